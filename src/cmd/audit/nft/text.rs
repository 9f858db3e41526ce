//! A ruleset file in nft's own syntax (`/etc/nftables.conf`, read offline), into the model of `super`.

use std::collections::HashMap;

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Str(String),
    Open,
    Close,
    Comma,
    Semi,
    Newline,
}

fn tokenize(text: &str) -> Vec<(Tok, usize)> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                out.push((Tok::Newline, line));
                line += 1;
            }
            c if c.is_whitespace() => {}
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
                line += 1;
            }
            '#' => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            '{' => out.push((Tok::Open, line)),
            '}' => out.push((Tok::Close, line)),
            ',' => out.push((Tok::Comma, line)),
            ';' => out.push((Tok::Semi, line)),
            '"' => {
                let mut s = String::new();
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                    if c == '\n' {
                        line += 1;
                    }
                    s.push(c);
                }
                out.push((Tok::Str(s), line));
            }
            c => {
                let mut w = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || matches!(n, '{' | '}' | ',' | ';' | '"' | '#') {
                        break;
                    }
                    w.push(n);
                    chars.next();
                }
                out.push((Tok::Word(w), line));
            }
        }
    }
    out
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    rs: Ruleset,
    sets: HashMap<(String, String, String), Vec<Elem>>,
}

/// Reads a ruleset file in nft's syntax (`table FAMILY NAME { chain NAME { ... } }` blocks, and
/// `add table|chain|rule` / `insert rule` commands). `include` and other commands are refused with
/// their line: the audit then says it could not read the ruleset rather than guess.
pub fn from_text(text: &str) -> Result<Ruleset, String> {
    let mut p = Parser {
        toks: tokenize(text),
        pos: 0,
        rs: Ruleset::default(),
        sets: HashMap::new(),
    };
    p.top()?;
    let sets = std::mem::take(&mut p.sets);
    resolve_sets(&mut p.rs, &sets);
    Ok(p.rs)
}

