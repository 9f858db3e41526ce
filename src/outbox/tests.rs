//! The outbox's own tests: limits, policies, the store's durability and read-back, priorities.

use super::*;
use bytes::Bytes;

fn settings(max_bytes: u64, on_full: OnFull) -> OutboxSettings {
    OutboxSettings {
        max_bytes,
        max_age: Duration::from_secs(3600),
        on_full,
        commit_window: Duration::from_millis(5),
        min_sync_interval: Duration::from_millis(1),
        qos0_max_bytes: 1 << 20,
        max_bytes_per_user: max_bytes,
        drain_max_msgs_per_s: None,
        drain_max_bytes_per_s: None,
        max_disk_bytes: None,
    }
}

fn msg(qos: u8, payload: &'static [u8]) -> OutMessage {
    user_msg("u", qos, payload)
}

fn user_msg(user: &str, qos: u8, payload: &'static [u8]) -> OutMessage {
    OutMessage {
        mapping: 0,
        topic: "t".into(),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        accepted_ms: 0,
        user: user.into(),
        props: None,
        priority: 0,
        ttl_s: None,
    }
}

#[tokio::test]
async fn a_user_over_its_share_refuses_or_evicts_only_its_own() {
    let mut s = settings(1000, OnFull::RejectNew);
    s.max_bytes_per_user = 250;
    let o = Outbox::memory(s.clone());
    for _ in 0..3 {
        o.push(user_msg("hog", 1, &[0; 50])).await.unwrap();
    }
    assert_eq!(
        o.push(user_msg("hog", 1, &[0; 50])).await,
        Err(PushError::UserFull)
    );
    o.push(user_msg("other", 1, &[0; 50])).await.unwrap();
    assert_eq!(o.counters().user_rejected.load(Ordering::Relaxed), 1);

    s.on_full = OnFull::DropOldest;
    let o = Outbox::memory(s);
    o.push(user_msg("other", 1, b"keep")).await.unwrap();
    for _ in 0..10 {
        o.push(user_msg("hog", 1, &[0; 50])).await.unwrap();
    }
    let left = o.pending_after(0, 100);
    assert_eq!(
        left[0].1.payload, "keep",
        "another user's message is never evicted"
    );
    assert_eq!(left.len(), 1 + 3);
    assert_eq!(o.counters().user_dropped_oldest.load(Ordering::Relaxed), 7);
    assert_eq!(o.user_bytes("hog"), 3 * 83);
}

#[tokio::test]
async fn the_qos0_lane_is_capped_in_bytes() {
    let mut s = settings(1 << 20, OnFull::RejectNew);
    s.qos0_max_bytes = 1000;
    let o = Outbox::memory(s);
    for _ in 0..100 {
        o.push(msg(0, &[0; 100])).await.unwrap();
    }
    assert!(o.qos0_bytes() <= 1000, "{}", o.qos0_bytes());
    assert_eq!(o.qos0_depth(), 1000 / 133);
    assert_eq!(
        o.counters().qos0_dropped.load(Ordering::Relaxed),
        100 - 1000 / 133
    );
    // A message larger than the whole lane is dropped alone; the lane keeps what it has.
    o.push(msg(0, &[0; 2000])).await.unwrap();
    assert_eq!(o.qos0_depth(), 1000 / 133);
    assert_eq!(
        o.counters().qos0_dropped.load(Ordering::Relaxed),
        100 - 1000 / 133 + 1
    );
    while o.pop_qos0().is_some() {}
    assert_eq!(o.qos0_bytes(), 0);
}

/// Pacing: an idle writer syncs a lone message at once; messages that arrive within
/// `min_sync_interval` of that sync share the next one. (Without pacing the second batch would be
/// written as soon as its first message arrived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_writer_syncs_at_once_and_a_busy_one_groups_what_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(1 << 20, OnFull::RejectNew);
    s.commit_window = Duration::ZERO;
    s.min_sync_interval = Duration::from_millis(800);
    let o = Outbox::open(dir.path(), s).unwrap();
    // Idle: the first message is synced alone (its commit resolves with one sync done).
    o.push(msg(1, b"first")).await.unwrap();
    assert_eq!(o.syncs(), 1);
    // Busy (a sync started less than 800 ms ago): the next ones wait for the interval, and
    // however they trickle in meanwhile, they share one sync.
    let mut commits = Vec::new();
    for i in 0..5u8 {
        commits.push(o.enqueue(msg(1, b"later")).unwrap().expect("a durable commit"));
        tokio::time::sleep(Duration::from_millis(20 * u64::from(i))).await;
    }
    for c in commits {
        c.wait().await.unwrap();
    }
    assert_eq!(o.syncs(), 2, "the five later messages took more than one sync");
    assert_eq!(o.depth(), 6);
}

