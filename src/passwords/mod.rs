//! The broker's password file (mosquitto_passwd compatible) and password hashing; the password
//! strength policy is in [`strength`].
//!
//! File format: one `username:hash` per line; blank lines and lines starting with `#` are
//! ignored. Accepted hashes are mosquitto 2.0's `$7$` (PBKDF2-HMAC-SHA512), mosquitto 1.x's
//! `$6$` (salted SHA-512, verify only) and argon2id PHC strings. Anything else, a plaintext
//! password in particular, is refused at parse time. Error messages name the line and the
//! user, never the hash or what might be a secret.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::alphabet;
use base64::engine::{DecodePaddingMode, Engine, GeneralPurpose, GeneralPurposeConfig};
use rand::TryRngCore;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use thiserror::Error;

pub mod strength;

pub use strength::{check_strength, WeakPassword, LONG_PASSWORD_CHARS, MIN_PASSWORD_CHARS};

/// mosquitto_passwd's default PBKDF2 iteration count (mosquitto 2.0); kept for reference and
/// for producing hashes that match what mosquitto itself writes.
pub const MOSQUITTO_ITERATIONS: u32 = 101;

/// The PBKDF2-HMAC-SHA512 iteration count mqtt-uplink uses for new `$7$` hashes (the OWASP
/// 2023 recommendation for PBKDF2-HMAC-SHA512); mosquitto reads the count from the hash.
pub const DEFAULT_PBKDF2_ITERATIONS: u32 = 210_000;

/// Largest `$7$` iteration count accepted when parsing or hashing: a typo (or a hostile
/// file) must not turn every login into minutes of CPU work.
pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;

/// Largest argon2 memory cost accepted in a PHC string, in KiB (1 GiB), for the same reason.
pub const MAX_ARGON2_M_COST: u32 = 1024 * 1024;
/// Largest argon2 time cost accepted in a PHC string.
pub const MAX_ARGON2_T_COST: u32 = 64;
/// Largest argon2 parallelism accepted in a PHC string.
pub const MAX_ARGON2_P_COST: u32 = 64;

/// Salt length of mosquitto's `$7$` hashes, in bytes.
const PBKDF2_SALT_LEN: usize = 12;
/// Length of a SHA-512 output, the hash part of both `$6$` and `$7$`.
const SHA512_LEN: usize = 64;
/// Upper bound on a decoded salt: mosquitto uses 12 bytes; anything much longer is garbage.
const MAX_SALT_LEN: usize = 64;

/// Standard base64 alphabet; encodes with padding (as mosquitto writes) but accepts input with
/// or without it, since OpenSSL's decoder is equally lenient.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One problem on one line of a password file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong; never contains a hash or a password.
    pub message: String,
}

/// Failure to load a password file from disk.
#[derive(Debug, Error)]
pub enum PasswordFileError {
    /// The file could not be read.
    #[error("cannot read password file {}: {source}", .path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but some lines are invalid.
    #[error("invalid password file {}: {}", .path.display(), join_errors(.errors))]
    Invalid {
        /// The file that was parsed.
        path: PathBuf,
        /// Every invalid line, in file order.
        errors: Vec<LineError>,
    },
}

