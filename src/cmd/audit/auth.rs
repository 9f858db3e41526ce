//! Practices 2 (username and password), 3 (an ACL file, deny by default), 4 (the most restrictive
//! permissions), 5 (no wildcards in publish rights) and 6 (unique client ids bound to the user,
//! strong passwords). The ACL is read with the ACL parser's public types (`Acl::rules`).

use super::{Audit, Status};
use crate::config::{AclSource, Config, Direction};
use crate::guard::acl::{Access, Acl, RuleKind};
use crate::guard::passwords::{assess_hash, HashAssessment};
use crate::topic;

/// One password file entry as the audit sees it: its line, its user (when the line has one) and
/// what its hash field is. Nothing of the hash or of a password is kept.
struct Entry {
    line: usize,
    user: Option<String>,
    assessment: HashAssessment,
}

/// Reads the password file's entries the way `PasswordFile::parse` splits them.
fn entries(text: &str) -> Vec<Entry> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                return None;
            }
            Some(match t.split_once(':') {
                Some((user, hash)) => Entry {
                    line: i + 1,
                    user: Some(user.trim().to_string()),
                    assessment: assess_hash(hash),
                },
                // No `:` at all: possibly a pasted password; nothing of it is shown.
                None => Entry {
                    line: i + 1,
                    user: None,
                    assessment: HashAssessment::Plaintext,
                },
            })
        })
        .collect()
}

fn who(e: &Entry) -> String {
    match &e.user {
        Some(u) => format!("line {} (user {u:?})", e.line),
        None => format!("line {} (not `user:hash`)", e.line),
    }
}

/// Practice 2: no anonymous access beyond loopback; a password file of salted hashes only.
pub(super) fn passwords(a: &mut Audit<'_>, c: &Config) {
    if c.auth.allow_anonymous {
        // `check` refuses allow_anonymous with any listener that is not loopback.
        a.push(
            2,
            Status::Pass,
            "auth.allow_anonymous",
            "anonymous clients on loopback only (every listener is loopback)",
        );
    } else {
        a.push(
            2,
            Status::Pass,
            "auth.allow_anonymous",
            "anonymous clients refused",
        );
    }
    let identity = c
        .listeners
        .iter()
        .any(|l| l.tls.as_ref().is_some_and(|t| t.use_identity_as_username));
    let Some(p) = &c.auth.password_file else {
        if identity {
            a.push(2, Status::Pass, "", "clients authenticate by certificate only");
        } else {
            a.push(
                2,
                Status::Warn,
                "auth",
                "no password_file: no device can log in with a password (create one with \
                 `mqtt-uplink passwd FILE USER` and set [auth] password_file)",
            );
        }
        return;
    };
    a.key_file(2, "auth.password_file", p);
    let Ok(text) = std::fs::read_to_string(p) else {
        return; // key_file reported it
    };
    let entries = entries(&text);
    let mut bad = 0;
    for e in &entries {
        let what = match e.assessment {
            HashAssessment::Plaintext => "a plaintext password",
            HashAssessment::Unsalted => "an unsalted hash",
            HashAssessment::Unsupported => "a hash format the appliance cannot read",
            HashAssessment::Strong | HashAssessment::Weak(_) => continue,
        };
        bad += 1;
        a.push(
            2,
            Status::Fail,
            "auth.password_file",
            format!(
                "{}: {}, {what}: set it with `mqtt-uplink passwd {} USER` (the appliance refuses to load this file)",
                p.display(),
                who(e),
                p.display()
            ),
        );
    }
    if bad == 0 {
        a.push(
            2,
            Status::Pass,
            "auth.password_file",
            format!(
                "{} user(s) in {}, every entry a salted hash (argon2id, $7$ or $6$)",
                entries.len(),
                p.display()
            ),
        );
    }
}

/// Practice 3: an ACL file; what it does not grant is refused.
pub(super) fn acl(a: &mut Audit<'_>, c: &Config) {
    match &c.auth.acl {
        AclSource::File(p) => a.push(
            3,
            Status::Pass,
            "auth.acl_file",
            format!("{} (deny by default)", p.display()),
        ),
        AclSource::DenyAll => a.push(3, Status::Warn, "auth", "no acl_file: everything is denied"),
        AclSource::AllowAll => a.push(3, Status::Fail, "", "allow-all ACL (embedded default)"),
    }
}

fn acl_of(c: &Config) -> Option<Acl> {
    match &c.auth.acl {
        AclSource::File(p) => Acl::load(p).ok(),
        _ => None,
    }
}