#[tokio::test]
async fn keeps_order_until_acked() {
    let o = Outbox::memory(settings(1 << 20, OnFull::RejectNew));
    for p in [b"1", b"2", b"3"] {
        o.push(msg(1, p)).await.unwrap();
    }
    let got = o.pending_after(0, 10);
    assert_eq!(
        got.iter().map(|(_, m)| m.payload.clone()).collect::<Vec<_>>(),
        vec!["1", "2", "3"]
    );
    o.ack(got[0].0);
    assert_eq!(o.depth(), 2);
    assert_eq!(o.pending_after(0, 10)[0].1.payload, "2");
    assert_eq!(o.pending_after(got[1].0, 10).len(), 1);
}

#[tokio::test]
async fn reject_new_counts_every_refusal() {
    let o = Outbox::memory(settings(100, OnFull::RejectNew));
    assert!(o.push(msg(1, &[0; 50])).await.is_ok());
    assert_eq!(o.push(msg(1, &[0; 50])).await, Err(PushError::Full));
    assert_eq!(o.counters().rejected_full.load(Ordering::Relaxed), 1);
    assert_eq!(o.depth(), 1);
}

#[tokio::test]
async fn drop_oldest_counts_every_drop() {
    let o = Outbox::memory(settings(100, OnFull::DropOldest));
    o.push(msg(1, b"old-old-old-old-old-old-old-old-old"))
        .await
        .unwrap();
    o.push(msg(1, b"new-new-new-new-new-new-new-new-new"))
        .await
        .unwrap();
    assert_eq!(o.counters().dropped_oldest.load(Ordering::Relaxed), 1);
    assert_eq!(
        o.pending_after(0, 10)[0].1.payload,
        "new-new-new-new-new-new-new-new-new"
    );
}

/// `/healthz` says the store is failing from a failed write until a *later* write succeeds: a
/// commit of an earlier batch resolving late does not clear it.
#[test]
fn the_store_fails_until_a_later_write_succeeds() {
    let o = Outbox::memory(settings(1 << 20, OnFull::RejectNew));
    assert_eq!(o.store_failure(), None);
    o.note_written(3);
    o.note_failed(5, Some("No space left on device (os error 28)"));
    o.note_failed(6, None);
    assert_eq!(
        o.store_failure().as_deref(),
        Some("No space left on device (os error 28)"),
        "the writer's list of failures keeps the last error seen"
    );
    o.note_written(4);
    assert!(o.store_failure().is_some(), "an earlier batch does not clear it");
    o.note_written(7);
    assert_eq!(o.store_failure(), None);
    o.note_failed(9, None);
    assert_eq!(
        o.store_failure().as_deref(),
        Some("No space left on device (os error 28)")
    );
}

/// What is on disk right now: a copy of the file, opened as a second store.
fn on_disk(dir: &std::path::Path) -> usize {
    let copy = tempfile::tempdir().unwrap();
    std::fs::create_dir(copy.path().join("outbox")).unwrap();
    for f in std::fs::read_dir(dir.join("outbox")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.path().join("outbox").join(f.file_name().unwrap())).unwrap();
    }
    Outbox::open(copy.path(), settings(1 << 20, OnFull::RejectNew))
        .unwrap()
        .depth()
}

fn prio_msg(mapping: usize, priority: u8, n: u32) -> OutMessage {
    OutMessage {
        mapping,
        priority,
        ttl_s: (priority > 0).then_some(3600),
        payload: Bytes::from(n.to_string()),
        ..msg(1, b"")
    }
}

