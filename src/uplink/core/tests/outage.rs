//! After an outage (issue 18 items 1-3): priorities, a mapping's TTL, the paced drain.

use super::*;

/// Issue 18 item 1: with mapping 2 at priority 5, every cut point of the window (the PUBACK lost or
/// not) still loses nothing, acknowledges each message once, and keeps each mapping's order on every
/// connection; and the backlog queued before the first connection leaves priority first.
#[test]
fn priorities_leave_first_and_lose_nothing_at_any_cut() {
    let total = 30;
    let window = 4;
    let clean = run_with(total, window, None, false, &[0, 0, 5]);
    // The first connection's first sends: the priority mapping's backlog (seqs 3, 6, ..., 15), then
    // the rest oldest first (a live priority message, 18, overtakes it as soon as it arrives).
    let first: Vec<(usize, u64)> = clean.got.iter().take(6).map(|g| (g.mapping, g.seq)).collect();
    assert_eq!(
        first,
        vec![(2, 3), (2, 6), (2, 9), (2, 12), (2, 15), (0, 1)],
        "the priority backlog first"
    );
    let steps = clean.got.len();
    for cut in 0..steps + 2 {
        for lose_ack in [false, true] {
            let r = run_with(total, window, Some(cut), lose_ack, &[0, 0, 5]);
            let got: BTreeSet<u64> = r.got.iter().map(|g| g.seq).collect();
            assert_eq!(got, (1..=total).collect::<BTreeSet<_>>(), "cut at {cut}");
            let acked: BTreeSet<u64> = r.acked.iter().copied().collect();
            assert_eq!(acked.len(), r.acked.len(), "cut at {cut}: acknowledged twice");
            assert_eq!(acked, got, "cut at {cut}");
            assert!(r.max_window_seen <= usize::from(window), "cut at {cut}");
            let mut last: HashMap<(usize, usize), u64> = HashMap::new();
            for g in &r.got {
                let prev = last.insert((g.connection, g.mapping), g.seq);
                assert!(
                    prev.is_none_or(|p| p < g.seq),
                    "cut at {cut}: mapping {} sent {} after {prev:?}",
                    g.mapping,
                    g.seq
                );
            }
        }
    }
}

/// A live message of a priority mapping overtakes the backlog of lower ones: it is the next one
/// sent when the window has room.
#[test]
fn a_live_priority_message_overtakes_the_backlog() {
    let mut r = Rig::new(4);
    r.priorities = vec![0, 3];
    for _ in 0..50 {
        r.accept(0);
    }
    r.connect(true);
    r.cloud_ack(0, false);
    r.cloud_ack(0, false);
    let alarm = r.accept(1);
    r.pump();
    r.cloud_ack(0, false);
    let after: Vec<u64> = r.got.iter().skip(6).map(|g| g.seq).collect();
    assert_eq!(after.first(), Some(&alarm), "{:?}", r.got);
    r.cloud_acks_all_until_idle();
    assert_eq!(r.acked.len(), 51);
}

