//! The guard's handlers in rmqtt's hook chain: CONNECT authentication (with the will's topic checked
//! against the ACL, since rmqtt publishes wills without a publish-ACL check), subscribe ACL and publish
//! ACL. Each refusal is logged once with the peer, client id, user and reason.
//!
//! At CONNECT the guard also enforces `duplicate_client_id` (it reads rmqtt's session registry,
//! `scx.extends.shared()`, for a connected session with the same client id and logs both peers), the
//! per-address connection limit (sessions counted by the connected/disconnected hooks), and accepts a
//! verified certificate CN as the username on `use_identity_as_username` listeners.
//!
//! On those listeners rmqtt does not overwrite the username with the CN (that would hide a client
//! claiming another name): the guard refuses a username that differs from the CN, and a client that
//! sent none acts as its CN, which the ACL hooks read back from the session's certificate.
//!
//! On `require_client_cert_and_password` listeners both factors are needed: a verified certificate
//! whose CN is the username the client sends, and that user's password.

use std::borrow::Cow;

use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, Register, ReturnType, Type};
use rmqtt::net::MqttError;
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, FromType, LastWill, PublishAclResult, Reason, SubscribeAclResult,
};

use super::acl::Subscription;
use super::{Guard, Login, Refusal};
use crate::config::DuplicatePolicy;

/// Priority of the guard's handlers: above everything else, so nothing runs before the policy.
pub const GUARD_PRIORITY: u32 = 1000;

/// Registers the guard's handlers on a broker's hook register. `scx` is the broker's context, read for
/// the session registry (duplicate client ids).
pub async fn register(register: &dyn Register, guard: &Guard, scx: ServerContext) {
    for typ in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
        Type::ClientDisconnected,
        Type::ClientConnect,
        Type::SessionCreated,
        Type::SessionTerminated,
        Type::MessagePublish,
        Type::MessageExpiryCheck,
        Type::ClientConnected,
        Type::SessionUnsubscribed,
    ] {
        register
            .add_priority(
                typ,
                GUARD_PRIORITY,
                Box::new(GuardHandler {
                    guard: guard.clone(),
                    scx: scx.clone(),
                }),
            )
            .await;
    }
    // Shared subscriptions: messages spread over a group's members, never to one that may not read
    // them.
    *scx.extends.shared_subscription_mut().await = Box::new(super::shared::GuardedShared::new(guard.clone()));
}

struct GuardHandler {
    guard: Guard,
    scx: ServerContext,
}

/// The CN of a TLS-verified client certificate, when rmqtt collected one.
fn cert_cn(ci: &ConnectInfo) -> Option<&str> {
    let cert = match ci {
        ConnectInfo::V3(_, c) => c.cert.as_ref(),
        ConnectInfo::V5(_, c) => c.cert.as_ref(),
    };
    cert.and_then(|c| c.common_name.as_deref())
}

