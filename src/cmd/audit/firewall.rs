//! Practice 9: behind a firewall. The host's nftables ruleset (`nft -j list ruleset`, or a ruleset
//! file given with `--nft-ruleset`) is asked one question per device port: would the input hook
//! accept a new TCP connection to it from an address of nobody's choosing? Warn when it would.
//!
//! The probe packet: TCP, the listener's port and address, connection state `new`, from an arbitrary
//! source address (covered by no condition but `0.0.0.0/0` / `::/0` or a negation), arriving on an
//! interface that is not `lo`. Every base chain on the input hook of the packet's families (`inet`
//! and `ip`, or `inet` and `ip6`) is walked in priority order, following `jump` and `goto`; the packet
//! passes when each of them accepts it. A rule that matches only some sources (`ip saddr { LAN }`,
//! `iifname "eth1"`) does not accept "from anywhere"; it is reported as the restriction in place. A
//! condition the audit cannot judge (`limit`, `fib`, a named set it does not know, ...) is assumed to
//! match in an accepting rule and not to match in a dropping one, so doubt leans to a warning.

use std::net::IpAddr;
use std::path::PathBuf;

use super::nft::{self, Chain, Cond, Elem, Fam, Key, Ruleset, Verdict};
use super::{Audit, Status};
use crate::config::Config;

/// Where the ruleset comes from.
#[derive(Debug, Clone)]
pub enum FirewallSource {
    /// This host's, from `nft -j list ruleset`.
    Live,
    /// A ruleset file: nft syntax (`/etc/nftables.conf`) or `nft -j list ruleset` output.
    File(PathBuf),
}

/// The connection attempt asked about.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub fam: Fam,
    pub port: u16,
    /// The listener's address; `None` when it binds every address.
    pub daddr: Option<IpAddr>,
}

/// Would the ruleset accept the probe, and why.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub accepted: bool,
    /// The rule or policy that decided (the last chain's, when all accepted).
    pub by: String,
    /// Accepting rules that matched only some sources: `line 13: ip saddr { ... }`.
    pub restricted: Vec<String>,
    /// Conditions the decision had to assume.
    pub assumed: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    Yes,
    No,
    Maybe,
}

enum End {
    Accept(String),
    Drop(String),
    /// Fell off the end of the chain, or `return`.
    Return,
}

const MAX_DEPTH: usize = 16;

/// Walks every input base chain of the probe's families.
pub fn evaluate(rs: &Ruleset, probe: &Probe) -> Evaluation {
    let fams: &[&str] = match probe.fam {
        Fam::V4 => &["inet", "ip"],
        Fam::V6 => &["inet", "ip6"],
    };
    let mut bases: Vec<&Chain> = rs
        .chains
        .iter()
        .filter(|c| fams.contains(&c.family.as_str()))
        .filter(|c| c.base.as_ref().is_some_and(|b| b.hook == "input"))
        .collect();
    bases.sort_by_key(|c| c.base.as_ref().map(|b| b.priority).unwrap_or(0));
    let mut ev = Evaluation {
        accepted: true,
        by: "no input chain in the ruleset: nothing filters inbound connections".into(),
        restricted: Vec::new(),
        assumed: Vec::new(),
    };
    for base in bases {
        let policy = base.base.as_ref().is_none_or(|b| b.accept);
        let name = format!("{} {} {}", base.family, base.table, base.name);
        match walk(rs, base, probe, &mut ev, 0) {
            End::Accept(by) => ev.by = by,
            End::Drop(by) => {
                ev.accepted = false;
                ev.by = by;
                return ev;
            }
            End::Return if policy => ev.by = format!("chain {name}: policy accept"),
            End::Return => {
                ev.accepted = false;
                ev.by = format!("chain {name}: policy drop");
                return ev;
            }
        }
    }
    ev
}

