//! The guard: our security policy, plugged into the broker's hooks. It owns authentication (password
//! file), authorisation (ACL, deny by default), the client-id policy, and one log line per refusal
//! with the peer address, client id, user and reason (rate-limited per reason and address, counted
//! always), failed-login throttling per address and the per-address connection limit.

pub use crate::acl;
pub mod delivery;
pub mod hooks;
pub use crate::passwords;
pub mod ratelimit;
pub mod revalidate;
pub mod sessions;
pub mod shared;
pub mod throttle;
pub mod verify;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use anyhow::Context as _;

use crate::config::{AclSource, Auth, DuplicatePolicy};
use crate::metrics::Metrics;
use acl::{Acl, Decision, Subscription};
use passwords::PasswordFile;

/// One immutable snapshot of the rules; swapped whole on reload so a check never sees half of two.
pub struct Policy {
    pub passwords: Option<PasswordFile>,
    pub acl: Acl,
    pub allow_anonymous: bool,
    pub client_id_pattern: Option<String>,
    pub duplicate_client_id: DuplicatePolicy,
}

impl Policy {
    /// Loads the password and ACL files named by `[auth]`.
    pub fn load(auth: &Auth) -> anyhow::Result<Policy> {
        let passwords = match &auth.password_file {
            Some(p) => Some(PasswordFile::load(p).with_context(|| format!("password file {}", p.display()))?),
            None => None,
        };
        let acl = match &auth.acl {
            AclSource::File(p) => Acl::load(p).with_context(|| format!("ACL file {}", p.display()))?,
            AclSource::DenyAll => Acl::parse("").map_err(|_| anyhow::anyhow!("empty ACL"))?,
            AclSource::AllowAll => Acl::allow_all(),
        };
        Ok(Policy {
            passwords,
            acl,
            allow_anonymous: auth.allow_anonymous,
            client_id_pattern: auth.client_id_pattern.clone(),
            duplicate_client_id: auth.duplicate_client_id,
        })
    }

    /// Does `client_id` fit the configured pattern for `user`? (`%u` is the username, a trailing `*`
    /// matches any rest.) No pattern means any client id.
    pub fn client_id_allowed(&self, user: Option<&str>, client_id: &str) -> bool {
        let Some(pattern) = &self.client_id_pattern else {
            return true;
        };
        let (body, open) = match pattern.strip_suffix('*') {
            Some(b) => (b, true),
            None => (pattern.as_str(), false),
        };
        if body.contains("%u") && user.is_none() {
            return false;
        }
        let expected = body.replace("%u", user.unwrap_or(""));
        if open {
            client_id.starts_with(&expected)
        } else {
            client_id == expected
        }
    }
}

/// Why a connection, publish or subscribe was refused; the log's `reason` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    AnonymousNotAllowed,
    NoPasswordFile,
    BadCredentials,
    ClientIdPattern,
    WillDenied,
    PublishDenied,
    SubscribeDenied,
    /// Too many failed logins from this address: attempt refused without checking the password.
    Throttled,
    /// Too many failed logins from this address: banned for a while.
    Banned,
    /// `duplicate_client_id = "reject"` and the client id is connected elsewhere.
    ClientIdInUse,
    /// `duplicate_client_id = "takeover"`: the older connection was closed (logged, not refused).
    ClientIdTakeover,
    /// `max_connections_per_address` (the listener's, or `[limits]`'s) reached for this address.
    TooManyFromAddress,
    /// On a `use_identity_as_username` listener, the username differs from the certificate's CN.
    IdentityMismatch,
    /// On a `require_client_cert_and_password` listener, a factor is missing: no verified client
    /// certificate with a CN, or no username and password.
    SecondFactorMissing,
    /// No TLS handshake, or no CONNECT, within `limits.handshake_timeout_s`: the socket is closed.
    HandshakeTimeout,
    /// rmqtt refused the CONNECT itself: `limits.max_connections` sessions are connected.
    SessionLimit,
    /// A malformed, unsupported or unexpected packet: rmqtt closed that connection.
    ProtocolError,
    /// `limits.max_sessions_per_user` sessions (connected or offline) are held for this user.
    TooManySessionsForUser,
    /// A topic name, topic filter or will topic deeper than `limits.max_topic_levels`.
    TopicTooDeep,
    /// A subscriber whose socket took no data for the write timeout: disconnected (src/broker/slow.rs).
    SlowConsumer,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::AnonymousNotAllowed => "anonymous access not allowed",
            Refusal::NoPasswordFile => "no password file configured",
            Refusal::BadCredentials => "bad username or password",
            Refusal::ClientIdPattern => "client id does not match client_id_pattern",
            Refusal::WillDenied => "will topic not writable (ACL)",
            Refusal::PublishDenied => "publish denied (ACL)",
            Refusal::SubscribeDenied => "subscribe denied (ACL)",
            Refusal::Throttled => "login throttled (recent failures from this address)",
            Refusal::Banned => "address banned (too many failed logins)",
            Refusal::ClientIdInUse => "client id already connected (duplicate_client_id = reject)",
            Refusal::ClientIdTakeover => "client id taken over (duplicate_client_id = takeover)",
            Refusal::TooManyFromAddress => "too many connections from this address",
            Refusal::IdentityMismatch => "username differs from the client certificate's CN",
            Refusal::SecondFactorMissing => "client certificate and password both required",
            Refusal::HandshakeTimeout => "no TLS handshake or CONNECT within the handshake timeout",
            Refusal::SessionLimit => "session limit reached (limits.max_connections)",
            Refusal::ProtocolError => "malformed or unexpected packet (connection closed)",
            Refusal::TooManySessionsForUser => "too many sessions for this user",
            Refusal::TopicTooDeep => "topic has too many levels",
            Refusal::SlowConsumer => "slow consumer",
        }
    }

    /// Does this refusal count as a failed login for the throttle?
    pub fn is_login_failure(self) -> bool {
        matches!(
            self,
            Refusal::AnonymousNotAllowed | Refusal::NoPasswordFile | Refusal::BadCredentials
        )
    }
}