fn join_errors(errors: &[LineError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why an entry cannot be added with [`PasswordFile::set`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EntryError {
    /// The username cannot be stored in the file format.
    #[error("invalid username: {0}")]
    InvalidUser(&'static str),
    /// The hash is not one of the accepted formats.
    #[error("unsupported or malformed password hash for user '{user}'")]
    InvalidHash {
        /// The user whose hash was refused.
        user: String,
    },
}

/// A parsed password hash.
#[derive(Clone)]
enum Hash {
    /// mosquitto 2.0 `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// mosquitto 1.x `$6$`: SHA-512(password || salt).
    Sha512Salted { salt: Vec<u8>, hash: Vec<u8> },
    /// argon2id PHC string, kept as text because `PasswordHash` borrows from it.
    Argon2id(String),
}

impl Hash {
    /// Parses one hash field, or `None` when it is not an accepted, well-formed hash.
    fn parse(s: &str) -> Option<Hash> {
        if let Some(rest) = s.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (iter, salt, hash) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || iter.is_empty() || !iter.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let iterations: u32 = iter.parse().ok()?;
            if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
                return None;
            }
            let (salt, hash) = decode_salt_hash(salt, hash)?;
            return Some(Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            });
        }
        if let Some(rest) = s.strip_prefix("$6$") {
            let mut parts = rest.split('$');
            let (salt, hash) = (parts.next()?, parts.next()?);
            if parts.next().is_some() {
                return None;
            }
            let (salt, hash) = decode_salt_hash(salt, hash)?;
            return Some(Hash::Sha512Salted { salt, hash });
        }
        if s.starts_with("$argon2id$") {
            let phc = PasswordHash::new(s).ok()?;
            if Algorithm::try_from(phc.algorithm).ok()? != Algorithm::Argon2id {
                return None;
            }
            // Rejects missing/ill-formed parameters now rather than at the first login.
            let params = Params::try_from(&phc).ok()?;
            if params.m_cost() > MAX_ARGON2_M_COST
                || params.t_cost() > MAX_ARGON2_T_COST
                || params.p_cost() > MAX_ARGON2_P_COST
                || phc.salt.is_none()
                || phc.hash.is_none()
            {
                return None;
            }
            return Some(Hash::Argon2id(s.to_owned()));
        }
        None
    }

    /// Checks `password` against this hash; comparisons of digests are constant-time.
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; SHA512_LEN];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                bool::from(out.as_slice().ct_eq(hash.as_slice()))
            }
            Hash::Sha512Salted { salt, hash } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                bool::from(h.finalize().as_slice().ct_eq(hash.as_slice()))
            }
            Hash::Argon2id(phc) => verify_argon2id(phc, password),
        }
    }
}

/// Argon2 working memory kept per thread between verifications, in 1 KiB blocks: enough for the
/// default parameters (19 MiB) and up to 64 MiB. A hash asking for more gets a buffer of its own,
/// freed afterwards.
const KEEP_ARGON2_BLOCKS: usize = 64 * 1024;

/// Blocks reserved for a kept buffer (only the blocks a hash needs are ever touched): just over
/// glibc's largest dynamic mmap threshold (32 MiB on 64-bit), so the buffer is always a mapping of
/// its own, and freeing it ([`release_argon2_memory`]) hands the memory back to the system. A
/// smaller one, once freed, would raise glibc's threshold to its size; the next buffer would come
/// from the thread's arena, where a free keeps the pages (trimmed only past twice the threshold).
const RESERVE_ARGON2_BLOCKS: usize = 32 * 1024 + 1;

/// Bytes of argon2 working memory the threads hold between verifications, all threads together.
static ARGON2_HELD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's argon2 working memory, reused by every verification on it, so memory does not
    /// grow with the number of logins (glibc would otherwise keep each freed 19 MiB block in the
    /// thread's arena). Password checks run on two to four long-lived threads (`guard::verify`),
    /// which give it back once idle ([`release_argon2_memory`]).
    static ARGON2_BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Frees this thread's kept argon2 working memory (the password-check threads call it once idle for
/// a few seconds, so the ~19 MiB each held after a burst of logins is not kept for good).
pub fn release_argon2_memory() {
    let freed = ARGON2_BLOCKS.take();
    ARGON2_HELD.fetch_sub(freed.capacity() * std::mem::size_of::<Block>(), Ordering::Relaxed);
}

/// Bytes of argon2 working memory kept between verifications, by all threads.
pub fn argon2_memory_held() -> usize {
    ARGON2_HELD.load(Ordering::Relaxed)
}

