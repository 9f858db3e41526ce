//! WireGuard key handling: parsing, reading key files, checking their permissions, deriving
//! public keys and generating a key pair for a new appliance.
//!
//! Error messages name the file or say what is wrong with the encoding, but never echo any part
//! of the key (base64 decoder messages quote the offending byte, so they are not passed on).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::TryRngCore as _;

use super::error::WgError;

/// Parses a base64 WireGuard key (as written by `wg genkey` / `wg pubkey`) into 32 bytes.
/// Surrounding whitespace is ignored.
pub fn parse_key(b64: &str) -> Result<[u8; 32], WgError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| {
            WgError::Key("not valid base64 (expected 44 characters as `wg genkey` writes)".into())
        })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        WgError::Key(format!(
            "decodes to {} bytes, a WireGuard key has 32",
            bytes.len()
        ))
    })
}

/// Reads and parses a key file (private or preshared key, base64, trailing newline allowed).
/// The error names the path and the problem, never the file content.
pub fn read_key_file(path: impl AsRef<Path>) -> Result<[u8; 32], WgError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| WgError::Key(format!("cannot read key file {}: {e}", path.display())))?;
    parse_key(&text).map_err(|e| match e {
        WgError::Key(reason) => WgError::Key(format!("key file {}: {reason}", path.display())),
        other => other,
    })
}

/// Returns a warning when a key file is readable or writable by group or others (a private key
/// should be mode 0600), `None` when the mode is fine or the file cannot be inspected (reading it
/// will then report the real error).
pub fn check_key_file_mode(path: impl AsRef<Path>) -> Option<String> {
    let path = path.as_ref();
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "key file {} is accessible by group/others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

/// Derives the public key of a private key.
pub fn public_key(private_key: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private_key)).to_bytes()
}

/// Encodes a key as base64, the format of wg configs.
pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Generates a key pair like `wg genkey | tee private.key | wg pubkey > public.key`:
/// `dir/private.key` is created with mode 0600 (never widened, even briefly) and `dir/public.key`
/// with 0644. Refuses to overwrite either file. Returns a `[Peer]` block to paste into the hub's
/// WireGuard config; `address` is this appliance's tunnel address (a placeholder is written when
/// `None`).
pub fn keygen(dir: &Path, address: Option<IpAddr>) -> Result<String, WgError> {
    let private_path = dir.join("private.key");
    let public_path = dir.join("public.key");
    // Check both first so that a refusal leaves nothing half-written behind.
    for p in [&private_path, &public_path] {
        if p.symlink_metadata().is_ok() {
            return Err(WgError::Key(format!(
                "{} already exists; refusing to overwrite it",
                p.display()
            )));
        }
    }

    let mut private = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut private)
        .map_err(|e| WgError::Key(format!("operating system random source failed: {e}")))?;
    // Clamp like `wg genkey` so the file is byte-identical in form to what the tools produce.
    private[0] &= 248;
    private[31] &= 127;
    private[31] |= 64;
    let public = public_key(&private);

    let write = |path: &Path, mode: u32, text: String| -> Result<(), WgError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true) // atomic "refuse to overwrite", also against a racing writer
            .mode(mode)
            .open(path)
            .map_err(|e| WgError::Key(format!("cannot create {}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| WgError::Key(format!("cannot write {}: {e}", path.display())))
    };
    write(&private_path, 0o600, format!("{}\n", encode_key(&private)))?;
    write(&public_path, 0o644, format!("{}\n", encode_key(&public)))?;

    let allowed = match address {
        Some(IpAddr::V4(a)) => format!("{a}/32"),
        Some(IpAddr::V6(a)) => format!("{a}/128"),
        None => "<appliance tunnel address>/32".to_string(),
    };
    Ok(format!(
        "[Peer]\nPublicKey = {}\nAllowedIPs = {allowed}\n",
        encode_key(&public)
    ))
}