/// One CONNECT as the guard sees it.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    pub peer: Option<SocketAddr>,
    /// The listener (config order) it came through; `None` counts sessions across all listeners.
    pub listener: Option<u16>,
    pub user: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub client_id: &'a str,
    /// The username was taken from a client certificate's CN that TLS verified, on a listener with
    /// `use_identity_as_username = true`: no password is needed.
    pub cert_identity: bool,
}

/// Settings that come from outside `[auth]`'s files and do not change on reload.
#[derive(Debug, Clone, Default)]
pub struct GuardSettings {
    pub throttle: throttle::ThrottleSettings,
    /// Listener indexes (config order) with `use_identity_as_username = true`.
    pub identity_listeners: HashSet<u16>,
    /// Listener indexes (config order) with `require_client_cert_and_password = true`.
    pub two_factor_listeners: HashSet<u16>,
    /// Sessions (connected or offline) per peer address and listener at most; 0 means no limit.
    pub max_connections_per_address: usize,
    /// Listeners (config order) with their own `max_connections_per_address`.
    pub listener_max_per_address: HashMap<u16, usize>,
    /// Sessions (connected or offline) per user at most; 0 means no limit.
    pub max_sessions_per_user: usize,
    /// Topic levels at most in a topic name, filter or will topic; 0 means no limit.
    pub max_topic_levels: usize,
}

/// The guard's shared state: the current policy. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    policy: Arc<RwLock<Arc<Policy>>>,
    settings: Arc<GuardSettings>,
    throttle: Arc<throttle::Throttle>,
    /// Sessions held, connected or offline, per user and address (kept by the session hooks).
    sessions: Arc<sessions::SessionTable>,
    /// Clients holding subscriptions whose messages are checked at delivery.
    delivery: Arc<delivery::DeliveryChecks>,
    /// Recent successful password checks (keyed hashes); cleared when the policy is replaced.
    verified: Arc<verify::VerifyCache>,
    /// Password hash computations run (cache misses), for tests and figures.
    hash_runs: Arc<AtomicU64>,
    refusals: Refusals,
}

impl Guard {
    pub fn new(policy: Policy) -> Self {
        Guard::with_settings(policy, GuardSettings::default(), Metrics::new())
    }

