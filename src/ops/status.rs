//! `mqtt-uplink status`: one screen from the metrics endpoint, like `wg show` for the appliance. Also
//! the Prometheus text parser the tests use.

use std::fmt::Write as _;

use crate::config::MetricsBind;

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text format (comments skipped). Lines that do not parse are an error: the
/// endpoint must produce nothing a scraper would reject.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: cannot parse `{line}`", i + 1);
        let (series, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad())?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(bad)?;
                (name.to_string(), parse_labels(body).ok_or_else(bad)?)
            }
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(bad());
        }
        out.push(Sample { name, labels, value });
    }
    Ok(out)
}

fn parse_labels(body: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

fn sum(samples: &[Sample], name: &str) -> f64 {
    // Not `.sum()`: a float sum of nothing is -0.0, which printed as "-0".
    samples
        .iter()
        .filter(|s| s.name == name)
        .fold(0.0, |total, s| total + s.value)
}

fn by_label(samples: &[Sample], name: &str, label: &str) -> String {
    let mut parts: Vec<String> = samples
        .iter()
        .filter(|s| s.name == name && s.value != 0.0)
        .map(|s| format!("{} {}", s.label(label).unwrap_or("?"), s.value))
        .collect();
    parts.sort();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The one-screen summary from a scrape of `/metrics` and `/healthz`.
pub fn render(endpoint: &MetricsBind, metrics: &[Sample], health_code: u16, health: &str) -> String {
    let mut o = String::new();
    let verdict = if health_code == 200 { "ok" } else { "DEGRADED" };
    let info = metrics.iter().find(|s| s.name == "mqtt_uplink_info");
    let site = info.and_then(|s| s.label("site")).unwrap_or("?");
    let broker = info.and_then(|s| s.label("broker")).unwrap_or("");
    let _ = writeln!(o, "mqtt-uplink  site {site}  at {endpoint}  health: {verdict}");
    if health_code != 200 {
        for reason in health.lines().skip(1) {
            let _ = writeln!(o, "  ! {reason}");
        }
    }
    let state = metrics
        .iter()
        .find(|s| s.name == "mqtt_uplink_uplink_state" && s.value == 1.0)
        .and_then(|s| s.label("state"))
        .unwrap_or("unknown");
    let transport = metrics
        .iter()
        .find(|s| s.name == "mqtt_uplink_transport_up" && s.value == 1.0)
        .and_then(|s| s.label("transport"));
    let uplink = match (state, transport) {
        ("stopped", _) => "none configured (local broker only)".to_string(),
        (_, Some(t)) => {
            let age = metrics
                .iter()
                .find(|s| s.name == "mqtt_uplink_handshake_age_seconds")
                .map_or("?".into(), |s| duration(s.value));
            let plain = if broker.starts_with("mqtt://") {
                " (plaintext MQTT)"
            } else {
                ""
            };
            format!("connected via {t}{plain} to {broker}, session up {age}")
        }
        (s, None) => s.to_string(),
    };
    let _ = writeln!(o, "  uplink:     {uplink}");
    let _ = writeln!(
        o,
        "              connects: {}; transport switches: {}",
        by_label(metrics, "mqtt_uplink_uplink_connects_total", "transport"),
        sum(metrics, "mqtt_uplink_transport_switches_total")
    );
    let _ = writeln!(
        o,
        "  devices:    {} connected",
        sum(metrics, "mqtt_uplink_connections")
    );
    let oldest = sum(metrics, "mqtt_uplink_outbox_oldest_age_seconds");
    let _ = writeln!(
        o,
        "  outbox:     {} queued ({} bytes, files {} bytes), oldest {}; qos0 lane {}; accepted {}, acked {}, store errors {}",
        sum(metrics, "mqtt_uplink_outbox_depth"),
        sum(metrics, "mqtt_uplink_outbox_bytes"),
        sum(metrics, "mqtt_uplink_outbox_disk_bytes"),
        if oldest > 0.0 {
            duration(oldest)
        } else {
            "-".into()
        },
        sum(metrics, "mqtt_uplink_outbox_qos0_depth"),
        sum(metrics, "mqtt_uplink_outbox_accepted"),
        sum(metrics, "mqtt_uplink_outbox_acked"),
        sum(metrics, "mqtt_uplink_outbox_storage_errors_total"),
    );
    let _ = writeln!(
        o,
        "  out by map: {}",
        by_label(metrics, "mqtt_uplink_messages_out_total", "mapping")
    );
    let _ = writeln!(
        o,
        "  in by map:  {}",
        by_label(metrics, "mqtt_uplink_messages_in_total", "mapping")
    );
    let _ = writeln!(
        o,
        "  refusals:   {}",
        by_label(metrics, "mqtt_uplink_refusals_total", "reason")
    );
    let _ = writeln!(
        o,
        "  drops:      {}",
        by_label(metrics, "mqtt_uplink_dropped_total", "reason")
    );
    o
}

/// Where `status` took the endpoint from, for the advice when it cannot reach it.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--endpoint`.
    Endpoint,
    /// `[metrics] bind` of this config (`--config` or `$MQTT_UPLINK_CONFIG`).
    Config(std::path::PathBuf),
    /// Neither was given: the default address.
    Default,
}

/// How often `--wait` asks again.
const WAIT_STEP: std::time::Duration = std::time::Duration::from_millis(200);

/// Scrapes `endpoint` and prints the summary; exit 0 healthy, 1 degraded, 2 unreachable. With
/// `wait`, scrapes again (every 200 ms, at most that long) until the appliance answers healthy.
pub fn status(endpoint: &MetricsBind, source: &Source, wait: Option<std::time::Duration>) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqtt-uplink status: {e}");
            return 2;
        }
    };
    let deadline = std::time::Instant::now() + wait.unwrap_or_default();
    let scraped = runtime.block_on(async {
        loop {
            let once = async {
                let (_, metrics) = crate::ops::http::get(endpoint, "/metrics").await?;
                let (code, health) = crate::ops::http::get(endpoint, "/healthz").await?;
                anyhow::Ok((metrics, code, health))
            };
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), once)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 5 s")));
            let healthy = matches!(&r, Ok((_, 200, _)));
            if healthy || std::time::Instant::now() + WAIT_STEP > deadline {
                return r;
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
    });
    let (metrics, code, health) = match scraped {
        Ok(s) => s,
        Err(e) => {
            let advice = match source {
                Source::Endpoint => "is the appliance running, and serving its metrics there?".to_string(),
                Source::Config(p) => format!(
                    "is the appliance running with {}? that address is its [metrics] bind",
                    p.display()
                ),
                Source::Default => "is the appliance running? this is the default address; for an \
                                    appliance with another [metrics] bind pass --config FILE or \
                                    --endpoint ADDR"
                    .to_string(),
            };
            let waited = match wait {
                Some(w) => format!(" (waited {} s)", w.as_secs()),
                None => String::new(),
            };
            eprintln!(
                "mqtt-uplink status: cannot reach the metrics endpoint {endpoint}{waited}: {}\n({advice})",
                e.root_cause()
            );
            return 2;
        }
    };
    let samples = match parse(&metrics) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mqtt-uplink status: {endpoint}/metrics: {e}");
            return 2;
        }
    };
    print!("{}", render(endpoint, &samples, code, &health));
    if code == 200 {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP x y\n# TYPE x counter\nmqtt_uplink_refusals_total{reason=\"bad \\\"user\\\", or pw\"} 3\n\
                    mqtt_uplink_outbox_depth 0\nmqtt_uplink_transport_up{transport=\"tls\",x=\"\"} 1\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].label("reason"), Some("bad \"user\", or pw"));
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[2].labels.len(), 2);
        assert!(parse("no_value\n").is_err());
        assert!(parse("9bad 1\n").is_err());
        assert!(parse("x{a=\"1\" 2\n").is_err());
    }

    #[test]
    fn renders_one_screen() {
        let text = "mqtt_uplink_info{site=\"plant7\",broker=\"mqtt://10.0.0.5:1883\"} 1\n\
                    mqtt_uplink_uplink_state{state=\"connected\"} 1\n\
                    mqtt_uplink_transport_up{transport=\"ssh\"} 1\n\
                    mqtt_uplink_handshake_age_seconds 75\n\
                    mqtt_uplink_connections 3\n\
                    mqtt_uplink_refusals_total{reason=\"publish denied (ACL)\"} 2\n\
                    mqtt_uplink_outbox_storage_errors_total 4\n";
        let out = render(
            &MetricsBind::Tcp(([127, 0, 0, 1], 9883).into()),
            &parse(text).unwrap(),
            200,
            "ok\n",
        );
        assert!(
            out.starts_with("mqtt-uplink  site plant7  at 127.0.0.1:9883  health: ok\n"),
            "{out}"
        );
        assert!(
            out.contains("connected via ssh (plaintext MQTT) to mqtt://10.0.0.5:1883, session up 1m15s"),
            "{out}"
        );
        assert!(out.contains("devices:    3 connected"), "{out}");
        assert!(out.contains("publish denied (ACL) 2"), "{out}");
        assert!(out.contains("acked 0, store errors 4\n"), "{out}");
        assert!(!out.contains("-0"), "a missing metric is 0, not -0:\n{out}");
        assert!(out.lines().count() <= 24, "one screen:\n{out}");
    }
}