const VERDICT_WORDS: [&str; 8] = [
    "accept", "drop", "reject", "queue", "jump", "goto", "return", "continue",
];

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn line(&self) -> usize {
        self.toks
            .get(self.pos)
            .or(self.toks.last())
            .map(|(_, l)| *l)
            .unwrap_or(1)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|(t, _)| t.clone());
        self.pos += 1;
        t
    }

    fn word(&mut self) -> Result<String, String> {
        let line = self.line();
        match self.next() {
            Some(Tok::Word(w)) | Some(Tok::Str(w)) => Ok(w),
            other => Err(format!("line {line}: expected a name, found {other:?}")),
        }
    }

    fn expect_open(&mut self) -> Result<(), String> {
        let line = self.line();
        match self.next() {
            Some(Tok::Open) => Ok(()),
            other => Err(format!("line {line}: expected `{{`, found {other:?}")),
        }
    }

    fn skip_separators(&mut self) {
        while matches!(self.peek(), Some(Tok::Newline | Tok::Semi)) {
            self.pos += 1;
        }
    }

    /// The tokens up to the end of the statement (a newline or `;` outside braces).
    fn statement(&mut self) -> Vec<(Tok, usize)> {
        let mut depth = 0usize;
        let mut out = Vec::new();
        while let Some((t, l)) = self.toks.get(self.pos).cloned() {
            match t {
                Tok::Newline | Tok::Semi if depth == 0 => break,
                Tok::Close if depth == 0 => break,
                Tok::Newline => {}
                Tok::Open => {
                    depth += 1;
                    out.push((t, l));
                }
                Tok::Close => {
                    depth -= 1;
                    out.push((t, l));
                }
                _ => out.push((t, l)),
            }
            self.pos += 1;
        }
        out
    }

    /// Skips a `{ ... }` block (the opening brace is next).
    fn skip_block(&mut self) -> Result<(), String> {
        self.expect_open()?;
        let mut depth = 1;
        while depth > 0 {
            match self.next() {
                Some(Tok::Open) => depth += 1,
                Some(Tok::Close) => depth -= 1,
                Some(_) => {}
                None => return Err("unclosed `{` at the end of the file".into()),
            }
        }
        Ok(())
    }

    fn top(&mut self) -> Result<(), String> {
        loop {
            self.skip_separators();
            let line = self.line();
            let Some(tok) = self.next() else {
                return Ok(());
            };
            let Tok::Word(w) = tok else {
                return Err(format!("line {line}: unexpected {tok:?}"));
            };
            match w.as_str() {
                "flush" | "delete" | "destroy" | "reset" => {
                    self.statement();
                }
                "table" => {
                    let (family, name) = self.family_and_name()?;
                    self.expect_open()?;
                    self.table_body(&family, &name)?;
                }
                "add" | "create" | "insert" => {
                    let what = self.word()?;
                    match what.as_str() {
                        "table" => {
                            self.statement();
                        }
                        "chain" => {
                            let (family, table, name) = self.family_table_name()?;
                            let i = self.chain_index(&family, &table, &name);
                            if matches!(self.peek(), Some(Tok::Open)) {
                                self.pos += 1;
                                self.chain_body(i)?;
                            }
                        }
                        "rule" => {
                            let (family, table, name) = self.family_table_name()?;
                            let i = self.chain_index(&family, &table, &name);
                            let toks = self.statement();
                            let rule = rule_of(&toks, line);
                            let rules = &mut self.rs.chains[i].rules;
                            if w == "insert" {
                                rules.insert(0, rule);
                            } else {
                                rules.push(rule);
                            }
                        }
                        other => return Err(format!("line {line}: `{w} {other}` is not read by the audit")),
                    }
                }
                other => return Err(format!("line {line}: `{other}` is not read by the audit")),
            }
        }
    }

    /// `[FAMILY] NAME` (the family defaults to `ip`).
    fn family_and_name(&mut self) -> Result<(String, String), String> {
        let first = self.word()?;
        match self.peek() {
            Some(Tok::Word(_)) | Some(Tok::Str(_)) => Ok((first, self.word()?)),
            _ => Ok(("ip".to_string(), first)),
        }
    }

    /// `[FAMILY] TABLE CHAIN` of an `add chain` or `add rule` command.
    fn family_table_name(&mut self) -> Result<(String, String, String), String> {
        let a = self.word()?;
        let b = self.word()?;
        let families = ["ip", "ip6", "inet", "arp", "bridge", "netdev"];
        if families.contains(&a.as_str()) {
            if let Some(Tok::Word(_) | Tok::Str(_)) = self.peek() {
                // `add rule inet filter input ...` (the third word is the chain) unless the rule
                // starts right after two words: then `a` was the table of family ip.
                let c = self.word()?;
                return Ok((a, b, c));
            }
        }
        Ok(("ip".to_string(), a, b))
    }

    fn chain_index(&mut self, family: &str, table: &str, name: &str) -> usize {
        if let Some(i) = self
            .rs
            .chains
            .iter()
            .position(|c| c.family == family && c.table == table && c.name == name)
        {
            return i;
        }
        self.rs.chains.push(Chain {
            family: family.to_string(),
            table: table.to_string(),
            name: name.to_string(),
            base: None,
            rules: Vec::new(),
        });
        self.rs.chains.len() - 1
    }

    fn table_body(&mut self, family: &str, table: &str) -> Result<(), String> {
        loop {
            self.skip_separators();
            let line = self.line();
            match self.next() {
                Some(Tok::Close) => return Ok(()),
                Some(Tok::Word(w)) => match w.as_str() {
                    "chain" => {
                        let name = self.word()?;
                        let i = self.chain_index(family, table, &name);
                        self.expect_open()?;
                        self.chain_body(i)?;
                    }
                    "set" => {
                        let name = self.word()?;
                        let elems = self.set_body()?;
                        self.sets
                            .insert((family.to_string(), table.to_string(), name), elems);
                    }
                    "map" | "flowtable" | "counter" | "quota" | "ct" | "limit" | "secmark" | "synproxy" => {
                        // A named object: its name (and for `ct`, its kind), then its block.
                        while !matches!(self.peek(), Some(Tok::Open) | None) {
                            self.pos += 1;
                        }
                        self.skip_block()?;
                    }
                    "flags" | "comment" => {
                        self.statement();
                    }
                    other => {
                        return Err(format!(
                            "line {line}: `{other}` in a table is not read by the audit"
                        ))
                    }
                },
                None => return Err(format!("table {family} {table}: unclosed `{{`")),
                Some(t) => return Err(format!("line {line}: unexpected {t:?} in a table")),
            }
        }
    }

    /// A named set's block: its `elements = { ... }`, if any.
    fn set_body(&mut self) -> Result<Vec<Elem>, String> {
        self.expect_open()?;
        let mut elems = Vec::new();
        loop {
            self.skip_separators();
            match self.peek() {
                Some(Tok::Close) => {
                    self.pos += 1;
                    return Ok(elems);
                }
                None => return Err("unclosed set".into()),
                _ => {}
            }
            let toks = self.statement();
            if let Some((Tok::Word(w), _)) = toks.first() {
                if w == "elements" {
                    let mut i = 1;
                    if matches!(toks.get(1), Some((Tok::Word(eq), _)) if eq == "=") {
                        i = 2;
                    }
                    let (value, _) = value_of(&toks, i);
                    elems.extend(value);
                }
            }
        }
    }

    fn chain_body(&mut self, i: usize) -> Result<(), String> {
        loop {
            self.skip_separators();
            let line = self.line();
            match self.peek() {
                Some(Tok::Close) => {
                    self.pos += 1;
                    return Ok(());
                }
                None => return Err(format!("chain {}: unclosed `{{`", self.rs.chains[i].name)),
                _ => {}
            }
            let toks = self.statement();
            let first = match toks.first() {
                Some((Tok::Word(w), _)) => w.as_str(),
                _ => "",
            };
            match first {
                "type" => {
                    let words: Vec<String> = toks
                        .iter()
                        .filter_map(|(t, _)| match t {
                            Tok::Word(w) | Tok::Str(w) => Some(w.clone()),
                            _ => None,
                        })
                        .collect();
                    let at = |k: &str| words.iter().position(|w| w == k);
                    let hook = at("hook")
                        .and_then(|h| words.get(h + 1))
                        .cloned()
                        .unwrap_or_default();
                    let priority = at("priority").map(|p| priority(&words[p + 1..])).unwrap_or(0);
                    let accept = self.rs.chains[i].base.as_ref().is_none_or(|b| b.accept);
                    self.rs.chains[i].base = Some(BaseChain {
                        hook,
                        priority,
                        accept,
                    });
                }
                "policy" => {
                    let drop = matches!(toks.get(1), Some((Tok::Word(w), _)) if w == "drop");
                    match &mut self.rs.chains[i].base {
                        Some(b) => b.accept = !drop,
                        None => {
                            return Err(format!(
                                "line {line}: a policy before the chain's `type ... hook`"
                            ))
                        }
                    }
                }
                "comment" | "devices" | "flags" => {}
                _ if toks.is_empty() => {}
                _ => {
                    let rule = rule_of(&toks, line);
                    self.rs.chains[i].rules.push(rule);
                }
            }
        }
    }
}

