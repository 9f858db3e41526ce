//! Azure IoT Hub (`profile = "azure-iot-hub"`, `[uplink.azure]`): the device's MQTT identity and its
//! SAS tokens.
//!
//! IoT Hub takes the device id as the client id, `{hub}.azure-devices.net/{device_id}/?api-version=V`
//! as the username, and as the password either nothing (the device presents its X.509 certificate)
//! or a shared access signature:
//! `SharedAccessSignature sr={url-encoded resource uri}&sig={url-encoded signature}&se={expiry}`, the
//! signature being base64(HMAC-SHA256(base64-decoded device key, "{url-encoded resource uri}\n{expiry}"))
//! and the resource uri `{hub}.azure-devices.net/devices/{device_id}`. MQTT cannot change the
//! password of a live session, so the uplink reconnects with a fresh token at 80% of its lifetime
//! ([`SasSigner::renew_at`]): the persistent session and the outbox carry what was in flight.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac as _};

use crate::secret::Secret;

/// The IoT Hub MQTT API version used when `api_version` is not set.
pub const DEFAULT_API_VERSION: &str = "2021-04-12";
/// Lifetime of a SAS token when `token_lifetime_s` is not set.
pub const DEFAULT_TOKEN_LIFETIME_S: u64 = 3600;
/// The uplink reconnects with a fresh token after this share of the lifetime.
pub const RENEW_AT_PERCENT: u32 = 80;
/// Device-to-cloud message size at most (256 KB).
pub const MAX_PAYLOAD: u32 = 256 * 1024;

/// `[uplink.azure]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureConfig {
    /// The hub's name: `{hub}.azure-devices.net`.
    pub hub: String,
    pub device_id: String,
    pub api_version: String,
    pub auth: AzureAuth,
}

/// How the device proves who it is.
#[derive(Debug, Clone, PartialEq)]
pub enum AzureAuth {
    /// A SAS token made from the device's symmetric key (base64, as the portal shows it).
    Sas {
        key: Secret,
        /// Where the key was read from (`audit` checks its mode).
        key_file: std::path::PathBuf,
        lifetime: Duration,
    },
    /// The uplink's client certificate (`cert_file`, `key_file`).
    X509,
}

impl AzureConfig {
    /// `{hub}.azure-devices.net`.
    pub fn host(&self) -> String {
        format!("{}.azure-devices.net", self.hub)
    }

    /// The MQTT username IoT Hub expects.
    pub fn username(&self) -> String {
        format!(
            "{}/{}/?api-version={}",
            self.host(),
            self.device_id,
            self.api_version
        )
    }

    /// The resource a device SAS token grants access to.
    pub fn resource_uri(&self) -> String {
        format!("{}/devices/{}", self.host(), self.device_id)
    }

    /// The device-to-cloud topic prefix.
    pub fn events_prefix(&self) -> String {
        format!("devices/{}/messages/events/", self.device_id)
    }

    /// The one cloud-to-device filter IoT Hub lets a device subscribe to.
    pub fn devicebound_filter(&self) -> String {
        format!("devices/{}/messages/devicebound/#", self.device_id)
    }

