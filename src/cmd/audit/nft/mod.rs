//! An nftables ruleset as practice 9 reads it: from `nft -j list ruleset` (JSON, the live host) or
//! from a ruleset file in nft's own syntax (what `/etc/nftables.conf` holds, read offline), into one
//! small model: chains (base chains with their hook, priority and policy), and rules as conditions
//! plus a verdict. Only what decides whether a packet is accepted is kept; a condition the model does
//! not understand is kept as [`Key::Unknown`], and the evaluation treats it conservatively
//! (`firewall.rs`). The two readers are `json.rs` and `text.rs`.

use std::collections::HashMap;
use std::net::IpAddr;

mod json;
mod text;

pub use json::from_json;
pub use text::from_text;

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

/// Replaces `@name` elements by the named set's elements (same family and table), where known
/// (for both readers).
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
