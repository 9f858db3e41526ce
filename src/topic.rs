//! MQTT topic names and topic filters (MQTT 3.1.1 / 5.0 rules).
//!
//! This module owns the syntax checks for PUBLISH topic names and SUBSCRIBE filters, the
//! matching of a filter against a name, and the two filter-vs-filter relations the ACL needs:
//! [`covers`] (every name one filter can match is matched by another) and [`intersects`]
//! (some name is matched by both). All of them apply the MQTT rule that a name whose first
//! character is `$` is never matched by a filter whose first level is `+` or `#`.
//!
//! Every function here is total: malformed input yields `Err` or `false`, never a panic.

use thiserror::Error;

/// The largest encoded length of a topic name or filter: MQTT strings carry a 16-bit length.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic name or topic filter is malformed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The topic or filter is the empty string, which MQTT forbids.
    #[error("empty topic")]
    Empty,
    /// The topic or filter does not fit in an MQTT string.
    #[error("longer than 65535 bytes")]
    TooLong,
    /// The topic or filter contains U+0000, which MQTT forbids in UTF-8 strings.
    #[error("contains NUL")]
    ContainsNul,
    /// A PUBLISH topic name contains `+` or `#`.
    #[error("wildcards not allowed in a topic name")]
    WildcardInName,
    /// A filter has a `#` level that is followed by further levels.
    #[error("`#` must be the last level")]
    HashNotLast,
    /// A filter has a `#` sharing its level with other characters (`a/b#`).
    #[error("`#` must occupy a whole level")]
    HashNotWholeLevel,
    /// A filter has a `+` sharing its level with other characters (`a+`).
    #[error("`+` must occupy a whole level")]
    PlusNotWholeLevel,
}

/// Checks the properties shared by names and filters: non-empty, length, no NUL.
fn validate_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::ContainsNul);
    }
    Ok(())
}

/// Validates a PUBLISH topic name: non-empty, at most 65535 bytes, no NUL, no `+` or `#`.
///
/// Empty levels (`a//b`, `/a`) are legal, as MQTT allows them.
/// Levels in a topic name or filter (`a/b` has two), counted without splitting.
pub fn levels(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    validate_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Validates a SUBSCRIBE topic filter.
///
/// `#` is allowed only as a whole level and only as the last level; `+` only as a whole
/// level. So `a/#/b`, `a/b#` and `a+` are rejected. A `$share/GROUP/...` prefix is *not*
/// special here (it is validated as ordinary levels); use [`strip_shared`] first to check the
/// inner filter of a shared subscription.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    validate_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') {
            if level != "#" {
                return Err(TopicError::HashNotWholeLevel);
            }
            if levels.peek().is_some() {
                return Err(TopicError::HashNotLast);
            }
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::PlusNotWholeLevel);
        }
    }
    Ok(())
}

/// Splits an MQTT 5 shared subscription `$share/GROUP/FILTER` into `(GROUP, FILTER)`.
///
/// Returns `None` when `filter` is not a well-formed shared subscription: no `$share/` prefix,
/// an empty group, a group containing `+` or `#`, or an empty inner filter. The inner filter is
/// returned as is; callers still run [`validate_filter`] on it. A `None` result means the
/// string must be treated as an ordinary (literal `$share` first level) filter.
pub fn strip_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return None;
    }
    Some((group, inner))
}

/// True when the first level of a (valid) filter is a wildcard, i.e. the filter can never
/// match a topic name starting with `$`.
fn first_level_is_wildcard(filter: &str) -> bool {
    let first = filter.split('/').next().unwrap_or("");
    first == "+" || first == "#"
}

/// Does `filter` match the topic name `topic`?
///
/// Follows MQTT: `+` matches exactly one level (possibly empty), `#` matches the parent level
/// and any number of child levels (`sport/#` matches `sport`), and names starting with `$`
/// are not matched by a filter whose first level is `+` or `#`. Returns `false` when either
/// argument is malformed.
pub fn matches(filter: &str, topic: &str) -> bool {
    if validate_filter(filter).is_err() || validate_name(topic).is_err() {
        return false;
    }
    if topic.starts_with('$') && first_level_is_wildcard(filter) {
        return false;
    }
    let mut names = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            // `#` is always the last filter level and matches zero or more remaining levels.
            return true;
        }
        match names.next() {
            Some(n) if f == "+" || f == n => {}
            _ => return false,
        }
    }
    names.next().is_none()
}