/// Verifies `password` against an argon2id PHC string, computing into this thread's reusable
/// memory; the digests are compared in constant time.
fn verify_argon2id(phc: &str, password: &[u8]) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(params), Some(salt), Some(expected)) = (Params::try_from(&parsed), parsed.salt, parsed.hash)
    else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    let argon2 = Argon2::new(Algorithm::Argon2id, version, params);
    let mut out = vec![0u8; expected.len()];
    let hashed = if blocks <= KEEP_ARGON2_BLOCKS {
        ARGON2_BLOCKS.with_borrow_mut(|memory| {
            if memory.capacity() < blocks {
                let mut fresh = Vec::with_capacity(blocks.max(RESERVE_ARGON2_BLOCKS));
                fresh.resize(blocks, Block::default());
                let block = std::mem::size_of::<Block>();
                ARGON2_HELD.fetch_add(fresh.capacity() * block, Ordering::Relaxed);
                ARGON2_HELD.fetch_sub(
                    std::mem::replace(memory, fresh).capacity() * block,
                    Ordering::Relaxed,
                );
            } else if memory.len() < blocks {
                memory.resize(blocks, Block::default());
            }
            argon2.hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
        })
    } else {
        argon2.hash_password_into_with_memory(password, salt, &mut out, vec![Block::default(); blocks])
    };
    hashed.is_ok() && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

/// Decodes the base64 salt and hash of a `$6$`/`$7$` entry, checking their lengths.
fn decode_salt_hash(salt: &str, hash: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let salt = B64.decode(salt).ok()?;
    let hash = B64.decode(hash).ok()?;
    if salt.is_empty() || salt.len() > MAX_SALT_LEN || hash.len() != SHA512_LEN {
        return None;
    }
    Some((salt, hash))
}

/// Checks that `user` can be written as the first field of a line and read back unchanged.
fn check_username(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        return Err("empty username");
    }
    if user.contains(':') {
        return Err("username contains ':'");
    }
    if user.chars().any(char::is_control) {
        return Err("username contains a control character");
    }
    // Parsing trims fields and treats `#` lines as comments, so such names would not survive
    // a render/parse round trip.
    if user.trim() != user {
        return Err("username has leading or trailing whitespace");
    }
    if user.starts_with('#') {
        return Err("username starts with '#'");
    }
    Ok(())
}

#[derive(Clone)]
struct Entry {
    user: String,
    /// The hash as written, so `render` reproduces it byte for byte.
    text: String,
    hash: Hash,
}

/// An in-memory password file: users in file order, each with a verified-format hash.
#[derive(Clone, Default)]
pub struct PasswordFile {
    // A Vec keeps insertion order for `render`; files are small enough for a linear lookup.
    entries: Vec<Entry>,
}

impl fmt::Debug for PasswordFile {
    // Hashes are offline-crackable material: keep them out of logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Creates an empty password file.
    pub fn new() -> PasswordFile {
        PasswordFile::default()
    }

