//! Retained messages, in memory. rmqtt's built-in store is a disabled stub (it points at its
//! `rmqtt-retainer` plugin, which pulls a storage stack we do not need); this uses its in-memory tree
//! and bounds it by topic count and by bytes (topic + payload). A retained message over either bound
//! is still delivered to the subscribers of the moment (rmqtt does that apart from the store), but not
//! kept; it replaces (removes) the one retained before it on its topic, so no stale value is handed
//! to later subscribers. Every such drop is counted and logged ([`super::drops`]).

use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rmqtt::retain::{DefaultRetainStorage, RetainStorage};
use rmqtt::types::{Retain, TimedValue, Topic, TopicFilter, TopicName};
use rmqtt::Result;
use std::str::FromStr;

use super::drops;

/// Drop reasons (labels of `mqtt_uplink_dropped_total`).
pub mod reason {
    pub const TOO_MANY_TOPICS: &str = "retained store full (topics)";
    pub const TOO_MANY_BYTES: &str = "retained store full (max_retained_bytes)";
}

/// What one retained message costs against `max_retained_bytes` (rmqtt stores it under its own topic).
fn cost(r: &Retain) -> u64 {
    (r.publish.topic.len() + r.publish.payload.len()) as u64
}

/// In-memory retained-message store with caps on topics and bytes.
pub struct RetainedStore {
    /// Only its tree is used: the counts are kept here, beside the bytes, under the tree's lock.
    inner: DefaultRetainStorage,
    max_topics: isize,
    max_bytes: u64,
    count: AtomicIsize,
    peak: AtomicIsize,
    bytes: AtomicU64,
    drops: drops::Drops,
}

impl RetainedStore {
    pub fn new(max_topics: usize, max_bytes: u64, drops: drops::Drops) -> Self {
        RetainedStore {
            inner: DefaultRetainStorage::new(),
            max_topics: max_topics as isize,
            max_bytes,
            count: AtomicIsize::new(0),
            peak: AtomicIsize::new(0),
            bytes: AtomicU64::new(0),
            drops,
        }
    }

    /// Topic + payload bytes held now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl RetainStorage for RetainedStore {
    fn enable(&self) -> bool {
        true
    }

    fn need_sync(&self) -> bool {
        false
    }

    async fn set(&self, topic: &TopicName, retain: Retain, expiry: Option<Duration>) -> Result<()> {
        let t = Topic::from_str(topic)?;
        let mut tree = self.inner.messages.write().await;
        // The new message replaces the old one whatever happens to it.
        if let Some(old) = tree.remove(&t) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(cost(old.value()), Ordering::Relaxed);
        }
        if retain.publish.payload.is_empty() {
            return Ok(());
        }
        let size = cost(&retain);
        let full = |s: &Self| {
            if s.count.load(Ordering::Relaxed) >= s.max_topics {
                Some(reason::TOO_MANY_TOPICS)
            } else if s.bytes.load(Ordering::Relaxed) + size > s.max_bytes {
                Some(reason::TOO_MANY_BYTES)
            } else {
                None
            }
        };
        if full(self).is_some() {
            // Expired messages still count until removed: take them out before refusing.
            tree.retain(usize::MAX, |tv| {
                if tv.is_expired() {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    self.bytes.fetch_sub(cost(tv.value()), Ordering::Relaxed);
                    false
                } else {
                    true
                }
            });
        }
        if let Some(why) = full(self) {
            if let Some(suppressed) = self.drops.dropped(why) {
                tracing::warn!(
                    topic = ?&**topic,
                    size,
                    held = self.bytes.load(Ordering::Relaxed),
                    max_bytes = self.max_bytes,
                    topics = self.count.load(Ordering::Relaxed),
                    max_topics = self.max_topics,
                    suppressed,
                    "retained message delivered but not retained: {why}"
                );
            }
            return Ok(());
        }
        // A payload decoded from a connection shares that connection's read buffer; a copy keeps the
        // store from pinning more than it counts.
        let mut retain = retain;
        retain.publish.payload = bytes::Bytes::copy_from_slice(&retain.publish.payload);
        tree.insert(&t, TimedValue::new(retain, expiry));
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    async fn get(&self, topic_filter: &TopicFilter) -> Result<Vec<(TopicName, Retain)>> {
        self.inner.get_message(topic_filter).await
    }

    async fn get_all_paginated(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<(TopicName, Retain, Option<Duration>)>, bool)> {
        self.inner.get_all_paginated(offset, limit).await
    }

    async fn count(&self) -> isize {
        self.count.load(Ordering::Relaxed)
    }

    async fn max(&self) -> isize {
        self.peak.load(Ordering::Relaxed)
    }
}
