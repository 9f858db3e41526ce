//! Access control lists in mosquitto's `acl_file` syntax, evaluated deny-by-default.
//!
//! This module owns parsing the ACL file and the three decisions the broker asks for:
//! may this client publish to a topic, subscribe to a filter, receive a message on a topic.
//!
//! Syntax (as mosquitto 2.0):
//! - `user USERNAME` starts a section whose `topic` lines apply to that user only;
//! - `topic [read|write|readwrite|deny] FILTER` (access defaults to `readwrite`); `topic`
//!   lines before the first `user` line apply to anonymous clients only;
//! - `pattern [read|write|readwrite|deny] FILTER` applies to every client, with `%u` replaced
//!   by the username and `%c` by the client id;
//! - blank lines and `#` comment lines are ignored, lines are trimmed.
//!
//! mqtt-uplink extension (a comment, so mosquitto ignores it): the line
//! `# mqtt-uplink: wildcard-write-intended` marks the next rule as an intended wildcard write,
//! recorded in [`Rule::intended_wildcard_write`] for audits.
//!
//! Evaluation: a request is allowed iff some applicable granting rule matches it and no
//! applicable `deny` rule does; rule order does not matter and `deny` always wins.
//!
//! Subscriptions follow mosquitto: a filter is refused only when no topic it can match is
//! readable; otherwise it is admitted, and when it can also match topics that are not readable
//! (it overlaps a `deny`, or reaches beyond the read grants) each message is checked against the
//! subscriber's read rights at delivery ([`Subscription::Checked`]). A filter that every read right
//! covers whole ([`Subscription::Whole`]) needs no check at delivery.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::topic;

/// The comment text (after `#`, trimmed) that marks the next rule as an intended wildcard write.
pub const WILDCARD_WRITE_MARKER: &str = "mqtt-uplink: wildcard-write-intended";

/// [`Decision::reason`] when no rule grants the request.
pub const REASON_DEFAULT_DENY: &str = "no matching rule (deny by default)";
/// [`Decision::reason`] when a `deny` rule matched.
pub const REASON_DENIED: &str = "denied by rule";
/// [`Decision::reason`] when a granting rule matched and no `deny` rule did.
pub const REASON_ALLOWED: &str = "allowed by rule";
/// [`Decision::reason`] when the PUBLISH or delivery topic is not a valid topic name.
pub const REASON_INVALID_TOPIC: &str = "invalid topic name";
/// [`Decision::reason`] when the SUBSCRIBE filter is not a valid topic filter.
pub const REASON_INVALID_FILTER: &str = "invalid topic filter";
/// [`Decision::reason`] when a subscription is admitted but only some of its topics are readable.
pub const REASON_PARTLY_READABLE: &str = "allowed by rule, some topics checked at delivery";

/// How many steps the search for a readable topic may take before it gives up and admits the
/// subscription with a check at delivery (safe: every message is then checked).
const READABLE_SEARCH_BUDGET: usize = 20_000;

/// The ACL's answer to a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// No topic the filter can match is readable: SUBACK 0x80 (MQTT 5: 0x87).
    Refused(Decision),
    /// Every topic the filter can match is readable: admitted, nothing to check at delivery.
    Whole(Decision),
    /// Some topics are readable and some are not: admitted, and every message is checked against
    /// the subscriber's read rights at delivery.
    Checked(Decision),
}

impl Subscription {
    /// The decision behind the answer (`allowed` unless refused).
    pub fn decision(self) -> Decision {
        match self {
            Subscription::Refused(d) | Subscription::Whole(d) | Subscription::Checked(d) => d,
        }
    }

    /// Is the subscription admitted (whole or checked)?
    pub fn admitted(self) -> bool {
        !matches!(self, Subscription::Refused(_))
    }

    /// Must each message be checked at delivery?
    pub fn checked(self) -> bool {
        matches!(self, Subscription::Checked(_))
    }
}

/// What a rule grants (or, for `Deny`, forbids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe and receive.
    Read,
    /// Publish.
    Write,
    /// Both read and write.
    ReadWrite,
    /// Explicitly forbids reading and writing; overrides any grant.
    Deny,
}

impl Access {
    /// True for `Read` and `ReadWrite`.
    pub fn grants_read(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    /// True for `Write` and `ReadWrite`.
    pub fn grants_write(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }

    fn from_keyword(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }
}

/// Whom a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleKind {
    /// A `topic` line: `user: None` for the anonymous section (before any `user` line),
    /// otherwise the user of the enclosing section.
    Topic {
        /// The section's username; `None` means anonymous clients only.
        user: Option<String>,
    },
    /// A `pattern` line: every client, after `%u`/`%c` substitution.
    Pattern,
}

