//! The outbox log against the real appliance (the `mqtt-uplink` binary, SIGKILLed) and a real cloud
//! (mosquitto): issue 13 item 4's torn-tail proof end to end. Messages queue while the cloud is down,
//! the appliance is killed, the last record of its log is torn (cut, or overwritten with random
//! bytes), and after a restart every other acknowledged message reaches the cloud.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use support::appliance::{received, ChildApp, Publisher};
use support::cloud::{Cloud, Sub};
use support::site::{Site, Uplink};
use support::{free_port, tempdir};

const T: Duration = Duration::from_secs(30);
const DEV_PW: &str = "dev1-Passw0rd-long";
const LOCAL: &str = "sensors/seq";
const REMOTE: &str = "sites/plant-7/sensors/seq";

/// The appliance's config, device `dev1`'s password and ACL and the uplink password written into
/// `dir`: device listener on `listen`, uplink to `broker_port`.
fn site(dir: &Path, listen: u16, broker_port: u16) -> Site {
    Site::new(dir)
        .listener(listen)
        .user("dev1", DEV_PW)
        .acl("user dev1\ntopic readwrite sensors/#\n")
        .uplink(Uplink::port(broker_port).transports(&["tls"]).quick())
        .map_out("sensors/#", "sites/plant-7/")
}

/// A persistent subscriber on the cloud, returned once the cloud has saved its session (so that it
/// survives the cloud's SIGKILL).
async fn accounting_sub(cloud: &mut Cloud, id: &str) -> Sub {
    support::sshd::append_line(&cloud.dir.join("cloud.conf"), "autosave_interval 1");
    cloud.restart();
    let since = SystemTime::now();
    let sub = cloud.subscribe_persistent_forever("sites/plant-7/#", id);
    let db = cloud.dir.join("mosquitto.db");
    let saved = support::wait_until(Duration::from_secs(10), || {
        std::fs::metadata(&db)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > since + Duration::from_millis(100))
    })
    .await;
    assert!(saved, "the cloud never saved its sessions to {}", db.display());
    sub
}

/// The log's segments, oldest first.
fn segments(state: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(state.join("outbox"))
        .expect("the outbox log directory exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Walks the records of a segment (`[len u32][crc u32][seq u64][body]`): the offset of each message
/// record, and its payload (the publisher's number), up to the first empty slot.
fn message_records(seg: &Path) -> Vec<(u64, u64, u64)> {
    let data = std::fs::read(seg).unwrap();
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 16 <= data.len() {
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 || off + 16 + len > data.len() {
            break;
        }
        let body = &data[off + 16..off + 16 + len];
        if (2..=4).contains(&body[0]) {
            // Formats 2 to 4: format, mapping u32, qos, retain, accepted_ms u64, topic len u32, user
            // len u16, user, topic; format 3 then has its properties' length u32 and the properties;
            // format 4 then the priority u8 and the TTL u32.
            let tlen = u32::from_le_bytes(body[15..19].try_into().unwrap()) as usize;
            let ulen = u16::from_le_bytes(body[19..21].try_into().unwrap()) as usize;
            let mut at = 21 + ulen + tlen;
            if body[0] >= 3 {
                at += 4 + u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
            }
            if body[0] == 4 {
                at += 5;
            }
            let payload = &body[at..];
            let n = std::str::from_utf8(payload).unwrap().parse().unwrap();
            out.push((off as u64, (16 + len) as u64, n));
        }
        off += 16 + len;
    }
    out
}

async fn torn_tail_then_restart(random: bool) {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    let mut sub = accounting_sub(&mut cloud, if random { "acct-r" } else { "acct-c" }).await;
    let port = free_port();
    let mut app = ChildApp::start(dir.path(), &site(dir.path(), port, cloud.port).toml(), port);
    assert!(
        support::wait_until(T, || app.log().contains("uplink connected")).await,
        "{}",
        app.log()
    );
    cloud.kill();

    let total = 300;
    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, 0, total);
    assert!(
        publisher.wait_acked(total as usize, T).await,
        "only {} of {total} acknowledged:\n{}",
        publisher.acked_count(),
        app.log()
    );
    let acked = publisher.stop().await;
    app.kill();

    // Tear the last record of the newest segment holding messages: as if the appliance had died
    // during that write (its device would then have had no PUBACK).
    let state = dir.path().join("state");
    let (seg, records) = segments(&state)
        .into_iter()
        .rev()
        .map(|s| {
            let r = message_records(&s);
            (s, r)
        })
        .find(|(_, r)| !r.is_empty())
        .expect("a segment holds the queued messages");
    let &(off, len, torn) = records.last().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    if random {
        let junk: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        f.write_all_at(&junk[len as usize / 2..], off + len / 2).unwrap();
    } else {
        f.set_len(off + len / 2).unwrap();
    }
    drop(f);
    eprintln!(
        "tore message {torn} at {}+{off} ({len} bytes), random {random}",
        seg.display()
    );

    app.start_again();
    assert!(
        support::wait_until(T, || app.log().contains("torn")).await,
        "recovery did not report the torn record:\n{}",
        app.log()
    );
    cloud.start_again();
    let expected: BTreeSet<u64> = acked.iter().copied().filter(|&n| n != torn).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing: Vec<u64> = loop {
        let got = received(sub.wait_lines(usize::MAX, Duration::from_millis(300)), REMOTE);
        let missing: Vec<u64> = expected.difference(&got).copied().collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
    };
    assert!(
        missing.is_empty(),
        "{} acknowledged messages (of {}) never reached the cloud after the torn tail, first: {:?}\n{}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(20)],
        app.log()
    );
    assert!(!app.log().contains("panicked"), "{}", app.log());
}

/// Issue 13 item 4, proof, end to end: the last record cut in the middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_last_record_is_dropped_and_the_rest_is_delivered() {
    torn_tail_then_restart(false).await;
}