/// `filter`, `raw`, `-150`, `filter + 10`...
fn priority(words: &[String]) -> i64 {
    let base = |w: &str| -> i64 {
        match w {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            n => n.parse().unwrap_or(0),
        }
    };
    let Some(first) = words.first() else {
        return 0;
    };
    let mut p = base(first);
    if let (Some(op), Some(n)) = (words.get(1), words.get(2).and_then(|n| n.parse::<i64>().ok())) {
        match op.as_str() {
            "+" => p += n,
            "-" => p -= n,
            _ => {}
        }
    }
    p
}

fn tok_text(toks: &[(Tok, usize)]) -> String {
    let mut s = String::new();
    for (t, _) in toks {
        let piece = match t {
            Tok::Word(w) => w.clone(),
            Tok::Str(w) => format!("\"{w}\""),
            Tok::Open => "{".into(),
            Tok::Close => "}".into(),
            Tok::Comma => ",".into(),
            Tok::Semi => ";".into(),
            Tok::Newline => continue,
        };
        if !s.is_empty() && !matches!(t, Tok::Comma) {
            s.push(' ');
        }
        s += &piece;
    }
    s
}

/// A condition's value from `toks[i..]`: one element, a comma list (`established,related`) or a
/// `{ ... }` set. Returns the elements and the index after them.
fn value_of(toks: &[(Tok, usize)], mut i: usize) -> (Vec<Elem>, usize) {
    let mut out = Vec::new();
    let elem = |t: &Tok| match t {
        Tok::Word(w) => elem_of_word(&w.to_ascii_lowercase()),
        Tok::Str(s) => Elem::Word(s.clone()),
        _ => Elem::Unknown,
    };
    match toks.get(i) {
        Some((Tok::Open, _)) => {
            i += 1;
            while let Some((t, _)) = toks.get(i) {
                i += 1;
                match t {
                    Tok::Close => break,
                    Tok::Comma => {}
                    // A nested set or a concatenation (`a . b`): not judged.
                    Tok::Open => out.push(Elem::Unknown),
                    Tok::Word(w) if w == "." || w == ":" => out.push(Elem::Unknown),
                    t => out.push(elem(t)),
                }
            }
        }
        Some((t, _)) => {
            out.push(elem(t));
            i += 1;
            while matches!(toks.get(i), Some((Tok::Comma, _))) {
                match toks.get(i + 1) {
                    Some((t @ (Tok::Word(_) | Tok::Str(_)), _)) => {
                        out.push(elem(t));
                        i += 2;
                    }
                    _ => break,
                }
            }
        }
        None => {}
    }
    (out, i)
}