    /// Parses the text of a password file, collecting every invalid line.
    ///
    /// Lines are trimmed; blank lines and lines starting with `#` are skipped. Each other line
    /// must be `username:hash` with a non-empty username, no duplicate usernames, and a hash in
    /// one of the accepted formats. Error messages never include the hash field, and for a line
    /// without `:` (which may be a pasted password) they include nothing from the line at all.
    pub fn parse(text: &str) -> Result<PasswordFile, Vec<LineError>> {
        let mut file = PasswordFile::new();
        let mut errors = Vec::new();
        // A UTF-8 byte order mark is not whitespace, so trimming would not remove it.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let mut err = |message: String| errors.push(LineError { line, message });
            let Some((user, hash)) = trimmed.split_once(':') else {
                err("expected 'username:hash' (no ':' found)".to_owned());
                continue;
            };
            let (user, hash) = (user.trim(), hash.trim());
            if let Err(why) = check_username(user) {
                err(why.to_owned());
                continue;
            }
            if file.position(user).is_some() {
                err(format!("duplicate entry for user '{user}'"));
                continue;
            }
            match Hash::parse(hash) {
                Some(parsed) => file.entries.push(Entry {
                    user: user.to_owned(),
                    text: hash.to_owned(),
                    hash: parsed,
                }),
                None => err(format!(
                    "user '{user}': unsupported or malformed password hash (expected $7$, $6$ or \
                     $argon2id$; plaintext passwords are not accepted)"
                )),
            }
        }
        if errors.is_empty() {
            Ok(file)
        } else {
            Err(errors)
        }
    }

    /// Reads and parses the password file at `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        PasswordFile::parse(&text).map_err(|errors| PasswordFileError::Invalid {
            path: path.to_owned(),
            errors,
        })
    }

    fn position(&self, user: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.user == user)
    }

    /// Checks `password` for `user`.
    ///
    /// Unknown users get `false` after the same work as verifying the first user in the file
    /// (its hash is computed and the result discarded), so response time does not reveal
    /// whether a username exists. Users whose hashes use a different scheme or cost than the
    /// first entry remain distinguishable by timing; keep one scheme per file. With an empty
    /// file there is no user to reveal and `false` is returned at once.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.position(user) {
            Some(i) => self.entries[i].hash.verify(password),
            None => {
                if let Some(first) = self.entries.first() {
                    std::hint::black_box(first.hash.verify(std::hint::black_box(password)));
                }
                false
            }
        }
    }

    /// The stored hash of `user`, as written in the file (the verification cache's key includes it,
    /// so a changed hash never matches an old entry).
    pub fn hash_text(&self, user: &str) -> Option<&str> {
        self.position(user).map(|i| self.entries[i].text.as_str())
    }

    /// Usernames in file order.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.user.as_str())
    }

    /// Adds `user` with `hash`, or replaces the hash of an existing user in place.
    ///
    /// The hash must be in an accepted format (as produced by [`hash_argon2id`] or
    /// [`hash_pbkdf2_sha512`]) and the username must survive a render/parse round trip, so a
    /// file written by [`PasswordFile::render`] always loads again.
    pub fn set(&mut self, user: &str, hash: String) -> Result<(), EntryError> {
        check_username(user).map_err(EntryError::InvalidUser)?;
        let Some(parsed) = Hash::parse(&hash) else {
            return Err(EntryError::InvalidHash {
                user: user.to_owned(),
            });
        };
        let entry = Entry {
            user: user.to_owned(),
            text: hash,
            hash: parsed,
        };
        match self.position(user) {
            Some(i) => self.entries[i] = entry,
            None => self.entries.push(entry),
        }
        Ok(())
    }

    /// Removes `user`; returns whether it was present.
    pub fn remove(&mut self, user: &str) -> bool {
        match self.position(user) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no users.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the file back as `username:hash` lines in insertion order (comments are not
    /// preserved), each line terminated by `\n`.
    pub fn render(&self) -> String {
        self.entries
            .iter()
            .map(|e| format!("{}:{}\n", e.user, e.text))
            .collect()
    }
}

/// Fills a buffer from the operating system's CSPRNG. Should the OS source fail (it does not
/// on Linux), rand's thread-local CSPRNG, itself seeded from the OS, is used instead.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if rand::rngs::OsRng.try_fill_bytes(&mut buf).is_err() {
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut buf);
    }
    buf
}

/// Hashes `password` as an argon2id PHC string with the argon2 crate's default parameters
/// (m=19456 KiB, t=2, p=1) and a random 16-byte salt.
pub fn hash_argon2id(password: &[u8]) -> String {
    let salt = SaltString::encode_b64(&random_bytes::<16>()).expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(password, &salt)
        .expect("argon2 default parameters and a 16-byte salt are valid")
        .to_string()
}

