//! The `in` mappings' subscriptions: what each connection subscribes, the ledger, live changes.

use super::*;

fn subscribes(r: &Rig) -> Vec<(NonZeroU16, Vec<(String, u8)>)> {
    r.sent_now()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Subscribe {
                packet_id,
                topic_filters,
            } => Some((
                *packet_id,
                topic_filters
                    .iter()
                    .map(|(f, q)| (f.to_string(), q.value()))
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

fn unsubscribes(r: &Rig) -> Vec<(NonZeroU16, Vec<String>)> {
    r.sent_now()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Unsubscribe {
                packet_id,
                topic_filters,
            } => Some((*packet_id, topic_filters.iter().map(|f| f.to_string()).collect())),
            _ => None,
        })
        .collect()
}

#[test]
fn every_connection_subscribes_what_is_wanted_and_takes_back_what_only_the_ledger_holds() {
    let mut r = Rig::new(4);
    r.s = Session::new(settings(4), filters(&[("old/#", 1), ("keep/#", 1)]));
    r.s.set_wanted(filters(&[("keep/#", 1), ("new/#", 0)]));
    r.connect(true);
    let unsub = unsubscribes(&r);
    assert_eq!(unsub.len(), 1);
    assert_eq!(unsub[0].1, ["old/#"]);
    let sub = subscribes(&r);
    assert_eq!(sub.len(), 1);
    assert_eq!(sub[0].1, [("keep/#".to_string(), 1), ("new/#".to_string(), 0)]);
    // The ledger learnt of new/# before the SUBSCRIBE went out; old/# stays until its UNSUBACK.
    assert_eq!(
        r.ledger,
        Some(filters(&[("old/#", 1), ("keep/#", 1), ("new/#", 0)]))
    );
    r.receive(Packet::SubscribeAck {
        packet_id: sub[0].0,
        status: vec![SubscribeReturnCode::Success(QoS::AtLeastOnce); 2],
    });
    r.receive(Packet::UnsubscribeAck {
        packet_id: unsub[0].0,
    });
    assert_eq!(r.ledger, Some(filters(&[("keep/#", 1), ("new/#", 0)])));
    assert_eq!(r.s.held(), &filters(&[("keep/#", 1), ("new/#", 0)]));
}

#[test]
fn subscription_changes_while_disconnected_are_applied_on_the_next_connection() {
    let mut r = Rig::new(4);
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 1)]));
    r.connect(true);
    let sub = subscribes(&r);
    r.receive(Packet::SubscribeAck {
        packet_id: sub[0].0,
        status: vec![SubscribeReturnCode::Success(QoS::AtLeastOnce); 2],
    });
    r.disconnect();
    // Two reloads while the uplink is down: nothing is sent, the last one counts.
    r.s.set_wanted(filters(&[("b/#", 0)]));
    r.s.set_wanted(filters(&[("b/#", 0), ("c/#", 1)]));
    assert_eq!(r.sent.len(), sub.len() + unsubscribes(&r).len());
    r.connect(true);
    let unsub = unsubscribes(&r);
    assert_eq!(unsub.len(), 1);
    assert_eq!(unsub[0].1, ["a/#"]);
    assert_eq!(
        subscribes(&r)[0].1,
        [("b/#".to_string(), 0), ("c/#".to_string(), 1)]
    );
    // The UNSUBSCRIBE went out before the SUBSCRIBE.
    let kinds: Vec<&str> = r
        .sent_now()
        .iter()
        .map(|p| match p {
            Packet::Subscribe { .. } => "sub",
            Packet::Unsubscribe { .. } => "unsub",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["unsub", "sub"]);
    // The connection drops before the UNSUBACK: a/# stays in the ledger and is taken back next time.
    r.disconnect();
    assert!(r.s.held().contains_key("a/#"));
    r.connect(true);
    assert_eq!(unsubscribes(&r)[0].1, ["a/#"]);
}

#[test]
fn a_live_change_sends_only_the_difference() {
    let mut r = Rig::new(4);
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 1)]));
    r.connect(true);
    let before = r.sent_now().len();
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 0), ("c/#", 1)]));
    r.pump();
    let new: Vec<&Packet> = r.sent_now()[before..].to_vec();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        subscribes(&r).last().unwrap().1,
        [("b/#".to_string(), 0), ("c/#".to_string(), 1)]
    );
    // No change, nothing sent.
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 0), ("c/#", 1)]));
    r.pump();
    assert_eq!(r.sent_now().len(), before + 1);
}

#[test]
fn a_new_cloud_session_forgets_the_ledger() {
    let mut r = Rig::new(4);
    r.s = Session::new(settings(4), filters(&[("gone/#", 1)]));
    r.s.set_wanted(filters(&[("a/#", 1)]));
    r.connect(false);
    assert!(
        unsubscribes(&r).is_empty(),
        "the cloud holds nothing to take back"
    );
    assert_eq!(r.ledger, Some(filters(&[("a/#", 1)])));
}

#[test]
fn subscribe_and_outbox_packet_ids_never_collide() {
    let mut r = Rig::new(8);
    for _ in 0..4 {
        r.accept(0);
    }
    r.s.set_wanted(filters(&[("a/#", 1)]));
    r.connect(true);
    r.s.set_wanted(filters(&[("b/#", 1)]));
    r.pump();
    let mut ids: Vec<u16> = r
        .sent_now()
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => p.packet_id,
            Packet::Subscribe { packet_id, .. } | Packet::Unsubscribe { packet_id, .. } => Some(*packet_id),
            _ => None,
        })
        .map(NonZeroU16::get)
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a packet id used twice");
    assert_eq!(n, 4 + 3);
}
