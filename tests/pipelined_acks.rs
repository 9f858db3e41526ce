//! Issue 13, item 1: pipelined acknowledgements. A device keeps publishing while its earlier QoS 1
//! messages are made durable; its PUBACKs leave in PUBLISH order (MQTT 3.1.1 4.6.0-2 / MQTT 5.0
//! MQTT-4.6.0-2) once the sync covering them is done, messages that do not go to the outbox keep their
//! place in that order, and a device with more messages in flight than `max_inflight` is slowed down
//! (the appliance stops reading its socket), not disconnected.
//!
//! Real peers: the appliance in-process with its durable outbox, a real mosquitto as the cloud broker,
//! a raw MQTT 3.1.1 client on 127.0.0.1 (a raw socket, so that the test sees every PUBACK in the
//! order it arrives and can keep any number of PUBLISHes in flight).

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use support::cloud::Cloud;
use support::raw::{self, Raw};
use support::site::{Site, Uplink};
use support::{tempdir, App};

const T: Duration = Duration::from_secs(60);
const PW: &str = "Pipelined-Acks-Passw0rd";

/// The appliance's config (no `[site]`: the test default), device `dev`'s password and ACL and the
/// uplink password written into `dir`: uplink to `broker_port` with `max_inflight` in `[limits]`.
fn site(dir: &Path, broker_port: u16, max_inflight: u16) -> Site {
    Site::new(dir)
        .without_site()
        .listener(0)
        .user_hashed("dev", PW)
        .acl("user dev\ntopic write sensors/#\ntopic write local/#\n")
        .limits(&format!("max_inflight = {max_inflight}"))
        .uplink(
            Uplink::port(broker_port)
                .set("client_id", "\"pipelined-uplink\"")
                .transports(&["tls"]),
        )
        .map_out("sensors/#", "sites/p/")
        .map_key("qos", 1)
}

/// Connects a raw MQTT 3.1.1 device as `dev`.
async fn device(app: &App, id: &str) -> Raw {
    let mut c = Raw::connect(app.addr).await;
    assert_eq!(
        c.login(&raw::connect(id.as_bytes(), true, Some("dev"), Some(PW)))
            .await,
        Some(0),
        "CONNACK"
    );
    c
}

/// Writes every PUBLISH at once (the appliance reads them as fast as it lets itself), reading the
/// PUBACKs at the same time; returns the packet ids of the PUBACKs in the order they arrived, and
/// whether the connection stayed open.
async fn publish_all(c: Raw, packets: Vec<(u16, Vec<u8>)>) -> (Vec<u16>, bool) {
    let Raw { sock, .. } = c;
    let (mut rd, mut wr) = sock.into_split();
    let n = packets.len();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        for (_, p) in packets {
            if wr.write_all(&p).await.is_err() {
                return false;
            }
        }
        let _ = wr.flush().await;
        // Keep the write half (and so the connection) open until the reader is done.
        tokio::time::sleep(T).await;
        true
    });
    let mut acks = Vec::with_capacity(n);
    let mut buf: Vec<u8> = Vec::new();
    let mut open = true;
    let deadline = tokio::time::Instant::now() + T;
    while acks.len() < n {
        use tokio::io::AsyncReadExt as _;
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                open = false;
                break;
            }
            Err(_) => break,
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
        }
        // PUBACK: 0x40, remaining length 2, packet id.
        while buf.len() >= 4 {
            assert_eq!(buf[0], 0x40, "only PUBACKs expected, got {:#x}", buf[0]);
            assert_eq!(buf[1], 2, "PUBACK remaining length");
            acks.push(u16::from_be_bytes([buf[2], buf[3]]));
            buf.drain(..4);
        }
    }
    writer.abort();
    (acks, open)
}

/// MQTT-4.6.0-2: "[the Server] MUST send PUBACK packets in the order in which the corresponding
/// PUBLISH packets were received (QoS 1 messages)". Messages that go to the cloud (their PUBACK waits
/// for the outbox's sync) and messages that stay on site (nothing to wait for) are interleaved; 3,000
/// are written at once, far more than `max_inflight` (200), so the appliance must also hold the device
/// back by not reading, rather than disconnect it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_leave_in_publish_order_and_a_device_over_its_window_is_slowed_not_cut() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let mut cloud_sub = cloud.subscribe_ready("sites/p/#");
    let app = App::start(dir.path(), &site(dir.path(), cloud.port, 200).toml()).await;
    assert!(app.wait_connected(T).await, "uplink did not connect");

    let n: u16 = 3000;
    let packets: Vec<(u16, Vec<u8>)> = (1..=n)
        .map(|id| {
            let topic = if id % 3 == 0 { "local/x" } else { "sensors/x" };
            (
                id,
                raw::publish(topic.as_bytes(), id.to_string().as_bytes(), 1, false, id),
            )
        })
        .collect();
    let (acks, open) = publish_all(device(&app, "dev-order").await, packets).await;
    assert!(
        open,
        "the appliance closed the connection after {} PUBACKs",
        acks.len()
    );
    let expected: Vec<u16> = (1..=n).collect();
    if acks != expected {
        let first_bad = acks.iter().zip(&expected).position(|(a, e)| a != e);
        panic!(
            "{} PUBACKs of {n}; first out of order at position {first_bad:?}: got {:?}",
            acks.len(),
            first_bad.map(|i| &acks[i..(i + 5).min(acks.len())])
        );
    }

    // Every message that went to the cloud arrives there.
    let want: BTreeSet<u64> = (1..=u64::from(n)).filter(|i| i % 3 != 0).collect();
    let lines = cloud_sub.wait_lines(want.len(), T);
    let got = support::appliance::received(lines, "sites/p/sensors/x");
    let missing: Vec<_> = want.difference(&got).take(10).collect();
    assert!(missing.is_empty(), "not at the cloud (first 10): {missing:?}");
    app.stop().await;
}

/// A device that keeps many messages in flight is not held to one message per sync: its messages
/// share syncs (a serial broker, which syncs before reading the next PUBLISH, would need one sync per
/// message). The figure printed is how many messages a sync carried on this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_publishing_while_its_messages_are_synced() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), cloud.port, 1000).toml()).await;
    assert!(app.wait_connected(T).await, "uplink did not connect");

    let n: u16 = 5000;
    let packets: Vec<(u16, Vec<u8>)> = (1..=n)
        .map(|id| {
            (
                id,
                raw::publish(b"sensors/y", id.to_string().as_bytes(), 1, false, id),
            )
        })
        .collect();
    let before = app.outbox.syncs();
    let (acks, open) = publish_all(device(&app, "dev-batch").await, packets).await;
    assert!(
        open && acks.len() == usize::from(n),
        "{} of {n} PUBACKs",
        acks.len()
    );
    let syncs = app.outbox.syncs() - before;
    println!(
        "{n} messages acknowledged after {syncs} syncs ({:.1} messages per sync)",
        f64::from(n) / syncs.max(1) as f64
    );
    assert!(syncs >= 1, "no sync at all: the messages were not made durable");
    assert!(
        syncs * 4 <= u64::from(n),
        "{syncs} syncs for {n} messages: the device waited for a sync per message"
    );
    app.stop().await;
}
