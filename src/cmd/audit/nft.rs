//! An nftables ruleset as practice 9 reads it: from `nft -j list ruleset` (JSON, the live host) or
//! from a ruleset file in nft's own syntax (what `/etc/nftables.conf` holds, read offline), into one
//! small model: chains (base chains with their hook, priority and policy), and rules as conditions
//! plus a verdict. Only what decides whether a packet is accepted is kept; a condition the model does
//! not understand is kept as [`Key::Unknown`], and the evaluation treats it conservatively
//! (`firewall.rs`).

use std::collections::HashMap;
use std::net::IpAddr;

/// A whole ruleset: every chain of every table.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone)]
pub struct Chain {
    pub family: String,
    pub table: String,
    pub name: String,
    /// Set for base chains (those attached to a hook).
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct BaseChain {
    pub hook: String,
    pub priority: i64,
    /// The chain's policy: accept (nftables' default) or drop.
    pub accept: bool,
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Where the rule is, for the report: `line 12` (a file) or `inet filter input, handle 7` (JSON).
    pub at: String,
    pub conds: Vec<Cond>,
    pub verdict: Option<Verdict>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// `drop` and `reject`.
    Drop,
    Jump(String),
    Goto(String),
    Return,
    Continue,
}

/// One condition of a rule: `key [!=] value`.
#[derive(Debug, Clone)]
pub struct Cond {
    pub key: Key,
    pub negated: bool,
    pub value: Vec<Elem>,
    /// The condition as written (a file) or as nft would print it (JSON), for the report.
    pub text: String,
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `iif`, `iifname` (also under `meta`).
    InputInterface,
    /// `ct state`.
    CtState,
    /// `ip saddr` / `ip6 saddr`.
    Saddr(Fam),
    /// `ip daddr` / `ip6 daddr`.
    Daddr(Fam),
    /// `meta l4proto` (no family), `ip protocol` (IPv4), `ip6 nexthdr` (IPv6).
    L4proto(Option<Fam>),
    /// `meta nfproto`.
    Nfproto,
    /// `tcp dport`, `udp dport`, ... ; `None` for `th dport` (any transport header).
    Dport(Option<String>),
    /// Any other field of a protocol header (`tcp flags`, `udp sport`, `icmp type`, `ip ttl`...):
    /// the protocol it implies.
    Header(String),
    /// `limit`, `quota`: match some packets, not others.
    Rate,
    /// Anything else: may or may not match.
    Unknown,
}

/// One element of a condition's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elem {
    /// A name: an interface, a ct state, a protocol, a service (lowercase except interfaces).
    Word(String),
    Num(u64),
    Range(u64, u64),
    /// An address with its prefix length (a bare address: full length).
    Net(IpAddr, u8),
    /// `@name`, a named set not resolved.
    SetRef(String),
    /// A variable, an address range, a concatenation...: not judged.
    Unknown,
}

fn elem_of_word(w: &str) -> Elem {
    if let Some(name) = w.strip_prefix('@') {
        return Elem::SetRef(name.to_string());
    }
    if w.starts_with('$') {
        return Elem::Unknown;
    }
    if let Ok(ip) = w.parse::<IpAddr>() {
        return Elem::Net(ip, if ip.is_ipv4() { 32 } else { 128 });
    }
    if let Some((addr, len)) = w.split_once('/') {
        if let (Ok(ip), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u8>()) {
            return Elem::Net(ip, len);
        }
        return Elem::Unknown;
    }
    if let Some(n) = number(w) {
        return Elem::Num(n);
    }
    if let Some((a, b)) = w.split_once('-') {
        if let (Some(a), Some(b)) = (number(a), number(b)) {
            return Elem::Range(a, b);
        }
        if a.parse::<IpAddr>().is_ok() {
            return Elem::Unknown;
        }
    }
    Elem::Word(w.to_string())
}

fn number(w: &str) -> Option<u64> {
    match w.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => w.parse().ok(),
    }
}