/// Issue 18 item 2: a mapping's TTL drops a message older than it (counted as expired, never sent);
/// the smaller of the TTL and the MQTT 5 expiry wins, and what is left is sent upstream, also for a
/// message without MQTT 5 properties.
#[test]
fn a_mappings_ttl_drops_old_messages_and_the_smaller_lifetime_is_sent() {
    let mut s = Session::new(settings(8), Filters::new());
    s.connected_to(Instant::now(), true, v5_peer(100, None, 0));
    let t0 = 1_700_000_000_000;
    let ttl = |seq, ttl_s, expiry_s| OutMessage {
        ttl_s,
        ..with_props(seq, t0, expiry_s)
    };
    let bare = OutMessage {
        ttl_s: Some(10),
        accepted_ms: t0,
        ..message(4, 0)
    };
    s.offer(
        t0 + 4_000,
        [
            (1, ttl(1, Some(3), None)),      // TTL 3 s, 4 s old: dropped
            (2, ttl(2, Some(10), Some(60))), // TTL wins: 6 s left
            (3, ttl(3, Some(60), Some(5))),  // MQTT 5 expiry wins: 1 s left
            (4, bare),                       // TTL only, no properties: 6 s left
        ],
    );
    let (sent, other) = publishes(&mut s);
    assert!(matches!(other[..], [Action::Expired(1)]), "{other:?}");
    let left: Vec<Option<u32>> = sent
        .iter()
        .map(|p| {
            p.properties
                .as_ref()
                .and_then(|p| p.message_expiry_interval)
                .map(|e| e.get())
        })
        .collect();
    assert_eq!(left, vec![Some(6), Some(1), Some(6)]);
    // Over 3.1.1 the TTL applies all the same (nothing is sent late), without properties.
    s.disconnected();
    s.connected(Instant::now(), true);
    s.offer(
        t0 + 11_000,
        [(5, ttl(5, Some(10), None)), (6, ttl(6, Some(20), None))],
    );
    let (sent, other) = publishes(&mut s);
    assert!(matches!(other[..], [Action::Expired(5)]), "{other:?}");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].properties, None);
}

fn paced(msgs: Option<u32>, bytes: Option<u64>, window: u16) -> Settings {
    Settings {
        drain_max_msgs_per_s: msgs,
        drain_max_bytes_per_s: bytes,
        ..settings(window)
    }
}

/// Drives a paced session for `secs` of simulated time in 10 ms ticks against an outbox that holds
/// `backlog` (accepted before the connection), the cloud acknowledging everything at once. A live
/// priority message (mapping 1, priority 2) is accepted at `alarm_at_ms`. Returns, per second, the
/// backlog messages and bytes sent, and when the alarm was sent (ms after the start).
fn drive_paced(
    s: Settings,
    backlog: u64,
    payload: usize,
    secs: u64,
    alarm_at_ms: u64,
) -> (Vec<u64>, Vec<u64>, Option<u64>) {
    let mut s = Session::new(s, Filters::new());
    let t0 = Instant::now();
    let wall0 = 1_700_000_000_000u64;
    s.connected(t0, true);
    // The outbox by priority, as `Outbox::pending` reads it.
    let mut outbox: Vec<BTreeMap<u64, OutMessage>> = vec![BTreeMap::new(); PRIORITIES];
    for seq in 1..=backlog {
        let m = OutMessage {
            payload: Bytes::from(format!("{seq:0>payload$}")),
            accepted_ms: wall0 - 60_000,
            ..message(seq, 0)
        };
        outbox[0].insert(seq, m);
    }
    let (mut msgs, mut bytes) = (vec![0u64; secs as usize], vec![0u64; secs as usize]);
    let mut alarm_sent = None;
    for tick in 0..secs * 100 {
        let ms = tick * 10;
        let now = t0 + Duration::from_millis(ms);
        if ms == alarm_at_ms {
            let m = OutMessage {
                priority: 2,
                accepted_ms: wall0 + ms,
                ..message(backlog + 1, 1)
            };
            outbox[2].insert(backlog + 1, m);
        }
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now).unwrap();
        }
        for _ in 0..4 {
            let Some((after, max)) = s.outbox_wanted() else {
                break;
            };
            let mut batch = Vec::new();
            for p in (0..PRIORITIES).rev() {
                batch.extend(
                    outbox[p]
                        .range(after[p].saturating_add(1)..)
                        .take(max - batch.len())
                        .map(|(q, m)| (*q, m.clone())),
                );
            }
            if batch.is_empty() {
                break;
            }
            s.offer_at(now, wall0 + ms, batch);
            let mut any = false;
            while let Some(a) = s.poll_action() {
                if let Action::Send(Packet::Publish(p)) = a {
                    any = true;
                    let seq: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                    if p.topic.ends_with("m1") {
                        alarm_sent = Some(ms);
                    } else {
                        msgs[(ms / 1000) as usize] += 1;
                        bytes[(ms / 1000) as usize] += (p.topic.len() + p.payload.len() + 9) as u64;
                    }
                    for lane in outbox.iter_mut() {
                        lane.remove(&seq);
                    }
                    s.handle_packet(
                        now,
                        Inbound::Packet(Packet::PublishAck {
                            packet_id: p.packet_id.unwrap(),
                        }),
                    );
                }
            }
            while s.poll_action().is_some() {}
            if !any {
                break;
            }
        }
    }
    (msgs, bytes, alarm_sent)
}