    /// A guard with explicit throttle, listener and per-address settings.
    pub fn with_settings(policy: Policy, settings: GuardSettings, metrics: Arc<Metrics>) -> Self {
        Guard {
            refusals: Refusals::new(metrics),
            policy: Arc::new(RwLock::new(Arc::new(policy))),
            throttle: Arc::new(throttle::Throttle::new(settings.throttle.clone())),
            settings: Arc::new(settings),
            sessions: Arc::new(sessions::SessionTable::default()),
            delivery: Arc::new(delivery::DeliveryChecks::default()),
            verified: Arc::new(verify::VerifyCache::new()),
            hash_runs: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Where this guard's refusals are counted and logged.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// Logs and counts one refusal (see [`Refusals::log`]).
    pub fn log_refusal(
        &self,
        peer: Option<SocketAddr>,
        client_id: &str,
        user: Option<&str>,
        reason: Refusal,
        detail: &str,
    ) {
        self.refusals.log(peer, client_id, user, reason, detail)
    }

    /// Does listener `lid` take the username from the client certificate?
    pub fn identity_listener(&self, lid: u16) -> bool {
        self.settings.identity_listeners.contains(&lid)
    }

    /// Does listener `lid` want both a client certificate (CN = username) and the password?
    pub fn two_factor_listener(&self, lid: u16) -> bool {
        self.settings.two_factor_listeners.contains(&lid)
    }

    /// The failed-login table (for tests and metrics).
    pub fn throttle(&self) -> &throttle::Throttle {
        &self.throttle
    }

    /// The sessions held, connected or offline, per user and address.
    pub fn sessions(&self) -> &sessions::SessionTable {
        &self.sessions
    }

    /// The subscriptions checked at delivery, by client.
    pub fn delivery(&self) -> &delivery::DeliveryChecks {
        &self.delivery
    }

    /// Sessions held (connected or offline) that were opened from `ip`.
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.sessions.from_ip(ip)
    }

    /// Is `topic` (a name or a filter) within `limits.max_topic_levels`? `Err` carries the detail
    /// for the refusal's log line.
    pub fn check_levels(&self, topic: &str) -> Result<(), String> {
        let max = self.settings.max_topic_levels;
        if max == 0 {
            return Ok(());
        }
        let levels = crate::topic::levels(topic);
        if levels > max {
            return Err(format!("{levels} levels (limits.max_topic_levels = {max})"));
        }
        Ok(())
    }

    /// Password hash computations run so far (logins that missed the verification cache).
    pub fn hash_runs(&self) -> u64 {
        self.hash_runs.load(Ordering::Relaxed)
    }

    /// The current policy snapshot.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the policy (live reload); connections keep running under the new rules.
    pub fn replace(&self, policy: Policy) {
        let mut current = self.policy.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(policy);
        // Cleared while the new policy is being installed: no check can add an entry of the old one.
        self.verified.clear();
    }

    /// Checks a CONNECT: per-address session limit, throttle, credentials (or the verified certificate
    /// identity), client-id pattern, per-user session limit. A client id that already holds a session
    /// resumes or takes it over, so it is never counted twice against either limit. Password hashing is deliberately slow (and argon2id needs ~19 MiB),
    /// so it runs on the password-check threads ([`verify::POOL`], one per core, two to four), and a success is cached. A
    /// credential failure is recorded against the peer address.
    pub async fn authenticate(&self, login: Login<'_>) -> Result<(), Refusal> {
        let ip = login.peer.map(|p| p.ip());
        let resumes = self.sessions.holds(login.client_id);
        if let Some(ip) = ip {
            // Per listener: a NAT'd site's listener may allow far more than the default.
            let (max, held) = match login.listener {
                Some(lid) => (
                    self.settings
                        .listener_max_per_address
                        .get(&lid)
                        .copied()
                        .unwrap_or(self.settings.max_connections_per_address),
                    self.sessions.from_ip_on(lid, ip),
                ),
                None => (
                    self.settings.max_connections_per_address,
                    self.connections_from(ip),
                ),
            };
            if max > 0 && !resumes && held >= max {
                return Err(Refusal::TooManyFromAddress);
            }
            match self.throttle.gate(ip, login.user, Instant::now()) {
                throttle::Gate::Go => {}
                throttle::Gate::Wait(d) => tokio::time::sleep(d).await,
                throttle::Gate::Throttled => return Err(Refusal::Throttled),
                throttle::Gate::Banned => return Err(Refusal::Banned),
            }
        }
        let result = self.check_credentials(&login).await;
        if let (Err(r), Some(ip)) = (result, ip) {
            if r.is_login_failure() {
                self.throttle.failure(ip, login.user, Instant::now());
            }
        }
        result?;
        // After the credentials, so that the limit cannot be probed for users one cannot log in as.
        let max = self.settings.max_sessions_per_user;
        if let Some(user) = login.user {
            if max > 0 && !resumes && self.sessions.of_user(user) >= max {
                return Err(Refusal::TooManySessionsForUser);
            }
        }
        Ok(())
    }

    async fn check_credentials(&self, login: &Login<'_>) -> Result<(), Refusal> {
        let policy = self.policy();
        let user = login.user;
        match user {
            None => {
                if !policy.allow_anonymous {
                    return Err(Refusal::AnonymousNotAllowed);
                }
            }
            Some(_) if login.cert_identity => {}
            Some(user) => {
                if policy.passwords.is_none() {
                    // A name without a password file cannot be checked, so it is refused.
                    return Err(Refusal::NoPasswordFile);
                }
                let password = login.password.unwrap_or_default();
                let stored = policy.passwords.as_ref().and_then(|f| f.hash_text(user));
                let cached = stored.is_some_and(|h| self.verified.contains(user, password, h));
                if !cached {
                    self.hash_runs.fetch_add(1, Ordering::Relaxed);
                    let (user_owned, password_owned) = (user.to_string(), password.to_vec());
                    let p = policy.clone();
                    let ok = verify::POOL
                        .run(move || {
                            p.passwords
                                .as_ref()
                                .is_some_and(|f| f.verify(&user_owned, &password_owned))
                        })
                        .await
                        .unwrap_or(false);
                    if !ok {
                        return Err(Refusal::BadCredentials);
                    }
                    // Only if the policy checked is still current: a reload clears the cache.
                    let current = self.policy.read().unwrap_or_else(|e| e.into_inner());
                    if let (true, Some(h)) = (Arc::ptr_eq(&current, &policy), stored) {
                        self.verified.insert(user, password, h);
                    }
                }
            }
        }
        if !policy.client_id_allowed(user, login.client_id) {
            return Err(Refusal::ClientIdPattern);
        }
        Ok(())
    }

    pub fn check_publish(&self, user: Option<&str>, client_id: &str, topic: &str) -> Decision {
        self.policy().acl.check_publish(user, client_id, topic)
    }

    pub fn check_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> Decision {
        self.policy().acl.check_subscribe(user, client_id, filter)
    }

    /// A SUBSCRIBE's answer: refused, admitted whole, or admitted with a check at delivery.
    pub fn subscription(&self, user: Option<&str>, client_id: &str, filter: &str) -> Subscription {
        self.policy().acl.subscription(user, client_id, filter)
    }

    /// May this client receive a message on `topic` (the check at delivery)?
    pub fn check_receive(&self, user: Option<&str>, client_id: &str, topic: &str) -> Decision {
        self.policy().acl.check_receive(user, client_id, topic)
    }
}

/// Where refusals go: counted in the appliance's metrics every time, logged at most once per
/// [`ratelimit::LOG_INTERVAL`] per (reason, peer address), the next line carrying the number held back
/// (`suppressed`), and a summary line for bursts that ended. Cheap to clone; the broker's handshake
/// and slow-subscriber hooks share the guard's.
#[derive(Clone)]
pub struct Refusals {
    log: Arc<ratelimit::RefusalLog>,
    metrics: Arc<Metrics>,
}

impl Refusals {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Refusals {
            log: Arc::new(ratelimit::RefusalLog::new(ratelimit::LOG_INTERVAL)),
            metrics,
        }
    }

    /// The counters refusals (and the drops of the hooks that share this) are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// One log line per refusal: the fields an operator greps for.
    pub fn log(
        &self,
        peer: Option<SocketAddr>,
        client_id: &str,
        user: Option<&str>,
        reason: Refusal,
        detail: &str,
    ) {
        self.metrics.refusals.with_label_values(&[reason.as_str()]).inc();
        let now = Instant::now();
        for s in self.log.flush(now) {
            tracing::warn!(
                target: "mqtt_uplink::guard",
                peer = %s.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                reason = s.reason,
                suppressed = s.suppressed,
                "refusals held back in the last interval"
            );
        }
        let suppressed = match self.log.admit(reason.as_str(), peer.map(|p| p.ip()), now) {
            ratelimit::Verdict::Suppress => return,
            ratelimit::Verdict::Log { suppressed } => suppressed,
        };
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        tracing::warn!(
            target: "mqtt_uplink::guard",
            peer = %peer,
            client_id = ?client_id,
            user = user.unwrap_or("-"),
            reason = reason.as_str(),
            detail,
            suppressed,
            "refused"
        );
    }
}