/// The key of `left.right` (`ip saddr`, `meta l4proto`, `ct state`...), or of a one-word key.
fn key_of(first: &str, second: Option<&str>) -> Key {
    match (first, second) {
        ("iif" | "iifname", None) | ("meta", Some("iif" | "iifname")) => Key::InputInterface,
        ("ct", Some("state")) => Key::CtState,
        ("ip", Some("saddr")) => Key::Saddr(Fam::V4),
        ("ip6", Some("saddr")) => Key::Saddr(Fam::V6),
        ("ip", Some("daddr")) => Key::Daddr(Fam::V4),
        ("ip6", Some("daddr")) => Key::Daddr(Fam::V6),
        ("meta", Some("l4proto")) => Key::L4proto(None),
        ("ip", Some("protocol")) => Key::L4proto(Some(Fam::V4)),
        ("ip6", Some("nexthdr")) => Key::L4proto(Some(Fam::V6)),
        ("meta", Some("nfproto")) => Key::Nfproto,
        ("th", Some("dport")) => Key::Dport(None),
        ("tcp" | "udp" | "udplite" | "sctp" | "dccp", Some("dport")) => Key::Dport(Some(first.to_string())),
        (
            "ip" | "ip6" | "tcp" | "udp" | "udplite" | "sctp" | "dccp" | "icmp" | "icmpv6" | "igmp" | "ah"
            | "esp" | "comp" | "th",
            Some(_),
        ) => Key::Header(first.to_string()),
        _ => Key::Unknown,
    }
}

// ---------------------------------------------------------------------------------------------
// JSON: `nft -j list ruleset`

/// Reads the output of `nft -j list ruleset`.
pub fn from_json(text: &str) -> Result<Ruleset, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no `nftables` array")?;
    let mut rs = Ruleset::default();
    let mut sets: HashMap<(String, String, String), Vec<Elem>> = HashMap::new();
    let s = |o: &serde_json::Value, k: &str| o.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    for item in items {
        if let Some(c) = item.get("chain") {
            let base = c.get("hook").and_then(|h| h.as_str()).map(|hook| BaseChain {
                hook: hook.to_string(),
                priority: c.get("prio").and_then(|p| p.as_i64()).unwrap_or(0),
                accept: c.get("policy").and_then(|p| p.as_str()) != Some("drop"),
            });
            rs.chains.push(Chain {
                family: s(c, "family"),
                table: s(c, "table"),
                name: s(c, "name"),
                base,
                rules: Vec::new(),
            });
        } else if let Some(set) = item.get("set") {
            let mut elems = Vec::new();
            if let Some(e) = set.get("elem") {
                json_elems(e, &mut elems);
            }
            sets.insert((s(set, "family"), s(set, "table"), s(set, "name")), elems);
        } else if let Some(r) = item.get("rule") {
            let (family, table, chain) = (s(r, "family"), s(r, "table"), s(r, "chain"));
            let handle = r.get("handle").and_then(|h| h.as_i64()).unwrap_or(-1);
            let mut rule = Rule {
                at: format!("{family} {table} {chain}, handle {handle}"),
                conds: Vec::new(),
                verdict: None,
            };
            for stmt in r.get("expr").and_then(|e| e.as_array()).into_iter().flatten() {
                json_stmt(stmt, &mut rule);
            }
            match rs
                .chains
                .iter_mut()
                .find(|c| c.family == family && c.table == table && c.name == chain)
            {
                Some(c) => c.rules.push(rule),
                None => {
                    return Err(format!(
                        "a rule for chain {family} {table} {chain}, which is not listed"
                    ))
                }
            }
        }
    }
    resolve_sets(&mut rs, &sets);
    Ok(rs)
}

