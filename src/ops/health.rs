//! The appliance's state as operators see it: one [`Snapshot`] feeds `/metrics` (gauges), `/healthz`
//! (ok or degraded, with the reasons), systemd's `STATUS=` line and `mqtt-uplink status`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::broker::Broker;
use crate::outbox::Outbox;
use crate::uplink::UplinkState;

/// The uplink's last session, kept by [`track_uplink`].
#[derive(Debug, Default)]
struct LastSession {
    /// The transport of the current session and when it was established.
    up: Option<(&'static str, Instant)>,
}

/// Reads the running appliance's state. Cheap to clone.
#[derive(Clone)]
pub struct StateReader {
    pub(crate) outbox: Outbox,
    pub(crate) uplink: watch::Receiver<UplinkState>,
    pub(crate) uplink_configured: bool,
    pub(crate) broker: Arc<Broker>,
    pub(crate) degraded_after: Duration,
    /// The site id and the cloud broker's URL, for `mqtt_uplink_info` (which `status` shows).
    pub(crate) identity: Arc<(String, Option<String>)>,
    /// The uplink client certificate's notAfter (Unix seconds), when it has one.
    pub(crate) cert_expiry: Option<i64>,
    link: Arc<Mutex<LastSession>>,
}

/// The state at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `[site] id`.
    pub site: String,
    /// The cloud broker as configured (`mqtts://…` or plaintext `mqtt://…`), when there is an uplink.
    pub broker: Option<String>,
    pub uplink_configured: bool,
    pub uplink: UplinkState,
    /// How long the current uplink session has been up (since its MQTT handshake).
    pub handshake_age: Option<Duration>,
    pub devices: isize,
    /// Bytes held for device subscribers, queued or in flight, all together.
    pub subscriber_bytes: usize,
    pub outbox_depth: usize,
    pub outbox_bytes: u64,
    /// Size of the outbox's files on disk (segments, preallocated space included).
    pub outbox_disk_bytes: u64,
    pub qos0_depth: usize,
    /// Age of the oldest unsent QoS ≥ 1 message.
    pub oldest_age: Option<Duration>,
    pub accepted: u64,
    pub acked: u64,
    /// Messages refused since start because the outbox store could not write them.
    pub storage_errors: u64,
    /// The last write error while the outbox store is failing (until a write succeeds again).
    pub store_failure: Option<String>,
    pub degraded_after: Duration,
    /// The uplink client certificate's notAfter (Unix seconds), when it has one.
    pub cert_expiry: Option<i64>,
}

/// What `/healthz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Each reason is one line, e.g. "no transport up (uplink in backoff)".
    Degraded(Vec<String>),
}

