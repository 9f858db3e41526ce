//! The uplink's client certificate (mutual TLS): reading and checking `cert_file` and `key_file`,
//! and `keygen tls` (a new key and a certificate signing request for enrolment).
//!
//! Keys: ECDSA (P-256, P-384), Ed25519 and RSA, in PEM as PKCS#8 (`PRIVATE KEY`), PKCS#1
//! (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`). Error messages name files, never key material.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};

/// `check` warns when the certificate expires within this.
pub const EXPIRY_WARNING_S: i64 = 30 * 86_400;

/// What validation learns from a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// The leaf's subject, e.g. `CN=plant-7`.
    pub subject: String,
    /// notBefore and notAfter of the leaf, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads the certificate chain (leaf first) and the private key.
pub fn load(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let pem = std::fs::read(cert_file).map_err(|e| format!("cannot read {}: {e}", cert_file.display()))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            cert_file.display()
        ));
    }
    let pem = std::fs::read(key_file).map_err(|e| format!("cannot read {}: {e}", key_file.display()))?;
    let key = match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => k,
        // The parser's own error may quote the file; say only what is wrong.
        Ok(None) | Err(_) => {
            return Err(format!(
            "{} holds no PEM private key (PKCS#8 \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")",
            key_file.display()
        ))
        }
    };
    Ok((chain, key))
}

/// Reads both files, checks that the key is one rustls can sign with and that it belongs to the
/// leaf certificate, and returns the leaf's subject and validity.
pub fn inspect(cert_file: &Path, key_file: &Path) -> Result<Inspected, String> {
    certified(cert_file, key_file).map(|(_, inspected)| inspected)
}

/// The certificate chain with its signing key, and what the leaf says. The key is matched against
/// the leaf's public key here rather than by rustls, whose check parses the leaf with webpki and so
/// refuses version 1 certificates (what `openssl x509 -req` makes without extensions), which a
/// broker may well accept.
fn certified(cert_file: &Path, key_file: &Path) -> Result<(CertifiedKey, Inspected), String> {
    let (chain, key) = load(cert_file, key_file)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| {
        format!(
            "{}: the first certificate does not parse: {e}",
            cert_file.display()
        )
    })?;
    let inspected = Inspected {
        subject: leaf.subject().to_string(),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        format!(
            "{}: unusable key ({e}): ECDSA P-256/P-384, Ed25519 or RSA expected",
            key_file.display()
        )
    })?;
    if let Some(spki) = signing.public_key() {
        if spki.as_ref() != leaf.public_key().raw {
            return Err(format!(
                "the key in {} does not belong to the certificate in {} ({})",
                key_file.display(),
                cert_file.display(),
                inspected.subject
            ));
        }
    }
    Ok((CertifiedKey::new(chain, signing), inspected))
}

/// A warning when the certificate is expired, expires within [`EXPIRY_WARNING_S`], or is not valid
/// yet at `now` (seconds since the Unix epoch).
pub fn expiry_warning(now: i64, cert: &Inspected) -> Option<String> {
    let days = |s: i64| s.div_euclid(86_400);
    if now >= cert.not_after {
        Some(format!(
            "the certificate ({}) expired on {}: the cloud will refuse the uplink; renew it",
            cert.subject,
            utc(cert.not_after)
        ))
    } else if cert.not_after - now < EXPIRY_WARNING_S {
        Some(format!(
            "the certificate ({}) expires in {} day(s), on {}: renew it",
            cert.subject,
            days(cert.not_after - now),
            utc(cert.not_after)
        ))
    } else if now < cert.not_before {
        Some(format!(
            "the certificate ({}) is not valid before {}: is the clock right?",
            cert.subject,
            utc(cert.not_before)
        ))
    } else {
        None
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the Unix epoch.
pub fn utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A rustls client configuration presenting the certificate in `cert_file` with `key_file`.
pub fn client_auth(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    cert_file: &Path,
    key_file: &Path,
) -> Result<rustls::ClientConfig, String> {
    let (key, _) = certified(cert_file, key_file)?;
    Ok(builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key))))
}

/// The key algorithm of `keygen tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyKind {
    /// ECDSA P-256 (accepted by AWS IoT Core, Azure IoT Hub and mosquitto).
    #[default]
    Ecdsa,
    /// Ed25519 (not accepted by AWS IoT Core).
    Ed25519,
    /// RSA 2048.
    Rsa,
}