fn json_stmt(stmt: &serde_json::Value, rule: &mut Rule) {
    let Some((name, body)) = stmt.as_object().and_then(|o| o.iter().next()) else {
        return;
    };
    let target = || {
        body.get("target")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string()
    };
    match name.as_str() {
        "accept" => rule.verdict = Some(Verdict::Accept),
        "drop" | "reject" => rule.verdict = Some(Verdict::Drop),
        // The packet goes to a user-space program that decides: it may be accepted.
        "queue" => rule.verdict = Some(Verdict::Accept),
        "jump" => rule.verdict = Some(Verdict::Jump(target())),
        "goto" => rule.verdict = Some(Verdict::Goto(target())),
        "return" => rule.verdict = Some(Verdict::Return),
        "continue" => rule.verdict = Some(Verdict::Continue),
        // Statements with an effect but no say over the verdict.
        "counter" | "log" | "notrack" | "mangle" | "set" | "meta" | "ct" | "comment" => {}
        "limit" | "quota" => rule.conds.push(Cond {
            key: Key::Rate,
            negated: false,
            value: Vec::new(),
            text: name.clone(),
        }),
        "match" => {
            let op = body.get("op").and_then(|o| o.as_str()).unwrap_or("==");
            let left = body.get("left").cloned().unwrap_or_default();
            let key = json_key(&left);
            let mut value = Vec::new();
            if let Some(r) = body.get("right") {
                json_elems(r, &mut value);
            }
            let shown = if op == "!=" { " != " } else { " " };
            let text = format!("{}{shown}{}", json_key_text(&left), elems_text(&value));
            let (key, negated) = match op {
                "==" | "in" | "eq" => (key, false),
                "!=" | "ne" => (key, true),
                _ => (Key::Unknown, false),
            };
            rule.conds.push(Cond {
                key,
                negated,
                value,
                text,
            });
        }
        other => rule.conds.push(Cond {
            key: Key::Unknown,
            negated: false,
            value: Vec::new(),
            text: other.to_string(),
        }),
    }
}

/// Elements as nft prints them: one as itself, several as `{ a, b }`.
fn elems_text(value: &[Elem]) -> String {
    let one = |e: &Elem| match e {
        Elem::Word(w) => w.clone(),
        Elem::Num(n) => n.to_string(),
        Elem::Range(a, b) => format!("{a}-{b}"),
        Elem::Net(ip, len) if (ip.is_ipv4() && *len == 32) || *len == 128 => ip.to_string(),
        Elem::Net(ip, len) => format!("{ip}/{len}"),
        Elem::SetRef(name) => format!("@{name}"),
        Elem::Unknown => "?".to_string(),
    };
    match value {
        [e] => one(e),
        _ => format!("{{ {} }}", value.iter().map(one).collect::<Vec<_>>().join(", ")),
    }
}

fn json_key(left: &serde_json::Value) -> Key {
    let str_at = |a: &str, b: &str| left.get(a).and_then(|x| x.get(b)).and_then(|x| x.as_str());
    if let Some(k) = str_at("meta", "key") {
        return key_of("meta", Some(k));
    }
    if let Some(k) = str_at("ct", "key") {
        return key_of("ct", Some(k));
    }
    if let (Some(p), Some(f)) = (str_at("payload", "protocol"), str_at("payload", "field")) {
        return key_of(p, Some(f));
    }
    Key::Unknown
}

fn json_key_text(left: &serde_json::Value) -> String {
    let str_at = |a: &str, b: &str| left.get(a).and_then(|x| x.get(b)).and_then(|x| x.as_str());
    if let Some(k) = str_at("meta", "key") {
        return format!("meta {k}");
    }
    if let Some(k) = str_at("ct", "key") {
        return format!("ct {k}");
    }
    if let (Some(p), Some(f)) = (str_at("payload", "protocol"), str_at("payload", "field")) {
        return format!("{p} {f}");
    }
    left.to_string()
}