/// Practices 4 and 5: no rule reading or writing `#`, none granting more than the mappings and the
/// other clients need (each warned with its ACL line), and no unmarked wildcard in a write right.
pub(super) fn privilege(a: &mut Audit<'_>, c: &Config) {
    let acl_key = "auth.acl_file";
    for m in &c.mappings {
        if m.direction.goes_out() && m.topic == "#" && m.local_prefix.is_empty() {
            a.push(
                4,
                Status::Warn,
                &format!("map[{}].topic", m.index),
                "this mapping forwards every local topic (`#`) to the cloud",
            );
        }
    }
    let Some(acl) = acl_of(c) else {
        a.push(4, Status::Pass, "", "no ACL rules grant anything");
        a.push(5, Status::Pass, "", "no ACL rules grant anything");
        return;
    };
    let out_filters: Vec<String> = c
        .mappings
        .iter()
        .filter(|m| m.direction.goes_out())
        .map(|m| format!("{}{}", m.local_prefix, m.topic))
        .collect();
    let in_filters: Vec<String> = c
        .mappings
        .iter()
        .filter(|m| matches!(m.direction, Direction::In | Direction::Both))
        .map(|m| format!("{}{}", m.local_prefix, m.topic))
        .collect();
    // `%u`/`%c` make a pattern's filter concrete per client; for overlap tests a level wildcard
    // stands in for them.
    let generic = |f: &str| -> String {
        f.split('/')
            .map(|l| if l.contains('%') { "+" } else { l })
            .collect::<Vec<_>>()
            .join("/")
    };
    let rules = acl.rules();
    let mut wildcard_fail = false;
    let mut privilege_warned = false;
    for r in rules {
        let who = match &r.kind {
            RuleKind::Topic { user: Some(u) } => format!("user {u}"),
            RuleKind::Topic { user: None } => "anonymous clients".into(),
            RuleKind::Pattern => "every client (pattern)".into(),
        };
        let f = generic(&r.filter);
        if r.access != Access::Deny && r.filter == "#" {
            let what = match (r.access.grants_read(), r.access.grants_write()) {
                (true, true) => "read and write",
                (true, false) => "read",
                _ => "write",
            };
            privilege_warned = true;
            a.push(
                4,
                Status::Warn,
                acl_key,
                format!("acl line {}: {who} may {what} `#`, every topic", r.line),
            );
        }
        if r.access.grants_write() && (r.filter.contains('+') || r.filter.contains('#')) {
            if r.intended_wildcard_write {
                a.push(
                    5,
                    Status::Pass,
                    acl_key,
                    format!(
                        "acl line {}: wildcard write `{}` marked as intended",
                        r.line, r.filter
                    ),
                );
            } else {
                wildcard_fail = true;
                a.push(
                    5,
                    Status::Fail,
                    acl_key,
                    format!(
                        "acl line {}: {who} may publish to wildcard filter `{}` (mark it with \
                         `# mqtt-uplink: wildcard-write-intended` if meant)",
                        r.line, r.filter
                    ),
                );
            }
        }
        if r.access == Access::Deny || r.filter == "#" {
            continue;
        }
        let needed_by_write = r.access.grants_write()
            && (out_filters.iter().any(|o| topic::intersects(o, &f))
                || rules
                    .iter()
                    .any(|o| o.access.grants_read() && topic::intersects(&generic(&o.filter), &f)));
        let needed_by_read = r.access.grants_read()
            && (in_filters.iter().any(|o| topic::intersects(o, &f))
                || rules
                    .iter()
                    .any(|o| o.access.grants_write() && topic::intersects(&generic(&o.filter), &f)));
        if !needed_by_write && !needed_by_read {
            privilege_warned = true;
            a.push(
                4,
                Status::Warn,
                acl_key,
                format!(
                    "acl line {}: `{}` for {who} is needed by no mapping and no other client's rule",
                    r.line, r.filter
                ),
            );
        }
    }
    if !wildcard_fail {
        a.push(5, Status::Pass, acl_key, "no unmarked wildcard write rights");
    }
    if !privilege_warned && !a.has(4) {
        a.push(
            4,
            Status::Pass,
            acl_key,
            "no rule reads or writes `#`; every rule is used by a mapping or another client",
        );
    }
}

/// Practice 6: client ids bound to their user, duplicates handled, strong passwords (enforced by
/// `passwd`; weak hash parameters in an imported file are a warning).
pub(super) fn client_ids(a: &mut Audit<'_>, c: &Config) {
    match &c.auth.client_id_pattern {
        Some(p) if p.contains("%u") => a.push(
            6,
            Status::Pass,
            "auth.client_id_pattern",
            format!("client ids bound to their user by `{p}`"),
        ),
        Some(p) => a.push(
            6,
            Status::Warn,
            "auth.client_id_pattern",
            format!("`{p}` does not name the user (`%u`): any user may take another's client id"),
        ),
        None => a.push(
            6,
            Status::Warn,
            "auth",
            "no client_id_pattern: any user may take any client id; bind ids to users with \
             `client_id_pattern = \"%u-*\"` in [auth]",
        ),
    }
    a.push(
        6,
        Status::Pass,
        "auth.duplicate_client_id",
        format!(
            "a client id already connected: {}, logged with both peers",
            crate::cmd::check::duplicate_name(c.auth.duplicate_client_id)
        ),
    );
    let Some(p) = &c.auth.password_file else {
        return;
    };
    let Ok(text) = std::fs::read_to_string(p) else {
        return;
    };
    let weak: Vec<String> = entries(&text)
        .into_iter()
        .filter_map(|e| match &e.assessment {
            HashAssessment::Weak(why) => Some(format!("{}: {why}", who(&e))),
            _ => None,
        })
        .collect();
    if weak.is_empty() {
        a.push(
            6,
            Status::Pass,
            "auth.password_file",
            "strong hashes; `mqtt-uplink passwd` refuses weak passwords (12+ characters, not common, \
             not the username, mixed classes below 16)",
        );
    } else {
        a.push(
            6,
            Status::Warn,
            "auth.password_file",
            format!(
                "weak hash parameters in {} ({}): set these passwords again with `mqtt-uplink passwd`",
                p.display(),
                weak.join("; ")
            ),
        );
    }
}
