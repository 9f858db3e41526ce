//! Live reload (SIGHUP, or [`crate::Appliance::reload`]): mappings, ACL and passwords are swapped in
//! without dropping device connections or the uplink session. Sessions already connected are then
//! held to the new rules ([`crate::guard::revalidate`]): a client whose login was revoked is
//! disconnected, a subscription the new ACL refuses is removed. A new config that does not load is
//! refused whole and the old one stays. Settings that only take effect at a restart (listeners, the
//! uplink, limits, outbox, metrics, site, log level, `[auth.throttle]`) are reported as such.

use std::sync::{Arc, Mutex};

use rmqtt::context::ServerContext;
use tokio::sync::watch;

use crate::bridge::hooks::SharedRoutes;
use crate::bridge::Routes;
use crate::config::Config;
use crate::guard::{Guard, Policy};
use crate::uplink::subscriptions::{self, Filters};

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Parts now in effect (e.g. "mappings", "acl and passwords").
    pub applied: Vec<&'static str>,
    /// Changed sections that keep their old value until the appliance restarts.
    pub needs_restart: Vec<&'static str>,
    /// `in` mapping subscriptions changed: the running uplink session subscribes and unsubscribes on
    /// the cloud broker at once (or the next session does, when the uplink is down).
    pub subscriptions_changed: bool,
    /// Sessions held to the new rules: clients disconnected, subscriptions removed.
    pub revoked: crate::guard::revalidate::Revalidation,
}

/// Swaps the live parts of the config. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    pub(crate) guard: Guard,
    pub(crate) routes: SharedRoutes,
    /// The cloud subscriptions the `in` mappings want, watched by the uplink session.
    pub(crate) subscriptions: Arc<watch::Sender<Filters>>,
    /// The broker, whose sessions are revalidated.
    pub(crate) scx: ServerContext,
    pub(crate) current: Arc<Mutex<Config>>,
}

impl Reloader {
    /// Applies `new`: loads its password and ACL files first (any error refuses the whole reload and
    /// keeps the old rules), then swaps the policy and the mappings, then holds the sessions already
    /// in the broker to the new policy.
    pub async fn reload(&self, new: Config) -> anyhow::Result<ReloadReport> {
        let policy = Policy::load(&new.auth)?;
        let old_policy = self.guard.policy();
        let mut report = self.swap(new, policy);
        let new_policy = self.guard.policy();
        report.revoked =
            crate::guard::revalidate::revalidate(&self.guard, &self.scx, &old_policy, &new_policy).await;
        Ok(report)
    }

    /// Installs the new policy and mappings; reports what changed.
    fn swap(&self, new: Config, policy: Policy) -> ReloadReport {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = ReloadReport::default();
        let routes = Arc::new(
            Routes::new(new.mappings.clone()).with_cloud_limits(
                new.uplink
                    .as_ref()
                    .and_then(|u| crate::profile::cloud_topic_limits(&u.profile)),
            ),
        );
        let new_subs = subscriptions::wanted(&routes);
        self.guard.replace(policy);
        report.applied.push("auth (passwords, ACL, client-id policy)");
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
        report.applied.push("mappings");
        // The routes are swapped first: a message from a new subscription finds its mapping.
        report.subscriptions_changed = self.subscriptions.send_if_modified(|subs| {
            let changed = *subs != new_subs;
            *subs = new_subs;
            changed
        });
        // Compared by value (`PartialEq`: secrets too, by content, never printed).
        if current.listeners != new.listeners {
            report.needs_restart.push("listener");
        }
        if current.uplink != new.uplink {
            report.needs_restart.push("uplink");
        }
        if current.limits != new.limits {
            report.needs_restart.push("limits");
        }
        if current.outbox != new.outbox {
            report.needs_restart.push("outbox");
        }
        if current.metrics != new.metrics {
            report.needs_restart.push("metrics");
        }
        if current.site != new.site {
            report.needs_restart.push("site");
        }
        // The failed-login table keeps its settings (and its counts) until a restart.
        if current.auth.throttle != new.auth.throttle {
            report.needs_restart.push("auth.throttle");
        }
        if current.log_level != new.log_level {
            report.needs_restart.push("log");
        }
        // Keep the running values of what did not change live, so the next comparison is against
        // what is actually in effect.
        let keep = current.clone();
        let mut auth = new.auth.clone();
        auth.throttle = keep.auth.throttle.clone();
        *current = Config {
            auth,
            listeners: keep.listeners,
            uplink: keep.uplink,
            limits: keep.limits,
            outbox: keep.outbox,
            metrics: keep.metrics,
            site: keep.site,
            log_level: keep.log_level,
            ..new
        };
        report
    }
}

impl ReloadReport {
    /// Logs the outcome: one info line, and a warning per section that needs a restart.
    pub fn log(&self) {
        tracing::info!(
            applied = ?self.applied,
            disconnected = self.revoked.disconnected,
            unsubscribed = self.revoked.unsubscribed,
            "configuration reloaded; connections kept unless the new rules revoke them"
        );
        if self.subscriptions_changed {
            tracing::info!("`in` mappings changed: the uplink updates its cloud subscriptions now");
        }
        for section in &self.needs_restart {
            tracing::warn!(
                section,
                "changed, but takes effect only after a restart (systemctl restart mqtt-uplink)"
            );
        }
    }
}
