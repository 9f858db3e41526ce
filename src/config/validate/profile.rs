//! `[uplink] profile`, `alpn` and `[uplink.azure]`: what a cloud profile requires of the uplink's
//! settings, and the cloud's published limits applied to every mapping (each refusal names the
//! mapping's line).

use super::Ctx;
use crate::config::file::*;
use crate::config::model::*;
use crate::profile::azure::{self, AzureAuth, AzureConfig};
use crate::profile::{aws, Profile};
use crate::secret::Secret;

/// Shortest and longest SAS token lifetime accepted.
const MIN_TOKEN_LIFETIME_S: u64 = 10;
const MAX_TOKEN_LIFETIME_S: u64 = 365 * 86_400;

/// The profile and the settings it needs; `None` when an error was reported.
pub(super) fn profile(
    ctx: &mut Ctx<'_>,
    f: &UplinkFile,
    brokers: Option<&[BrokerUrl]>,
    transports: &[TransportKind],
) -> Option<Profile> {
    let tls = brokers.map(|b| b.iter().all(|b| b.tls));
    if let Some(alpn) = &f.alpn {
        for p in alpn {
            if p.is_empty() || p.len() > 255 {
                ctx.error("uplink.alpn", format!("`{p}`: 1 to 255 bytes"));
            }
        }
        if tls == Some(false) {
            ctx.error(
                "uplink.alpn",
                "ALPN is part of TLS: use mqtts:// broker addresses",
            );
        }
    }
    let name = f.profile.as_deref().unwrap_or("generic");
    let has_cert = f.cert_file.is_some() && f.key_file.is_some();
    let probes = transports.len() > 1;
    match name {
        "generic" => {
            if f.azure.is_some() {
                ctx.error(
                    "uplink.azure",
                    "[uplink.azure] needs profile = \"azure-iot-hub\" in [uplink]",
                );
                return None;
            }
            Some(Profile::Generic)
        }
        "aws-iot" => {
            let mut ok = true;
            if f.azure.is_some() {
                ctx.error(
                    "uplink.azure",
                    "[uplink.azure] needs profile = \"azure-iot-hub\", not \"aws-iot\"",
                );
                ok = false;
            }
            if !has_cert {
                ctx.error(
                    "uplink.profile",
                    "\"aws-iot\": AWS IoT Core takes only mutual TLS: set cert_file and key_file \
                     (the thing's certificate and its key; `mqtt-uplink keygen tls` makes a key and a CSR)",
                );
                ok = false;
            }
            if tls == Some(false) {
                ctx.error(
                    "uplink.broker",
                    "\"aws-iot\": AWS IoT Core takes TLS only: use mqtts://ENDPOINT-ats.iot.REGION.amazonaws.com:8883",
                );
                ok = false;
            }
            for b in brokers.unwrap_or_default() {
                if b.port != 8883 && b.port != 443 {
                    ctx.warn(
                        "uplink.broker",
                        format!(
                            "{b}: AWS IoT Core serves MQTT on port 8883, or 443 with ALPN {}",
                            aws::ALPN
                        ),
                    );
                }
            }
            if let Some(p) = aws::client_id_problem(&f.client_id, probes) {
                ctx.error("uplink.client_id", format!("\"aws-iot\": {p}"));
                ok = false;
            }
            ok.then_some(Profile::AwsIot)
        }
        "azure-iot-hub" => azure_profile(ctx, f, brokers, has_cert, probes).map(Profile::AzureIotHub),
        other => {
            ctx.error(
                "uplink.profile",
                format!("unknown profile `{other}` (known: \"generic\", \"aws-iot\", \"azure-iot-hub\")"),
            );
            None
        }
    }
}

