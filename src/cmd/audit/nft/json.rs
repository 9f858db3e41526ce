//! The live host's ruleset as `nft -j list ruleset` prints it (JSON), into the model of `super`.

use std::collections::HashMap;

use super::*;

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
