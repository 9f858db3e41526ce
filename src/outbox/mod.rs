//! The outbox: the queue between the site and the uplink. QoS ≥ 1 messages enter it before the device
//! gets its PUBACK and leave it only after the cloud broker's PUBACK. Bounded by bytes and age with an
//! explicit `on_full` policy; every message a limit drops is counted by reason. QoS 0 messages take a
//! separate small best-effort lane that never blocks QoS 1.
//!
//! This version keeps the queue in memory: acknowledged messages survive tunnel drops and cloud
//! restarts, not a crash of the appliance. The on-disk store is the delivery-guarantees issue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::{OnFull, OutboxSettings};

/// QoS 0 messages waiting for the uplink at most; more are dropped (counted).
const QOS0_LANE: usize = 10_000;

/// A message on its way to the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub mapping: usize,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Milliseconds since the Unix epoch when the appliance accepted it.
    pub accepted_ms: u64,
}

impl OutMessage {
    fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len() + 32) as u64
    }
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("outbox full (max_bytes reached, on_full = reject-new)")]
    Full,
}

/// Counters of what the outbox did, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub acked: AtomicU64,
    pub dropped_oldest: AtomicU64,
    pub rejected_full: AtomicU64,
    pub expired: AtomicU64,
    pub qos0_dropped: AtomicU64,
}

struct State {
    queue: BTreeMap<u64, OutMessage>,
    bytes: u64,
    next_seq: u64,
    qos0: VecDeque<OutMessage>,
}

struct Inner {
    state: Mutex<State>,
    /// Woken whenever a message is queued (either lane).
    ready: Notify,
    settings: OutboxSettings,
    counters: Counters,
}

/// Handle to the outbox; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

