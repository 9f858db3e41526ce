//! One MQTT connection to the cloud broker that keeps reading while it writes.
//!
//! A write can wait on the transport's flow control: an SSH channel's window, or the TCP window inside
//! the WireGuard tunnel. If the session stopped reading meanwhile, the acknowledgements piling up on
//! the other side can block the very messages (an SSH window adjust) that would let the write go on:
//! russh stops reading its socket when a channel's receive buffer is full, and the link wedges. So every
//! write here is driven together with the reader; packets read during a write wait in a backlog that
//! [`Link::next`] hands out first. The backlog is bounded in packets and bytes (the cloud's in-flight
//! window keeps it small): a broker that floods past the bound is not read from until the write is
//! done, and a write that makes no progress for `write_timeout` ends the session, so neither a flood
//! nor a dead peer can hold memory or the session forever.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rmqtt::codec::error::EncodeError;
use rmqtt::codec::v3::{Codec, Packet};
use rmqtt::codec::v5;
use tokio::io::{ReadHalf, WriteHalf};
use tokio_util::codec::Encoder;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::decode::{Inbound, InboundCodec};
use crate::transport::BoxStream;

/// Packets read during writes and not yet handled, at most ...
const MAX_BACKLOG: usize = 65_536;
/// ... and their bytes (topics and payloads), at most.
const MAX_BACKLOG_BYTES: usize = 32 * 1024 * 1024;

/// Packets read during writes, with their size.
#[derive(Default)]
struct Backlog {
    q: VecDeque<Inbound>,
    bytes: usize,
}

fn size(p: &Inbound) -> usize {
    match p {
        Inbound::Packet(Packet::Publish(p)) => 64 + p.topic.len() + p.payload.len(),
        _ => 64,
    }
}

impl Backlog {
    fn push(&mut self, p: Inbound) {
        self.bytes += size(&p);
        self.q.push_back(p);
    }

    fn pop(&mut self) -> Option<Inbound> {
        let p = self.q.pop_front()?;
        self.bytes -= size(&p);
        Some(p)
    }

    fn has_room(&self) -> bool {
        self.q.len() < MAX_BACKLOG && self.bytes < MAX_BACKLOG_BYTES
    }
}

/// The encoder: MQTT 3.1.1, or MQTT 5 with the session core's 3.1.1 packets translated.
pub enum Wire {
    V3(Codec),
    V5(v5::Codec),
}

impl Encoder<Packet> for Wire {
    type Error = EncodeError;

    fn encode(&mut self, p: Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Wire::V3(c) => c.encode(p, dst),
            Wire::V5(c) => c.encode(to_v5(p)?, dst),
        }
    }
}

impl Encoder<v5::Packet> for Wire {
    type Error = EncodeError;

    fn encode(&mut self, p: v5::Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Wire::V5(c) => c.encode(p, dst),
            Wire::V3(_) => Err(EncodeError::MalformedPacket),
        }
    }
}

/// A session core packet as MQTT 5. Cloud subscriptions are made with no-local (the cloud never
/// sends the uplink its own messages back: no echo on a `both` mapping) and retain-as-published
/// (a retained message keeps its flag on live delivery, so a mapping's retain policy sees it).
pub fn to_v5(p: Packet) -> Result<v5::Packet, EncodeError> {
    use v5::Packet as P;
    let ack = |packet_id| v5::PublishAck {
        packet_id,
        reason_code: v5::PublishAckReason::Success,
        properties: Vec::new(),
        reason_string: None,
    };
    Ok(match p {
        Packet::Publish(p) => P::Publish(p),
        Packet::PublishAck { packet_id } => P::PublishAck(ack(packet_id)),
        Packet::PublishReceived { packet_id } => P::PublishReceived(ack(packet_id)),
        Packet::PublishComplete { packet_id } => P::PublishComplete(v5::PublishAck2 {
            packet_id,
            reason_code: v5::PublishAck2Reason::Success,
            properties: Vec::new(),
            reason_string: None,
        }),
        Packet::Subscribe {
            packet_id,
            topic_filters,
        } => P::Subscribe(v5::Subscribe {
            packet_id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: topic_filters
                .into_iter()
                .map(|(f, qos)| {
                    let o = v5::SubscriptionOptions {
                        qos,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: v5::RetainHandling::AtSubscribe,
                    };
                    (f, o)
                })
                .collect(),
        }),
        Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => P::Unsubscribe(v5::Unsubscribe {
            packet_id,
            user_properties: Vec::new(),
            topic_filters,
        }),
        Packet::PingRequest => P::PingRequest,
        Packet::Disconnect => P::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::NormalDisconnection,
            session_expiry_interval_secs: None,
            server_reference: None,
            reason_string: None,
            user_properties: Vec::new(),
        }),
        _ => return Err(EncodeError::MalformedPacket),
    })
}