/// Hashes `password` in mosquitto 2.0's `$7$ITERATIONS$SALT$HASH` format: PBKDF2-HMAC-SHA512
/// with a random 12-byte salt and a 64-byte output, both in padded standard base64 — exactly
/// what `mosquitto_passwd` writes, so mosquitto accepts the result.
///
/// `iterations` is clamped to `1..=MAX_PBKDF2_ITERATIONS` so the output always parses.
/// Use [`DEFAULT_PBKDF2_ITERATIONS`] unless mosquitto's own default is wanted.
pub fn hash_pbkdf2_sha512(password: &[u8], iterations: u32) -> String {
    let iterations = iterations.clamp(1, MAX_PBKDF2_ITERATIONS);
    let salt = random_bytes::<PBKDF2_SALT_LEN>();
    let mut out = [0u8; SHA512_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut out);
    format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(out))
}

/// What `audit` makes of one password file entry's hash field (never of the password itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashAssessment {
    /// A salted hash with parameters at or above the recommended minimum.
    Strong,
    /// A salted hash the appliance accepts, with weak parameters (why, without the hash).
    Weak(String),
    /// A hash without a salt (an empty salt field, or a bare hex digest).
    Unsalted,
    /// Not a hash at all: a password written in clear.
    Plaintext,
    /// Looks like a hash in a format the appliance does not read (`$1$`, `$5$`, `{SHA}`, ...).
    Unsupported,
}

/// The smallest argon2id memory cost (KiB) `audit` accepts without a warning...
pub const ARGON2_MIN_M_COST: u32 = 7168;
/// ... and the smallest memory × time product: OWASP's argon2id rows (m=47104 t=1, m=19456 t=2,
/// m=12288 t=3, m=9216 t=4, m=7168 t=5) are all at or above it.
pub const ARGON2_MIN_M_TIMES_T: u64 = 35_840;