impl GuardHandler {
    /// The full CONNECT check; `Err` has been logged.
    async fn connect(&self, ci: &ConnectInfo) -> Result<(), ()> {
        let id = ci.id();
        let claimed = ci.username().map(|u| u.as_ref());
        let client_id: &str = id.client_id.as_ref();
        // On an identity listener a verified certificate's CN is the username, without a password. A
        // client may repeat it as its username but not claim another. A certificate without a CN leaves
        // the client's own username, which then needs its password.
        let cn = cert_cn(ci).filter(|_| self.guard.identity_listener(id.lid));
        let (user, cert_identity) = match (cn, claimed) {
            (Some(cn), None) => (Some(cn), true),
            (Some(cn), Some(u)) if u == cn => (Some(cn), true),
            (Some(cn), Some(u)) => {
                let detail = format!("certificate CN is {cn:?}");
                self.guard.log_refusal(
                    id.remote_addr,
                    client_id,
                    Some(u),
                    Refusal::IdentityMismatch,
                    &detail,
                );
                return Err(());
            }
            (None, u) => (u, false),
        };
        // Two factors: the verified certificate's CN names the user, and that user's password is
        // checked below like on any listener (a certificate never stands in for it here).
        if self.guard.two_factor_listener(id.lid) {
            let detail = match (cert_cn(ci), claimed) {
                (None, _) => Some("no verified client certificate with a CN".to_string()),
                (Some(_), None) => Some("no username and password".to_string()),
                (Some(cn), Some(u)) if u != cn => {
                    let detail = format!("certificate CN is {cn:?}");
                    self.guard.log_refusal(
                        id.remote_addr,
                        client_id,
                        Some(u),
                        Refusal::IdentityMismatch,
                        &detail,
                    );
                    return Err(());
                }
                _ => None,
            };
            if let Some(detail) = detail {
                self.guard.log_refusal(
                    id.remote_addr,
                    client_id,
                    claimed,
                    Refusal::SecondFactorMissing,
                    &detail,
                );
                return Err(());
            }
        }
        let login = Login {
            peer: id.remote_addr,
            listener: Some(id.lid),
            user,
            password: ci.password().map(|p| p.as_ref()),
            client_id,
            cert_identity,
        };
        if let Err(reason) = self.guard.authenticate(login).await {
            self.guard
                .log_refusal(id.remote_addr, client_id, user, reason, "");
            return Err(());
        }
        if let Some(topic) = will_topic(ci) {
            if let Err(detail) = self.guard.check_levels(&topic) {
                self.guard.log_refusal(
                    id.remote_addr,
                    client_id,
                    user,
                    Refusal::TopicTooDeep,
                    &format!("will: {detail}"),
                );
                return Err(());
            }
            if !self.guard.check_publish(user, client_id, &topic).allowed {
                self.guard
                    .log_refusal(id.remote_addr, client_id, user, Refusal::WillDenied, &topic);
                return Err(());
            }
        }
        let entry = self.scx.extends.shared().await.entry(id.clone());
        if entry.is_connected().await {
            let other = entry
                .session()
                .and_then(|s| s.id.remote_addr)
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into());
            let detail = format!("connected from {other}");
            match self.guard.policy().duplicate_client_id {
                DuplicatePolicy::Reject => {
                    self.guard
                        .log_refusal(id.remote_addr, client_id, user, Refusal::ClientIdInUse, &detail);
                    return Err(());
                }
                DuplicatePolicy::Takeover => {
                    self.guard.log_refusal(
                        id.remote_addr,
                        client_id,
                        user,
                        Refusal::ClientIdTakeover,
                        &detail,
                    );
                }
            }
        }
        Ok(())
    }
}

impl GuardHandler {
    /// Would the current policy refuse this will? `Some((user, detail))` when its client may no
    /// longer write the topic. The user is the one the session was created with (the certificate's
    /// CN on identity listeners), so a will is judged exactly as at CONNECT.
    fn will_refusal(&self, from: &rmqtt::types::From, topic: &str) -> Option<(Option<String>, String)> {
        let client_id: &str = from.id.client_id.as_ref();
        let user = self
            .guard
            .sessions()
            .user_of(client_id)
            .or_else(|| from.id.username.as_ref().map(|u| u.to_string()));
        if self
            .guard
            .check_publish(user.as_deref(), client_id, topic)
            .allowed
        {
            return None;
        }
        Some((
            user,
            format!("will on {topic:?} no longer writable (revoked by reload)"),
        ))
    }
}

/// Did the session log in with its verified certificate (an identity listener, a CN, and no other
/// username claimed)?
pub(crate) async fn session_cert_identity(guard: &Guard, session: &Session) -> bool {
    if !guard.identity_listener(session.id.lid) {
        return false;
    }
    let Ok(ci) = session.connect_info().await else {
        return false;
    };
    match (cert_cn(&ci), &session.id.username) {
        (Some(_), None) => true,
        (Some(cn), Some(u)) => cn == <_ as AsRef<str>>::as_ref(u),
        (None, _) => false,
    }
}

/// The username the ACL applies to: the session's own, or on an identity listener the verified
/// certificate's CN when the client sent none (the CONNECT check made sure they never differ).
pub(crate) async fn session_user<'a>(guard: &Guard, session: &'a Session) -> Option<Cow<'a, str>> {
    if let Some(u) = &session.id.username {
        return Some(Cow::Borrowed(u.as_ref()));
    }
    if !guard.identity_listener(session.id.lid) {
        return None;
    }
    let ci = session.connect_info().await.ok()?;
    cert_cn(&ci).map(|cn| Cow::Owned(cn.to_string()))
}