/// One level of a filter, seen as the set of level strings it accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level<'a> {
    /// `+`, or any level past a trailing `#`: every string (at level 0: every string not
    /// starting with `$`).
    Any,
    /// Exactly this string.
    Lit(&'a str),
}

/// A valid filter as "these levels, then optionally `#`".
///
/// A filter matches names whose level count is exactly `prefix.len()` (no `#`), or at least
/// `prefix.len()` (with `#`, which also matches the parent). Names always have at least one
/// level, and the one-level name `""` does not exist (it is the empty string), which is why
/// the relations below walk lengths explicitly instead of just comparing levels.
struct Shape<'a> {
    prefix: Vec<&'a str>,
    hash: bool,
}

impl<'a> Shape<'a> {
    fn new(filter: &'a str) -> Shape<'a> {
        let mut prefix: Vec<&str> = filter.split('/').collect();
        let hash = prefix.last() == Some(&"#");
        if hash {
            prefix.pop();
        }
        Shape { prefix, hash }
    }

    /// Does the filter match some names with exactly `len` levels?
    fn has_len(&self, len: usize) -> bool {
        if self.hash {
            len >= self.prefix.len()
        } else {
            len == self.prefix.len()
        }
    }

    /// The set accepted at level `j` (only meaningful when `has_len` of some length > `j`).
    fn level(&self, j: usize) -> Level<'a> {
        match self.prefix.get(j) {
            Some(&"+") | None => Level::Any,
            Some(l) => Level::Lit(l),
        }
    }
}

/// Is level set `a` a subset of level set `b` at level index `j`?
fn level_subset(a: Level<'_>, b: Level<'_>, j: usize) -> bool {
    match (a, b) {
        (Level::Lit(x), Level::Lit(y)) => x == y,
        // At level 0 a wildcard excludes `$` names.
        (Level::Lit(x), Level::Any) => j > 0 || !x.starts_with('$'),
        (Level::Any, Level::Any) => true,
        (Level::Any, Level::Lit(_)) => false,
    }
}

/// What two level sets have in common.
#[derive(PartialEq, Eq)]
enum Meet {
    Empty,
    /// Only the empty level: fine inside a name, impossible as a whole one-level name.
    OnlyEmptyLevel,
    Some,
}

fn level_meet(a: Level<'_>, b: Level<'_>, j: usize) -> Meet {
    let lit = |x: &str| {
        if x.is_empty() {
            Meet::OnlyEmptyLevel
        } else {
            Meet::Some
        }
    };
    match (a, b) {
        (Level::Lit(x), Level::Lit(y)) if x == y => lit(x),
        (Level::Lit(_), Level::Lit(_)) => Meet::Empty,
        (Level::Lit(x), Level::Any) | (Level::Any, Level::Lit(x)) => {
            if j == 0 && x.starts_with('$') {
                Meet::Empty
            } else {
                lit(x)
            }
        }
        (Level::Any, Level::Any) => Meet::Some,
    }
}

/// True iff every topic name matched by filter `inner` is also matched by filter `outer`.
///
/// This is what "an ACL read rule allows this subscription" means. It respects the `$` rule:
/// `#` does not cover `$SYS/#`. Examples: `#` covers `+/x`; `a/#` covers `a/+/b` and `a`;
/// `a/+` does not cover `a/#`; `+/+` covers `a/b`; `+/#` covers `#`. Returns `false` when
/// either argument is not a valid filter (deny on doubt). Runs in time linear in the inputs.
pub fn covers(outer: &str, inner: &str) -> bool {
    if validate_filter(outer).is_err() || validate_filter(inner).is_err() {
        return false;
    }
    let (o, i) = (Shape::new(outer), Shape::new(inner));
    // Past this many levels both filters are `Any` at every level and their length
    // constraints no longer change, so longer names add nothing new.
    let max_len = o.prefix.len().max(i.prefix.len()) + 1;
    let mut prefix_ok = true;
    for len in 1..=max_len {
        let j = len - 1;
        prefix_ok &= level_subset(i.level(j), o.level(j), j);
        if !i.has_len(len) {
            continue;
        }
        // Inner's only one-level name would be "", which is not a topic name.
        if len == 1 && i.level(0) == Level::Lit("") {
            continue;
        }
        if !o.has_len(len) || !prefix_ok {
            return false;
        }
    }
    true
}