/// One `topic` or `pattern` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// 1-based line number in the ACL file (0 for built-in rules).
    pub line: usize,
    /// Whom the rule applies to.
    pub kind: RuleKind,
    /// What it grants or denies.
    pub access: Access,
    /// The topic filter as written (patterns still contain `%u`/`%c`).
    pub filter: String,
    /// Preceded by the `# mqtt-uplink: wildcard-write-intended` marker.
    pub intended_wildcard_write: bool,
}

/// One problem on one line of an ACL file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct AclLineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Failure to load an ACL file from disk.
#[derive(Debug, Error)]
pub enum AclFileError {
    /// The file could not be read.
    #[error("cannot read ACL file {}: {source}", .path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but some lines are invalid.
    #[error("invalid ACL file {}: {}", .path.display(), join_errors(.errors))]
    Invalid {
        /// The file that was parsed.
        path: PathBuf,
        /// Every invalid line, in file order.
        errors: Vec<AclLineError>,
    },
}

fn join_errors(errors: &[AclLineError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The outcome of an ACL check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The line of the rule that decided, if a rule did (0 for built-in rules).
    pub line: Option<usize>,
    /// Why, as one of the `REASON_*` constants.
    pub reason: &'static str,
}

impl Decision {
    fn allow(line: usize) -> Decision {
        Decision {
            allowed: true,
            line: Some(line),
            reason: REASON_ALLOWED,
        }
    }

    fn deny(line: usize) -> Decision {
        Decision {
            allowed: false,
            line: Some(line),
            reason: REASON_DENIED,
        }
    }

    fn refuse(reason: &'static str) -> Decision {
        Decision {
            allowed: false,
            line: None,
            reason,
        }
    }
}

/// How a rule applies to one client.
enum Applied<'a> {
    /// Not at all.
    No,
    /// With this (substituted) filter.
    Filter(Cow<'a, str>),
    /// A `deny` pattern that could not be substituted safely: it denies everything, so that
    /// an odd username can never switch a denial off.
    DenyAll,
}

/// Is this comment text (after the `#`) the wildcard-write marker? Whitespace is normalised so
/// that `#mqtt-uplink:  wildcard-write-intended` is not silently ignored.
fn is_marker(comment: &str) -> bool {
    comment
        .split_whitespace()
        .eq(WILDCARD_WRITE_MARKER.split_whitespace())
}

/// Substitutes `%u` and `%c` in a single left-to-right pass (a value containing `%c` is not
/// substituted again). Returns `None` when a needed value is missing or unsafe.
///
/// A value is unsafe when it is empty or contains `+`, `#`, `/` or NUL: it would add
/// wildcards or levels, widening the filter beyond "this client's own subtree", or (empty)
/// collide with other clients' empty values. A substitution that makes a filter start with `$`
/// when the pattern did not is refused too, since it would reach `$SYS`-like topics that
/// wildcards deliberately never match.
fn substitute(pattern: &str, user: Option<&str>, client_id: &str) -> Option<String> {
    fn safe(v: &str) -> Option<&str> {
        (!v.is_empty() && !v.contains(['+', '#', '/', '\0'])).then_some(v)
    }
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('u') {
            out.push_str(safe(user?)?);
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('c') {
            out.push_str(safe(client_id)?);
            rest = tail;
        } else {
            out.push('%');
            rest = after;
        }
    }
    out.push_str(rest);
    if out.starts_with('$') && !pattern.starts_with('$') {
        return None;
    }
    Some(out)
}

/// Replaces placeholders with a dummy level, to validate a pattern's shape at parse time.
fn substitute_dummy(pattern: &str) -> String {
    substitute(pattern, Some("x"), "x").unwrap_or_else(|| pattern.to_owned())
}

/// A parsed ACL. The empty ACL denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    /// Parses an ACL file's text, collecting every invalid line.
    ///
    /// Stricter than mosquitto in two places, both to refuse likely mistakes: an access keyword
    /// with no filter (`topic deny`, which mosquitto reads as readwrite access to the topic
    /// `deny`) is an error, and so is a misplaced wildcard-write marker (one not followed by a
    /// `topic`/`pattern` line granting write access).
    pub fn parse(text: &str) -> Result<Acl, Vec<AclLineError>> {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        let mut section: Option<String> = None;
        // Line of a marker waiting for its rule.
        let mut marker: Option<usize> = None;
        let misplaced_marker = |line| AclLineError {
            line,
            message: "wildcard-write marker must be followed by a `topic` or `pattern` line".to_owned(),
        };

        // A UTF-8 byte order mark is not whitespace, so trimming would not remove it.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let l = raw.trim();
            if l.is_empty() {
                continue;
            }
            if let Some(comment) = l.strip_prefix('#') {
                if is_marker(comment) {
                    if let Some(prev) = marker.replace(line) {
                        errors.push(misplaced_marker(prev));
                    }
                }
                continue;
            }
            let (keyword, rest) = match l.split_once(char::is_whitespace) {
                Some((k, r)) => (k, r.trim()),
                None => (l, ""),
            };
            match keyword {
                "user" => {
                    if let Some(prev) = marker.take() {
                        errors.push(misplaced_marker(prev));
                    }
                    if rest.is_empty() {
                        errors.push(AclLineError {
                            line,
                            message: "`user` needs a username".to_owned(),
                        });
                    }
                    section = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let marked = marker.take().is_some();
                    let kind = if keyword == "topic" {
                        RuleKind::Topic {
                            user: section.clone(),
                        }
                    } else {
                        RuleKind::Pattern
                    };
                    match parse_rule(rest, kind, line, marked) {
                        Ok(rule) => rules.push(rule),
                        Err(message) => errors.push(AclLineError { line, message }),
                    }
                }
                other => errors.push(AclLineError {
                    line,
                    message: format!(
                        "unknown keyword `{}` (expected `user`, `topic` or `pattern`)",
                        other.chars().take(32).collect::<String>()
                    ),
                }),
            }
        }
        if let Some(prev) = marker {
            errors.push(misplaced_marker(prev));
        }
        errors.sort_by_key(|e| e.line);
        if errors.is_empty() {
            Ok(Acl { rules })
        } else {
            Err(errors)
        }
    }

    /// Reads and parses the ACL file at `path`.
    pub fn load(path: &Path) -> Result<Acl, AclFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Acl::parse(&text).map_err(|errors| AclFileError::Invalid {
            path: path.to_owned(),
            errors,
        })
    }

    /// An ACL granting every client read and write on every topic not starting with `$`
    /// (one built-in `pattern readwrite #` rule, line 0). Meant only for the built-in
    /// loopback-only default configuration.
    pub fn allow_all() -> Acl {
        Acl {
            rules: vec![Rule {
                line: 0,
                kind: RuleKind::Pattern,
                access: Access::ReadWrite,
                filter: "#".to_owned(),
                intended_wildcard_write: true,
            }],
        }
    }

    /// The rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// May this client PUBLISH to `topic`?
    ///
    /// Allowed iff an applicable `write`/`readwrite` rule matches the topic and no applicable
    /// `deny` rule does.
    pub fn check_publish(&self, user: Option<&str>, client_id: &str, topic: &str) -> Decision {
        if topic::validate_name(topic).is_err() {
            return Decision::refuse(REASON_INVALID_TOPIC);
        }
        self.decide(
            user,
            client_id,
            Access::grants_write,
            |f| topic::matches(f, topic),
            |f| topic::matches(f, topic),
        )
    }

    /// May this client SUBSCRIBE to `filter`? (`allowed`: admitted, whole or checked at
    /// delivery; see [`Acl::subscription`].)
    pub fn check_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> Decision {
        self.subscription(user, client_id, filter).decision()
    }

    /// This client's SUBSCRIBE to `filter`: refused, admitted whole, or admitted with each message
    /// checked at delivery. For a shared subscription `$share/GROUP/F` the inner filter `F` is
    /// checked.
    ///
    /// - Whole: an applicable `read`/`readwrite` rule's filter covers the whole requested filter
    ///   (see [`topic::covers`]) and no applicable `deny` rule's filter intersects it.
    /// - Refused: no topic name matched by the filter is readable (matched by a read rule and by
    ///   no deny rule; [`topic::exists_name`]), or the filter is invalid.
    /// - Checked: otherwise (also when the search for a readable topic runs out of steps).
    pub fn subscription(&self, user: Option<&str>, client_id: &str, filter: &str) -> Subscription {
        let inner = topic::strip_shared(filter).map_or(filter, |(_, f)| f);
        if topic::validate_filter(inner).is_err() {
            return Subscription::Refused(Decision::refuse(REASON_INVALID_FILTER));
        }
        let whole = self.decide(
            user,
            client_id,
            Access::grants_read,
            |f| topic::covers(f, inner),
            |f| topic::intersects(f, inner),
        );
        if whole.allowed {
            return Subscription::Whole(whole);
        }
        // Some readable topic? The read grants and the deny rules as they apply to this client.
        let mut grants: Vec<(usize, Cow<'_, str>)> = Vec::new();
        let mut denies: Vec<(usize, Cow<'_, str>)> = Vec::new();
        for rule in &self.rules {
            let is_deny = rule.access == Access::Deny;
            if !is_deny && !rule.access.grants_read() {
                continue;
            }
            match applied(rule, user, client_id) {
                Applied::No => {}
                // Denies everything: nothing is readable.
                Applied::DenyAll => return Subscription::Refused(Decision::deny(rule.line)),
                Applied::Filter(f) if is_deny => denies.push((rule.line, f)),
                Applied::Filter(f) => grants.push((rule.line, f)),
            }
        }
        let none_of: Vec<&str> = denies.iter().map(|(_, f)| f.as_ref()).collect();
        let mut refused = Decision::refuse(REASON_DEFAULT_DENY);
        for (line, grant) in &grants {
            if !topic::intersects(grant, inner) {
                continue;
            }
            match topic::exists_name(&[inner, grant], &none_of, READABLE_SEARCH_BUDGET) {
                Some(false) => {
                    // Readable through this grant, but denied whole: name a deny that overlaps.
                    if let Some((l, _)) = denies.iter().find(|(_, d)| topic::intersects(d, inner)) {
                        refused = Decision::deny(*l);
                    }
                }
                Some(true) | None => {
                    return Subscription::Checked(Decision {
                        allowed: true,
                        line: Some(*line),
                        reason: REASON_PARTLY_READABLE,
                    })
                }
            }
        }
        Subscription::Refused(refused)
    }

    /// May this client receive a message published on `topic` (delivery-time read check)?
    pub fn check_receive(&self, user: Option<&str>, client_id: &str, topic: &str) -> Decision {
        if topic::validate_name(topic).is_err() {
            return Decision::refuse(REASON_INVALID_TOPIC);
        }
        self.decide(
            user,
            client_id,
            Access::grants_read,
            |f| topic::matches(f, topic),
            |f| topic::matches(f, topic),
        )
    }

    /// Shared evaluation: any applicable deny rule hit decides; otherwise the first granting
    /// rule that allows decides; otherwise deny by default.
    fn decide(
        &self,
        user: Option<&str>,
        client_id: &str,
        grants: fn(Access) -> bool,
        allows: impl Fn(&str) -> bool,
        denies: impl Fn(&str) -> bool,
    ) -> Decision {
        let mut granted: Option<usize> = None;
        for rule in &self.rules {
            let is_deny = rule.access == Access::Deny;
            if !is_deny && (granted.is_some() || !grants(rule.access)) {
                continue;
            }
            match applied(rule, user, client_id) {
                Applied::No => {}
                Applied::DenyAll => return Decision::deny(rule.line),
                Applied::Filter(f) if is_deny => {
                    if denies(&f) {
                        return Decision::deny(rule.line);
                    }
                }
                Applied::Filter(f) => {
                    if allows(&f) {
                        granted = Some(rule.line);
                    }
                }
            }
        }
        granted.map_or(Decision::refuse(REASON_DEFAULT_DENY), Decision::allow)
    }
}

/// How `rule` applies to the client (`user`, `client_id`).
///
/// A `topic` rule applies to its section's user (anonymous section: clients without a
/// username). A `pattern` applies to everyone, except that a pattern using `%u` does not apply
/// to a client without a username (as in mosquitto). When a username or client id is unsafe
/// to substitute (see [`substitute`]), a granting pattern does not apply and a `deny` pattern
/// denies everything.
fn applied<'a>(rule: &'a Rule, user: Option<&str>, client_id: &str) -> Applied<'a> {
    match &rule.kind {
        RuleKind::Topic { user: section } => {
            if section.as_deref() == user {
                Applied::Filter(Cow::Borrowed(&rule.filter))
            } else {
                Applied::No
            }
        }
        RuleKind::Pattern => {
            if user.is_none() && rule.filter.contains("%u") {
                return Applied::No;
            }
            match substitute(&rule.filter, user, client_id) {
                Some(f) if f == rule.filter => Applied::Filter(Cow::Borrowed(&rule.filter)),
                Some(f) => Applied::Filter(Cow::Owned(f)),
                None if rule.access == Access::Deny => Applied::DenyAll,
                None => Applied::No,
            }
        }
    }
}

