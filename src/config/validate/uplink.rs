//! `[uplink]` and its transports (`[uplink.ssh]`, `[uplink.wireguard]`, `[uplink.websocket]`,
//! `[uplink.proxy]`): broker URL, identity, timers, keys and the chain order.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::Ctx;
use crate::config::file::*;
use crate::config::model::*;
use crate::secret::Secret;

/// Parses `mqtt://host:port` or `mqtts://host:port` (IPv6 in brackets; port defaults to 1883/8883).
pub fn parse_broker_url(s: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "`{s}`: expected mqtts://HOST:PORT (or mqtt:// for plaintext)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, p.parse::<u16>().map_err(|_| format!("`{s}`: bad port"))?),
            None if after.is_empty() => (h, default_port),
            None => return Err(format!("`{s}`: unexpected text after `]`")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("`{s}`: bad port `{p}`"))?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(format!("`{s}`: bad host"));
    }
    if port == 0 {
        return Err(format!("`{s}`: port 0"));
    }
    Ok(BrokerUrl {
        tls,
        host: host.to_string(),
        port,
    })
}

pub(super) fn uplink(ctx: &mut Ctx<'_>, f: UplinkFile, site_id: &str) -> Option<Uplink> {
    let brokers = brokers(ctx, &f.broker.0);
    if f.client_id.is_empty() || f.client_id.len() > 65535 {
        ctx.error("uplink.client_id", "must be non-empty");
    }
    let password = f.password_file.as_ref().and_then(|p| {
        let path = ctx.file("uplink.password_file", p, true)?;
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().is_empty() => {
                ctx.error(
                    "uplink.password_file",
                    format!("{} is empty: put the uplink password in it", path.display()),
                );
                None
            }
            Ok(s) => Some(Secret::new(s.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) => {
                ctx.error(
                    "uplink.password_file",
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    });
    if password.is_some() && f.username.is_none() {
        ctx.error("uplink.username", "a password_file needs a username");
    }
    let ca_file = f
        .ca_file
        .as_ref()
        .and_then(|p| ctx.file("uplink.ca_file", p, false));
    let client_cert = client_cert(ctx, &f, brokers.as_deref());
    let mut transports = Vec::new();
    if f.transports.is_empty() {
        ctx.error("uplink.transports", "name at least one transport, e.g. [\"tls\"]");
    }
    for t in &f.transports {
        let kind = match t.as_str() {
            "tls" => TransportKind::Tls,
            "ssh" => TransportKind::Ssh,
            "wireguard" => TransportKind::Wireguard,
            "websocket" => TransportKind::Websocket,
            other => {
                ctx.error(
                    "uplink.transports",
                    format!(
                        "unknown transport `{other}` (known: \"tls\", \"ssh\", \"wireguard\", \"websocket\")"
                    ),
                );
                continue;
            }
        };
        if transports.contains(&kind) {
            ctx.error("uplink.transports", format!("`{t}` is listed twice"));
        }
        transports.push(kind);
    }
    if f.keepalive_s < 5 {
        ctx.error(
            "uplink.keepalive_s",
            "must be at least 5: the keepalive is how a dead link is found",
        );
    }
    if f.max_inflight == 0 {
        ctx.error("uplink.max_inflight", "must be at least 1");
    }
    if f.backoff_min_ms == 0 || f.backoff_min_ms > f.backoff_max_ms {
        ctx.error(
            "uplink.backoff_min_ms",
            "must be at least 1 and not above backoff_max_ms",
        );
    }
    if f.connect_timeout_s == 0 {
        ctx.error("uplink.connect_timeout_s", "must be at least 1");
    }
    if f.health_interval_s == 0 {
        ctx.error("uplink.health_interval_s", "must be at least 1");
    }
    if f.health_timeout_ms < 100 || f.health_timeout_ms > f.health_interval_s.saturating_mul(1000) {
        ctx.error(
            "uplink.health_timeout_ms",
            "must be at least 100 and not above health_interval_s",
        );
    }
    if f.probe_interval_s == 0 {
        ctx.error("uplink.probe_interval_s", "must be at least 1");
    }
    if f.return_after_s < f.probe_interval_s {
        ctx.error(
            "uplink.return_after_s",
            "must be at least probe_interval_s: one good probe is not \"healthy for a while\"",
        );
    }
    if f.max_in_msgs_per_s == 0 {
        ctx.error("uplink.max_in_msgs_per_s", "must be at least 1");
    }
    let connect_timeout = Duration::from_secs(f.connect_timeout_s);
    let uses = |k| transports.contains(&k);
    let ssh = match (&f.ssh, uses(TransportKind::Ssh)) {
        (Some(s), used) => {
            if !used {
                ctx.warn("uplink.ssh", "configured but \"ssh\" is not in uplink.transports");
            }
            ssh(ctx, s, connect_timeout)
        }
        (None, true) => {
            ctx.error("uplink.transports", "\"ssh\" needs an [uplink.ssh] section");
            None
        }
        (None, false) => None,
    };
    let wireguard = match (&f.wireguard, uses(TransportKind::Wireguard)) {
        (Some(w), used) => {
            if !used {
                ctx.warn(
                    "uplink.wireguard",
                    "configured but \"wireguard\" is not in uplink.transports",
                );
            }
            wireguard(ctx, w, connect_timeout)
        }
        (None, true) => {
            ctx.error(
                "uplink.transports",
                "\"wireguard\" needs an [uplink.wireguard] section",
            );
            None
        }
        (None, false) => None,
    };
    let websocket = match (&f.websocket, uses(TransportKind::Websocket)) {
        (Some(w), used) => {
            if !used {
                ctx.warn(
                    "uplink.websocket",
                    "configured but \"websocket\" is not in uplink.transports",
                );
            }
            crate::transport::websocket::parse_url(&w.url)
                .map_err(|e| ctx.error("uplink.websocket.url", e))
                .ok()
        }
        (None, true) => {
            ctx.error(
                "uplink.transports",
                "\"websocket\" needs an [uplink.websocket] section with its url",
            );
            None
        }
        (None, false) => None,
    };
    let proxy = match &f.proxy {
        Some(p) => {
            if transports == [TransportKind::Wireguard] {
                ctx.warn(
                    "uplink.proxy",
                    "unused: WireGuard (UDP) cannot go through an HTTP proxy",
                );
            }
            proxy(ctx, p)
        }
        None => Some(None),
    };
    let profile = super::profile::profile(ctx, &f, brokers.as_deref(), &transports);
    let protocol = match f.protocol.as_str() {
        "5" | "5.0" => Some(MqttVersion::V5),
        "3.1.1" | "4" => Some(MqttVersion::V311),
        other => {
            ctx.error(
                "uplink.protocol",
                format!("`{other}` is not an MQTT version here (\"5\" or \"3.1.1\")"),
            );
            None
        }
    };
    if f.topic_alias && protocol == Some(MqttVersion::V311) {
        ctx.warn(
            "uplink.topic_alias",
            "unused: topic aliases need MQTT 5 (protocol = \"3.1.1\")",
        );
    }
    let brokers = brokers?;
    let profile = profile?;
    let status_topic = status_topic(ctx, f.status_topic.as_deref(), site_id, &profile, &f.client_id);
    let username = match profile.azure() {
        Some(a) => Some(a.username()),
        None => f.username,
    };
    Some(Uplink {
        broker: brokers.first()?.clone(),
        brokers,
        client_cert: client_cert?,
        client_id: f.client_id,
        username,
        password,
        ca_file,
        transports,
        keepalive: Duration::from_secs(f.keepalive_s.into()),
        max_inflight: f.max_inflight,
        connect_timeout,
        backoff_min: Duration::from_millis(f.backoff_min_ms),
        backoff_max: Duration::from_millis(f.backoff_max_ms),
        health_interval: Duration::from_secs(f.health_interval_s),
        health_timeout: Duration::from_millis(f.health_timeout_ms),
        probe_interval: Duration::from_secs(f.probe_interval_s),
        return_after: Duration::from_secs(f.return_after_s),
        max_in_msgs_per_s: f.max_in_msgs_per_s,
        protocol: protocol?,
        topic_alias: f.topic_alias,
        status_topic,
        ssh,
        wireguard,
        websocket,
        proxy: proxy?,
        profile,
        alpn: f.alpn,
    })
}

/// `status_topic`: unset, `sites/<site.id>/status`, except for the cloud profiles, where it is off
/// unless set: `aws-iot` closes the connection over a publish (or refuses a CONNECT with a will) the
/// thing's policy does not allow, so an upgrade must not start sending one the policy was not written
/// for; `azure-iot-hub` takes device messages only under `devices/{id}/messages/events/` and keeps no
/// retained message. `""`: off. Else a topic name the profile accepts.
fn status_topic(
    ctx: &mut Ctx<'_>,
    raw: Option<&str>,
    site_id: &str,
    profile: &crate::profile::Profile,
    client_id: &str,
) -> Option<String> {
    use crate::profile::Profile;
    let key = "uplink.status_topic";
    let topic = match raw {
        Some("") => return None,
        Some(t) => t.to_string(),
        None if *profile != Profile::Generic => return None,
        None => format!("sites/{site_id}/status"),
    };
    if let Err(e) = crate::topic::validate_name(&topic) {
        ctx.error(key, format!("`{topic}` is not a topic name: {e}"));
        return None;
    }
    match profile {
        Profile::Generic => {}
        Profile::AwsIot => {
            if let Some(p) = crate::profile::aws::topic_problem(&topic, client_id) {
                ctx.error(key, format!("\"aws-iot\": {p}"));
                return None;
            }
            ctx.warn(
                key,
                format!(
                    "\"aws-iot\": the thing's policy must allow iot:Publish and iot:RetainPublish on \
                     topic/{topic}, and iot:Connect with the iot:ConnectAttributes \"LastWill\" (the will); \
                     AWS IoT Core closes the connection over a publish it does not allow"
                ),
            );
        }
        Profile::AzureIotHub(a) => {
            let events = a.events_prefix();
            if !topic.starts_with(&events) {
                ctx.error(
                    key,
                    format!(
                        "\"azure-iot-hub\": `{topic}`: IoT Hub takes device messages under `{events}` only \
                         (or status_topic = \"\" to turn the status off)"
                    ),
                );
                return None;
            }
            ctx.warn(
                key,
                "\"azure-iot-hub\": IoT Hub keeps no retained message: the status arrives as device \
                 events (route them to keep the latest), not as a retained state",
            );
        }
    }
    Some(topic)
}

/// `broker`: one URL or a list, each parsed; all of one scheme, none twice.
fn brokers(ctx: &mut Ctx<'_>, urls: &[String]) -> Option<Vec<BrokerUrl>> {
    if urls.is_empty() {
        ctx.error(
            "uplink.broker",
            "name at least one broker, e.g. \"mqtts://cloud.example.com:8883\"",
        );
        return None;
    }
    let mut out: Vec<BrokerUrl> = Vec::new();
    let mut ok = true;
    for url in urls {
        let b = match parse_broker_url(url) {
            Ok(b) => b,
            Err(e) => {
                ctx.error("uplink.broker", e);
                ok = false;
                continue;
            }
        };
        if !b.tls {
            let loopback = b
                .host
                .parse::<IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(b.host == "localhost");
            if !loopback {
                ctx.warn(
                    "uplink.broker",
                    format!("{b}: plaintext MQTT to the cloud broker: use mqtts://"),
                );
            }
        }
        if out.contains(&b) {
            ctx.error("uplink.broker", format!("{b} is listed twice"));
            ok = false;
        } else if out.first().is_some_and(|first| first.tls != b.tls) {
            ctx.error(
                "uplink.broker",
                "the addresses of one cloud all use mqtts:// (or all mqtt://), not a mix",
            );
            ok = false;
        }
        out.push(b);
    }
    ok.then_some(out)
}

/// `cert_file` and `key_file`: both or neither, over TLS only; the key must belong to the
/// certificate. A key readable by others, and a certificate that expires within 30 days (or has, or
/// is not valid yet), are warnings: the appliance still starts and keeps the outbox meanwhile.
/// `Some(None)`: no certificate; `None`: an error was reported.
fn client_cert(
    ctx: &mut Ctx<'_>,
    f: &UplinkFile,
    brokers: Option<&[BrokerUrl]>,
) -> Option<Option<ClientCert>> {
    let (cert, key) = match (&f.cert_file, &f.key_file) {
        (None, None) => return Some(None),
        (Some(c), Some(k)) => (c, k),
        (Some(_), None) => {
            ctx.error("uplink.cert_file", "a cert_file needs its key_file");
            return None;
        }
        (None, Some(_)) => {
            ctx.error("uplink.key_file", "a key_file needs its cert_file");
            return None;
        }
    };
    if brokers.is_some_and(|b| b.iter().any(|b| !b.tls)) {
        ctx.error(
            "uplink.cert_file",
            "a client certificate needs TLS: use mqtts:// broker addresses",
        );
    }
    let cert_file = ctx.file("uplink.cert_file", cert, false);
    let key_file = ctx.file("uplink.key_file", key, true);
    let (cert_file, key_file) = (cert_file?, key_file?);
    match crate::transport::certs::inspect(&cert_file, &key_file) {
        Ok(i) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if let Some(w) = crate::transport::certs::expiry_warning(now, &i) {
                ctx.warn("uplink.cert_file", w);
            }
            Some(Some(ClientCert {
                cert_file,
                key_file,
                subject: i.subject,
                not_after: i.not_after,
            }))
        }
        Err(e) => {
            ctx.error("uplink.key_file", e);
            None
        }
    }
}

/// `[uplink.proxy]`: `Some(None)` never happens here; `None` means an error was reported.
fn proxy(ctx: &mut Ctx<'_>, f: &ProxyFile) -> Option<Option<crate::transport::proxy::ProxyConfig>> {
    let addr = crate::transport::proxy::parse_url(&f.url)
        .map_err(|e| ctx.error("uplink.proxy.url", e))
        .ok();
    let password = match &f.password_file {
        Some(p) => {
            let path = ctx.file("uplink.proxy.password_file", p, true)?;
            match std::fs::read_to_string(&path) {
                Ok(s) if s.trim().is_empty() => {
                    ctx.error(
                        "uplink.proxy.password_file",
                        format!("{} is empty: put the proxy password in it", path.display()),
                    );
                    return None;
                }
                Ok(s) => Some(Secret::new(s.trim_end_matches(['\n', '\r']).to_string())),
                Err(e) => {
                    ctx.error(
                        "uplink.proxy.password_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    return None;
                }
            }
        }
        None => None,
    };
    match (&f.username, &password) {
        (Some(u), _) if u.is_empty() || u.contains([':', '\r', '\n']) => {
            ctx.error(
                "uplink.proxy.username",
                "must be non-empty, without `:` or line breaks (HTTP Basic credentials)",
            );
            return None;
        }
        (None, Some(_)) => {
            ctx.error("uplink.proxy.username", "a password_file needs a username");
            return None;
        }
        (Some(_), None) => {
            ctx.error(
                "uplink.proxy.password_file",
                "a username needs a password_file (the proxy password)",
            );
            return None;
        }
        _ => {}
    }
    let (host, port) = addr?;
    Some(Some(crate::transport::proxy::ProxyConfig {
        host,
        port,
        username: f.username.clone(),
        password,
    }))
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6 literals).
fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(r) => {
            let (h, p) = r.split_once("]:")?;
            (h, p)
        }
        None => s.rsplit_once(':')?,
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    (!host.is_empty() && !host.contains(['/', ' ', '@'])).then(|| (host.to_string(), port))
}

fn ssh(
    ctx: &mut Ctx<'_>,
    f: &SshFile,
    connect_timeout: Duration,
) -> Option<crate::transport::ssh::SshConfig> {
    if f.server.is_empty() || f.server.contains(['/', ' ', '@']) {
        ctx.error(
            "uplink.ssh.server",
            format!("`{}`: expected HOST:PORT (the port defaults to 22)", f.server),
        );
    }
    let forward = host_port(&f.forward_to);
    if forward.is_none() {
        ctx.error(
            "uplink.ssh.forward_to",
            format!("`{}`: expected HOST:PORT", f.forward_to),
        );
    }
    if f.user.is_empty() {
        ctx.error("uplink.ssh.user", "must be non-empty");
    }
    let key_file = ctx.file("uplink.ssh.key_file", &f.key_file, true);
    let known_hosts = ctx.resolve(&f.known_hosts);
    if !known_hosts.exists() && !f.trust_on_first_use {
        ctx.error(
            "uplink.ssh.known_hosts",
            format!(
                "{} does not exist: pin the bastion's host key there (ssh-keyscan), or set trust_on_first_use = true",
                known_hosts.display()
            ),
        );
    }
    if f.keepalive_interval_s == 0 {
        ctx.error(
            "uplink.ssh.keepalive_interval_s",
            "must be at least 1: keepalives are how a dead bastion is found",
        );
    }
    if f.trust_on_first_use {
        ctx.warn(
            "uplink.ssh.trust_on_first_use",
            "an unknown bastion host key will be trusted on first contact",
        );
    }
    let (forward_to_host, forward_to_port) = forward?;
    Some(crate::transport::ssh::SshConfig {
        server: f.server.clone(),
        user: f.user.clone(),
        key_file: key_file?,
        known_hosts,
        forward_to_host,
        forward_to_port,
        keepalive_interval: Duration::from_secs(f.keepalive_interval_s),
        keepalive_max: f.keepalive_max,
        connect_timeout,
        trust_on_first_use: f.trust_on_first_use,
    })
}

fn wireguard(
    ctx: &mut Ctx<'_>,
    f: &WireguardFile,
    connect_timeout: Duration,
) -> Option<crate::transport::wireguard::WgConfig> {
    use crate::transport::wireguard::{parse_key, read_key_file};
    let private_key = ctx
        .file("uplink.wireguard.private_key_file", &f.private_key_file, true)
        .and_then(|p| {
            read_key_file(&p)
                .map_err(|e| ctx.error("uplink.wireguard.private_key_file", e.to_string()))
                .ok()
        });
    let peer_public_key = parse_key(&f.peer_public_key)
        .map_err(|e| ctx.error("uplink.wireguard.peer_public_key", e.to_string()))
        .ok();
    let preshared_key = match &f.preshared_key_file {
        Some(p) => match ctx.file("uplink.wireguard.preshared_key_file", p, true) {
            Some(path) => match read_key_file(&path) {
                Ok(k) => Some(Some(k)),
                Err(e) => {
                    ctx.error("uplink.wireguard.preshared_key_file", e.to_string());
                    None
                }
            },
            None => None,
        },
        None => Some(None),
    };
    if host_port(&f.endpoint).is_none() {
        ctx.error(
            "uplink.wireguard.endpoint",
            format!("`{}`: expected HOST:PORT", f.endpoint),
        );
    }
    let address: Option<IpAddr> = f
        .address
        .parse()
        .map_err(|_| {
            ctx.error(
                "uplink.wireguard.address",
                format!("`{}` is not an IP address", f.address),
            )
        })
        .ok();
    let broker: Option<SocketAddr> = f
        .broker
        .parse()
        .map_err(|_| {
            ctx.error(
                "uplink.wireguard.broker",
                format!("`{}`: expected IP:PORT", f.broker),
            )
        })
        .ok();
    if !(576..=9000).contains(&f.mtu) {
        ctx.error("uplink.wireguard.mtu", "must be between 576 and 9000");
    }
    Some(crate::transport::wireguard::WgConfig {
        private_key: private_key?,
        peer_public_key: peer_public_key?,
        preshared_key: preshared_key?,
        endpoint: f.endpoint.clone(),
        address: address?,
        broker: broker?,
        persistent_keepalive: (f.persistent_keepalive_s > 0)
            .then(|| Duration::from_secs(f.persistent_keepalive_s)),
        mtu: f.mtu,
        handshake_timeout: connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigErrors};
    use std::path::Path;

    fn uplink(dir: &Path, body: &str) -> Result<crate::config::Config, ConfigErrors> {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:1883\"\n[auth]\nallow_anonymous = true\n\
             [uplink]\nclient_id = \"x\"\n{body}\n"
        );
        parse(&dir.join("c.toml"), &text)
    }

    fn error(dir: &Path, body: &str) -> String {
        let e = uplink(dir, body).expect_err(body);
        e.to_string()
    }

    #[test]
    fn the_status_topic_defaults_to_the_site_and_is_checked_as_a_topic_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let site = |body: &str| {
            parse(
                &d.join("c.toml"),
                &format!(
                    "[site]\nid = \"plant-7\"\n[[listener]]\nbind = \"127.0.0.1:1883\"\n[auth]\nallow_anonymous = true\n\
                     [uplink]\nclient_id = \"x\"\nbroker = \"mqtt://127.0.0.1:1\"\n{body}\n"
                ),
            )
        };
        let topic = |body: &str| site(body).unwrap().uplink.unwrap().status_topic;
        assert_eq!(topic("").as_deref(), Some("sites/plant-7/status"));
        assert_eq!(topic("status_topic = \"\"").as_deref(), None);
        assert_eq!(topic("status_topic = \"a/b\"").as_deref(), Some("a/b"));
        let e = site("status_topic = \"sites/+/status\"").unwrap_err().to_string();
        assert!(
            e.contains("uplink.status_topic") && e.contains("not a topic name"),
            "{e}"
        );
    }

    #[test]
    fn broker_is_a_string_or_a_list_of_one_scheme_without_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let c = uplink(d, "broker = \"mqtt://127.0.0.1:1\"").unwrap();
        assert_eq!(c.uplink.unwrap().brokers.len(), 1);
        let u = uplink(d, "broker = [\"mqtt://127.0.0.1:1\", \"mqtt://localhost:2\"]")
            .unwrap()
            .uplink
            .unwrap();
        assert_eq!(u.broker, u.brokers[0]);
        assert_eq!(u.brokers[1].port, 2);
        assert_eq!(u.brokers_label(), "mqtt://127.0.0.1:1, mqtt://localhost:2");
        for (body, want) in [
            ("broker = []", "name at least one broker"),
            ("broker = [\"mqtt://127.0.0.1:1\", \"mqtts://a:2\"]", "not a mix"),
            (
                "broker = [\"mqtt://127.0.0.1:1\", \"mqtt://127.0.0.1:1\"]",
                "listed twice",
            ),
            (
                "broker = [\"mqtt://127.0.0.1:1\", \"http://a\"]",
                "expected mqtts://",
            ),
            ("broker = 5", "a broker URL or a list"),
        ] {
            let e = error(d, body);
            assert!(e.contains("uplink.broker") || e.contains("uplink"), "{body}: {e}");
            assert!(e.contains(want), "{body}: {e}");
            assert!(e.contains("c.toml:"), "file and line: {e}");
        }
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_tls() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "site");
        std::fs::write(d.join("c.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(d.join("c.key"), key.serialize_pem()).unwrap();
        std::fs::set_permissions(
            d.join("c.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let tls = "broker = \"mqtts://localhost:1\"\nca_file = \"c.pem\"\n";
        let ok = uplink(d, &format!("{tls}cert_file = \"c.pem\"\nkey_file = \"c.key\"")).unwrap();
        assert!(
            !ok.warnings.iter().any(|w| w.key.starts_with("uplink")),
            "{:?}",
            ok.warnings
        );
        let cert = ok.uplink.unwrap().client_cert.unwrap();
        assert_eq!(cert.subject, "CN=site");
        assert!(error(d, &format!("{tls}cert_file = \"c.pem\"")).contains("needs its key_file"));
        assert!(error(d, &format!("{tls}key_file = \"c.key\"")).contains("needs its cert_file"));
        let e = error(
            d,
            "broker = \"mqtt://127.0.0.1:1\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
        );
        assert!(e.contains("needs TLS"), "{e}");
        // A credential name that cannot be resolved is refused like the other secrets.
        let e = error(
            d,
            &format!("{tls}cert_file = \"c.pem\"\nkey_file = \"cred:no/such\""),
        );
        assert!(e.contains("uplink.key_file"), "{e}");
        // Readable by others: a warning, not an error.
        std::fs::set_permissions(
            d.join("c.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .unwrap();
        let w = uplink(d, &format!("{tls}cert_file = \"c.pem\"\nkey_file = \"c.key\""))
            .unwrap()
            .warnings;
        assert!(
            w.iter()
                .any(|w| w.key == "uplink.key_file" && w.message.contains("0640")),
            "{w:?}"
        );
    }
}