fn json_elems(v: &serde_json::Value, out: &mut Vec<Elem>) {
    match v {
        serde_json::Value::String(s) => out.push(elem_of_word(s)),
        serde_json::Value::Number(n) => out.push(n.as_u64().map(Elem::Num).unwrap_or(Elem::Unknown)),
        serde_json::Value::Array(items) => items.iter().for_each(|i| json_elems(i, out)),
        serde_json::Value::Object(o) => {
            if let Some(s) = o.get("set") {
                json_elems(s, out);
            } else if let Some(e) = o.get("elem") {
                json_elems(e.get("val").unwrap_or(e), out);
            } else if let Some(p) = o.get("prefix") {
                let addr = p
                    .get("addr")
                    .and_then(|a| a.as_str())
                    .and_then(|a| a.parse().ok());
                let len = p
                    .get("len")
                    .and_then(|l| l.as_u64())
                    .and_then(|l| u8::try_from(l).ok());
                out.push(match (addr, len) {
                    (Some(a), Some(l)) => Elem::Net(a, l),
                    _ => Elem::Unknown,
                });
            } else if let Some(r) = o.get("range").and_then(|r| r.as_array()) {
                out.push(
                    match (
                        r.first().and_then(|a| a.as_u64()),
                        r.get(1).and_then(|b| b.as_u64()),
                    ) {
                        (Some(a), Some(b)) => Elem::Range(a, b),
                        _ => Elem::Unknown,
                    },
                );
            } else {
                out.push(Elem::Unknown);
            }
        }
        _ => out.push(Elem::Unknown),
    }
}

