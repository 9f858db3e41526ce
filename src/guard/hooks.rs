//! The guard's handlers in rmqtt's hook chain: CONNECT authentication (with the will's topic checked
//! against the ACL, since rmqtt publishes wills without a publish-ACL check), subscribe ACL and publish
//! ACL. Each refusal is logged once with the peer, client id, user and reason.

use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, Register, ReturnType, Type};
use rmqtt::types::{AuthResult, ConnectInfo, LastWill, PublishAclResult, SubscribeAclResult};

use super::{log_refusal, Guard, Refusal};

/// Priority of the guard's handlers: above everything else, so nothing runs before the policy.
pub const GUARD_PRIORITY: u32 = 1000;

/// Registers the guard's handlers on a broker's hook register.
pub async fn register(register: &dyn Register, guard: &Guard) {
    for typ in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
    ] {
        register
            .add_priority(
                typ,
                GUARD_PRIORITY,
                Box::new(GuardHandler { guard: guard.clone() }),
            )
            .await;
    }
}

struct GuardHandler {
    guard: Guard,
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
                let id = ci.id();
                let user = ci.username().map(|u| u.as_ref());
                let password = ci.password().map(|p| p.as_ref());
                let client_id: &str = id.client_id.as_ref();
                let verdict = match self.guard.authenticate(user, password, client_id).await {
                    Ok(()) => match will_topic(ci) {
                        Some(topic) => {
                            let d = self.guard.check_publish(user, client_id, &topic);
                            if d.allowed {
                                Ok(())
                            } else {
                                log_refusal(id.remote_addr, client_id, user, Refusal::WillDenied, &topic);
                                Err(())
                            }
                        }
                        None => Ok(()),
                    },
                    Err(reason) => {
                        log_refusal(id.remote_addr, client_id, user, reason, "");
                        Err(())
                    }
                };
                let result = match verdict {
                    Ok(()) => AuthResult::Allow(false, None),
                    Err(()) => AuthResult::NotAuthorized,
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let user = session.id.username.as_ref().map(|u| u.as_ref());
                let client_id: &str = session.id.client_id.as_ref();
                let filter: &str = sub.topic_filter.as_ref();
                let d = self.guard.check_subscribe(user, client_id, filter);
                if d.allowed {
                    let ok = SubscribeAclResult::new_success(sub.opts.qos(), None);
                    (true, Some(HookResult::SubscribeAclResult(ok)))
                } else {
                    log_refusal(
                        session.id.remote_addr,
                        client_id,
                        user,
                        Refusal::SubscribeDenied,
                        filter,
                    );
                    let no = SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized);
                    (false, Some(HookResult::SubscribeAclResult(no)))
                }
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let user = session.id.username.as_ref().map(|u| u.as_ref());
                let client_id: &str = session.id.client_id.as_ref();
                let topic: &str = publish.topic.as_ref();
                let d = self.guard.check_publish(user, client_id, topic);
                if d.allowed {
                    (
                        true,
                        Some(HookResult::PublishAclResult(PublishAclResult::allow())),
                    )
                } else {
                    log_refusal(
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