/// Issue 18 item 3: the backlog drains at the budget (each second within 10 % of it, after the
/// first), a live message of a priority mapping goes at once although the budget is spent, and
/// without a budget the backlog goes as fast as the window allows.
#[test]
fn the_paced_drain_keeps_the_budget_and_lets_live_priority_through() {
    let (msgs, _, alarm) = drive_paced(paced(Some(50), None, 64), 10_000, 10, 6, 2_500);
    for (i, n) in msgs.iter().enumerate() {
        assert!(
            (45..=55).contains(n),
            "second {i}: {n} messages (budget 50): {msgs:?}"
        );
    }
    assert_eq!(alarm, Some(2_500), "the live priority message waited");
    let (bytes_s, bytes, alarm) = drive_paced(paced(None, Some(20_000), 64), 10_000, 200, 6, 3_000);
    for (i, b) in bytes.iter().enumerate().skip(1) {
        assert!(
            (18_000..=22_000).contains(b),
            "second {i}: {b} bytes (budget 20000): {bytes:?}"
        );
    }
    assert!(bytes_s[0] <= 110, "{bytes_s:?}");
    assert_eq!(alarm, Some(3_000));
    // No budget: the window is the only limit (thousands a second here).
    let (msgs, _, _) = drive_paced(settings(64), 10_000, 10, 2, 500);
    assert!(msgs[0] > 1_000, "{msgs:?}");
}

/// A priority message queued while the cloud was away is backlog, not live: it is paced too (first
/// in line), and the order of its mapping holds.
#[test]
fn a_priority_backlog_is_paced_and_in_order() {
    let mut s = Session::new(paced(Some(10), None, 64), Filters::new());
    let t0 = Instant::now();
    s.connected(t0, true);
    let batch: Vec<(u64, OutMessage)> = (1..=5)
        .map(|seq| {
            (
                seq,
                OutMessage {
                    priority: 4,
                    accepted_ms: 1,
                    ..message(seq, 1)
                },
            )
        })
        .collect();
    s.offer_at(t0, 1_000, batch.clone());
    let (sent, _) = publishes(&mut s);
    assert_eq!(sent.len(), 1, "one at once, then the rate");
    s.offer_at(t0 + Duration::from_millis(150), 1_150, batch);
    let (sent, _) = publishes(&mut s);
    let seqs: Vec<String> = sent
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into())
        .collect();
    assert_eq!(
        seqs,
        vec!["2"],
        "after 150 ms at 10/s: one more, the next in order"
    );
}

/// The QoS 0 lane (in memory) is paced by the same budget: asked for only as many as it allows.
#[test]
fn the_qos0_lane_is_paced_too() {
    let mut s = Session::new(paced(Some(20), None, 8), Filters::new());
    let t0 = Instant::now();
    s.connected(t0, true);
    let mut sent = 0;
    for tick in 0..300u64 {
        let now = t0 + Duration::from_millis(tick * 10);
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now).unwrap();
        }
        for _ in 0..s.qos0_wanted() {
            s.offer_qos0(
                0,
                OutMessage {
                    qos: 0,
                    ..message(0, 0)
                },
            );
        }
        sent += publishes(&mut s).0.len();
    }
    assert!((58..=62).contains(&sent), "{sent} QoS 0 messages in 3 s at 20/s");
}
