//! Keep alive: `[limits] max_keepalive_s` is the longest keep alive a client may use (as mosquitto's
//! `max_keepalive`). rmqtt lowers an MQTT 5 client's larger value and announces it as Server Keep
//! Alive (MQTT-3.2.2-21), and refuses an MQTT 3.1.1 client asking for more (3.1.1 has no way to say
//! it). A keep alive of 0 (none) is allowed, but when a ceiling is set an MQTT 5 client asking for
//! none is given the ceiling too, as mosquitto does; rmqtt's own fitter keeps 0 then, so this one
//! wraps it.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rmqtt::codec::types::{Publish, MQTT_LEVEL_5};
use rmqtt::fitter::{DefaultFitter, Fitter, FitterManager};
use rmqtt::types::{ConnectInfo, Disconnect, FitterType, Id, ListenerConfig};

/// MQTT's largest keep alive: "no ceiling".
const NO_CEILING: u16 = u16::MAX;

pub struct KeepAliveFitterManager;

impl FitterManager for KeepAliveFitterManager {
    fn create(&self, conn_info: Arc<ConnectInfo>, id: Id, cfg: ListenerConfig) -> FitterType {
        let v5 = conn_info.proto_ver() == MQTT_LEVEL_5;
        let max = cfg.max_keepalive;
        Arc::new(KeepAliveFitter {
            inner: DefaultFitter::new(conn_info, id, cfg),
            v5,
            max,
        })
    }
}

struct KeepAliveFitter {
    inner: DefaultFitter,
    v5: bool,
    max: u16,
}

#[async_trait]
impl Fitter for KeepAliveFitter {
    fn keep_alive(&self, keep_alive: &mut u16) -> rmqtt::Result<u16> {
        if self.v5 && *keep_alive == 0 && self.max < NO_CEILING {
            *keep_alive = self.max;
        }
        self.inner.keep_alive(keep_alive)
    }
    fn max_mqueue_len(&self) -> usize {
        self.inner.max_mqueue_len()
    }
    fn mqueue_rate_limit(&self) -> (NonZeroU32, Duration) {
        self.inner.mqueue_rate_limit()
    }
    fn max_inflight(&self) -> NonZeroU16 {
        self.inner.max_inflight()
    }
    fn session_expiry_interval(&self, d: Option<&Disconnect>) -> Duration {
        self.inner.session_expiry_interval(d)
    }
    fn message_expiry_interval(&self, publish: &Publish) -> Duration {
        self.inner.message_expiry_interval(publish)
    }
    fn max_client_topic_aliases(&self) -> u16 {
        self.inner.max_client_topic_aliases()
    }
    fn max_server_topic_aliases(&self) -> u16 {
        self.inner.max_server_topic_aliases()
    }
}