/// Judges the hash field of a password file entry: salted or not, and how costly to attack.
/// `$7$` below [`DEFAULT_PBKDF2_ITERATIONS`] (mosquitto_passwd writes 101) and `$6$` (one salted
/// SHA-512) are weak; argon2id below OWASP's minimum parameters is weak.
pub fn assess_hash(field: &str) -> HashAssessment {
    let field = field.trim();
    match Hash::parse(field) {
        Some(Hash::Pbkdf2Sha512 { iterations, .. }) if iterations < DEFAULT_PBKDF2_ITERATIONS => {
            HashAssessment::Weak(format!(
                "$7$ with {iterations} PBKDF2 iterations (at least {DEFAULT_PBKDF2_ITERATIONS} recommended)"
            ))
        }
        Some(Hash::Pbkdf2Sha512 { .. }) => HashAssessment::Strong,
        Some(Hash::Sha512Salted { .. }) => {
            HashAssessment::Weak("$6$: a single salted SHA-512, cheap to brute-force".to_string())
        }
        Some(Hash::Argon2id(phc)) => {
            let params = PasswordHash::new(&phc)
                .ok()
                .and_then(|h| Params::try_from(&h).ok());
            match params {
                Some(p)
                    if p.m_cost() < ARGON2_MIN_M_COST
                        || u64::from(p.m_cost()) * u64::from(p.t_cost()) < ARGON2_MIN_M_TIMES_T =>
                {
                    HashAssessment::Weak(format!(
                        "argon2id m={} KiB t={}: below OWASP's minimum (m=19456 t=2 or equivalent)",
                        p.m_cost(),
                        p.t_cost()
                    ))
                }
                _ => HashAssessment::Strong,
            }
        }
        None => {
            let parts: Vec<&str> = field.split('$').collect();
            let empty_salt = match parts.as_slice() {
                ["", "6", salt, _] => salt.is_empty(),
                ["", "7", _, salt, _] => salt.is_empty(),
                _ => false,
            };
            let hex_digest =
                matches!(field.len(), 32 | 40 | 64 | 128) && field.bytes().all(|b| b.is_ascii_hexdigit());
            if empty_salt || hex_digest || (field.starts_with("$argon2") && parts.len() < 6) {
                HashAssessment::Unsalted
            } else if field.starts_with('$') || field.starts_with('{') {
                HashAssessment::Unsupported
            } else {
                HashAssessment::Plaintext
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Written by `mosquitto_passwd -c -b /tmp/x alice 'S3cret-passw0rd'` (mosquitto 2.0.11).
    const MOSQUITTO_LINE: &str = "alice:$7$101$MuIq43yDPmwEv8B+$cuRTa2XHDb8LHt2SOxMz9fkIOE5EMpvtJkAMmG+Ifm5UTlUnNPYyxELNgmLPDe7v8wQmDwEMkaRqI7bw75Rygg==";
    const MOSQUITTO_PASSWORD: &[u8] = b"S3cret-passw0rd";

    #[test]
    fn verifies_real_mosquitto_passwd_output() {
        let f = PasswordFile::parse(MOSQUITTO_LINE).unwrap();
        assert_eq!(f.len(), 1);
        assert!(f.verify("alice", MOSQUITTO_PASSWORD));
        assert!(!f.verify("alice", b"S3cret-passw0rD"));
        assert!(!f.verify("alice", b""));
        assert!(!f.verify("bob", MOSQUITTO_PASSWORD));
        assert!(!f.verify("Alice", MOSQUITTO_PASSWORD));
    }

    #[test]
    fn sha512_v1_format() {
        // mosquitto 1.x: base64(salt) and base64(SHA-512(password || salt)).
        let salt = b"0123456789ab";
        let mut h = Sha512::new();
        h.update(b"old-pass");
        h.update(salt);
        let line = format!("bob:$6${}${}", B64.encode(salt), B64.encode(h.finalize()));
        let f = PasswordFile::parse(&line).unwrap();
        assert!(f.verify("bob", b"old-pass"));
        assert!(!f.verify("bob", b"old-pasS"));
    }

    #[test]
    fn pbkdf2_round_trip_and_format() {
        let h = hash_pbkdf2_sha512(b"correct horse", 1000);
        let parts: Vec<&str> = h.split('$').collect();
        assert_eq!(parts.len(), 5);
        assert_eq!((parts[0], parts[1], parts[2]), ("", "7", "1000"));
        assert_eq!(B64.decode(parts[3]).unwrap().len(), 12);
        assert_eq!(parts[3].len(), 16);
        assert_eq!(parts[4].len(), 88);
        assert!(parts[4].ends_with("=="), "padded like mosquitto");
        let mut f = PasswordFile::new();
        f.set("carol", h.clone()).unwrap();
        assert!(f.verify("carol", b"correct horse"));
        assert!(!f.verify("carol", b"correct horsE"));
        assert_ne!(h, hash_pbkdf2_sha512(b"correct horse", 1000), "random salt");
        assert!(hash_pbkdf2_sha512(b"x", 0).starts_with("$7$1$"));
    }

    #[test]
    fn hashes_are_assessed_without_reading_passwords() {
        let (user, hash) = MOSQUITTO_LINE.split_once(':').unwrap();
        assert_eq!(user, "alice");
        assert!(matches!(assess_hash(hash), HashAssessment::Weak(w) if w.contains("101 PBKDF2")));
        assert_eq!(
            assess_hash(&hash_pbkdf2_sha512(b"x", DEFAULT_PBKDF2_ITERATIONS)),
            HashAssessment::Strong
        );
        assert_eq!(assess_hash(&hash_argon2id(b"x")), HashAssessment::Strong);
        let weak =
            "$argon2id$v=19$m=4096,t=3,p=1$c2FsdHNhbHRzYWx0$3u6V1E6DcQ1L7X0uXcTEw3nzSxQdVWvYq0nj4Yb2z0Y";
        assert!(matches!(assess_hash(weak), HashAssessment::Weak(w) if w.contains("m=4096")));
        let salt = B64.encode(b"0123456789ab");
        let digest = B64.encode([7u8; 64]);
        assert!(matches!(
            assess_hash(&format!("$6${salt}${digest}")),
            HashAssessment::Weak(_)
        ));
        assert_eq!(assess_hash(&format!("$6$${digest}")), HashAssessment::Unsalted);
        assert_eq!(
            assess_hash(&format!("$7$101$${digest}")),
            HashAssessment::Unsalted
        );
        assert_eq!(assess_hash(&"ab".repeat(32)), HashAssessment::Unsalted);
        assert_eq!(assess_hash("$1$abc$def"), HashAssessment::Unsupported);
        assert_eq!(assess_hash("{SHA}abcdef="), HashAssessment::Unsupported);
        assert_eq!(assess_hash("hunter2-plain"), HashAssessment::Plaintext);
    }

    #[test]
    fn argon2id_round_trip() {
        let h = hash_argon2id(b"correct horse");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        let mut f = PasswordFile::new();
        f.set("dave", h).unwrap();
        assert!(f.verify("dave", b"correct horse"));
        assert!(!f.verify("dave", b"correct horsE"));
        // Unknown user: false, after a dummy verification.
        assert!(!f.verify("nobody", b"correct horse"));
    }

    #[test]
    fn argon2id_with_reused_memory_agrees_with_the_crate() {
        use argon2::password_hash::PasswordVerifier;
        // Different costs in turn on one thread: the reused buffer grows and is sliced correctly.
        for (m, t, p) in [(64, 1, 1), (19456, 2, 1), (256, 3, 2), (64, 1, 1)] {
            let params = Params::new(m, t, p, None).unwrap();
            let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
            let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(b"pw", &salt)
                .unwrap()
                .to_string();
            let parsed = PasswordHash::new(&phc).unwrap();
            assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
            assert!(verify_argon2id(&phc, b"pw"), "{phc}");
            assert!(!verify_argon2id(&phc, b"pW"), "{phc}");
        }
        // A v=16 hash (argon2 1.0) verifies with its own version.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let old = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x10,
            Params::new(64, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw", &salt)
        .unwrap()
        .to_string();
        assert!(old.contains("v=16"), "{old}");
        assert!(verify_argon2id(&old, b"pw") && !verify_argon2id(&old, b"px"));
        assert!(!verify_argon2id("$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ", b"pw"));
    }

    #[test]
    fn refuses_other_argon2_variants_and_huge_costs() {
        let argon2i = "$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$Hh6Ls8YyAaMhB0KbxiNAJA";
        assert!(PasswordFile::parse(&format!("u:{argon2i}")).is_err());
        let huge = "$argon2id$v=19$m=4000000,t=2,p=1$c2FsdHNhbHQ$Hh6Ls8YyAaMhB0KbxiNAJA";
        assert!(PasswordFile::parse(&format!("u:{huge}")).is_err());
        let iters = MOSQUITTO_LINE.replace("$101$", "$4000000000$");
        assert!(PasswordFile::parse(&iters).is_err());
    }

    #[test]
    fn collects_all_errors_without_echoing_secrets() {
        let text = format!(
            "# comment\n\n{MOSQUITTO_LINE}\nbob:hunter2-plaintext\nhunter3-no-colon\n:$7$1$AAAA$BBBB\n\
             alice:{}\nx:$7$101$@@@$AAAA\n  # indented comment\n",
            hash_pbkdf2_sha512(b"p", 1)
        );
        let errors = PasswordFile::parse(&text).unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 5, 6, 7, 8]);
        let all = join_errors(&errors);
        assert!(!all.contains("hunter"), "{all}");
        assert!(!all.contains("@@@") && !all.contains("AAAA"), "{all}");
        assert!(
            errors[0].to_string().starts_with("line 4: user 'bob':"),
            "{}",
            errors[0]
        );
        assert!(errors[3].message.contains("duplicate"));
    }

    #[test]
    fn plaintext_entry_refused_without_echo() {
        let errors = PasswordFile::parse("mallory:S3cret-passw0rd\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(msg.contains("line 1") && msg.contains("mallory"), "{msg}");
        assert!(!msg.contains("S3cret"), "{msg}");
    }

    #[test]
    fn set_remove_render_round_trip() {
        let mut f = PasswordFile::parse(&format!("\u{feff}{MOSQUITTO_LINE}\r\n")).unwrap();
        f.set("zed", hash_pbkdf2_sha512(b"z", 1)).unwrap();
        f.set("bob", hash_pbkdf2_sha512(b"b", 1)).unwrap();
        f.set("zed", hash_pbkdf2_sha512(b"z2", 1)).unwrap();
        assert_eq!(f.users().collect::<Vec<_>>(), ["alice", "zed", "bob"]);
        let text = f.render();
        assert!(text.starts_with(&format!("{MOSQUITTO_LINE}\n")));
        let g = PasswordFile::parse(&text).unwrap();
        assert_eq!(g.render(), text);
        assert!(g.verify("zed", b"z2") && !g.verify("zed", b"z"));
        assert!(f.remove("zed"));
        assert!(!f.remove("zed"));
        assert_eq!(f.len(), 2);
        assert!(!f.is_empty());
        assert!(PasswordFile::new().is_empty());
        assert!(!format!("{f:?}").contains("$7$"));
    }

    #[test]
    fn set_refuses_bad_input() {
        let mut f = PasswordFile::new();
        let h = hash_pbkdf2_sha512(b"x", 1);
        for bad in ["", "a:b", "a\nb", " a", "#a"] {
            assert!(
                matches!(f.set(bad, h.clone()), Err(EntryError::InvalidUser(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            f.set("a", "plaintext".into()),
            Err(EntryError::InvalidHash { .. })
        ));
        assert!(matches!(
            f.set("a", format!("{h}\nb:x")),
            Err(EntryError::InvalidHash { .. })
        ));
        assert!(f.is_empty());
    }

    #[test]
    fn load_reports_path() {
        let dir = std::env::temp_dir().join(format!("guardlib-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing");
        let err = PasswordFile::load(&missing).unwrap_err();
        assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");
        let bad = dir.join("bad");
        std::fs::write(&bad, "u:plain\n").unwrap();
        let err = PasswordFile::load(&bad).unwrap_err().to_string();
        assert!(
            err.contains(&*bad.to_string_lossy()) && err.contains("line 1"),
            "{err}"
        );
        let good = dir.join("good");
        std::fs::write(&good, MOSQUITTO_LINE).unwrap();
        assert!(PasswordFile::load(&good)
            .unwrap()
            .verify("alice", MOSQUITTO_PASSWORD));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn parse_never_panics(text in "(([a-z#: ]{0,6}|\\$[0-9a-z]{0,3}\\$[A-Za-z0-9+/=$]{0,20})\n?){0,6}") {
            let _ = PasswordFile::parse(&text);
        }

        /// Arbitrary bytes (as a file read lossily would give): never a panic, errors within the file.
        #[test]
        fn parse_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            if let Err(errors) = PasswordFile::parse(&text) {
                prop_assert!(errors.iter().all(|e| e.line >= 1 && e.line <= text.lines().count()));
            }
        }

        /// Hash-shaped entries: parse never panics, and no error message repeats a hash field.
        #[test]
        fn parse_structured_never_echoes_hashes(
            lines in prop::collection::vec(
                (
                    "[a-z]{1,6}",
                    prop::sample::select(vec!["$7$", "$6$", "$argon2id$", "$argon2i$", "$7$101$", ""]),
                    "[A-Za-z0-9+/=$,]{4,40}",
                ),
                1..6,
            ),
        ) {
            let text: String = lines.iter().map(|(u, p, h)| format!("{u}:{p}{h}\n")).collect();
            if let Err(errors) = PasswordFile::parse(&text) {
                let all = join_errors(&errors);
                for (_, p, h) in &lines {
                    prop_assert!(!all.contains(&format!("{p}{h}")), "{}", all);
                }
            }
        }
    }
}