impl Outbox {
    pub fn new(settings: OutboxSettings) -> Self {
        Outbox {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queue: BTreeMap::new(),
                    bytes: 0,
                    next_seq: 1,
                    qos0: VecDeque::new(),
                }),
                ready: Notify::new(),
                settings,
                counters: Counters::default(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message. QoS ≥ 1: returns once the message is held by the outbox (the caller may then
    /// acknowledge it to the device), or `Full` under `reject-new`. QoS 0: best effort, never fails.
    pub async fn push(&self, mut msg: OutMessage) -> Result<(), PushError> {
        msg.accepted_ms = now_ms();
        let c = &self.inner.counters;
        {
            let mut st = self.state();
            if msg.qos == 0 {
                if st.qos0.len() >= QOS0_LANE {
                    st.qos0.pop_front();
                    c.qos0_dropped.fetch_add(1, Ordering::Relaxed);
                    log_drop("qos0 lane full", 1);
                }
                st.qos0.push_back(msg);
            } else {
                let size = msg.size();
                while st.bytes + size > self.inner.settings.max_bytes {
                    match self.inner.settings.on_full {
                        OnFull::RejectNew => {
                            c.rejected_full.fetch_add(1, Ordering::Relaxed);
                            log_drop("outbox full, new message rejected", 1);
                            return Err(PushError::Full);
                        }
                        OnFull::DropOldest => {
                            let Some((_, old)) = st.queue.pop_first() else {
                                break;
                            };
                            st.bytes -= old.size();
                            c.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                            log_drop("outbox full, oldest message dropped", 1);
                        }
                    }
                }
                let seq = st.next_seq;
                st.next_seq += 1;
                st.bytes += size;
                st.queue.insert(seq, msg);
                c.accepted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.inner.ready.notify_waiters();
        self.inner.ready.notify_one();
        Ok(())
    }

    /// Up to `max` QoS ≥ 1 messages with a sequence number above `after`, oldest first. Messages older
    /// than `max_age` are dropped (counted) on the way.
    pub fn pending_after(&self, after: u64, max: usize) -> Vec<(u64, OutMessage)> {
        let mut st = self.state();
        let cutoff = now_ms().saturating_sub(self.inner.settings.max_age.as_millis() as u64);
        let expired: Vec<u64> = st
            .queue
            .iter()
            .take_while(|(_, m)| m.accepted_ms < cutoff)
            .map(|(s, _)| *s)
            .collect();
        if !expired.is_empty() {
            for s in &expired {
                if let Some(m) = st.queue.remove(s) {
                    st.bytes -= m.size();
                }
            }
            self.inner
                .counters
                .expired
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
            log_drop("message older than max_age", expired.len() as u64);
        }
        st.queue
            .range(after + 1..)
            .take(max)
            .map(|(s, m)| (*s, m.clone()))
            .collect()
    }

    /// Takes the next QoS 0 message, if any.
    pub fn pop_qos0(&self) -> Option<OutMessage> {
        self.state().qos0.pop_front()
    }

    /// The cloud acknowledged message `seq`: forget it.
    pub fn ack(&self, seq: u64) {
        let mut st = self.state();
        if let Some(m) = st.queue.remove(&seq) {
            st.bytes -= m.size();
            self.inner.counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until something is queued (returns at once if a push happened since the last wait).
    pub async fn ready(&self) {
        self.inner.ready.notified().await
    }

    /// QoS ≥ 1 messages waiting.
    pub fn depth(&self) -> usize {
        self.state().queue.len()
    }

    /// Bytes held by QoS ≥ 1 messages.
    pub fn bytes(&self) -> u64 {
        self.state().bytes
    }

    /// When the oldest waiting QoS ≥ 1 message was accepted (ms since the Unix epoch), if any.
    pub fn oldest_accepted_ms(&self) -> Option<u64> {
        self.state().queue.first_key_value().map(|(_, m)| m.accepted_ms)
    }

    /// QoS 0 messages waiting in the best-effort lane.
    pub fn qos0_depth(&self) -> usize {
        self.state().qos0.len()
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }
}

/// Drops are logged, but at most once a second per process, with a count.
fn log_drop(reason: &'static str, n: u64) {
    crate::ops::metrics::get()
        .dropped
        .with_label_values(&[reason])
        .inc_by(n);
    static LAST: Mutex<(u64, u64)> = Mutex::new((0, 0));
    let now = now_ms();
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    last.1 += n;
    if now.saturating_sub(last.0) >= 1000 {
        tracing::warn!(reason, dropped = last.1, "outbox dropped messages");
        *last = (now, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_bytes: u64, on_full: OnFull) -> OutboxSettings {
        OutboxSettings {
            max_bytes,
            max_age: Duration::from_secs(3600),
            on_full,
        }
    }

    fn msg(qos: u8, payload: &'static [u8]) -> OutMessage {
        OutMessage {
            mapping: 0,
            topic: "t".into(),
            payload: Bytes::from_static(payload),
            qos,
            retain: false,
            accepted_ms: 0,
        }
    }

    #[tokio::test]
    async fn keeps_order_until_acked() {
        let o = Outbox::new(settings(1 << 20, OnFull::RejectNew));
        for p in [b"1", b"2", b"3"] {
            o.push(msg(1, p)).await.unwrap();
        }
        let got = o.pending_after(0, 10);
        assert_eq!(
            got.iter().map(|(_, m)| m.payload.clone()).collect::<Vec<_>>(),
            vec!["1", "2", "3"]
        );
        o.ack(got[0].0);
        assert_eq!(o.depth(), 2);
        assert_eq!(o.pending_after(0, 10)[0].1.payload, "2");
        assert_eq!(o.pending_after(got[1].0, 10).len(), 1);
    }

    #[tokio::test]
    async fn reject_new_counts_every_refusal() {
        let o = Outbox::new(settings(100, OnFull::RejectNew));
        assert!(o.push(msg(1, &[0; 50])).await.is_ok());
        assert_eq!(o.push(msg(1, &[0; 50])).await, Err(PushError::Full));
        assert_eq!(o.counters().rejected_full.load(Ordering::Relaxed), 1);
        assert_eq!(o.depth(), 1);
    }

    #[tokio::test]
    async fn drop_oldest_counts_every_drop() {
        let o = Outbox::new(settings(100, OnFull::DropOldest));
        o.push(msg(1, b"old-old-old-old-old-old-old-old-old"))
            .await
            .unwrap();
        o.push(msg(1, b"new-new-new-new-new-new-new-new-new"))
            .await
            .unwrap();
        assert_eq!(o.counters().dropped_oldest.load(Ordering::Relaxed), 1);
        assert_eq!(
            o.pending_after(0, 10)[0].1.payload,
            "new-new-new-new-new-new-new-new-new"
        );
    }
}