/// Writes `dir/site.key` (PEM PKCS#8, created with mode 0600) and `dir/site.csr` (a PKCS#10
/// certificate signing request with subject `CN=cn`), creating `dir` (0700) if needed. Refuses to
/// overwrite either file. Returns what to do next.
pub fn keygen(dir: &Path, cn: &str, kind: KeyKind) -> Result<String, String> {
    use std::os::unix::fs::DirBuilderExt as _;
    if cn.is_empty() || cn.len() > 64 || cn.chars().any(char::is_control) {
        return Err(format!("--cn {cn:?}: 1 to 64 characters, no control characters"));
    }
    let key_path = dir.join("site.key");
    let csr_path = dir.join("site.csr");
    for p in [&key_path, &csr_path] {
        if p.symlink_metadata().is_ok() {
            return Err(format!("refusing to overwrite existing file {}", p.display()));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let alg = match kind {
        KeyKind::Ecdsa => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        KeyKind::Rsa => &rcgen::PKCS_RSA_SHA256,
    };
    let key = rcgen::KeyPair::generate_for(alg).map_err(|e| format!("cannot generate a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("cannot make a request: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| format!("cannot make a request: {e}"))?;
    let write_new = |path: &Path, mode: u32, data: &[u8]| -> Result<(), String> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write_new(&key_path, 0o600, key.serialize_pem().as_bytes())?;
    if let Err(e) = write_new(&csr_path, 0o644, csr.as_bytes()) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(format!(
        "wrote {key} (0600) and {csr} (CN={cn})\n\
         have the cloud or your CA sign {csr}, e.g.\n  \
         AWS IoT Core: aws iot create-certificate-from-csr --set-as-active \
         --certificate-signing-request file://{csr} --query certificatePem --output text > {pem}\n  \
         your own CA:  openssl x509 -req -in {csr} -CA ca.pem -CAkey ca.key -days 365 -out {pem}\n\
         then in [uplink]: cert_file = \"{pem}\" and key_file = \"{key}\"",
        key = key_path.display(),
        csr = csr_path.display(),
        pem = dir.join("site.pem").display(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_for(key: &rcgen::KeyPair, days: (i64, i64)) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "plant-7");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        params.self_signed(key).unwrap().pem()
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn ecdsa_ed25519_and_rsa_keys_are_read_and_matched_to_their_certificate() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, name) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, "ecdsa"),
            (&rcgen::PKCS_ECDSA_P384_SHA384, "p384"),
            (&rcgen::PKCS_ED25519, "ed25519"),
            (&rcgen::PKCS_RSA_SHA256, "rsa"),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = write(dir.path(), &format!("{name}.pem"), &cert_for(&key, (-1, 365)));
            let keyf = write(dir.path(), &format!("{name}.key"), &key.serialize_pem());
            let i = inspect(&cert, &keyf).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(i.subject, "CN=plant-7", "{name}");
            assert!(i.not_after > i.not_before);
        }
        // PKCS#1 RSA and SEC1 EC encodings too (what `openssl genrsa -traditional` / `ecparam` write).
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = write(dir.path(), "rsa1.pem", &cert_for(&rsa, (-1, 365)));
        let pkcs1 = openssl_convert(dir.path(), &rsa.serialize_pem(), &["rsa", "-traditional"]);
        if let Some(pkcs1) = pkcs1 {
            assert!(
                pkcs1.contains("BEGIN RSA PRIVATE KEY"),
                "{}",
                pkcs1.lines().next().unwrap_or("")
            );
            let keyf = write(dir.path(), "rsa1.key", &pkcs1);
            inspect(&cert, &keyf).unwrap();
        }
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = write(dir.path(), "ec1.pem", &cert_for(&ec, (-1, 365)));
        if let Some(sec1) = openssl_convert(dir.path(), &ec.serialize_pem(), &["ec"]) {
            assert!(sec1.contains("BEGIN EC PRIVATE KEY"));
            let keyf = write(dir.path(), "ec1.key", &sec1);
            inspect(&cert, &keyf).unwrap();
        }
    }

    /// `openssl ARGS` on a PEM key; `None` without openssl (only the PKCS#1/SEC1 cases need it).
    fn openssl_convert(dir: &Path, pem: &str, args: &[&str]) -> Option<String> {
        let input = write(dir, "convert-in.key", pem);
        let out = std::process::Command::new("openssl")
            .args(args)
            .arg("-in")
            .arg(&input)
            .output()
            .ok()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Some(String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_without_printing_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::KeyPair::generate().unwrap();
        let b = rcgen::KeyPair::generate().unwrap();
        let cert = write(dir.path(), "a.pem", &cert_for(&a, (-1, 365)));
        let keyf = write(dir.path(), "b.key", &b.serialize_pem());
        let e = inspect(&cert, &keyf).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        let secret: String = b.serialize_pem().lines().nth(1).unwrap().to_string();
        assert!(!e.contains(&secret));
        // A certificate where the key should be, and an empty certificate file.
        let e = inspect(&cert, &cert).unwrap_err();
        assert!(e.contains("holds no PEM private key"), "{e}");
        let empty = write(dir.path(), "empty.pem", "");
        assert!(inspect(&empty, &keyf)
            .unwrap_err()
            .contains("holds no PEM certificate"));
    }

    #[test]
    fn expiry_is_warned_30_days_ahead_and_when_past_or_not_yet_valid() {
        let day = 86_400;
        let now = 1_800_000_000;
        let c = |nb: i64, na: i64| Inspected {
            subject: "CN=x".into(),
            not_before: now + nb * day,
            not_after: now + na * day,
        };
        assert_eq!(expiry_warning(now, &c(-10, 31)), None);
        let w = expiry_warning(now, &c(-10, 29)).unwrap();
        assert!(w.contains("expires in 29 day(s)"), "{w}");
        assert!(expiry_warning(now, &c(-10, 0)).unwrap().contains("expired on"));
        assert!(expiry_warning(now, &c(-10, -3)).unwrap().contains("expired on"));
        assert!(expiry_warning(now, &c(2, 400))
            .unwrap()
            .contains("not valid before"));
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_800_000_000), "2027-01-15 08:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn keygen_writes_a_private_key_and_a_request_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        for kind in [KeyKind::Ecdsa, KeyKind::Ed25519, KeyKind::Rsa] {
            let _ = std::fs::remove_dir_all(&tls);
            let text = keygen(&tls, "plant-7", kind).unwrap();
            assert!(text.contains("site.csr"), "{text}");
            let key = std::fs::read_to_string(tls.join("site.key")).unwrap();
            assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{kind:?}");
            let mode = std::fs::metadata(tls.join("site.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let csr = std::fs::read_to_string(tls.join("site.csr")).unwrap();
            assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{kind:?}");
            let e = keygen(&tls, "plant-7", kind).unwrap_err();
            assert!(e.contains("refusing to overwrite"), "{e}");
            assert_eq!(std::fs::read_to_string(tls.join("site.key")).unwrap(), key);
        }
        assert!(keygen(&dir.path().join("x"), "", KeyKind::Ecdsa).is_err());
    }
}