impl StateReader {
    /// The appliance's counters.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        self.broker.metrics()
    }

    pub(crate) fn new(
        outbox: Outbox,
        uplink: watch::Receiver<UplinkState>,
        uplink_configured: bool,
        broker: Arc<Broker>,
        degraded_after: Duration,
        identity: (String, Option<String>),
    ) -> StateReader {
        StateReader {
            outbox,
            uplink,
            uplink_configured,
            broker,
            degraded_after,
            identity: Arc::new(identity),
            cert_expiry: None,
            link: Arc::default(),
        }
    }

    /// Reports the uplink client certificate's notAfter (Unix seconds) as
    /// `mqtt_uplink_uplink_cert_expiry_timestamp_seconds`.
    pub(crate) fn cert_expiry(mut self, not_after: Option<i64>) -> StateReader {
        self.cert_expiry = not_after;
        self
    }

    /// Follows the uplink state until the uplink stops: records when each session came up (for the
    /// handshake age).
    pub(crate) async fn track_uplink(self) {
        let mut rx = self.uplink.clone();
        loop {
            let state = rx.borrow_and_update().clone();
            {
                let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
                match state {
                    UplinkState::Connected { transport } => {
                        // Connects and switches are counted by the uplink itself, where they happen.
                        if link.up.is_none() {
                            link.up = Some((transport, Instant::now()));
                        }
                    }
                    _ => link.up = None,
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The state now.
    pub async fn snapshot(&self) -> Snapshot {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64;
        let handshake_age = self
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .up
            .map(|(_, since)| since.elapsed());
        let uplink = self.uplink.borrow().clone();
        let devices = self.broker.sessions().await;
        let c = self.outbox.counters();
        use std::sync::atomic::Ordering::Relaxed;
        Snapshot {
            site: self.identity.0.clone(),
            broker: self.identity.1.clone(),
            uplink_configured: self.uplink_configured,
            uplink,
            handshake_age,
            devices,
            subscriber_bytes: self.broker.subscriber_bytes(),
            outbox_depth: self.outbox.depth(),
            outbox_bytes: self.outbox.bytes(),
            outbox_disk_bytes: self.outbox.store_file_bytes(),
            qos0_depth: self.outbox.qos0_depth(),
            oldest_age: self
                .outbox
                .oldest_accepted_ms()
                .map(|ms| Duration::from_millis(now_ms.saturating_sub(ms))),
            accepted: c.accepted.load(Relaxed),
            acked: c.acked.load(Relaxed),
            storage_errors: c.storage_errors.load(Relaxed),
            store_failure: self.outbox.store_failure(),
            degraded_after: self.degraded_after,
            cert_expiry: self.cert_expiry,
        }
    }
}

fn state_name(s: &UplinkState) -> &'static str {
    match s {
        UplinkState::Connecting => "connecting",
        UplinkState::Connected { .. } => "connected",
        UplinkState::Backoff => "backoff",
        UplinkState::Stopped => "stopped",
    }
}

impl Snapshot {
    /// Degraded when the outbox store cannot write (devices get no PUBACK), when an uplink is
    /// configured but no transport is up, or when the oldest unsent message is older than
    /// `[metrics] degraded_after_s`.
    pub fn health(&self) -> Health {
        let mut reasons = Vec::new();
        if let Some(e) = &self.store_failure {
            reasons.push(format!("outbox store failing: {e}"));
        }
        if self.uplink_configured && !matches!(self.uplink, UplinkState::Connected { .. }) {
            reasons.push(format!("no transport up (uplink {})", state_name(&self.uplink)));
        }
        if let Some(age) = self.oldest_age.filter(|a| *a > self.degraded_after) {
            reasons.push(format!(
                "oldest unsent message is {} s old (threshold {} s)",
                age.as_secs(),
                self.degraded_after.as_secs()
            ));
        }
        if reasons.is_empty() {
            Health::Ok
        } else {
            Health::Degraded(reasons)
        }
    }

    /// One line for systemd's `STATUS=` and the logs.
    pub fn summary(&self) -> String {
        let uplink = match (&self.uplink, self.uplink_configured) {
            (_, false) => "no uplink".to_string(),
            (UplinkState::Connected { transport }, _) if self.plaintext() => {
                format!("uplink up via {transport} (plaintext MQTT)")
            }
            (UplinkState::Connected { transport }, _) => format!("uplink up via {transport}"),
            (s, _) => format!("uplink {}", state_name(s)),
        };
        format!(
            "{uplink}; outbox {} queued; {} device(s) connected",
            self.outbox_depth, self.devices
        )
    }

    /// The uplink speaks plaintext MQTT to the cloud broker (`mqtt://`, no TLS of its own).
    pub fn plaintext(&self) -> bool {
        self.broker.as_deref().is_some_and(|b| b.starts_with("mqtt://"))
    }

    /// The state gauges in Prometheus text format (the counters come from the registry).
    pub fn render_gauges(&self) -> String {
        let mut out = String::new();
        let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = writeln!(
            out,
            "# HELP mqtt_uplink_info The site id and the cloud broker (\"\" without an uplink)\n\
             # TYPE mqtt_uplink_info gauge\nmqtt_uplink_info{{site=\"{}\",broker=\"{}\"}} 1",
            escape(&self.site),
            escape(self.broker.as_deref().unwrap_or(""))
        );
        let mut gauge = |name: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        gauge(
            "mqtt_uplink_connections",
            "Connected device sessions",
            &[("", self.devices as f64)],
        );
        gauge(
            "mqtt_uplink_subscriber_bytes",
            "Bytes held for device subscribers (queued or in flight), against [limits] max_total_queued_bytes",
            &[("", self.subscriber_bytes as f64)],
        );
        gauge(
            "mqtt_uplink_outbox_depth",
            "QoS 1 messages waiting for the cloud",
            &[("", self.outbox_depth as f64)],
        );
        gauge(
            "mqtt_uplink_outbox_bytes",
            "Bytes held by waiting QoS 1 messages",
            &[("", self.outbox_bytes as f64)],
        );
        gauge(
            "mqtt_uplink_outbox_disk_bytes",
            "Size of the outbox files on disk (segments with their preallocated space and record headers)",
            &[("", self.outbox_disk_bytes as f64)],
        );
        gauge(
            "mqtt_uplink_outbox_qos0_depth",
            "QoS 0 messages waiting in the best-effort lane",
            &[("", self.qos0_depth as f64)],
        );
        gauge(
            "mqtt_uplink_outbox_oldest_age_seconds",
            "Age of the oldest unsent QoS 1 message (0 when empty)",
            &[("", self.oldest_age.map_or(0.0, |a| a.as_secs_f64()))],
        );
        gauge(
            "mqtt_uplink_outbox_accepted",
            "QoS 1 messages the outbox took since start",
            &[("", self.accepted as f64)],
        );
        gauge(
            "mqtt_uplink_outbox_acked",
            "QoS 1 messages the cloud acknowledged since start",
            &[("", self.acked as f64)],
        );
        let current = state_name(&self.uplink);
        let states: Vec<(String, f64)> = ["connecting", "connected", "backoff", "stopped"]
            .iter()
            .map(|s| (format!("{{state=\"{s}\"}}"), f64::from(u8::from(*s == current))))
            .collect();
        let states: Vec<(&str, f64)> = states.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        gauge(
            "mqtt_uplink_uplink_state",
            "Uplink state (1 for the current one)",
            &states,
        );
        let transport = match &self.uplink {
            UplinkState::Connected { transport } => format!("{{transport=\"{transport}\"}}"),
            _ => "{transport=\"none\"}".to_string(),
        };
        gauge(
            "mqtt_uplink_transport_up",
            "1 while an uplink session is up, labelled with its transport",
            &[(
                transport.as_str(),
                f64::from(u8::from(matches!(self.uplink, UplinkState::Connected { .. }))),
            )],
        );
        if let Some(age) = self.handshake_age {
            gauge(
                "mqtt_uplink_handshake_age_seconds",
                "Time since the current uplink session's handshake",
                &[("", age.as_secs_f64())],
            );
        }
        if let Some(t) = self.cert_expiry {
            gauge(
                "mqtt_uplink_uplink_cert_expiry_timestamp_seconds",
                "When the uplink's client certificate expires (notAfter, Unix time)",
                &[("", t as f64)],
            );
        }
        gauge(
            "mqtt_uplink_healthy",
            "1 when /healthz reports ok, 0 when degraded",
            &[("", f64::from(u8::from(self.health() == Health::Ok)))],
        );
        let _ = writeln!(
            out,
            "# HELP mqtt_uplink_outbox_storage_errors_total QoS 1 messages refused because the outbox \
             store could not write them\n# TYPE mqtt_uplink_outbox_storage_errors_total counter\n\
             mqtt_uplink_outbox_storage_errors_total {}",
            self.storage_errors
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            site: "plant\"7".into(),
            broker: Some("mqtts://cloud.example:8883".into()),
            uplink_configured: true,
            uplink: UplinkState::Connected { transport: "ssh" },
            handshake_age: Some(Duration::from_secs(3)),
            devices: 2,
            subscriber_bytes: 0,
            outbox_depth: 0,
            outbox_bytes: 0,
            outbox_disk_bytes: 0,
            qos0_depth: 0,
            oldest_age: None,
            accepted: 0,
            acked: 0,
            storage_errors: 0,
            store_failure: None,
            degraded_after: Duration::from_secs(60),
            cert_expiry: None,
        }
    }

    #[test]
    fn health_reasons() {
        assert_eq!(snap().health(), Health::Ok);
        let mut s = snap();
        s.uplink = UplinkState::Backoff;
        s.oldest_age = Some(Duration::from_secs(61));
        let Health::Degraded(r) = s.health() else {
            panic!("should be degraded")
        };
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].contains("no transport up"), "{r:?}");
        assert!(r[1].contains("61 s old"), "{r:?}");
        let mut failing = snap();
        failing.store_failure = Some("No space left on device (os error 28)".into());
        assert_eq!(
            failing.health(),
            Health::Degraded(vec![
                "outbox store failing: No space left on device (os error 28)".into()
            ])
        );
        s.uplink_configured = false;
        s.oldest_age = None;
        assert_eq!(
            s.health(),
            Health::Ok,
            "a local-only broker is healthy without an uplink"
        );
    }

    #[test]
    fn summary_and_gauges() {
        let s = snap();
        assert_eq!(
            s.summary(),
            "uplink up via ssh; outbox 0 queued; 2 device(s) connected"
        );
        let g = s.render_gauges();
        assert!(
            g.contains("mqtt_uplink_transport_up{transport=\"ssh\"} 1\n"),
            "{g}"
        );
        assert!(
            g.contains("mqtt_uplink_uplink_state{state=\"connected\"} 1\n"),
            "{g}"
        );
        assert!(
            g.contains("mqtt_uplink_uplink_state{state=\"backoff\"} 0\n"),
            "{g}"
        );
        assert!(g.contains("mqtt_uplink_handshake_age_seconds 3\n"), "{g}");
        assert!(!g.contains("cert_expiry"), "no client certificate, no gauge: {g}");
        let with_cert = Snapshot {
            cert_expiry: Some(1_800_000_000),
            ..snap()
        };
        assert!(
            with_cert
                .render_gauges()
                .contains("mqtt_uplink_uplink_cert_expiry_timestamp_seconds 1800000000\n"),
            "{}",
            with_cert.render_gauges()
        );
        assert!(
            g.contains("# TYPE mqtt_uplink_outbox_storage_errors_total counter\nmqtt_uplink_outbox_storage_errors_total 0\n"),
            "{g}"
        );
        assert!(
            g.contains("mqtt_uplink_info{site=\"plant\\\"7\",broker=\"mqtts://cloud.example:8883\"} 1\n"),
            "{g}"
        );
        let parsed = crate::ops::status::parse(&g).unwrap();
        let info = parsed.iter().find(|x| x.name == "mqtt_uplink_info").unwrap();
        assert_eq!(info.label("site"), Some("plant\"7"));
        let mut plain = snap();
        plain.broker = Some("mqtt://127.0.0.1:1883".into());
        plain.uplink = UplinkState::Connected { transport: "tcp" };
        assert_eq!(
            plain.summary(),
            "uplink up via tcp (plaintext MQTT); outbox 0 queued; 2 device(s) connected"
        );
    }
}