/// A framed MQTT connection (3.1.1 or 5), split so reads go on during writes.
pub struct Link {
    rx: FramedRead<ReadHalf<BoxStream>, InboundCodec>,
    tx: FramedWrite<WriteHalf<BoxStream>, Wire>,
    backlog: Backlog,
    write_timeout: Duration,
    /// What the cloud allows on this connection (from its CONNACK).
    pub peer: crate::uplink::core::Peer,
}

impl Link {
    /// `max_inbound` bounds the remaining length of packets taken from the broker: a PUBLISH over it
    /// is skipped and reported as [`Inbound::Discarded`], anything else over it ends the stream.
    pub fn new(stream: BoxStream, max_inbound: u32, write_timeout: Duration) -> Self {
        Self::with_version(
            stream,
            max_inbound,
            write_timeout,
            crate::config::MqttVersion::V311,
        )
    }

    /// A link speaking `version`.
    pub fn with_version(
        stream: BoxStream,
        max_inbound: u32,
        write_timeout: Duration,
        version: crate::config::MqttVersion,
    ) -> Self {
        let (r, w) = tokio::io::split(stream);
        let mut codec = InboundCodec::new(max_inbound);
        let wire = match version {
            crate::config::MqttVersion::V5 => {
                codec.set_v5();
                Wire::V5(v5::Codec::new(0, 0))
            }
            crate::config::MqttVersion::V311 => Wire::V3(Codec::new(0)),
        };
        Link {
            rx: FramedRead::new(r, codec),
            tx: FramedWrite::new(w, wire),
            backlog: Backlog::default(),
            write_timeout,
            peer: crate::uplink::core::Peer::V311,
        }
    }

    /// Buffers and writes out one MQTT 5 packet (the CONNECT).
    pub async fn send_v5(&mut self, p: v5::Packet) -> anyhow::Result<()> {
        let Link {
            rx,
            tx,
            backlog,
            write_timeout,
            ..
        } = self;
        drive(tx.send(p), rx, backlog, *write_timeout).await
    }

    /// The next packet from the broker: first those read during writes, then the wire.
    /// `None` when the broker closed the connection.
    pub async fn next(&mut self) -> Option<anyhow::Result<Inbound>> {
        if let Some(p) = self.backlog.pop() {
            return Some(Ok(p));
        }
        self.rx.next().await.map(|r| r.map_err(|e| anyhow!("{e}")))
    }

    /// Buffers a packet (writing out when the buffer is full).
    pub async fn feed(&mut self, p: Packet) -> anyhow::Result<()> {
        let Link {
            rx,
            tx,
            backlog,
            write_timeout,
            ..
        } = self;
        drive(tx.feed(p), rx, backlog, *write_timeout).await
    }

