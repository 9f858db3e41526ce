//! Figures for the report, not a test: `cargo test --lib outbox::measure -- --ignored --nocapture
//! --test-threads 1`. Bytes written to disk per 64-byte message (`/proc/self/io` `write_bytes`: the
//! pages this process dirtied) at 1,000 msg/s for 10 s, with the default commit window (0) and with
//! 5 ms, and at full rate; and the memory a 64 MiB backlog of 64-byte messages costs (RSS).

use super::*;
use std::time::Instant;

use bytes::Bytes;

fn proc_field(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
        })
        .unwrap_or(0)
}

fn write_bytes() -> u64 {
    proc_field("/proc/self/io", "write_bytes:")
}

fn rss_kb() -> u64 {
    proc_field("/proc/self/status", "VmRSS:")
}

/// 64 bytes of topic and payload, like a small sensor reading.
fn msg(i: u64) -> OutMessage {
    OutMessage {
        mapping: 0,
        topic: "sites/p7/room1/temp".into(), // 19 bytes
        payload: Bytes::from(format!(
            "{:<45}",
            format!("{{\"seq\":{i},\"t\":21.5,\"u\":\"C\"}}")
        )),
        qos: 1,
        retain: false,
        accepted_ms: 0,
        user: "dev".into(),
        props: None,
        priority: 0,
        ttl_s: None,
    }
}

fn settings(window_ms: u64, interval_ms: u64, max_bytes: u64) -> OutboxSettings {
    OutboxSettings {
        max_bytes,
        max_age: Duration::from_secs(3600),
        on_full: OnFull::RejectNew,
        commit_window: Duration::from_millis(window_ms),
        min_sync_interval: Duration::from_millis(interval_ms),
        qos0_max_bytes: 1 << 20,
        max_bytes_per_user: max_bytes,
        drain_max_msgs_per_s: None,
        drain_max_bytes_per_s: None,
        max_disk_bytes: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn figures() {
    assert_eq!(msg(0).topic.len() + msg(0).payload.len(), 64);
    let default_interval = crate::config::file::default_min_sync_interval_ms();
    for (rate, window, interval) in [
        (1000, 0, 0),
        (1000, 0, 1),
        (1000, 0, 2),
        (1000, 0, 5),
        (1000, 5, default_interval),
        (100, 0, default_interval),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), settings(window, interval, 1 << 30)).unwrap();
        // `rate` msg/s for 10 s, acked as the uplink would (right after the commit).
        let n = rate * 10;
        let w0 = write_bytes();
        let start = Instant::now();
        let mut handles = Vec::new();
        for i in 0..n {
            tokio::time::sleep_until((start + Duration::from_micros(i * 1_000_000 / rate)).into()).await;
            let o2 = o.clone();
            handles.push(tokio::spawn(async move { o2.push(msg(i)).await.unwrap() }));
            for (seq, _) in o.pending_after(0, 64) {
                o.ack(seq);
            }
        }
        for h in handles {
            h.await.unwrap();
        }
        for (seq, _) in o.pending_after(0, 1 << 20) {
            o.ack(seq);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await; // idle write of the last deletions
        let written = write_bytes() - w0;
        eprintln!(
            "{rate} msg/s, 64 B messages, commit_window {window} ms, min_sync_interval {interval} ms: \
             {} B written/msg ({} syncs); files {} B",
            written / n,
            o.syncs(),
            o.store_file_bytes()
        );
    }

    // Full rate: 64 concurrent pushers, 100,000 messages, then drained (read + ack).
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), settings(0, default_interval, 1 << 30)).unwrap();
    let backlog = 100_000u64;
    let t = Instant::now();
    let w0 = write_bytes();
    let mut set = tokio::task::JoinSet::new();
    for k in 0..64 {
        let o = o.clone();
        set.spawn(async move {
            for i in (k..backlog).step_by(64) {
                o.push(msg(i)).await.unwrap();
            }
        });
    }
    while set.join_next().await.is_some() {}
    let fill = t.elapsed();
    let fill_bytes = write_bytes() - w0;
    let t = Instant::now();
    let mut cursor = 0;
    while o.depth() > 0 {
        let batch = o.pending_after(cursor, 256);
        for (seq, _) in &batch {
            o.ack(*seq);
            cursor = *seq;
        }
    }
    o.sync().await;
    eprintln!(
        "full rate, {backlog} x 64 B: filled in {fill:?} ({:.0} msg/s durable), {} B written/msg \
         filling, {} B/msg with the drain; drained in {:?}",
        backlog as f64 / fill.as_secs_f64(),
        fill_bytes / backlog,
        (write_bytes() - w0) / backlog,
        t.elapsed()
    );
    drop(o);

    // A 64 MiB backlog (logical size: topic + payload + 32 per message) of 64-byte messages.
    let dir = tempfile::tempdir().unwrap();
    let max = 64 << 20;
    let o = Outbox::open(dir.path(), settings(0, default_interval, max)).unwrap();
    let rss0 = rss_kb();
    let mut set = tokio::task::JoinSet::new();
    let total = max / 96;
    for k in 0..64 {
        let o = o.clone();
        set.spawn(async move {
            for i in (k..total).step_by(64) {
                o.push(msg(i)).await.unwrap();
            }
        });
    }
    while set.join_next().await.is_some() {}
    let rss1 = rss_kb();
    let (index, cached) = {
        let st = o.state();
        (st.queue.heap_bytes(), st.cache.len())
    };
    eprintln!(
        "64 MiB backlog: {} messages, {} B logical, files {} B; RSS {} kB -> {} kB (+{} kB); the \
         index holds {index} B, the content cache {cached} messages (8 MiB logical)",
        o.depth(),
        o.bytes(),
        o.store_file_bytes(),
        rss0,
        rss1,
        rss1.saturating_sub(rss0)
    );
}