/// Issue 13 item 4, proof, end to end: the last record's second half overwritten with random bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_last_record_is_dropped_and_the_rest_is_delivered() {
    torn_tail_then_restart(true).await;
}

/// A record as the previous version's redb store wrote it (format 2): format, mapping, qos, retain,
/// accepted_ms, topic length (u32), user length (u16), user, topic, payload.
fn legacy_record(topic: &str, payload: &str, accepted_ms: u64) -> Vec<u8> {
    let mut v = vec![2u8];
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&[1, 0]);
    v.extend_from_slice(&accepted_ms.to_le_bytes());
    v.extend_from_slice(&(topic.len() as u32).to_le_bytes());
    v.extend_from_slice(&4u16.to_le_bytes());
    v.extend_from_slice(b"dev1");
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(payload.as_bytes());
    v
}

/// Issue 13 item 4: an `outbox.redb` left by the previous version (its table, its records) is moved
/// into the log at start and removed, and its messages reach the cloud, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_versions_outbox_redb_is_delivered_and_removed() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let mut sub = cloud.subscribe_ready("sites/plant-7/#");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let legacy = state.join("outbox.redb");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let total = 200u64;
    {
        const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("outbox");
        let db = redb::Database::create(&legacy).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(TABLE).unwrap();
            for n in 0..total {
                t.insert(100 + n, legacy_record(REMOTE, &n.to_string(), now).as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let port = free_port();
    let app = ChildApp::start(dir.path(), &site(dir.path(), port, cloud.port).toml(), port);
    let expected: BTreeSet<u64> = (0..total).collect();
    let deadline = Instant::now() + T;
    let lines = loop {
        let lines = sub.wait_lines(usize::MAX, Duration::from_millis(300)).to_vec();
        if received(&lines, REMOTE) == expected || Instant::now() >= deadline {
            break lines;
        }
    };
    let got = received(&lines, REMOTE);
    assert_eq!(
        got.len(),
        expected.len(),
        "missing: {:?}\n{}",
        expected.difference(&got).take(20).collect::<Vec<_>>(),
        app.log()
    );
    let order: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(REMOTE)?.strip_prefix(' ')?.parse().ok())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order: {order:?}");
    assert!(!legacy.exists(), "outbox.redb is still there:\n{}", app.log());
    assert!(app.log().contains("moved into the outbox log"), "{}", app.log());
    assert!(!segments(&state).is_empty());
}