/// Replaces `@name` elements by the named set's elements (same family and table), where known.
fn resolve_sets(rs: &mut Ruleset, sets: &HashMap<(String, String, String), Vec<Elem>>) {
    for chain in &mut rs.chains {
        for rule in &mut chain.rules {
            for cond in &mut rule.conds {
                let mut value = Vec::new();
                for e in cond.value.drain(..) {
                    match &e {
                        Elem::SetRef(name) => {
                            match sets.get(&(chain.family.clone(), chain.table.clone(), name.clone())) {
                                Some(elems) => value.extend(elems.iter().cloned()),
                                None => value.push(e),
                            }
                        }
                        _ => value.push(e),
                    }
                }
                cond.value = value;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// nft's own syntax: a ruleset file

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

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE_LIKE: &str = r#"#!/usr/sbin/nft -f
flush ruleset
table inet filter {
	set lan4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/8,
		192.168.0.0/16 } }
	chain input {
		type filter hook input priority filter; policy drop;
		iif "lo" accept
		ct state established,related accept
		ct state invalid drop
		meta l4proto 58 accept  # ICMPv6
		icmp type { echo-request, destination-unreachable } accept
		ip saddr @lan4 tcp dport { 8883, 22 } accept
		ip6 saddr { fc00::/7, fe80::/10 } tcp dport { 8883,22 } accept
		limit rate 6/minute burst 10 packets log prefix "drop: " level info
	}
	chain output {
		type filter hook output priority filter; policy accept;
	}
}
"#;

    #[test]
    fn a_ruleset_file_is_read_into_chains_rules_and_conditions() {
        let rs = from_text(IMAGE_LIKE).unwrap();
        let input = rs.chains.iter().find(|c| c.name == "input").unwrap();
        let base = input.base.as_ref().unwrap();
        assert_eq!(
            (base.hook.as_str(), base.priority, base.accept),
            ("input", 0, false)
        );
        assert_eq!(input.rules.len(), 8, "{:#?}", input.rules);
        let r = &input.rules[0];
        assert_eq!(r.at, "line 8");
        assert_eq!(r.conds[0].key, Key::InputInterface);
        assert_eq!(r.conds[0].value, vec![Elem::Word("lo".into())]);
        assert_eq!(r.verdict, Some(Verdict::Accept));
        let ct = &input.rules[1].conds[0];
        assert_eq!(ct.key, Key::CtState);
        assert_eq!(
            ct.value,
            vec![Elem::Word("established".into()), Elem::Word("related".into())]
        );
        // The named set is resolved; the port set is read.
        let lan = &input.rules[5];
        assert_eq!(lan.at, "line 13");
        assert_eq!(lan.conds[0].key, Key::Saddr(Fam::V4));
        assert_eq!(lan.conds[0].value.len(), 2, "{:?}", lan.conds[0]);
        assert_eq!(lan.conds[1].key, Key::Dport(Some("tcp".into())));
        assert_eq!(lan.conds[1].value, vec![Elem::Num(8883), Elem::Num(22)]);
        // The log rule has a rate condition and no verdict.
        let log = &input.rules[7];
        assert_eq!(log.conds.len(), 1);
        assert_eq!(log.conds[0].key, Key::Rate);
        assert_eq!(log.verdict, None);
        let out = rs.chains.iter().find(|c| c.name == "output").unwrap();
        assert!(out.base.as_ref().unwrap().accept);
    }

    #[test]
    fn add_and_insert_commands_and_unreadable_files() {
        let rs = from_text(
            "add table inet f\nadd chain inet f input { type filter hook input priority -10 ; policy drop ; }\n\
             add rule inet f input tcp dport != 22 counter jump other\ninsert rule inet f input iifname lo accept\n",
        )
        .unwrap();
        let c = &rs.chains[0];
        assert_eq!(c.base.as_ref().unwrap().priority, -10);
        assert_eq!(c.rules[0].verdict, Some(Verdict::Accept));
        assert_eq!(c.rules[1].verdict, Some(Verdict::Jump("other".into())));
        assert!(c.rules[1].conds[0].negated);
        let e = from_text("table inet f {\n}\ninclude \"/etc/more.nft\"\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("include"), "{e}");
    }

    #[test]
    fn not_understood_conditions_are_kept_as_unknown() {
        let rs = from_text(
            "table ip t {\n chain c {\n  type filter hook input priority 0;\n  fib daddr type local tcp dport 1883 accept\n  tcp flags syn / syn,ack drop\n  frobnicate 7 accept\n }\n}\n",
        )
        .unwrap();
        let rules = &rs.chains[0].rules;
        assert_eq!(rules[0].conds[0].key, Key::Unknown);
        assert_eq!(rules[0].conds[1].key, Key::Dport(Some("tcp".into())));
        assert_eq!(rules[0].verdict, Some(Verdict::Accept));
        assert_eq!(rules[1].conds[0].key, Key::Unknown);
        assert_eq!(rules[1].verdict, Some(Verdict::Drop));
        assert_eq!(rules[2].conds[0].key, Key::Unknown);
        assert_eq!(rules[2].verdict, Some(Verdict::Accept));
    }

    #[test]
    fn nft_json_is_read_into_the_same_model() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "inet", "name": "filter", "handle": 1}},
          {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
          {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]}},
          {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 5, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
          {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 9, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [22, 8883]}}}, {"accept": null}]}},
          {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 10, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"range": [1000, 2000]}}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}}}, {"jump": {"target": "foo"}}]}},
          {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 11, "expr": [{"limit": {"rate": 6, "burst": 10, "per": "minute"}}, {"log": {"prefix": "drop: "}}]}}
        ]}"#;
        let rs = from_json(json).unwrap();
        let c = &rs.chains[0];
        assert!(!c.base.as_ref().unwrap().accept);
        assert_eq!(c.rules.len(), 5);
        assert_eq!(c.rules[0].at, "inet filter input, handle 4");
        assert_eq!(
            c.rules[2].conds[0].value,
            vec![Elem::Net("10.0.0.0".parse().unwrap(), 8)]
        );
        assert_eq!(c.rules[2].conds[1].value, vec![Elem::Num(22), Elem::Num(8883)]);
        assert_eq!(c.rules[3].conds[0].value, vec![Elem::Range(1000, 2000)]);
        assert!(c.rules[3].conds[1].negated);
        assert_eq!(c.rules[3].verdict, Some(Verdict::Jump("foo".into())));
        assert_eq!(c.rules[4].conds[0].key, Key::Rate);
        assert!(from_json("{}").is_err());
    }
}
