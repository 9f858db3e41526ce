//! OpenSSH `known_hosts` lookups for the SSH uplink: the name a host is listed under, the verdict
//! for a host key (trusted, mismatch, unknown, revoked), hashed entries and pattern lists, and
//! OpenSSH-style fingerprints for the log. The rules are in the parent module's documentation.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use russh::keys::PublicKey;
use sha2::{Digest, Sha256};
use tracing::debug;

/// The name OpenSSH looks up in known_hosts: `host` for port 22, `[host]:port` otherwise.
pub(super) fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_ascii_lowercase()
    } else {
        format!("[{}]:{port}", host.to_ascii_lowercase())
    }
}

/// OpenSSH form of a SHA256 fingerprint of a key blob: `SHA256:` + base64 without padding.
pub(super) fn fingerprint_blob(blob: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(blob)))
}

pub(super) fn fingerprint_of(key: &PublicKey) -> String {
    key.to_bytes()
        .map(|b| fingerprint_blob(&b))
        .unwrap_or_else(|_| "SHA256:?".into())
}

/// Result of looking a host key up in known_hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HostKeyVerdict {
    /// A non-revoked entry for the host carries this very key.
    Trusted,
    /// The host is listed, but with other key(s).
    Mismatch,
    /// The host is not listed at all.
    Unknown,
    /// The key is listed as `@revoked` for this host.
    Revoked,
}

/// Checks `key_blob` (SSH wire encoding of the server's public key) for host name `name`
/// (already in `host` / `[host]:port` form) against the text of a known_hosts file.
pub(super) fn check_known_hosts(text: &str, name: &str, key_blob: &[u8]) -> HostKeyVerdict {
    let name = name.to_ascii_lowercase();
    let mut listed = false;
    let mut trusted = false;
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let marker = if first.starts_with('@') {
            let m = first;
            first = fields.next().unwrap_or_default();
            Some(m)
        } else {
            None
        };
        let (Some(_keytype), Some(key_b64)) = (fields.next(), fields.next()) else {
            debug!(line = lineno + 1, "known_hosts: skipping malformed line");
            continue;
        };
        if !host_field_matches(first, &name) {
            continue;
        }
        let same_key = STANDARD.decode(key_b64).is_ok_and(|b| b == key_blob);
        match marker {
            None => {
                listed = true;
                trusted |= same_key;
            }
            Some("@revoked") if same_key => return HostKeyVerdict::Revoked,
            Some("@revoked") => {}
            Some(other) => debug!(line = lineno + 1, "known_hosts: ignoring {other} line"),
        }
    }
    match (listed, trusted) {
        (_, true) => HostKeyVerdict::Trusted,
        (true, false) => HostKeyVerdict::Mismatch,
        (false, false) => HostKeyVerdict::Unknown,
    }
}

/// Does a known_hosts host field (hashed entry or comma-separated pattern list) match `name`?
fn host_field_matches(field: &str, name: &str) -> bool {
    if let Some(rest) = field.strip_prefix("|1|") {
        let Some((salt, hash)) = rest.split_once('|') else {
            return false;
        };
        let (Ok(salt), Ok(hash)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
            return false;
        };
        mac.update(name.as_bytes());
        return mac.verify_slice(&hash).is_ok();
    }
    let mut matched = false;
    for pat in field.split(',') {
        let pat = pat.to_ascii_lowercase();
        if let Some(neg) = pat.strip_prefix('!') {
            if glob_match(neg, name) {
                return false;
            }
        } else if glob_match(&pat, name) {
            matched = true;
        }
    }
    matched
}

/// OpenSSH pattern match: `*` any run of characters, `?` exactly one.
fn glob_match(pat: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == '?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match backtrack {
                Some((bp, bs)) => {
                    pi = bp + 1;
                    si = bs + 1;
                    backtrack = Some((bp, bs + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(known_hosts_name("Host", 22), "host");
        assert_eq!(known_hosts_name("h", 2222), "[h]:2222");
    }

    #[test]
    fn globbing() {
        assert!(glob_match("*.example.com", "a.example.com"));
        assert!(!glob_match("*.example.com", "example.com"));
        assert!(glob_match("[h?]:*", "[hx]:22"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", "ab"));
        assert!(host_field_matches("foo,*.bar", "x.bar"));
        assert!(!host_field_matches("*.bar,!x.bar", "x.bar"));
    }

    #[test]
    fn known_hosts_verdicts() {
        let k1 = STANDARD.encode(b"key-one");
        let k2 = STANDARD.encode(b"key-two");
        let text = format!(
            "# comment\n\nother {k2} x\nhost1,host2 ssh-ed25519 {k1}\n@revoked * ssh-ed25519 {k2}\n\
             @cert-authority * ssh-ed25519 {k1}\n[h]:2222 ssh-ed25519 {k1}\n"
        )
        .replace("other ", "other ssh-ed25519 ");
        assert_eq!(
            check_known_hosts(&text, "host2", b"key-one"),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            check_known_hosts(&text, "host1", b"key-three"),
            HostKeyVerdict::Mismatch
        );
        assert_eq!(
            check_known_hosts(&text, "host1", b"key-two"),
            HostKeyVerdict::Revoked
        );
        assert_eq!(
            check_known_hosts(&text, "nobody", b"key-one"),
            HostKeyVerdict::Unknown
        );
        assert_eq!(check_known_hosts(&text, "h", b"key-one"), HostKeyVerdict::Unknown);
        assert_eq!(
            check_known_hosts(&text, "[h]:2222", b"key-one"),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            check_known_hosts(&text, "other", b"key-one"),
            HostKeyVerdict::Mismatch
        );
    }

    #[test]
    fn fingerprint_format() {
        // `ssh-keygen -lf` of this blob is not needed: check the shape.
        let fp = fingerprint_blob(b"abc");
        assert!(fp.starts_with("SHA256:") && !fp.ends_with('='));
        assert_eq!(fp.len(), "SHA256:".len() + 43);
    }
}
