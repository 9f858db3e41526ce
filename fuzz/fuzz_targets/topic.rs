//! Topic filters and names from the input (three, newline-separated): the set operations the ACL
//! and the mapping checks rely on agree with `matches`:
//! - `covers(outer, inner)` and `matches(inner, t)` imply `matches(outer, t)`;
//! - `matches(a, t)` and `matches(b, t)` imply `intersects(a, b)`;
//! - a valid filter covers itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mqtt_uplink::topic::{covers, intersects, matches, validate_filter};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let (a, b, t) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    if covers(a, b) && matches(b, t) {
        assert!(
            matches(a, t),
            "{a:?} covers {b:?} which matches {t:?}, but {a:?} does not"
        );
    }
    if matches(a, t) && matches(b, t) {
        assert!(
            intersects(a, b),
            "{a:?} and {b:?} both match {t:?} but do not intersect"
        );
    }
    if validate_filter(a).is_ok() {
        assert!(covers(a, a), "{a:?} does not cover itself");
    }
});