/// One rule statement's conditions and verdict.
fn rule_of(toks: &[(Tok, usize)], line: usize) -> Rule {
    let mut rule = Rule {
        at: format!("line {line}"),
        conds: Vec::new(),
        verdict: None,
    };
    let word = |i: usize| match toks.get(i) {
        Some((Tok::Word(w), _)) => Some(w.as_str()),
        _ => None,
    };
    let mut i = 0;
    while i < toks.len() {
        let Some(w) = word(i) else {
            rule.conds.push(Cond {
                key: Key::Unknown,
                negated: false,
                value: Vec::new(),
                text: tok_text(&toks[i..]),
            });
            break;
        };
        let start = i;
        match w {
            "accept" => rule.verdict = Some(Verdict::Accept),
            "drop" => rule.verdict = Some(Verdict::Drop),
            "reject" | "queue" => {
                rule.verdict = Some(if w == "reject" {
                    Verdict::Drop
                } else {
                    Verdict::Accept
                });
                break; // `reject with ...`, `queue num ...`: the rest is options
            }
            "return" => rule.verdict = Some(Verdict::Return),
            "continue" => rule.verdict = Some(Verdict::Continue),
            "jump" | "goto" => {
                let target = word(i + 1).unwrap_or_default().to_string();
                rule.verdict = Some(if w == "jump" {
                    Verdict::Jump(target)
                } else {
                    Verdict::Goto(target)
                });
                i += 1;
            }
            "counter" => {
                while matches!(word(i + 1), Some("packets" | "bytes" | "name")) {
                    i += 2;
                }
            }
            "log" => {
                while matches!(
                    word(i + 1),
                    Some("prefix" | "level" | "group" | "snaplen" | "queue-threshold" | "flags")
                ) {
                    i += 2;
                    while matches!(toks.get(i + 1), Some((Tok::Comma, _))) {
                        i += 2;
                    }
                }
            }
            "comment" => i += 1,
            "notrack" => {}
            "limit" | "quota" => {
                while let Some(n) = word(i + 1) {
                    let part_of = matches!(
                        n,
                        "rate"
                            | "over"
                            | "until"
                            | "burst"
                            | "used"
                            | "packets"
                            | "bytes"
                            | "kbytes"
                            | "mbytes"
                    ) || n.contains('/')
                        || n.parse::<u64>().is_ok();
                    if !part_of {
                        break;
                    }
                    i += 1;
                }
                rule.conds.push(Cond {
                    key: Key::Rate,
                    negated: false,
                    value: Vec::new(),
                    text: tok_text(&toks[start..=i]),
                });
            }
            _ => {
                let one_word = matches!(w, "iif" | "iifname" | "oif" | "oifname");
                let second = if one_word { None } else { word(i + 1) };
                let known_prefix = one_word
                    || matches!(
                        w,
                        "meta"
                            | "ct"
                            | "ip"
                            | "ip6"
                            | "tcp"
                            | "udp"
                            | "udplite"
                            | "sctp"
                            | "dccp"
                            | "th"
                            | "icmp"
                            | "icmpv6"
                            | "igmp"
                            | "ah"
                            | "esp"
                            | "comp"
                            | "ether"
                            | "vlan"
                            | "arp"
                            | "fib"
                            | "socket"
                            | "rt"
                            | "ipsec"
                            | "osf"
                    );
                if !known_prefix {
                    // Not understood: keep it as a condition that may match, and find the verdict.
                    rule.conds.push(Cond {
                        key: Key::Unknown,
                        negated: false,
                        value: Vec::new(),
                        text: tok_text(&toks[i..]),
                    });
                    rule.verdict = trailing_verdict(toks);
                    break;
                }
                i += if one_word { 1 } else { 2 };
                // `meta mark set 1`, `ct mark set ...`: a statement, not a condition.
                if word(i) == Some("set") {
                    i += 1;
                    let (_, after) = value_of(toks, i);
                    i = after;
                    continue;
                }
                let mut key = if w == "fib" || w == "oif" || w == "oifname" {
                    Key::Unknown
                } else {
                    key_of(w, second)
                };
                // `ip saddr . tcp dport { ... }`: concatenations are not judged.
                while word(i) == Some(".") {
                    key = Key::Unknown;
                    i += 3;
                }
                if w == "fib" {
                    // `fib saddr . iif oif missing`, `fib daddr type local`, `fib daddr type { ... }`:
                    // inputs up to the result (`oif`, `oifname`, `type`), an operator, a value.
                    i = start + 1;
                    while let Some(n) = word(i) {
                        i += 1;
                        if matches!(n, "oif" | "oifname" | "type") || VERDICT_WORDS.contains(&n) {
                            break;
                        }
                    }
                    if matches!(word(i), Some("==" | "!=" | "eq" | "ne")) {
                        i += 1;
                    }
                    i = value_of(toks, i).1;
                    rule.conds.push(Cond {
                        key: Key::Unknown,
                        negated: false,
                        value: Vec::new(),
                        text: tok_text(&toks[start..i]),
                    });
                    continue;
                }
                let mut negated = false;
                match word(i) {
                    Some("==" | "eq") => i += 1,
                    Some("!=" | "ne") => {
                        negated = true;
                        i += 1;
                    }
                    Some("<" | ">" | "<=" | ">=" | "lt" | "gt" | "le" | "ge") => {
                        key = Key::Unknown;
                        i += 1;
                    }
                    _ => {}
                }
                let (mut value, after) = value_of(toks, i);
                i = after;
                // `tcp flags syn / syn,ack` and `ct state & (...)`: masks are not judged.
                if word(i) == Some("/") || word(i) == Some("&") {
                    key = Key::Unknown;
                    let (_, after) = value_of(toks, i + 1);
                    i = after;
                    value.clear();
                }
                rule.conds.push(Cond {
                    key,
                    negated,
                    value,
                    text: tok_text(&toks[start..i]),
                });
                continue;
            }
        }
        i += 1;
    }
    rule
}

/// The verdict at the end of a rule that was not understood: `... accept`, `... jump NAME`.
fn trailing_verdict(toks: &[(Tok, usize)]) -> Option<Verdict> {
    let words: Vec<&str> = toks
        .iter()
        .filter_map(|(t, _)| match t {
            Tok::Word(w) => Some(w.as_str()),
            _ => None,
        })
        .collect();
    for (i, w) in words.iter().enumerate().rev() {
        match *w {
            "accept" | "queue" => return Some(Verdict::Accept),
            "drop" | "reject" => return Some(Verdict::Drop),
            "return" => return Some(Verdict::Return),
            "jump" | "goto" => {
                let t = words.get(i + 1).unwrap_or(&"").to_string();
                return Some(if *w == "jump" {
                    Verdict::Jump(t)
                } else {
                    Verdict::Goto(t)
                });
            }
            _ => {}
        }
    }
    None
}