fn azure_profile(
    ctx: &mut Ctx<'_>,
    f: &UplinkFile,
    brokers: Option<&[BrokerUrl]>,
    has_cert: bool,
    probes: bool,
) -> Option<AzureConfig> {
    let Some(a) = &f.azure else {
        ctx.error(
            "uplink.profile",
            "\"azure-iot-hub\" needs an [uplink.azure] section: hub, device_id and device_key_file \
             (or cert_file and key_file in [uplink])",
        );
        return None;
    };
    let mut ok = true;
    let hub_ok = !a.hub.is_empty()
        && a.hub.len() <= 50
        && a.hub.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !hub_ok {
        let hint = a
            .hub
            .split_once('.')
            .map(|(name, _)| format!(" (the name only: hub = \"{name}\")"))
            .unwrap_or_default();
        ctx.error(
            "uplink.azure.hub",
            format!("`{}`: the hub's name, letters, digits and `-`{hint}", a.hub),
        );
        ok = false;
    }
    // IoT Hub's device ids: ASCII letters, digits and `-.%_*?!(),:=@$'` (not `+` or `#`, which
    // would be wildcards in the cloud-to-device filter, nor `/`), at most 128.
    let device_ok = !a.device_id.is_empty()
        && a.device_id.len() <= 128
        && a.device_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(c));
    if !device_ok {
        ctx.error(
            "uplink.azure.device_id",
            format!(
                "`{}`: 1 to 128 ASCII letters, digits or `-.%_*?!(),:=@$'`",
                a.device_id
            ),
        );
        ok = false;
    } else if f.client_id != a.device_id {
        ctx.error(
            "uplink.client_id",
            format!(
                "\"azure-iot-hub\": IoT Hub takes the device id as the client id: set client_id = \"{}\"",
                a.device_id
            ),
        );
        ok = false;
    }
    if a.api_version.is_empty()
        || !a
            .api_version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        ctx.error(
            "uplink.azure.api_version",
            format!("`{}`: e.g. \"{}\"", a.api_version, azure::DEFAULT_API_VERSION),
        );
        ok = false;
    }
    for key in ["username", "password_file"] {
        let set = match key {
            "username" => f.username.is_some(),
            _ => f.password_file.is_some(),
        };
        if set {
            ctx.error(
                &format!("uplink.{key}"),
                "\"azure-iot-hub\" makes the username and the password (a SAS token) itself: remove it",
            );
            ok = false;
        }
    }
    if !(MIN_TOKEN_LIFETIME_S..=MAX_TOKEN_LIFETIME_S).contains(&a.token_lifetime_s) {
        ctx.error(
            "uplink.azure.token_lifetime_s",
            format!("must be {MIN_TOKEN_LIFETIME_S} to {MAX_TOKEN_LIFETIME_S} (a year)"),
        );
        ok = false;
    }
    if brokers.is_some_and(|b| b.iter().any(|b| !b.tls)) {
        ctx.error(
            "uplink.broker",
            "\"azure-iot-hub\": IoT Hub takes TLS only: use mqtts://HUB.azure-devices.net:8883",
        );
        ok = false;
    }
    let host = format!("{}.azure-devices.net", a.hub);
    for b in brokers.unwrap_or_default() {
        if hub_ok && b.host != host {
            ctx.warn(
                "uplink.broker",
                format!("{b}: the hub \"{}\" is at mqtts://{host}:8883", a.hub),
            );
        }
    }
    if probes {
        ctx.warn(
            "uplink.transports",
            "\"azure-iot-hub\": a preferred transport is probed by connecting as CLIENT_ID-probe, \
             which IoT Hub refuses (one connection per device id): the uplink will not return to \
             a preferred transport on its own; list one transport, or restart to return",
        );
    }
    let auth = match (&a.device_key_file, has_cert) {
        (Some(_), true) => {
            ctx.error(
                "uplink.azure.device_key_file",
                "a device key or a certificate (cert_file, key_file), not both",
            );
            None
        }
        (None, true) => Some(AzureAuth::X509),
        (None, false) => {
            ctx.error(
                "uplink.azure",
                "set device_key_file (the device's symmetric key, for SAS tokens) or cert_file and \
                 key_file in [uplink] (X.509)",
            );
            None
        }
        (Some(p), false) => {
            let path = ctx.file("uplink.azure.device_key_file", p, true)?;
            match std::fs::read_to_string(&path) {
                Ok(text) => match azure::decode_key(&text) {
                    Ok(_) => Some(AzureAuth::Sas {
                        key: Secret::new(text.trim().to_string()),
                        key_file: path.clone(),
                        lifetime: std::time::Duration::from_secs(a.token_lifetime_s),
                    }),
                    Err(e) => {
                        ctx.error("uplink.azure.device_key_file", format!("{}: {e}", path.display()));
                        None
                    }
                },
                Err(e) => {
                    ctx.error(
                        "uplink.azure.device_key_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    None
                }
            }
        }
    };
    let auth = auth?;
    ok.then(|| AzureConfig {
        hub: a.hub.clone(),
        device_id: a.device_id.clone(),
        api_version: a.api_version.clone(),
        auth,
    })
}