    /// Writes out everything buffered.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let Link {
            rx,
            tx,
            backlog,
            write_timeout,
            ..
        } = self;
        drive(SinkExt::<Packet>::flush(tx), rx, backlog, *write_timeout).await
    }

    /// Buffers and writes out one packet.
    pub async fn send(&mut self, p: Packet) -> anyhow::Result<()> {
        let Link {
            rx,
            tx,
            backlog,
            write_timeout,
            ..
        } = self;
        drive(tx.send(p), rx, backlog, *write_timeout).await
    }

    /// Ends the connection cleanly, taking at most `within`: DISCONNECT, the write side shut (TLS
    /// close_notify, TCP FIN), then what the broker still sends read and dropped until it closes.
    /// Dropping a socket that holds unread data (a PUBACK that came after the last read) sends a TCP
    /// reset instead of a FIN, and a broker that gets the reset before it has read the DISCONNECT
    /// discards it and publishes the will: the status topic said "connection lost" after a clean
    /// stop.
    pub async fn disconnect(&mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            self.send(Packet::Disconnect).await?;
            SinkExt::<Packet>::close(&mut self.tx)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            while let Some(Ok(_)) = self.rx.next().await {}
            anyhow::Ok(())
        })
        .await;
    }
}

/// Runs `write` to completion while reading into `backlog`.
async fn drive<E: std::fmt::Display>(
    write: impl Future<Output = Result<(), E>>,
    rx: &mut FramedRead<ReadHalf<BoxStream>, InboundCodec>,
    backlog: &mut Backlog,
    timeout: Duration,
) -> anyhow::Result<()> {
    tokio::pin!(write);
    let stalled = tokio::time::sleep(timeout);
    tokio::pin!(stalled);
    let mut reading = true;
    loop {
        tokio::select! {
            r = &mut write => return r.map_err(|e| anyhow!("writing to the cloud broker: {e}")),
            _ = &mut stalled => bail!("writing to the cloud broker made no progress for {timeout:?}"),
            // A full backlog is not added to: the rest waits on the wire (or in the transport)
            // until the write is done and the session has taken what is read.
            p = rx.next(), if reading && backlog.has_room() => match p {
                Some(Ok(p)) => backlog.push(p),
                Some(Err(e)) => bail!("reading from the cloud broker: {e}"),
                // Closed for reading: let the write finish or fail on its own.
                None => reading = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rmqtt::codec::types::{Publish, QoS};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    /// A cloud that does not read (so our write cannot finish) and floods 200 x 256 KiB meanwhile:
    /// the backlog stops at its byte bound and the write ends by its timeout.
    #[tokio::test]
    async fn a_flood_during_a_blocked_write_is_not_read_past_the_backlog_bound() {
        let (ours, mut cloud) = tokio::io::duplex(64 * 1024);
        let mut link = Link::new(Box::new(ours), 1 << 20, Duration::from_millis(500));
        let flood = tokio::spawn(async move {
            let mut enc = Codec::new(0);
            for i in 0..200u32 {
                let mut b = bytes::BytesMut::new();
                let p = Publish {
                    dup: false,
                    retain: false,
                    qos: QoS::AtMostOnce,
                    topic: format!("flood/{i}").into(),
                    packet_id: None,
                    payload: Bytes::from(vec![b'x'; 256 * 1024]),
                    properties: None,
                };
                enc.encode(Packet::Publish(Box::new(p)), &mut b).unwrap();
                if cloud.write_all(&b).await.is_err() {
                    break;
                }
            }
            cloud
        });
        let big = Publish {
            dup: false,
            retain: false,
            qos: QoS::AtMostOnce,
            topic: "up".into(),
            packet_id: None,
            payload: Bytes::from(vec![b'y'; 4 << 20]),
            properties: None,
        };
        let r = link.send(Packet::Publish(Box::new(big))).await;
        assert!(r.is_err(), "the write cannot finish: the cloud does not read");
        let held = link.backlog.bytes;
        println!(
            "backlog after the flood: {} packets, {} KiB",
            link.backlog.q.len(),
            held / 1024
        );
        assert!(held <= MAX_BACKLOG_BYTES + 300 * 1024, "{held} bytes held");
        assert!(link.backlog.q.len() < 200, "not everything was read");
        flood.abort();
    }
}