/// Why rmqtt closed a session for what the client sent (a malformed, unsupported or unexpected
/// packet), if it did; normal closes, timeouts, kicks and the guard's own refusals are not.
fn protocol_error(reason: &Reason) -> Option<String> {
    match reason {
        Reason::Reasons(all) => all.iter().find_map(protocol_error),
        Reason::ProtocolError(s) | Reason::Error(s) => Some(s.to_string()),
        // A refused v3 publish closes the session; the guard logged it as "publish denied".
        Reason::MqttError(MqttError::PublishAckReason(..)) => None,
        Reason::MqttError(MqttError::ReadTimeout | MqttError::WriteTimeout) => None,
        Reason::MqttError(e) => Some(e.to_string()),
        _ => None,
    }
}

fn will_topic(ci: &ConnectInfo) -> Option<String> {
    ci.last_will().map(|lw| match lw {
        LastWill::V3(w) => w.topic.to_string(),
        LastWill::V5(w) => w.topic.to_string(),
    })
}

#[async_trait]
impl Handler for GuardHandler {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(ci) => {
                let result = match self.connect(ci).await {
                    Ok(()) => AuthResult::Allow(false, None),
                    Err(()) => AuthResult::NotAuthorized,
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            // rmqtt refuses a CONNECT over its session limit itself, right after this hook and
            // before authentication, without telling any hook: the same test, to log and count it.
            Parameter::ClientConnect(ci) => {
                let id = ci.id();
                let max = self.scx.mqtt_max_sessions;
                if max > 0
                    && self.scx.sessions.count() >= max
                    && !self.scx.extends.shared().await.entry(id.clone()).exist()
                {
                    self.guard.log_refusal(
                        id.remote_addr,
                        id.client_id.as_ref(),
                        ci.username().map(|u| u.as_ref()),
                        Refusal::SessionLimit,
                        &format!("limits.max_connections ({max}) reached"),
                    );
                }
                (true, acc)
            }
            Parameter::SessionCreated(session) => {
                // A new session starts without subscriptions.
                self.guard
                    .delivery()
                    .session_created(session.id.client_id.as_ref());
                let user = session_user(&self.guard, session).await;
                self.guard.sessions().created(
                    session.id.client_id.as_ref(),
                    user.as_deref(),
                    session.id.remote_addr.map(|a| a.ip()),
                    session.id.lid,
                    session.id.create_time,
                );
                (true, acc)
            }
            Parameter::SessionTerminated(session, _) => {
                self.guard
                    .sessions()
                    .terminated(session.id.client_id.as_ref(), session.id.create_time);
                self.guard
                    .delivery()
                    .session_terminated(session.id.client_id.as_ref(), session.id.create_time);
                (true, acc)
            }
            // Every connection, a resumed persistent session included (which gets no
            // SessionCreated): it now holds the subscriptions it took over.
            Parameter::ClientConnected(session) => {
                self.guard
                    .delivery()
                    .session_resumed(session.id.client_id.as_ref(), session.id.create_time);
                (true, acc)
            }
            Parameter::SessionUnsubscribed(session, unsub) => {
                let key = super::delivery::key(
                    unsub.topic_filter.as_ref(),
                    unsub.shared_group.as_ref().map(|g| g.as_ref()),
                );
                self.guard.delivery().unmark(session.id.client_id.as_ref(), &key);
                (true, acc)
            }
            // rmqtt publishes a will without a publish-ACL check, and the rights may have changed
            // since CONNECT (a reload): a will its client may no longer write is dropped here, before
            // the bridge could queue it for the cloud (the chain stops), and at each delivery below.
            Parameter::MessagePublish(_, from, publish) if matches!(from.typ(), FromType::LastWill) => {
                let topic: &str = publish.topic.as_ref();
                match self.will_refusal(from, topic) {
                    None => (true, acc),
                    Some((user, detail)) => {
                        self.guard.log_refusal(
                            from.id.remote_addr,
                            from.id.client_id.as_ref(),
                            user.as_deref(),
                            Refusal::WillDenied,
                            &detail,
                        );
                        (false, acc)
                    }
                }
            }
            // Runs for every copy of every message as it is delivered to a subscriber (retained
            // messages sent at SUBSCRIBE, queued and resent ones included).
            Parameter::MessageExpiryCheck(session, from, publish) => {
                let topic: &str = publish.topic.as_ref();
                if matches!(from.typ(), FromType::LastWill) && self.will_refusal(from, topic).is_some() {
                    return (false, Some(HookResult::MessageExpiry));
                }
                // The subscriber's read rights, only for a client holding a subscription that
                // reaches beyond them (a plain subscription pays one atomic load here).
                let client_id: &str = session.id.client_id.as_ref();
                if self.guard.delivery().needed(client_id) {
                    let user = session_user(&self.guard, session).await;
                    if !self
                        .guard
                        .check_receive(user.as_deref(), client_id, topic)
                        .allowed
                    {
                        return (false, Some(HookResult::MessageExpiry));
                    }
                }
                (true, acc)
            }
            Parameter::ClientDisconnected(session, reason) => {
                if let Some(detail) = protocol_error(reason) {
                    let user = session.id.username.as_ref().map(|u| u.as_ref());
                    let client_id: &str = session.id.client_id.as_ref();
                    self.guard.log_refusal(
                        session.id.remote_addr,
                        client_id,
                        user,
                        Refusal::ProtocolError,
                        &detail,
                    );
                }
                (true, acc)
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let user = session_user(&self.guard, session).await;
                let user = user.as_deref();
                let client_id: &str = session.id.client_id.as_ref();
                // rmqtt splits `$share/GROUP/FILTER`: the ACL applies to the inner filter.
                let filter: &str = sub.topic_filter.as_ref();
                let key = super::delivery::key(filter, sub.opts.shared_group().map(|g| g.as_ref()));
                // Before rmqtt inserts the filter in its recursive topic trie.
                if let Err(detail) = self.guard.check_levels(filter) {
                    self.guard.log_refusal(
                        session.id.remote_addr,
                        client_id,
                        user,
                        Refusal::TopicTooDeep,
                        &detail,
                    );
                    let no = SubscribeAclResult::new_failure(SubscribeAckReason::TopicFilterInvalid);
                    return (false, Some(HookResult::SubscribeAclResult(no)));
                }
                let answer = self.guard.subscription(user, client_id, filter);
                // Marked before rmqtt adds the subscription, so no message reaches it unchecked.
                let delivery = self.guard.delivery();
                match answer {
                    Subscription::Checked(_) => delivery.mark(client_id, session.id.create_time, key.clone()),
                    Subscription::Whole(_) => delivery.unmark(client_id, &key),
                    Subscription::Refused(_) => {}
                }
                if answer.admitted() {
                    if answer.checked() {
                        tracing::debug!(
                            client_id = ?client_id,
                            filter = ?key,
                            "subscription reaches beyond the read rights: messages checked at delivery"
                        );
                    }
                    let ok = SubscribeAclResult::new_success(sub.opts.qos(), None);
                    (true, Some(HookResult::SubscribeAclResult(ok)))
                } else {
                    self.guard.log_refusal(
                        session.id.remote_addr,
                        client_id,
                        user,
                        Refusal::SubscribeDenied,
                        &key,
                    );
                    let no = SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized);
                    (false, Some(HookResult::SubscribeAclResult(no)))
                }
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let user = session_user(&self.guard, session).await;
                let user = user.as_deref();
                let client_id: &str = session.id.client_id.as_ref();
                let topic: &str = publish.topic.as_ref();
                // A topic name with `+`, `#` or NUL is a protocol violation (MQTT-3.3.2-2): refused and
                // the connection closed, not just the message dropped.
                if let Err(e) = crate::topic::validate_name(topic) {
                    self.guard.log_refusal(
                        session.id.remote_addr,
                        client_id,
                        user,
                        Refusal::PublishDenied,
                        &format!("invalid topic name: {e}"),
                    );
                    return (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            true, None,
                        ))),
                    );
                }
                // Deeper than the limit: a protocol abuse (rmqtt's topic trie recurses per level),
                // refused and the connection closed.
                if let Err(detail) = self.guard.check_levels(topic) {
                    self.guard.log_refusal(
                        session.id.remote_addr,
                        client_id,
                        user,
                        Refusal::TopicTooDeep,
                        &detail,
                    );
                    return (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            true, None,
                        ))),
                    );
                }
                let d = self.guard.check_publish(user, client_id, topic);
                if d.allowed {
                    (
                        true,
                        Some(HookResult::PublishAclResult(PublishAclResult::allow())),
                    )
                } else {
                    self.guard.log_refusal(
                        session.id.remote_addr,
                        client_id,
                        user,
                        Refusal::PublishDenied,
                        topic,
                    );
                    (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            false, None,
                        ))),
                    )
                }
            }
            _ => (true, acc),
        }
    }
}
