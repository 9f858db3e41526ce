//! After a reload, the sessions already in the broker are held to the new rules, as new ones are:
//! - a connected client whose login is no longer valid is disconnected: its user was removed or its
//!   password changed (the password file entry differs from the one it logged in with), anonymous
//!   access was turned off, or its client id no longer matches `client_id_pattern`;
//! - a subscription the new ACL would refuse is removed, from connected and from offline persistent
//!   sessions (rmqtt restores those without an ACL check when the client comes back);
//! - a subscription the new ACL admits with a check at delivery is marked for it, and one it now
//!   admits whole is unmarked (the check itself always reads the current ACL).
//!
//! Publishes need nothing here: the guard checks each one against the current ACL. Clients that
//! logged in with a verified certificate (`use_identity_as_username`) keep their login: the CA is not
//! reloadable. Every disconnect and removal is logged as a refusal with the detail "revoked by reload".

use rmqtt::context::ServerContext;
use rmqtt::types::Unsubscribe;

use super::acl::Subscription;
use super::delivery::key;
use super::hooks::{session_cert_identity, session_user};
use super::{Guard, Policy, Refusal};

/// What a revalidation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Revalidation {
    /// Connected clients disconnected because their login is no longer valid.
    pub disconnected: usize,
    /// Subscriptions removed because the new ACL refuses them.
    pub unsubscribed: usize,
}

const DETAIL: &str = "revoked by reload";

/// Why a client that logged in under `old` would not log in under `new`, if it would not.
fn login_revoked(
    old: &Policy,
    new: &Policy,
    user: Option<&str>,
    client_id: &str,
    cert: bool,
) -> Option<Refusal> {
    match user {
        _ if cert => {}
        None if !new.allow_anonymous => return Some(Refusal::AnonymousNotAllowed),
        None => {}
        Some(u) => {
            let before = old.passwords.as_ref().and_then(|f| f.hash_text(u));
            let now = new.passwords.as_ref().and_then(|f| f.hash_text(u));
            if now.is_none() || now != before {
                return Some(Refusal::BadCredentials);
            }
        }
    }
    (!new.client_id_allowed(user, client_id)).then_some(Refusal::ClientIdPattern)
}

/// Applies `new` (already installed in `guard`) to the sessions of the broker behind `scx`; `old` is
/// the policy they were admitted under.
pub async fn revalidate(guard: &Guard, scx: &ServerContext, old: &Policy, new: &Policy) -> Revalidation {
    let mut done = Revalidation::default();
    let shared = scx.extends.shared().await;
    let entries: Vec<_> = shared.iter().collect();
    for mut entry in entries {
        let Some(session) = entry.session() else { continue };
        let user = session_user(guard, &session).await.map(|u| u.into_owned());
        let user = user.as_deref();
        let client_id = session.id.client_id.to_string();
        let peer = session.id.remote_addr;
        if entry.is_connected().await {
            let cert = session_cert_identity(guard, &session).await;
            if let Some(reason) = login_revoked(old, new, user, &client_id, cert) {
                guard.log_refusal(peer, &client_id, user, reason, DETAIL);
                if let Err(e) = entry.kick(true, true, true).await {
                    tracing::warn!(client_id, "could not disconnect a revoked client: {e:#}");
                }
                done.disconnected += 1;
                continue;
            }
        }
        for sub in entry.subscriptions().await.unwrap_or_default() {
            let filter: &str = sub.topic.as_ref();
            let group = sub.opts.shared_group().cloned();
            let key = key(filter, group.as_ref().map(|g| g.as_ref()));
            match new.acl.subscription(user, &client_id, filter) {
                Subscription::Whole(_) => {
                    guard.delivery().unmark(&client_id, &key);
                    continue;
                }
                Subscription::Checked(_) => {
                    guard.delivery().mark(&client_id, session.id.create_time, key);
                    continue;
                }
                Subscription::Refused(_) => {}
            }
            guard.log_refusal(
                peer,
                &client_id,
                user,
                Refusal::SubscribeDenied,
                &format!("{key} {DETAIL}"),
            );
            let unsubscribe = Unsubscribe {
                topic_filter: sub.topic.clone(),
                shared_group: group,
            };
            match entry.unsubscribe(&unsubscribe).await {
                Ok(_) => {
                    guard.delivery().unmark(&client_id, &key);
                    done.unsubscribed += 1
                }
                Err(e) => tracing::warn!(
                    client_id,
                    filter,
                    "could not remove a revoked subscription: {e:#}"
                ),
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DuplicatePolicy;
    use crate::guard::acl::Acl;
    use crate::guard::passwords::PasswordFile;

    fn policy(passwords: &str, anonymous: bool, pattern: Option<&str>) -> Policy {
        Policy {
            passwords: Some(PasswordFile::parse(passwords).unwrap()),
            acl: Acl::allow_all(),
            allow_anonymous: anonymous,
            client_id_pattern: pattern.map(Into::into),
            duplicate_client_id: DuplicatePolicy::Reject,
        }
    }

    #[test]
    fn a_login_stays_valid_only_under_the_same_credentials() {
        let a = crate::guard::passwords::hash_argon2id(b"first-Passw0rd");
        let b = crate::guard::passwords::hash_argon2id(b"second-Passw0rd");
        let old = policy(&format!("dev:{a}\nother:{a}\n"), true, None);
        // Unchanged entry: kept; changed or removed: revoked.
        let same = policy(&format!("dev:{a}\n"), true, None);
        assert_eq!(login_revoked(&old, &same, Some("dev"), "c", false), None);
        let changed = policy(&format!("dev:{b}\n"), true, None);
        assert_eq!(
            login_revoked(&old, &changed, Some("dev"), "c", false),
            Some(Refusal::BadCredentials)
        );
        assert_eq!(
            login_revoked(&old, &same, Some("other"), "c", false),
            Some(Refusal::BadCredentials)
        );
        // Anonymous switched off; certificate identities keep their login.
        let closed = policy(&format!("dev:{a}\n"), false, None);
        assert_eq!(
            login_revoked(&old, &closed, None, "c", false),
            Some(Refusal::AnonymousNotAllowed)
        );
        assert_eq!(login_revoked(&old, &changed, Some("dev"), "c", true), None);
        // A client id pattern that no longer matches.
        let pattern = policy(&format!("dev:{a}\n"), true, Some("%u-*"));
        assert_eq!(login_revoked(&old, &pattern, Some("dev"), "dev-1", false), None);
        assert_eq!(
            login_revoked(&old, &pattern, Some("dev"), "x", false),
            Some(Refusal::ClientIdPattern)
        );
    }
}