/// True iff some topic name is matched by both filter `a` and filter `b`.
///
/// Respects the `$` rule: `#` and `$SYS/#` do not intersect. Returns `false` when either
/// argument is not a valid filter. Runs in time linear in the inputs.
pub fn intersects(a: &str, b: &str) -> bool {
    if validate_filter(a).is_err() || validate_filter(b).is_err() {
        return false;
    }
    let (x, y) = (Shape::new(a), Shape::new(b));
    let max_len = x.prefix.len().max(y.prefix.len()) + 1;
    for len in 1..=max_len {
        let j = len - 1;
        let meet = level_meet(x.level(j), y.level(j), j);
        if meet == Meet::Empty {
            // Every name of this length or longer disagrees at level `j`.
            return false;
        }
        if x.has_len(len) && y.has_len(len) && !(len == 1 && meet == Meet::OnlyEmptyLevel) {
            return true;
        }
    }
    false
}

/// One level of a name in [`exists_name`]'s search: a literal of one of the filters, or any other
/// string (not `$`-prefixed, not empty), which every filter treats alike.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick<'a> {
    Lit(&'a str),
    Other,
}

/// Does `shape` accept `pick` as level `j` of a name (its earlier levels already accepted)?
fn accepts(shape: &Shape<'_>, j: usize, pick: Pick<'_>) -> bool {
    let dollar = j == 0 && matches!(pick, Pick::Lit(l) if l.starts_with('$'));
    match shape.prefix.get(j) {
        Some(&"+") => !dollar,
        Some(lit) => pick == Pick::Lit(lit),
        None => shape.hash && !dollar,
    }
}

/// Is there a topic name that every filter of `all_of` matches and no filter of `none_of` does?
///
/// This is what "some topic this subscription can match is readable" means, with `all_of` the
/// subscription and one read grant, and `none_of` the deny rules (a union of filters, which
/// [`covers`] cannot answer). The search builds names level by level from the filters' own
/// literals plus one "other" string per level (filters only compare levels for equality, and treat
/// `$` first levels and empty levels apart), so it is exact; it stops after `budget` steps and
/// answers `None` then (the caller decides on doubt). An invalid `all_of` filter matches nothing;
/// invalid `none_of` filters match nothing and are ignored.
pub fn exists_name(all_of: &[&str], none_of: &[&str], budget: usize) -> Option<bool> {
    if all_of.iter().any(|f| validate_filter(f).is_err()) {
        return Some(false);
    }
    let all: Vec<Shape<'_>> = all_of.iter().map(|f| Shape::new(f)).collect();
    let none: Vec<Shape<'_>> = none_of
        .iter()
        .filter(|f| validate_filter(f).is_ok())
        .map(|f| Shape::new(f))
        .collect();
    // Past the longest prefix every filter accepts every level alike (or no more levels at all),
    // so a name longer than this adds nothing a shorter one lacks.
    let max_len = all.iter().chain(&none).map(|s| s.prefix.len()).max().unwrap_or(0) + 1;
    let search = Search {
        all,
        none,
        max_len,
        budget,
        steps: std::cell::Cell::new(0),
    };
    let alive: Vec<usize> = (0..search.none.len()).collect();
    search.from(0, false, &alive)
}

struct Search<'a> {
    all: Vec<Shape<'a>>,
    none: Vec<Shape<'a>>,
    max_len: usize,
    budget: usize,
    steps: std::cell::Cell<usize>,
}