/// The cloud's limits applied to every mapping: topic shapes, lengths and depths, reserved
/// prefixes, and the payload size devices may send (`[limits] max_packet_size`).
pub(super) fn mappings(ctx: &mut Ctx<'_>, uplink: &Uplink, maps: &[Mapping], limits: &Limits) {
    let max_payload = match &uplink.profile {
        Profile::Generic => return,
        Profile::AwsIot => aws::MAX_PAYLOAD,
        Profile::AzureIotHub(_) => azure::MAX_PAYLOAD,
    };
    let name = uplink.profile.name();
    for m in maps {
        let key = format!("map[{}].topic", m.index);
        let remote = format!("{}{}", m.remote_prefix, m.topic);
        match &uplink.profile {
            Profile::AwsIot => {
                if let Some(p) = aws::topic_problem(&remote, &uplink.client_id) {
                    ctx.error(&key, format!("\"aws-iot\": cloud topic {p}"));
                } else if remote.ends_with('#') && m.direction.goes_out() {
                    // Device topics under `#` may be deeper than the filter: bound them by the
                    // broker's own level limit.
                    let slashes = |s: &str| s.matches('/').count();
                    let deepest = limits.max_topic_levels.saturating_sub(1) + slashes(&m.remote_prefix);
                    let deepest = deepest.saturating_sub(slashes(&m.local_prefix));
                    if deepest > aws::MAX_SLASHES {
                        ctx.warn(
                            &key,
                            format!(
                                "\"aws-iot\": device topics under `{}{}` may reach {deepest} forward \
                                 slashes in the cloud (`{remote}`); AWS IoT Core refuses more than {}: \
                                 lower [limits] max_topic_levels or the depth of the mapping",
                                m.local_prefix,
                                m.topic,
                                aws::MAX_SLASHES
                            ),
                        );
                    }
                }
            }
            Profile::AzureIotHub(a) => {
                let (events, devicebound) = (a.events_prefix(), a.devicebound_filter());
                match m.direction {
                    Direction::Both => ctx.error(
                        &key,
                        format!(
                            "\"azure-iot-hub\": IoT Hub has one topic each way: use an out mapping \
                             under `{events}` and an in mapping of `{devicebound}`"
                        ),
                    ),
                    Direction::Out if !remote.starts_with(&events) => ctx.error(
                        &key,
                        format!(
                            "\"azure-iot-hub\": cloud topic `{remote}`: device-to-cloud messages go \
                             under `{events}` (set remote_prefix = \"{events}\")"
                        ),
                    ),
                    Direction::In if remote != devicebound => ctx.error(
                        &key,
                        format!(
                            "\"azure-iot-hub\": cloud filter `{remote}`: IoT Hub lets a device \
                             subscribe to `{devicebound}` only (remote_prefix = \"devices/{}/messages/devicebound/\", topic = \"#\")",
                            a.device_id
                        ),
                    ),
                    _ => {}
                }
            }
            Profile::Generic => {}
        }
    }
    if maps.iter().any(|m| m.direction.goes_out()) && limits.max_packet_size > max_payload {
        let key = if ctx.map.line_of("limits.max_packet_size").is_some() {
            "limits.max_packet_size"
        } else {
            "uplink.profile"
        };
        ctx.error(
            key,
            format!(
                "\"{name}\": the cloud takes payloads of at most {max_payload} bytes, but devices may \
                 send packets of up to {} bytes ([limits] max_packet_size): set max_packet_size = \
                 {max_payload} in [limits] so the broker refuses larger messages at the device",
                limits.max_packet_size
            ),
        );
    }
}