fn walk(rs: &Ruleset, chain: &Chain, probe: &Probe, ev: &mut Evaluation, depth: usize) -> End {
    if depth > MAX_DEPTH {
        ev.assumed.push(format!(
            "chain {}: jumps nested deeper than {MAX_DEPTH}, assumed to accept",
            chain.name
        ));
        return End::Accept(format!("chain {} (too deep to follow)", chain.name));
    }
    let target = |name: &str| {
        rs.chains
            .iter()
            .find(|c| c.family == chain.family && c.table == chain.table && c.name == name)
    };
    for rule in &chain.rules {
        let Some(verdict) = &rule.verdict else {
            continue;
        };
        let (m, source_only) = matches(&rule.conds, probe);
        let doubt = |ev: &mut Evaluation, what: &str| {
            let conds: Vec<&str> = rule
                .conds
                .iter()
                .filter(|c| judge(c, probe).0 == Tri::Maybe)
                .map(|c| c.text.as_str())
                .collect();
            ev.assumed
                .push(format!("{}: `{}` assumed {what}", rule.at, conds.join(" ")));
        };
        match verdict {
            Verdict::Accept => match m {
                Tri::Yes => return End::Accept(rule.at.clone()),
                Tri::Maybe => {
                    doubt(ev, "to match");
                    return End::Accept(rule.at.clone());
                }
                Tri::No if source_only => {
                    let only: Vec<&str> = rule
                        .conds
                        .iter()
                        .filter(|c| judge(c, probe) == (Tri::No, true))
                        .map(|c| c.text.as_str())
                        .collect();
                    ev.restricted.push(format!("{}: {}", rule.at, only.join(" ")));
                }
                Tri::No => {}
            },
            Verdict::Drop => match m {
                Tri::Yes => return End::Drop(rule.at.clone()),
                Tri::Maybe => doubt(ev, "not to match"),
                Tri::No => {}
            },
            Verdict::Return => {
                if m == Tri::Yes {
                    return End::Return;
                }
            }
            Verdict::Continue => {}
            Verdict::Jump(t) | Verdict::Goto(t) => {
                if m == Tri::No {
                    continue;
                }
                let Some(next) = target(t) else {
                    ev.assumed
                        .push(format!("{}: chain {t} not found, assumed to accept", rule.at));
                    return End::Accept(rule.at.clone());
                };
                match (walk(rs, next, probe, ev, depth + 1), m) {
                    (End::Accept(by), _) => return End::Accept(by),
                    (End::Drop(by), Tri::Yes) => return End::Drop(by),
                    (End::Drop(_), _) => doubt(ev, "not to match"),
                    (End::Return, Tri::Yes) if matches!(verdict, Verdict::Goto(_)) => return End::Return,
                    (End::Return, _) => {}
                }
            }
        }
    }
    End::Return
}

/// Do all conditions hold? The second value: every condition that fails is a source restriction.
fn matches(conds: &[Cond], probe: &Probe) -> (Tri, bool) {
    let mut result = Tri::Yes;
    let mut source_only = true;
    for c in conds {
        let (t, source) = judge(c, probe);
        match t {
            Tri::No => {
                result = Tri::No;
                source_only &= source;
            }
            Tri::Maybe if result == Tri::Yes => result = Tri::Maybe,
            _ => {}
        }
    }
    (result, source_only && result == Tri::No)
}

fn known(value: &[Elem]) -> bool {
    !value.iter().any(|e| matches!(e, Elem::Unknown | Elem::SetRef(_)))
}

