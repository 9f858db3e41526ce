//! The guard: our security policy, plugged into the broker's hooks. It owns authentication (password
//! file), authorisation (ACL, deny by default), the client-id policy, and one log line per refusal
//! with the peer address, client id, user and reason.

pub mod acl;
pub mod hooks;
pub mod passwords;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;

use crate::config::{AclSource, Auth, DuplicatePolicy};
use acl::{Acl, Decision};
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
        }
    }
}

/// The guard's shared state: the current policy. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    policy: Arc<RwLock<Arc<Policy>>>,
    /// Password hashing is slow and argon2id takes ~19 MiB per check: at most this many run at once,
    /// so a login flood queues instead of growing memory and threads.
    verify_slots: Arc<tokio::sync::Semaphore>,
}

/// Concurrent password verifications.
const VERIFY_SLOTS: usize = 2;

impl Guard {
    pub fn new(policy: Policy) -> Self {
        Guard {
            policy: Arc::new(RwLock::new(Arc::new(policy))),
            verify_slots: Arc::new(tokio::sync::Semaphore::new(VERIFY_SLOTS)),
        }
    }

    /// The current policy snapshot.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the policy (live reload); connections keep running under the new rules.
    pub fn replace(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Checks a CONNECT. Password hashing is deliberately slow, so it runs on the blocking pool.
    pub async fn authenticate(
        &self,
        user: Option<&str>,
        password: Option<&[u8]>,
        client_id: &str,
    ) -> Result<(), Refusal> {
        let policy = self.policy();
        match user {
            None => {
                if !policy.allow_anonymous {
                    return Err(Refusal::AnonymousNotAllowed);
                }
            }
            Some(user) => {
                if policy.passwords.is_none() {
                    // Anonymous-only setups still accept a username for ACL purposes? No: a name
                    // without a password file cannot be checked, so it is refused.
                    return Err(Refusal::NoPasswordFile);
                }
                let user_owned = user.to_string();
                let password = password.unwrap_or_default().to_vec();
                let p = policy.clone();
                let Ok(_slot) = self.verify_slots.acquire().await else {
                    return Err(Refusal::BadCredentials);
                };
                let ok = tokio::task::spawn_blocking(move || {
                    p.passwords
                        .as_ref()
                        .is_some_and(|f| f.verify(&user_owned, &password))
                })
                .await
                .unwrap_or(false);
                if !ok {
                    return Err(Refusal::BadCredentials);
                }
            }
        }
        if !policy.client_id_allowed(user, client_id) {
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
}

/// One log line per refusal: the fields an operator greps for.
pub fn log_refusal(
    peer: Option<SocketAddr>,
    client_id: &str,
    user: Option<&str>,
    reason: Refusal,
    detail: &str,
) {
    crate::ops::metrics::get()
        .refusals
        .with_label_values(&[reason.as_str()])
        .inc();
    let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    tracing::warn!(
        target: "mqtt_uplink::guard",
        peer = %peer,
        client_id = %client_id,
        user = user.unwrap_or("-"),
        reason = reason.as_str(),
        detail,
        "refused"
    );
}
