//! Retained messages, in memory. rmqtt's built-in store is a disabled stub (it points at its
//! `rmqtt-retainer` plugin, which pulls a storage stack we do not need); this enables its in-memory
//! tree and bounds it.

use std::time::Duration;

use async_trait::async_trait;
use rmqtt::retain::{DefaultRetainStorage, RetainStorage};
use rmqtt::types::{Retain, TopicFilter, TopicName};
use rmqtt::Result;

/// In-memory retained-message store with a cap on the number of topics.
pub struct RetainedStore {
    inner: DefaultRetainStorage,
    max_topics: isize,
}

impl RetainedStore {
    pub fn new(max_topics: usize) -> Self {
        RetainedStore {
            inner: DefaultRetainStorage::new(),
            max_topics: max_topics as isize,
        }
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
        // Replacing or clearing an existing topic is always allowed; a new topic only below the cap.
        if !retain.publish.payload.is_empty() && self.inner.count().await >= self.max_topics {
            let existing = self.inner.get_message(&TopicFilter::from(topic.as_ref())).await?;
            if existing.is_empty() {
                tracing::warn!(topic = %topic, max = self.max_topics, "retained message dropped: store full");
                return Ok(());
            }
        }
        self.inner.set_with_timeout(topic, retain, expiry).await
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
        self.inner.count().await
    }

    async fn max(&self) -> isize {
        self.inner.max().await
    }
}