/// One condition against the probe; the second value: a failure because of the source (address or
/// input interface), i.e. a restriction.
fn judge(c: &Cond, probe: &Probe) -> (Tri, bool) {
    let flip = |t: bool| if t != c.negated { Tri::Yes } else { Tri::No };
    let has_word = |w: &str| c.value.iter().any(|e| matches!(e, Elem::Word(x) if x == w));
    match &c.key {
        Key::InputInterface => {
            // The probe does not come in on `lo`; whatever interface a rule names, an arbitrary
            // source may come in elsewhere: a positive match restricts, a negation holds.
            if c.negated {
                (Tri::Yes, false)
            } else {
                let lo = c.value.iter().all(|e| matches!(e, Elem::Word(w) if w == "lo"));
                (Tri::No, !lo)
            }
        }
        Key::CtState if known(&c.value) => (flip(has_word("new")), false),
        Key::Saddr(f) if *f != probe.fam => (Tri::No, false),
        Key::Saddr(_) if known(&c.value) => {
            let everything = c.value.iter().any(|e| matches!(e, Elem::Net(_, 0)));
            let t = flip(everything);
            (t, t == Tri::No)
        }
        Key::Daddr(f) if *f != probe.fam => (Tri::No, false),
        Key::Daddr(_) => match probe.daddr {
            Some(ip) if known(&c.value) => (
                flip(
                    c.value
                        .iter()
                        .any(|e| matches!(e, Elem::Net(n, len) if in_net(ip, *n, *len))),
                ),
                false,
            ),
            _ => (Tri::Maybe, false),
        },
        Key::L4proto(Some(f)) if *f != probe.fam => (Tri::No, false),
        Key::L4proto(_) if known(&c.value) => {
            (flip(has_word("tcp") || c.value.contains(&Elem::Num(6))), false)
        }
        Key::Nfproto if known(&c.value) => (
            flip(has_word(match probe.fam {
                Fam::V4 => "ipv4",
                Fam::V6 => "ipv6",
            })),
            false,
        ),
        Key::Dport(Some(p)) if p != "tcp" => (Tri::No, false),
        Key::Dport(_) => {
            let mut unknown = false;
            let hit = c.value.iter().any(|e| match e {
                Elem::Num(n) => *n == u64::from(probe.port),
                Elem::Range(a, b) => (*a..=*b).contains(&u64::from(probe.port)),
                Elem::Word(w) => match service_port(w) {
                    Some(p) => p == probe.port,
                    None => {
                        unknown = true;
                        false
                    }
                },
                _ => {
                    unknown = true;
                    false
                }
            });
            if unknown && !hit {
                (Tri::Maybe, false)
            } else {
                (flip(hit), false)
            }
        }
        Key::Header(p) => match (p.as_str(), probe.fam) {
            ("tcp" | "th", _) => (Tri::Maybe, false),
            ("ip", Fam::V6) | ("ip6", Fam::V4) => (Tri::No, false),
            ("ip" | "ip6", _) => (Tri::Maybe, false),
            _ => (Tri::No, false), // udp, icmp, icmpv6, sctp...: not a TCP packet
        },
        _ => (Tri::Maybe, false),
    }
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Service names nft may print or a file may use instead of numbers (`/etc/services`).
fn service_port(name: &str) -> Option<u16> {
    Some(match name {
        "ssh" => 22,
        "http" => 80,
        "https" => 443,
        "mqtt" => 1883,
        "secure-mqtt" | "mqtts" | "ibm-mqisdp" => 8883,
        "domain" => 53,
        "ntp" => 123,
        _ => return None,
    })
}

/// Reads the ruleset from its source; `Err` says why it could not be read.
fn read(source: &FirewallSource) -> Result<(Ruleset, String), String> {
    match source {
        FirewallSource::File(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            let parsed = if text.trim_start().starts_with('{') {
                nft::from_json(&text)
            } else {
                nft::from_text(&text)
            };
            let rs = parsed.map_err(|e| format!("cannot read the ruleset in {}: {e}", p.display()))?;
            Ok((rs, format!("the ruleset in {}", p.display())))
        }
        FirewallSource::Live => {
            let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or(
                    "cannot check the host firewall: nft is not installed (iptables-legacy rules are \
                     not read); give a ruleset file with --nft-ruleset FILE",
                )?;
            let out = std::process::Command::new(&nft)
                .args(["-j", "list", "ruleset"])
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                return Err(format!(
                    "cannot read the host firewall: `nft -j list ruleset` failed ({}); it needs root or \
                     CAP_NET_ADMIN: run audit as root, or give a ruleset file with --nft-ruleset FILE",
                    err.lines().next().unwrap_or("no message").trim()
                ));
            }
            let rs = nft::from_json(&String::from_utf8_lossy(&out.stdout))
                .map_err(|e| format!("cannot read the output of `nft -j list ruleset`: {e}"))?;
            Ok((rs, "this host's ruleset (nft -j list ruleset)".to_string()))
        }
    }
}

