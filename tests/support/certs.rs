//! Client certificates for mutual-TLS tests: a client CA and certificates it signs, written as PEM
//! files (keys with mode 0600).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};

/// A CA for client certificates.
pub type ClientCa = CertifiedIssuer<'static, KeyPair>;

/// Creates a CA named `name` and writes its certificate to `dir/{stem}.pem`.
pub fn client_ca(dir: &Path, stem: &str, name: &str) -> ClientCa {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), ca.pem()).unwrap();
    ca
}

/// A client certificate with common name `cn` (no CN when `None`), signed by `ca`, for client
/// authentication; written as `dir/{stem}.pem` and `dir/{stem}.key`.
pub fn client_cert(dir: &Path, ca: &ClientCa, stem: &str, cn: Option<&str>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, ca).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    super::write_secret(&dir.join(format!("{stem}.key")), &key.serialize_pem());
}
