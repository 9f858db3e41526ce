//! Event counters in Prometheus form, named `mqtt_uplink_*`. One [`Metrics`] per appliance, made in
//! [`crate::start`] and handed to each component that counts (guard, broker, bridge, outbox, uplink), so
//! no lower layer reaches up to `ops` for them, and a test reads its own appliance's counters exactly.
//! State gauges (outbox depth, transport) are read from the running appliance when `/metrics` renders
//! (`ops::health`), so they need no registration here.
//!
//! Usage: `metrics.refusals.with_label_values(&["bad username or password"]).inc()`.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// Every counter an appliance keeps.
pub struct Metrics {
    registry: Registry,
    /// Refused logins, subscribes, publishes and limit hits, by reason.
    pub refusals: IntCounterVec,
    /// Messages queued for the cloud, by mapping index.
    pub messages_out: IntCounterVec,
    /// Messages delivered from the cloud into the local broker, by mapping index.
    pub messages_in: IntCounterVec,
    /// Messages dropped (by a limit, or from the cloud with no `in` mapping), by reason.
    pub dropped: IntCounterVec,
    /// Uplink transport switches (failover and return).
    pub transport_switches: IntCounter,
    /// Uplink sessions established, by transport.
    pub uplink_connects: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    /// A fresh set of counters, all at zero, in a registry of its own.
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let transport_switches = IntCounter::new(
            "mqtt_uplink_transport_switches_total",
            "Uplink transport switches",
        )
        .expect("valid metric");
        registry
            .register(Box::new(transport_switches.clone()))
            .expect("unique metric");
        Arc::new(Metrics {
            refusals: counter_vec(
                &registry,
                "mqtt_uplink_refusals_total",
                "Refusals by reason",
                "reason",
            ),
            messages_out: counter_vec(
                &registry,
                "mqtt_uplink_messages_out_total",
                "Messages queued for the cloud",
                "mapping",
            ),
            messages_in: counter_vec(
                &registry,
                "mqtt_uplink_messages_in_total",
                "Messages delivered from the cloud",
                "mapping",
            ),
            dropped: counter_vec(
                &registry,
                "mqtt_uplink_dropped_total",
                "Messages dropped, by reason",
                "reason",
            ),
            uplink_connects: counter_vec(
                &registry,
                "mqtt_uplink_uplink_connects_total",
                "Uplink sessions established",
                "transport",
            ),
            transport_switches,
            registry,
        })
    }

    /// The counters in Prometheus text format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