pub(super) fn firewall(a: &mut Audit<'_>, c: &Config, source: &FirewallSource) {
    let exposed: Vec<(usize, std::net::SocketAddr)> = c
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.bind.ip().is_loopback())
        .map(|(i, l)| (i, l.bind))
        .collect();
    if exposed.is_empty() {
        a.push(
            9,
            Status::Pass,
            "",
            "no device listener beyond loopback: no port for a firewall to guard",
        );
        return;
    }
    let (rs, what) = match read(source) {
        Ok(r) => r,
        Err(why) => {
            a.push(9, Status::Warn, "", why);
            return;
        }
    };
    for (i, bind) in exposed {
        let key = format!("listener[{i}].bind");
        let ip = bind.ip();
        let fams: Vec<Fam> = match ip {
            IpAddr::V4(_) => vec![Fam::V4],
            // `[::]` also takes IPv4 (IPV6_V6ONLY is off on Linux by default).
            IpAddr::V6(v6) if v6.is_unspecified() => vec![Fam::V6, Fam::V4],
            IpAddr::V6(_) => vec![Fam::V6],
        };
        for fam in fams {
            let probe = Probe {
                fam,
                port: bind.port(),
                daddr: (!ip.is_unspecified()).then_some(ip),
            };
            let ev = evaluate(&rs, &probe);
            let family = match fam {
                Fam::V4 => "IPv4",
                Fam::V6 => "IPv6",
            };
            let assumed = if ev.assumed.is_empty() {
                String::new()
            } else {
                format!(" (assumed: {})", ev.assumed.join("; "))
            };
            if ev.accepted {
                a.push(
                    9,
                    Status::Warn,
                    &key,
                    format!(
                        "{bind}: {what} accepts new {family} connections to tcp/{} from any address ({}){assumed}: \
                         accept the device port from the site's networks only",
                        bind.port(),
                        ev.by
                    ),
                );
            } else if ev.restricted.is_empty() {
                a.push(
                    9,
                    Status::Pass,
                    &key,
                    format!(
                        "{bind}: {what} accepts no new {family} connection to tcp/{} from outside ({}){assumed}",
                        bind.port(),
                        ev.by
                    ),
                );
            } else {
                a.push(
                    9,
                    Status::Pass,
                    &key,
                    format!(
                        "{bind}: {what} accepts {family} tcp/{} only from {}; everything else: {}{assumed}",
                        bind.port(),
                        ev.restricted.join(", "),
                        ev.by
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(port: u16) -> Probe {
        Probe {
            fam: Fam::V4,
            port,
            daddr: Some("192.168.10.1".parse().unwrap()),
        }
    }

    fn eval(text: &str, p: Probe) -> Evaluation {
        evaluate(&nft::from_text(text).unwrap(), &p)
    }

    const CLOSED: &str = "table inet filter {\n chain input {\n  type filter hook input priority filter; policy drop;\n  iif \"lo\" accept\n  ct state established,related accept\n  ip saddr { 10.0.0.0/8, 192.168.0.0/16 } tcp dport { 8883, 22 } accept\n  ip6 saddr fc00::/7 tcp dport 8883 accept\n }\n}\n";

    #[test]
    fn a_lan_only_rule_restricts_and_the_drop_policy_decides() {
        let ev = eval(CLOSED, probe(8883));
        assert!(!ev.accepted, "{ev:?}");
        assert_eq!(ev.by, "chain inet filter input: policy drop");
        assert_eq!(ev.restricted.len(), 1, "{ev:?}");
        assert!(
            ev.restricted[0].starts_with("line 6: ip saddr { 10.0.0.0/8, 192.168.0.0/16 }"),
            "{ev:?}"
        );
        // Another port is not even restricted: just dropped.
        let ev = eval(CLOSED, probe(1883));
        assert!(!ev.accepted && ev.restricted.is_empty(), "{ev:?}");
        // IPv6: the ip6 rule is the restriction, the ip one does not apply.
        let ev = eval(
            CLOSED,
            Probe {
                fam: Fam::V6,
                port: 8883,
                daddr: None,
            },
        );
        assert!(!ev.accepted && ev.restricted.len() == 1, "{ev:?}");
        assert!(ev.restricted[0].contains("ip6 saddr"), "{ev:?}");
    }

    #[test]
    fn open_rulesets_accept_from_anywhere() {
        // No ruleset at all.
        let ev = evaluate(&Ruleset::default(), &probe(8883));
        assert!(ev.accepted && ev.by.contains("no input chain"), "{ev:?}");
        // An accept policy.
        let ev = eval(
            "table ip f {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 22 drop\n }\n}\n",
            probe(8883),
        );
        assert!(ev.accepted && ev.by.contains("policy accept"), "{ev:?}");
        // A rule for the port without a source condition.
        let ev = eval(
            &CLOSED.replace(
                "  iif \"lo\" accept\n",
                "  iif \"lo\" accept\n  tcp dport 8883 accept\n",
            ),
            probe(8883),
        );
        assert!(ev.accepted && ev.by == "line 5", "{ev:?}");
        // A negated source: everyone but 10/8.
        let ev = eval(
            &CLOSED.replace(
                "  iif \"lo\" accept\n",
                "  ip saddr != 10.0.0.0/8 tcp dport 8000-9000 accept\n",
            ),
            probe(8883),
        );
        assert!(ev.accepted && ev.by == "line 4", "{ev:?}");
    }

    #[test]
    fn jumps_other_tables_and_doubt() {
        // A jump to a chain that accepts.
        let text = "table inet f {\n chain input {\n  type filter hook input priority 0; policy drop;\n  tcp dport 8883 jump devices\n }\n chain devices {\n  counter accept\n }\n}\n";
        let ev = eval(text, probe(8883));
        assert!(ev.accepted && ev.by == "line 7", "{ev:?}");
        // The same, with a second base chain (another table) that drops: dropped.
        let two = format!("{text}table ip g {{\n chain in {{\n  type filter hook input priority 10; policy drop;\n }}\n}}\n");
        let ev = eval(&two, probe(8883));
        assert!(!ev.accepted && ev.by.contains("ip g in: policy drop"), "{ev:?}");
        // A rate-limited accept may accept: doubt leans to the warning, and says so.
        let ev = eval(
            &CLOSED.replace(
                "  iif \"lo\" accept\n",
                "  tcp dport 8883 limit rate 10/second accept\n",
            ),
            probe(8883),
        );
        assert!(ev.accepted, "{ev:?}");
        assert!(ev.assumed[0].contains("limit rate 10/second"), "{ev:?}");
        // A rate-limited drop may not drop: the policy decides.
        let ev = eval(
            "table ip f {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 8883 limit rate over 1/second drop\n }\n}\n",
            probe(8883),
        );
        assert!(ev.accepted && ev.assumed.len() == 1, "{ev:?}");
        // An interface restriction is a restriction; a daddr on another address does not apply.
        let ev = eval(
            &CLOSED.replace(
                "  iif \"lo\" accept\n",
                "  iifname \"eth1\" tcp dport 8883 accept\n  ip daddr 10.9.9.9 tcp dport 8883 accept\n",
            ),
            probe(8883),
        );
        assert!(!ev.accepted, "{ev:?}");
        assert!(ev.restricted[0].contains("iifname \"eth1\""), "{ev:?}");
    }
}