/// Issue 18 item 1: the priority is in the record, so after a restart the backlog still leaves
/// the highest priority first, each mapping in its order; the cursors per priority skip what was
/// taken.
#[tokio::test]
async fn priorities_survive_a_restart_and_leave_first() {
    let dir = tempfile::tempdir().unwrap();
    {
        let o = Outbox::open(dir.path(), settings(1 << 20, OnFull::RejectNew)).unwrap();
        for n in 0..30u32 {
            let (mapping, prio) = if n % 10 == 9 { (1, 6) } else { (0, 0) };
            o.push(prio_msg(mapping, prio, n)).await.unwrap();
        }
        o.sync().await;
    }
    let o = Outbox::open(dir.path(), settings(1 << 20, OnFull::RejectNew)).unwrap();
    let all = o.pending(&[0; PRIORITIES], 100);
    let order: Vec<(usize, String)> = all
        .iter()
        .map(|(_, m)| (m.mapping, String::from_utf8_lossy(&m.payload).into_owned()))
        .collect();
    let mut want: Vec<(usize, String)> = [9, 19, 29].iter().map(|n| (1, n.to_string())).collect();
    want.extend((0..30).filter(|n| n % 10 != 9).map(|n| (0, n.to_string())));
    assert_eq!(order, want);
    assert!(all[..3]
        .iter()
        .all(|(_, m)| m.priority == 6 && m.ttl_s == Some(3600)));
    // Above the cursors: priority 6 all taken, priority 0 after its fifth.
    let mut cur = [0; PRIORITIES];
    cur[6] = all[2].0;
    cur[0] = all[7].0;
    let next = o.pending(&cur, 2);
    assert_eq!(next[0].1.payload, "5");
    assert_eq!(next[1].1.payload, "6");
    // Acknowledged out of order (the priority ones first), nothing else is lost.
    for (seq, _) in &all[..3] {
        o.ack(*seq);
    }
    assert_eq!(o.depth(), 27);
    assert_eq!(o.pending_after(0, 1)[0].1.payload, "0");
}

/// The sum of the outbox files' sizes, as `stat` sees them.
fn files_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Issue 18 item 4: `max_disk_bytes` holds against the real size of the files. reject-new:
/// the messages that do not fit are refused (`Full`, counted), and accepted again once the
/// cloud took enough for a segment to go; drop-oldest: every new message is taken and the
/// oldest segment's messages are dropped (counted).
#[tokio::test]
async fn the_disk_budget_holds_against_the_files_size() {
    const LIMIT: u64 = 1 << 20;
    let payload = vec![b'p'; 1000];
    for on_full in [OnFull::RejectNew, OnFull::DropOldest] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(64 << 20, on_full);
        s.max_disk_bytes = Some(LIMIT);
        let o = Outbox::open(dir.path(), s).unwrap();
        let (mut ok, mut full) = (0u32, 0u32);
        for n in 0..3000u32 {
            let mut m = prio_msg(0, 0, n);
            m.payload = Bytes::from(payload.clone());
            match o.push(m).await {
                Ok(()) => ok += 1,
                Err(PushError::Full) => full += 1,
                Err(e) => panic!("{on_full:?}: {e}"),
            }
            assert!(
                files_size(dir.path()) <= LIMIT,
                "{on_full:?}: {} B",
                files_size(dir.path())
            );
        }
        let size = files_size(dir.path());
        assert!(
            size > LIMIT / 2,
            "{on_full:?}: the budget was not used ({size} B)"
        );
        assert_eq!(o.store_file_bytes(), size);
        let c = o.counters();
        match on_full {
            OnFull::RejectNew => {
                assert!(full > 1000 && ok > 500, "{ok} taken, {full} refused");
                assert_eq!(c.rejected_full.load(Ordering::Relaxed), u64::from(full));
                assert_eq!(o.depth() as u32, ok);
                assert_eq!(o.store_failure(), None, "a budget is not a failing store");
                // The cloud takes the oldest 300: a segment goes, and new messages fit again.
                for (seq, _) in o.pending_after(0, 300) {
                    o.ack(seq);
                }
                o.sync().await;
                o.push(prio_msg(0, 0, 1)).await.unwrap();
            }
            OnFull::DropOldest => {
                assert_eq!(full, 0);
                let dropped = c.dropped_oldest.load(Ordering::Relaxed);
                assert!(dropped > 1000, "{dropped}");
                assert_eq!(o.depth() as u64, 3000 - dropped);
                let left = o.pending_after(0, 5000);
                assert_eq!(
                    left.len() as u64,
                    3000 - dropped,
                    "every queued message reads back"
                );
            }
        }
    }
}

#[tokio::test]
async fn sync_makes_acknowledgements_durable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), settings(1 << 20, OnFull::RejectNew)).unwrap();
    for p in [b"1", b"2", b"3"] {
        o.push(msg(1, p)).await.unwrap();
    }
    assert_eq!(on_disk(dir.path()), 3);
    for (seq, _) in o.pending_after(0, 2) {
        o.ack(seq);
    }
    // Deletions alone are held back up to a second, unless synced, as a clean stop does.
    o.sync().await;
    assert_eq!(on_disk(dir.path()), 1);
}