/// Parses what follows `topic`/`pattern`: `[ACCESS] FILTER`.
fn parse_rule(rest: &str, kind: RuleKind, line: usize, marked: bool) -> Result<Rule, String> {
    if rest.is_empty() {
        return Err("missing topic filter".to_owned());
    }
    let (access, filter) = match rest.split_once(char::is_whitespace) {
        Some((word, filter)) => {
            let access = Access::from_keyword(word).ok_or_else(|| {
                format!(
                    "invalid access type `{}` (expected read, write, readwrite or deny)",
                    word.chars().take(32).collect::<String>()
                )
            })?;
            (access, filter.trim())
        }
        None => {
            if Access::from_keyword(rest).is_some() {
                return Err(format!("missing topic filter after `{rest}`"));
            }
            (Access::ReadWrite, rest)
        }
    };
    let checked = match kind {
        RuleKind::Pattern => topic::validate_filter(&substitute_dummy(filter)),
        RuleKind::Topic { .. } => topic::validate_filter(filter),
    };
    checked.map_err(|e| format!("invalid topic filter: {e}"))?;
    if marked && !access.grants_write() {
        return Err("wildcard-write marker on a rule that grants no write access".to_owned());
    }
    Ok(Rule {
        line,
        kind,
        access,
        filter: filter.to_owned(),
        intended_wildcard_write: marked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn pubs(a: &Acl, u: Option<&str>, t: &str) -> bool {
        a.check_publish(u, "cid", t).allowed
    }

    fn subs(a: &Acl, u: Option<&str>, f: &str) -> bool {
        a.check_subscribe(u, "cid", f).allowed
    }

    fn recv(a: &Acl, u: Option<&str>, t: &str) -> bool {
        a.check_receive(u, "cid", t).allowed
    }

    /// `W`hole, `C`hecked at delivery or `R`efused.
    fn kind(a: &Acl, u: Option<&str>, f: &str) -> char {
        match a.subscription(u, "cid", f) {
            Subscription::Whole(_) => 'W',
            Subscription::Checked(_) => 'C',
            Subscription::Refused(_) => 'R',
        }
    }

    #[test]
    fn empty_acl_denies_everything() {
        let a = acl("");
        for u in [None, Some("alice")] {
            assert_eq!(
                a.check_publish(u, "c", "a"),
                Decision::refuse(REASON_DEFAULT_DENY)
            );
            assert!(!subs(&a, u, "#"));
            assert!(!recv(&a, u, "a"));
        }
        let comments = acl("# only comments\n\n   \n");
        assert!(comments.rules().is_empty());
        assert!(!pubs(&comments, None, "a"));
    }

    #[test]
    fn anonymous_and_user_sections() {
        let a = acl("topic read public/#\nuser alice\ntopic alice/#\nuser bob\ntopic write bob/out\n");
        assert_eq!(a.rules().len(), 3);
        assert_eq!(a.rules()[0].kind, RuleKind::Topic { user: None });
        assert_eq!(a.rules()[1].access, Access::ReadWrite);
        // Anonymous: only the first section.
        assert!(subs(&a, None, "public/#"));
        assert!(!pubs(&a, None, "public/x"));
        assert!(!subs(&a, None, "alice/#"));
        // Users do not inherit the anonymous section.
        assert!(!subs(&a, Some("alice"), "public/#"));
        assert!(subs(&a, Some("alice"), "alice/#"));
        assert!(pubs(&a, Some("alice"), "alice/x/y"));
        assert!(!pubs(&a, Some("bob"), "alice/x"));
        assert!(pubs(&a, Some("bob"), "bob/out"));
        assert!(!subs(&a, Some("bob"), "bob/out"));
        assert!(!recv(&a, Some("bob"), "bob/out"));
        assert!(!pubs(&a, Some("carol"), "alice/x"));
        assert_eq!(a.check_publish(Some("alice"), "c", "alice/x").line, Some(3));
        assert_eq!(
            a.check_publish(Some("alice"), "c", "alice/x").reason,
            REASON_ALLOWED
        );
    }

    #[test]
    fn patterns_substitute_user_and_client_id() {
        let a = acl("pattern readwrite devices/%c/#\npattern read users/%u/inbox\npattern write x/%u-%c\n");
        assert!(pubs(&a, None, "devices/cid/state"));
        assert!(!pubs(&a, None, "devices/other/state"));
        assert!(subs(&a, Some("al"), "users/al/inbox"));
        assert!(
            !subs(&a, None, "users/%u/inbox"),
            "%u never matches literally for anonymous"
        );
        assert!(!subs(&a, Some("al"), "users/bo/inbox"));
        assert!(pubs(&a, Some("al"), "x/al-cid"));
        assert!(!pubs(&a, None, "x/-cid"));
        // A value containing a placeholder is not substituted again.
        assert!(pubs(&a, Some("%c"), "x/%c-cid"));
    }

    #[test]
    fn read_and_write_are_separate() {
        let a = acl("user u\ntopic read r/#\ntopic write w/#\n");
        assert!(subs(&a, Some("u"), "r/#") && recv(&a, Some("u"), "r/x") && !pubs(&a, Some("u"), "r/x"));
        assert!(pubs(&a, Some("u"), "w/x") && !subs(&a, Some("u"), "w/#") && !recv(&a, Some("u"), "w/x"));
    }

    #[test]
    fn deny_wins_regardless_of_order() {
        let a = acl("user u\ntopic readwrite #\ntopic deny secret/#\ntopic deny a/+/private\n");
        assert!(pubs(&a, Some("u"), "open"));
        let d = a.check_publish(Some("u"), "c", "secret/x");
        assert_eq!(
            d,
            Decision {
                allowed: false,
                line: Some(3),
                reason: REASON_DENIED
            }
        );
        assert!(!recv(&a, Some("u"), "secret"));
        assert!(!recv(&a, Some("u"), "a/b/private"));
        assert!(recv(&a, Some("u"), "a/b/public"));
        // Subscriptions overlapping a denied subtree are admitted and checked at delivery (as
        // mosquitto); those inside it are refused; the rest need no check.
        assert_eq!(kind(&a, Some("u"), "#"), 'C');
        assert_eq!(kind(&a, Some("u"), "+/#"), 'C');
        assert_eq!(kind(&a, Some("u"), "a/+/+"), 'C');
        assert_eq!(kind(&a, Some("u"), "secret/+"), 'R');
        assert_eq!(kind(&a, Some("u"), "secret/#"), 'R');
        assert_eq!(kind(&a, Some("u"), "a/x/private"), 'R');
        assert_eq!(kind(&a, Some("u"), "a/+/public"), 'W');
        assert_eq!(kind(&a, Some("u"), "open/#"), 'W');
        let refused = a.check_subscribe(Some("u"), "c", "secret/#");
        assert_eq!((refused.line, refused.reason), (Some(3), REASON_DENIED));
        let checked = a.check_subscribe(Some("u"), "c", "#");
        assert_eq!(
            (checked.allowed, checked.line, checked.reason),
            (true, Some(2), REASON_PARTLY_READABLE)
        );
        let reversed = acl("user u\ntopic deny secret/#\ntopic readwrite #\n");
        assert!(!pubs(&reversed, Some("u"), "secret/x"));
    }

    #[test]
    fn dollar_topics_need_explicit_rules() {
        let a = acl("topic read #\ntopic write #\n");
        assert!(!subs(&a, None, "$SYS/#"));
        assert!(!recv(&a, None, "$SYS/broker/uptime"));
        assert!(!pubs(&a, None, "$SYS/x"));
        assert!(subs(&a, None, "+/#"));
        let b = acl("topic read $SYS/broker/#\n");
        assert!(subs(&b, None, "$SYS/broker/+"));
        // Reaches beyond the grant: admitted, checked at delivery.
        assert_eq!(kind(&b, None, "$SYS/#"), 'C');
        assert_eq!(kind(&b, None, "$SYS/other/#"), 'R');
        // `#` never matches `$` topics, so a `$SYS` grant makes no `#` subscription readable.
        assert_eq!(kind(&b, None, "#"), 'R');
        assert_eq!(kind(&b, None, "+/broker/#"), 'R');
        let all = Acl::allow_all();
        assert!(pubs(&all, None, "a/b") && subs(&all, Some("x"), "#") && recv(&all, Some("y"), "z"));
        assert!(!subs(&all, None, "$SYS/#") && !pubs(&all, None, "$SYS/x"));
        assert_eq!(all.check_publish(None, "c", "a").line, Some(0));
    }

    #[test]
    fn subscription_bypass_attempts() {
        let a = acl("user u\ntopic read data/#\npattern read own/%u/#\n");
        let u = Some("u");
        assert!(subs(&a, u, "data/#"));
        assert!(subs(&a, u, "data/+/x"));
        assert!(subs(&a, u, "data"));
        assert!(subs(&a, u, "$share/g/data/#"));
        for bad in [
            "$SYS/#",
            "da+",
            "data/#/x",
            "",
            "other/#",
            "$share/g/other/#",
            "own/x/#",
        ] {
            assert_eq!(kind(&a, u, bad), 'R', "{bad}");
        }
        // Wider than the grants: admitted, each message checked at delivery (the inner filter of a
        // shared subscription likewise).
        for wide in ["#", "+/#", "$share/g/#", "$share/g/+/x", "own/+/#"] {
            assert_eq!(kind(&a, u, wide), 'C', "{wide}");
        }
        // `+` can match `data` (granted by `data/#`, which matches its parent).
        assert_eq!(kind(&a, u, "+"), 'C');
        // A malformed share is taken literally, so it needs a rule for the literal `$share`.
        assert!(!subs(&a, u, "$share/#"));
        assert_eq!(
            a.check_subscribe(u, "c", "data/#/x").reason,
            REASON_INVALID_FILTER
        );
        assert_eq!(a.check_publish(u, "c", "data/+").reason, REASON_INVALID_TOPIC);
    }

    #[test]
    fn injection_via_username_or_client_id() {
        let a = acl("pattern readwrite users/%u/#\npattern readwrite dev/%c\n");
        assert!(pubs(&a, Some("a"), "users/a/x"));
        for evil in ["a/#", "#", "+", "a/b", "", "x\0"] {
            assert!(!subs(&a, Some(evil), "users/#"), "{evil:?}");
            assert!(!subs(&a, Some(evil), "users/a/#"), "{evil:?}");
            assert!(!pubs(&a, Some(evil), "users/a/b/c"), "{evil:?}");
            assert!(!a.check_publish(None, evil, "dev/x").allowed, "{evil:?}");
        }
        // Cannot turn a pattern into a `$` filter either.
        let d = acl("pattern read %u/#\n");
        assert!(!subs(&d, Some("$SYS"), "$SYS/#"));
        assert!(subs(&d, Some("bob"), "bob/#"));
        // Deny patterns fail closed: an unsafe value denies everything.
        let e = acl("user a/b\ntopic readwrite #\npattern deny %u/private/#\n");
        assert!(!pubs(&e, Some("a/b"), "a/b/private/x"));
        assert!(!pubs(&e, Some("a/b"), "anything"));
        assert_eq!(kind(&e, Some("a/b"), "#"), 'R');
        assert_eq!(kind(&e, Some("a/b"), "anything"), 'R');
        let f = acl("user ab\ntopic readwrite #\npattern deny %u/private/#\n");
        assert!(pubs(&f, Some("ab"), "anything") && !pubs(&f, Some("ab"), "ab/private/x"));
    }

    #[test]
    fn parse_errors_are_collected_with_lines() {
        let text = "topic read a/#\nuser\ntopic foo bar\ntopic a/#/b\nfrobnicate x\ntopic\ntopic deny\n\
                    pattern read %u+/x\ntopic read a b/c\n";
        let errs = Acl::parse(text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7, 8]);
        assert!(
            errs[1].message.contains("invalid access type `foo`"),
            "{}",
            errs[1]
        );
        assert_eq!(
            errs[2].to_string(),
            "line 4: invalid topic filter: `#` must be the last level"
        );
        assert!(errs[3].message.contains("frobnicate"));
        // FILTER is the rest of the line: spaces allowed after an access keyword.
        let a = acl("topic read a b/c\n  topic   write   x y  \n");
        assert_eq!(a.rules()[0].filter, "a b/c");
        assert_eq!(a.rules()[1].filter, "x y");
        assert!(recv(&a, None, "a b/c"));
        // A lone word is a filter with readwrite access, as in mosquitto.
        assert_eq!(acl("topic sensors\n").rules()[0].access, Access::ReadWrite);
        assert_eq!(acl("\u{feff}topic read a\r\n").rules()[0].filter, "a");
    }

    #[test]
    fn wildcard_write_marker() {
        let text = "user u\n# mqtt-uplink: wildcard-write-intended\n\n# other comment\ntopic write cmd/#\n\
                    topic write other/#\n#mqtt-uplink:   wildcard-write-intended\npattern readwrite d/%c/#\n";
        let a = acl(text);
        let flags: Vec<(usize, bool)> = a
            .rules()
            .iter()
            .map(|r| (r.line, r.intended_wildcard_write))
            .collect();
        assert_eq!(flags, vec![(5, true), (6, false), (8, true)]);
        let not_marker = acl("# mqtt-uplink: wildcard-write-intended, says who\ntopic write w/#\n");
        assert!(!not_marker.rules()[0].intended_wildcard_write);
        let a = acl("# mqtt-uplink: wildcard-write-intended\npattern readwrite d/%c/#\n");
        assert!(a.rules()[0].intended_wildcard_write);
        let misplaced = "# mqtt-uplink: wildcard-write-intended\nuser u\ntopic read r/#\n\
                         # mqtt-uplink: wildcard-write-intended\ntopic read x/#\n\
                         # mqtt-uplink: wildcard-write-intended\n";
        let errs = Acl::parse(misplaced).unwrap_err();
        assert_eq!(errs.iter().map(|e| e.line).collect::<Vec<_>>(), vec![1, 5, 6]);
    }

    #[test]
    fn load_reports_path() {
        let dir = std::env::temp_dir().join(format!("guardlib-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("acl");
        std::fs::write(&bad, "topic a/#/b\n").unwrap();
        let err = Acl::load(&bad).unwrap_err().to_string();
        assert!(
            err.contains(&*bad.to_string_lossy()) && err.contains("line 1"),
            "{err}"
        );
        std::fs::write(&bad, "topic a/#\n").unwrap();
        assert_eq!(Acl::load(&bad).unwrap().rules().len(), 1);
        let err = Acl::load(&dir.join("missing")).unwrap_err();
        assert!(matches!(err, AclFileError::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // --- properties -----------------------------------------------------------------------

    fn acl_text() -> impl Strategy<Value = String> {
        let line = prop::sample::select(vec![
            "user a",
            "user b",
            "topic read #",
            "topic write a/+",
            "topic a/#",
            "topic deny a/b",
            "topic read $a/#",
            "topic deny +/z",
            "pattern readwrite %u/#",
            "pattern read +/%c",
            "pattern deny %c/b/#",
            "pattern deny %u",
            "# mqtt-uplink: wildcard-write-intended",
        ]);
        prop::collection::vec(line, 0..8).prop_map(|l| l.join("\n"))
    }

    fn filter() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "z", "$a", "", "+", "#"]);
        prop::collection::vec(level, 1..=3).prop_map(|l| l.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn parse_and_checks_never_panic(
            text in "((user|topic|pattern|#)?( (read|write|deny|x))?( [a%uc+#/$ ]{0,8})?\n){0,6}",
            junk in ".{0,40}",
            user in proptest::option::of("[a%/+#$]{0,4}"),
            cid in "[a%/+#$]{0,4}",
            t in ".{0,12}",
        ) {
            let _ = Acl::parse(&junk);
            if let Ok(a) = Acl::parse(&text) {
                let _ = a.check_publish(user.as_deref(), &cid, &t);
                let _ = a.check_subscribe(user.as_deref(), &cid, &t);
                let _ = a.check_receive(user.as_deref(), &cid, &t);
            }
        }

        /// Arbitrary bytes read lossily: no panic; errors name lines inside the file.
        #[test]
        fn parse_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), t in ".{0,16}") {
            let text = String::from_utf8_lossy(&bytes);
            match Acl::parse(&text) {
                Ok(a) => {
                    let _ = a.check_publish(Some("u"), "c", &t);
                    let _ = a.check_subscribe(Some("u"), "c", &t);
                }
                Err(errors) => prop_assert!(!errors.is_empty()),
            }
        }

        /// A subscription admitted whole never delivers a message the client may not receive; a
        /// refused one could have received nothing; one checked at delivery can receive something
        /// (the names below include a level no rule names, `q`, which stands for every other).
        #[test]
        fn subscription_kinds_agree_with_receive(
            text in acl_text(),
            f in filter(),
            user in prop::sample::select(vec![None, Some("a"), Some("b"), Some("a/#"), Some("+")]),
            cid in prop::sample::select(vec!["a", "z", "", "#"]),
        ) {
            let Ok(a) = Acl::parse(&text) else { return Ok(()) };
            let mut readable = Vec::new();
            let mut unreadable = Vec::new();
            for l1 in ["a", "b", "z", "$a", "", "q"] {
                for l2 in [None, Some("a"), Some("b"), Some("z"), Some("$a"), Some(""), Some("q")] {
                    for l3 in [None, Some("a"), Some("b"), Some("z"), Some("$a"), Some(""), Some("q")] {
                        let mut t = l1.to_owned();
                        for l in [l2, l3] {
                            match l { Some(l) => { t.push('/'); t.push_str(l) } None => break }
                        }
                        if topic::validate_name(&t).is_err() || !topic::matches(&f, &t) {
                            continue;
                        }
                        if a.check_receive(user, cid, &t).allowed { readable.push(t) } else { unreadable.push(t) }
                    }
                }
            }
            match a.subscription(user, cid, &f) {
                Subscription::Whole(_) => prop_assert!(unreadable.is_empty(), "{:?} via {} in\n{}", unreadable, f, text),
                Subscription::Refused(_) => prop_assert!(readable.is_empty(), "{:?} via {} in\n{}", readable, f, text),
                Subscription::Checked(_) => prop_assert!(!readable.is_empty(), "nothing readable via {} in\n{}", f, text),
            }
        }

        /// A subscription admitted whole never needs a check at delivery.
        #[test]
        fn whole_subscription_implies_receive(
            text in acl_text(),
            f in filter(),
            user in prop::sample::select(vec![None, Some("a"), Some("b"), Some("a/#"), Some("+")]),
            cid in prop::sample::select(vec!["a", "z", "", "#"]),
        ) {
            let Ok(a) = Acl::parse(&text) else { return Ok(()) };
            if matches!(a.subscription(user, cid, &f), Subscription::Whole(_)) {
                for l1 in ["a", "b", "z", "$a", ""] {
                    for l2 in [None, Some("a"), Some("b"), Some("")] {
                        let t = match l2 { Some(l2) => format!("{l1}/{l2}"), None => l1.to_owned() };
                        if topic::matches(&f, &t) {
                            prop_assert!(a.check_receive(user, cid, &t).allowed, "{} via {} in\n{}", t, f, text);
                        }
                    }
                }
            }
        }
    }
}