impl Search<'_> {
    /// With `j` levels chosen (accepted by every `all` filter; `alive`: the `none` filters that
    /// accept them too), can the name end here or go on to a witness?
    fn from(&self, j: usize, first_empty: bool, alive: &[usize]) -> Option<bool> {
        // End here: a name of `j` levels (the one-level name "" does not exist).
        if j >= 1
            && !(j == 1 && first_empty)
            && self.all.iter().all(|s| s.has_len(j))
            && !alive.iter().any(|&i| self.none[i].has_len(j))
        {
            return Some(true);
        }
        if j >= self.max_len {
            return Some(false);
        }
        let mut picks: Vec<Pick<'_>> = vec![Pick::Other];
        let shapes = self.all.iter().chain(alive.iter().map(|&i| &self.none[i]));
        for s in shapes {
            if let Some(&l) = s.prefix.get(j) {
                if l != "+" && !picks.contains(&Pick::Lit(l)) {
                    picks.push(Pick::Lit(l));
                }
            }
        }
        let mut unknown = false;
        for pick in picks {
            let steps = self.steps.get() + 1;
            self.steps.set(steps);
            if steps > self.budget {
                return None;
            }
            if !self.all.iter().all(|s| accepts(s, j, pick)) {
                continue;
            }
            let next: Vec<usize> = alive
                .iter()
                .copied()
                .filter(|&i| accepts(&self.none[i], j, pick))
                .collect();
            // A `#` filter whose prefix is all chosen matches every longer name too.
            if next
                .iter()
                .any(|&i| self.none[i].hash && self.none[i].prefix.len() <= j + 1)
            {
                continue;
            }
            let empty = first_empty || (j == 0 && pick == Pick::Lit(""));
            match self.from(j + 1, empty, &next) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => unknown = true,
            }
        }
        if unknown {
            None
        } else {
            Some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("a/b"), Ok(()));
        assert_eq!(validate_name("a//b"), Ok(()));
        assert_eq!(validate_name("/"), Ok(()));
        assert_eq!(validate_name("$SYS/x"), Ok(()));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a\0b"), Err(TopicError::ContainsNul));
        assert_eq!(validate_name(&"a".repeat(65_535)), Ok(()));
        assert_eq!(validate_name(&"a".repeat(65_536)), Err(TopicError::TooLong));
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/#",
            "a//b",
            "$SYS/#",
            "$share/g/#",
            "+/#",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_filter("a/#/b"), Err(TopicError::HashNotLast));
        assert_eq!(validate_filter("#/"), Err(TopicError::HashNotLast));
        assert_eq!(validate_filter("a/b#"), Err(TopicError::HashNotWholeLevel));
        assert_eq!(validate_filter("a+"), Err(TopicError::PlusNotWholeLevel));
        assert_eq!(validate_filter("a/+b/c"), Err(TopicError::PlusNotWholeLevel));
        assert_eq!(validate_filter("a\0"), Err(TopicError::ContainsNul));
        assert_eq!(validate_filter(&"+".repeat(65_536)), Err(TopicError::TooLong));
        assert_eq!(TopicError::HashNotLast.to_string(), "`#` must be the last level");
    }

    #[test]
    fn shared() {
        assert_eq!(strip_shared("$share/g/a/#"), Some(("g", "a/#")));
        assert_eq!(strip_shared("$share/g/#"), Some(("g", "#")));
        assert_eq!(strip_shared("$share//a"), None);
        assert_eq!(strip_shared("$share/g"), None);
        assert_eq!(strip_shared("$share/g/"), None);
        assert_eq!(strip_shared("$share/g+/a"), None);
        assert_eq!(strip_shared("$share/#"), None);
        assert_eq!(strip_shared("a/b"), None);
        assert_eq!(strip_shared("$SHARE/g/a"), None);
    }

    #[test]
    fn matching() {
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/#", "sport/a/b"));
        assert!(matches("#", "a"));
        assert!(matches("#", "/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("+", "a"));
        assert!(!matches("+", "a/b"));
        assert!(!matches("+", "/a"));
        assert!(matches("a//b", "a//b"));
        assert!(matches("a/+/b", "a//b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$SYS/+", "$SYS/x"));
        assert!(matches("a/#", "a/$x"));
        // Malformed arguments never match.
        assert!(!matches("a/#/b", "a/x/b"));
        assert!(!matches("a/#", "a/#"));
        assert!(!matches("", ""));
    }

    #[test]
    fn covering() {
        assert!(covers("#", "+/x"));
        assert!(covers("#", "a/#"));
        assert!(covers("#", "#"));
        assert!(!covers("#", "$SYS/#"));
        assert!(!covers("+/#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/+/x"));
        assert!(!covers("a/+", "a/#"));
        assert!(covers("a/#", "a/+/b"));
        assert!(covers("a/#", "a"));
        assert!(covers("+/#", "a"));
        assert!(covers("+/+", "a/b"));
        assert!(!covers("+/+", "a"));
        assert!(!covers("a/+/#", "a/#"));
        assert!(!covers("a", "+"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(!covers("+", "#"));
        assert!(!covers("a/#/b", "a/x/b"));
        // "" is not a topic name, so these hold although the "parent" of `/#` is level "".
        assert!(covers("+/#", "#"));
        assert!(covers("/+/#", "/#"));
        assert!(!covers("+/+/#", "#"));
        assert!(!covers("a/+/#", "a/#"));
        assert!(covers("/+", "/+"));
    }

    #[test]
    fn intersecting() {
        assert!(intersects("#", "a/b"));
        assert!(intersects("#", "#"));
        assert!(!intersects("#", "$SYS/#"));
        assert!(!intersects("+/x", "$SYS/x"));
        assert!(intersects("$SYS/#", "$SYS/+"));
        assert!(intersects("a/+", "+/b"));
        assert!(!intersects("a/+", "b/+"));
        assert!(intersects("a/#", "a"));
        assert!(!intersects("a/+", "a"));
        assert!(intersects("+/+/#", "a/+"));
        assert!(!intersects("a/b", "a/b/c"));
        assert!(!intersects("a/#/b", "a/#"));
        assert!(!intersects("+", "/#"));
        assert!(intersects("+/#", "/#"));
        assert!(intersects("/#", "/#"));
    }

    #[test]
    fn long_filters_are_linear() {
        // 30000 levels: a quadratic algorithm would take minutes here.
        let deep = format!("{}#", "+/".repeat(30_000));
        assert!(covers("#", &deep));
        assert!(!covers(&deep, "#"));
        assert!(intersects(&deep, &deep));
        assert!(matches(&deep, &"a/".repeat(30_001)));
    }

    // --- property tests over a small alphabet, checked against brute force ---------------

    /// Literal levels used in generated filters; `$a` exercises the `$` rule.
    const LITERALS: [&str; 3] = ["a", "$a", ""];

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "$a", "", "+", "#"]);
        prop::collection::vec(level, 1..=3)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("valid filter", |f| validate_filter(f).is_ok())
    }

    /// All valid topic names of 1..=4 levels over the filter literals plus a fresh level
    /// `z`. This set contains a witness for every covers/intersects question about filters
    /// of at most 3 levels (a deeper one is never needed), so brute force over it is exact.
    fn universe() -> Vec<String> {
        let alphabet: Vec<&str> = LITERALS.iter().copied().chain(["z"]).collect();
        let mut out: Vec<String> = Vec::new();
        let mut frontier: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
        for _ in 0..4 {
            out.extend(frontier.iter().filter(|t| validate_name(t).is_ok()).cloned());
            frontier = frontier
                .iter()
                .flat_map(|p| alphabet.iter().map(move |l| format!("{p}/{l}")))
                .collect();
        }
        out
    }

    /// Exhaustive check of covers/intersects against brute force for every valid filter of
    /// one or two levels over the test alphabet.
    #[test]
    fn exhaustive_small_filters() {
        let levels = ["a", "$a", "", "+", "#"];
        let mut filters: Vec<String> = levels.iter().map(|l| l.to_string()).collect();
        for x in levels {
            for y in levels {
                filters.push(format!("{x}/{y}"));
            }
        }
        filters.retain(|f| validate_filter(f).is_ok());
        let u = universe();
        for o in &filters {
            for i in &filters {
                let cov = u.iter().all(|t| !matches(i, t) || matches(o, t));
                assert_eq!(covers(o, i), cov, "covers({o}, {i})");
                let int = u.iter().any(|t| matches(o, t) && matches(i, t));
                assert_eq!(intersects(o, i), int, "intersects({o}, {i})");
            }
        }
    }

    #[test]
    fn names_outside_a_union() {
        let yes = |all: &[&str], none: &[&str]| exists_name(all, none, 10_000) == Some(true);
        assert!(yes(&["#"], &["hr/#"]));
        assert!(!yes(&["hr/#"], &["hr/#"]));
        assert!(!yes(&["hr/x"], &["hr/#"]));
        assert!(yes(&["#", "site/#"], &["site/private/#"]));
        // `a/#` is `a` plus `a/+/#`: the union denies it although neither filter alone does.
        assert!(!yes(&["a/#"], &["a", "a/+/#"]));
        assert!(yes(&["a/#"], &["a/+/#"]));
        assert!(!yes(&["+"], &["+"]));
        assert!(yes(&["$SYS/#"], &["#"]));
        assert!(!yes(&["#", "$SYS/#"], &[]));
        assert!(!yes(&["+/+"], &["a/+", "+/b", "+/+"]));
        assert!(yes(&["+/+"], &["a/+", "+/b"]));
        // Invalid filters: an invalid requirement matches nothing, an invalid exclusion is ignored.
        assert!(!yes(&["a/#/b"], &[]));
        assert!(yes(&["a"], &["a/#/b"]));
        // A budget too small to decide says so.
        assert_eq!(
            exists_name(&["+/+/+/+"], &["a/+/+/+", "+/a/+/+", "+/+/a/+", "+/+/+/a"], 3),
            None
        );
    }

    #[test]
    fn names_outside_a_union_exhaustive() {
        let levels = ["a", "$a", "", "+", "#"];
        let mut filters: Vec<String> = levels.iter().map(|l| l.to_string()).collect();
        for x in levels {
            for y in levels {
                filters.push(format!("{x}/{y}"));
            }
        }
        filters.retain(|f| validate_filter(f).is_ok());
        let u = universe();
        for a in &filters {
            for b in &filters {
                for c in &filters {
                    let brute = u
                        .iter()
                        .any(|t| matches(a, t) && !matches(b, t) && !matches(c, t));
                    assert_eq!(
                        exists_name(&[a], &[b, c], 100_000),
                        Some(brute),
                        "{a} minus {b}, {c}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn covers_agrees_with_brute_force(o in filter_strategy(), i in filter_strategy()) {
            let u = universe();
            let brute = u.iter().all(|t| !matches(&i, t) || matches(&o, t));
            prop_assert_eq!(covers(&o, &i), brute, "covers({}, {})", o, i);
        }

        #[test]
        fn intersects_agrees_with_brute_force(a in filter_strategy(), b in filter_strategy()) {
            let u = universe();
            let brute = u.iter().any(|t| matches(&a, t) && matches(&b, t));
            prop_assert_eq!(intersects(&a, &b), brute, "intersects({}, {})", a, b);
            prop_assert_eq!(intersects(&a, &b), intersects(&b, &a));
        }

        #[test]
        fn exists_name_agrees_with_brute_force(
            a in filter_strategy(),
            b in filter_strategy(),
            none in prop::collection::vec(filter_strategy(), 0..4),
        ) {
            let u = universe();
            let brute = u.iter().any(|t| matches(&a, t) && matches(&b, t) && none.iter().all(|n| !matches(n, t)));
            let none: Vec<&str> = none.iter().map(String::as_str).collect();
            prop_assert_eq!(exists_name(&[&a, &b], &none, 100_000), Some(brute), "{} and {} minus {:?}", a, b, none);
        }

        #[test]
        fn covers_is_reflexive(f in filter_strategy()) {
            prop_assert!(covers(&f, &f));
            prop_assert!(intersects(&f, &f));
        }

        /// Arbitrary bytes as topic names and filters: no panic, and a valid name matches itself.
        #[test]
        fn arbitrary_bytes(a in prop::collection::vec(any::<u8>(), 0..64), b in prop::collection::vec(any::<u8>(), 0..64)) {
            let (a, b) = (String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
            let _ = (validate_filter(&a), strip_shared(&a), covers(&a, &b), intersects(&a, &b), matches(&a, &b));
            if validate_name(&a).is_ok() {
                prop_assert!(matches(&a, &a), "{:?}", a);
            }
        }

        #[test]
        fn never_panics(a in ".{0,24}", b in "[a$/+#\\x00 ]{0,12}") {
            let _ = validate_name(&a);
            let _ = validate_filter(&a);
            let _ = strip_shared(&a);
            for (x, y) in [(&a, &b), (&b, &a), (&b, &b)] {
                let _ = matches(x, y);
                let _ = covers(x, y);
                let _ = intersects(x, y);
            }
        }
    }
}