    /// The token maker, for SAS authentication.
    pub fn signer(&self) -> Result<Option<SasSigner>, String> {
        match &self.auth {
            AzureAuth::X509 => Ok(None),
            AzureAuth::Sas { key, lifetime, .. } => {
                SasSigner::new(self.resource_uri(), key, *lifetime).map(Some)
            }
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`), as
/// Python's `urllib.parse.quote_plus` does for the characters a resource uri and a base64 signature
/// hold (`/`, `+`, `=`, `:` ...).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a device key as the Azure portal shows it (standard base64).
pub fn decode_key(key: &str) -> Result<Vec<u8>, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|_| "not a base64 device key (copy the device's primary key from IoT Hub)".to_string())?;
    if key.is_empty() {
        return Err("the device key is empty".into());
    }
    Ok(key)
}

/// The SAS token for `resource_uri` that expires at `expiry` (seconds since the Unix epoch).
pub fn sas_token(resource_uri: &str, key: &[u8], expiry: u64) -> String {
    let sr = url_encode(resource_uri);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        url_encode(&sig)
    )
}

/// Makes a fresh SAS token for each CONNECT and says when the one in use must be replaced.
pub struct SasSigner {
    resource_uri: String,
    key: Vec<u8>,
    lifetime: Duration,
    /// When the last token was made.
    issued: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for SasSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasSigner")
            .field("resource_uri", &self.resource_uri)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl SasSigner {
    pub fn new(resource_uri: String, key: &Secret, lifetime: Duration) -> Result<Self, String> {
        Ok(SasSigner {
            resource_uri,
            key: decode_key(key.expose())?,
            lifetime,
            issued: Mutex::new(None),
        })
    }

    /// A token valid for the configured lifetime from now.
    pub fn token(&self) -> Secret {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        *self.issued.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Secret::new(sas_token(
            &self.resource_uri,
            &self.key,
            now + self.lifetime.as_secs(),
        ))
    }

    /// When the session on the last token made must reconnect with a fresh one: at
    /// [`RENEW_AT_PERCENT`] of its lifetime.
    pub fn renew_at(&self) -> Option<Instant> {
        let issued = (*self.issued.lock().unwrap_or_else(|e| e.into_inner()))?;
        Some(issued + self.lifetime * RENEW_AT_PERCENT / 100)
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AzureConfig {
        AzureConfig {
            hub: "myhub".into(),
            device_id: "plant-7".into(),
            api_version: DEFAULT_API_VERSION.into(),
            auth: AzureAuth::X509,
        }
    }

    #[test]
    fn username_resource_and_topics_have_iot_hubs_shapes() {
        let c = cfg();
        assert_eq!(
            c.username(),
            "myhub.azure-devices.net/plant-7/?api-version=2021-04-12"
        );
        assert_eq!(c.resource_uri(), "myhub.azure-devices.net/devices/plant-7");
        assert_eq!(c.events_prefix(), "devices/plant-7/messages/events/");
        assert_eq!(c.devicebound_filter(), "devices/plant-7/messages/devicebound/#");
    }

    /// Microsoft's documentation gives the algorithm (its Python and Node.js samples) but no worked
    /// example with a published key and output, so the token is checked against an independent
    /// implementation: Python's hmac, hashlib, base64 and urllib.parse.quote_plus, the functions of
    /// Microsoft's Python sample, run here on the same inputs.
    #[test]
    fn sas_token_matches_an_independent_implementation() {
        // A fixed key and expiry, and a device id with characters that need encoding.
        let key_b64 = "dGhpcyBpcyBhIDMyIGJ5dGUgZGV2aWNlIGtleSEhISE=";
        let uri = "myhub.azure-devices.net/devices/plant-7:line+2";
        let expiry = 1_800_000_000u64;
        let ours = sas_token(uri, &decode_key(key_b64).unwrap(), expiry);
        let script = r#"
import sys, hmac, hashlib, base64
from urllib.parse import quote_plus, urlencode
uri, key, expiry = sys.argv[1], sys.argv[2], sys.argv[3]
sr = quote_plus(uri)
sig = base64.b64encode(hmac.new(base64.b64decode(key), (sr + "\n" + expiry).encode(), hashlib.sha256).digest())
print("SharedAccessSignature " + urlencode({"sr": uri, "sig": sig, "se": expiry}), end="")
"#;
        let out = match std::process::Command::new("python3")
            .args(["-c", script, uri, key_b64, &expiry.to_string()])
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "python3 is needed: {e}");
                eprintln!("SKIPPED: python3 is not installed ({e})");
                return;
            }
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let python = String::from_utf8(out.stdout).unwrap();
        assert_eq!(ours, python);
        assert!(ours.starts_with(
            "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fplant-7%3Aline%2B2&sig="
        ));
        assert!(ours.ends_with("&se=1800000000"));
        // A different expiry signs differently.
        assert_ne!(ours, sas_token(uri, &decode_key(key_b64).unwrap(), expiry + 1));
    }

    #[test]
    fn a_signer_renews_at_80_percent_and_keys_must_be_base64() {
        let s = SasSigner::new(
            "h.azure-devices.net/devices/d".into(),
            &Secret::new("a2V5"),
            Duration::from_secs(100),
        )
        .unwrap();
        assert!(s.renew_at().is_none());
        let before = Instant::now();
        let t = s.token();
        assert!(t
            .expose()
            .starts_with("SharedAccessSignature sr=h.azure-devices.net%2Fdevices%2Fd&sig="));
        let at = s.renew_at().unwrap();
        assert!(at >= before + Duration::from_secs(80) && at <= Instant::now() + Duration::from_secs(80));
        assert!(decode_key("not base64!").is_err());
        assert!(decode_key("").is_err());
    }
}
