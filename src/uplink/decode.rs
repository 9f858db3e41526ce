//! The decoder for what the cloud broker sends. rmqtt's v3 codec ends the stream on the first packet
//! it cannot take (over the size limit, a topic that is not UTF-8), and a persistent cloud session
//! sends that packet again at every reconnect: one message would block the uplink for good. This
//! decoder frames packets itself (fixed header and remaining length) and hands whole frames to rmqtt's
//! codec; a PUBLISH it cannot take is read and discarded whole, so the stream stays in sync, and is
//! reported as [`Inbound::Discarded`] with its QoS and packet id, for the session to acknowledge,
//! count and log. An oversize PUBLISH is never buffered: past its first bytes (topic and packet id)
//! its body is skipped as it arrives. Other packets that cannot be decoded still end the session.
//!
//! Over MQTT 5 ([`InboundCodec::set_v5`]) the same rules hold (a v5 PUBLISH starts with the same
//! topic and packet id; its properties follow), frames are decoded by rmqtt's v5 codec, and the
//! packets are handed on in the 3.1.1 model the session core works in (a PUBLISH keeps its
//! properties). What 3.1.1 has no place for comes as its own [`Inbound`]: an MQTT 5 CONNACK, a
//! DISCONNECT from the broker. A 3.1.1 CONNACK (2 bytes) is recognised in v5 mode too: it is how a
//! 3.1.1 broker refuses an MQTT 5 CONNECT.

use std::num::NonZeroU16;

use bytes::{Buf, BytesMut};
use rmqtt::codec::error::DecodeError;
use rmqtt::codec::types::QoS;
use rmqtt::codec::v3::{Codec, Packet, SubscribeReturnCode};
use rmqtt::codec::v5;
use tokio_util::codec::Decoder;

/// The largest remaining length MQTT can encode.
pub const MQTT_MAX_REMAINING: u32 = 268_435_455;
/// At most this many bytes of a discarded message's topic are kept for the log.
const TOPIC_SHOWN: usize = 256;

/// What the decoder yields.
#[derive(Debug)]
pub enum Inbound {
    Packet(Packet),
    /// A PUBLISH read whole and not delivered.
    Discarded(Discarded),
    /// An MQTT 5 CONNACK.
    ConnectAck5(Box<v5::ConnectAck>),
    /// An MQTT 5 DISCONNECT from the broker: why, as it said.
    Disconnected(String),
}

/// Why a PUBLISH was discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Its remaining length is over the limit.
    TooLarge { size: u32 },
    /// Its topic is not valid UTF-8.
    TopicNotUtf8,
    /// Anything else rmqtt's decoder refused (empty topic, packet id 0, QoS 3...).
    Malformed(String),
}

/// A discarded PUBLISH: enough to acknowledge it and to say what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discarded {
    pub why: Why,
    /// The QoS bits of the fixed header (3 is malformed).
    pub qos: u8,
    /// For QoS 1 and 2, when it could be read (and is not 0).
    pub packet_id: Option<NonZeroU16>,
    /// The start of its topic, lossily decoded (log it with `?`).
    pub topic: String,
}

#[derive(Debug)]
enum State {
    Header,
    /// Skipping the rest of an oversize PUBLISH; `left` bytes to go.
    Skip {
        left: usize,
        discarded: Discarded,
    },
}

/// MQTT 3.1.1 decoder for the uplink; `max_remaining` bounds the packets it accepts.
#[derive(Debug)]
pub struct InboundCodec {
    max_remaining: u32,
    state: State,
    v5: bool,
}

impl InboundCodec {
    pub fn new(max_remaining: u32) -> Self {
        InboundCodec {
            max_remaining: max_remaining.min(MQTT_MAX_REMAINING),
            state: State::Header,
            v5: false,
        }
    }

    /// Decode MQTT 5 from now on.
    pub fn set_v5(&mut self) {
        self.v5 = true;
    }
}

const CONNACK: u8 = 2;

/// An MQTT 5 packet in the session core's 3.1.1 model (see the module documentation).
fn from_v5(p: v5::Packet) -> Result<Inbound, DecodeError> {
    use v5::Packet as P;
    Ok(match p {
        P::Publish(p) => Inbound::Packet(Packet::Publish(p)),
        P::PublishAck(a) => {
            refused_by_cloud(&a);
            Inbound::Packet(Packet::PublishAck {
                packet_id: a.packet_id,
            })
        }
        P::PublishReceived(a) => Inbound::Packet(Packet::PublishReceived {
            packet_id: a.packet_id,
        }),
        P::PublishRelease(a) => Inbound::Packet(Packet::PublishRelease {
            packet_id: a.packet_id,
        }),
        P::PublishComplete(a) => Inbound::Packet(Packet::PublishComplete {
            packet_id: a.packet_id,
        }),
        P::SubscribeAck(a) => Inbound::Packet(Packet::SubscribeAck {
            packet_id: a.packet_id,
            status: a
                .status
                .iter()
                .map(|r| match r {
                    v5::SubscribeAckReason::GrantedQos0 => SubscribeReturnCode::Success(QoS::AtMostOnce),
                    v5::SubscribeAckReason::GrantedQos1 => SubscribeReturnCode::Success(QoS::AtLeastOnce),
                    v5::SubscribeAckReason::GrantedQos2 => SubscribeReturnCode::Success(QoS::ExactlyOnce),
                    _ => SubscribeReturnCode::Failure,
                })
                .collect(),
        }),
        P::UnsubscribeAck(a) => Inbound::Packet(Packet::UnsubscribeAck {
            packet_id: a.packet_id,
        }),
        P::PingResponse => Inbound::Packet(Packet::PingResponse),
        P::ConnectAck(a) => Inbound::ConnectAck5(a),
        P::Disconnect(d) => Inbound::Disconnected(match d.reason_string {
            Some(s) => format!("{:?} ({s})", d.reason_code),
            None => format!("{:?}", d.reason_code),
        }),
        _ => return Err(DecodeError::UnsupportedPacketType),
    })
}

/// A PUBACK with a failure reason: the cloud did not take the message. It is acknowledged (deleted)
/// all the same (sent again, it would be refused again); logged at most once per 10 s.
fn refused_by_cloud(a: &v5::PublishAck) {
    use std::sync::LazyLock;
    use std::time::{Duration, Instant};
    static LOG: LazyLock<crate::broker::drops::DropLog> =
        LazyLock::new(|| crate::broker::drops::DropLog::new(Duration::from_secs(10)));
    if matches!(
        a.reason_code,
        v5::PublishAckReason::Success | v5::PublishAckReason::NoMatchingSubscribers
    ) {
        return;
    }
    if let Some(suppressed) = LOG.admit("puback refused", Instant::now()) {
        tracing::warn!(
            packet_id = a.packet_id,
            reason = ?a.reason_code,
            reason_string = ?a.reason_string,
            suppressed,
            "the cloud broker refused a message (MQTT 5 PUBACK reason code); it is not sent again"
        );
    }
}

const PUBLISH: u8 = 3;

/// Fixed header: (remaining length, header length), `None` while incomplete.
fn fixed_header(src: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut len: u32 = 0;
    for (i, b) in src.iter().skip(1).take(4).enumerate() {
        len |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((len, i + 2)));
        }
    }
    if src.len() >= 5 {
        return Err(DecodeError::InvalidLength);
    }
    Ok(None)
}

/// QoS, packet id and topic from the start of a PUBLISH body (`body` may be cut short).
fn publish_head(first: u8, body: &[u8], why: Why) -> Discarded {
    let qos = (first >> 1) & 0b11;
    let tlen = body
        .get(..2)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let topic = body.get(2..).unwrap_or_default();
    let topic = &topic[..topic.len().min(tlen)];
    let packet_id = if qos == 1 || qos == 2 {
        body.get(2 + tlen..4 + tlen)
            .and_then(|b| NonZeroU16::new(u16::from_be_bytes([b[0], b[1]])))
    } else {
        None
    };
    Discarded {
        why,
        qos,
        packet_id,
        topic: String::from_utf8_lossy(&topic[..topic.len().min(TOPIC_SHOWN)]).into_owned(),
    }
}

/// What is wrong with a PUBLISH body rmqtt's decoder would refuse, checked here so that the packet
/// can still be acknowledged.
fn publish_problem(first: u8, body: &[u8]) -> Option<Why> {
    let qos = (first >> 1) & 0b11;
    if qos == 3 {
        return Some(Why::Malformed("QoS 3".into()));
    }
    let Some(tlen) = body
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return Some(Why::Malformed("no topic".into()));
    };
    let Some(topic) = body.get(2..2 + tlen) else {
        return Some(Why::Malformed("topic longer than the packet".into()));
    };
    if topic.is_empty() {
        return Some(Why::Malformed("empty topic".into()));
    }
    if std::str::from_utf8(topic).is_err() {
        return Some(Why::TopicNotUtf8);
    }
    if qos > 0 && body.get(2 + tlen..4 + tlen).is_none_or(|b| b == [0, 0]) {
        return Some(Why::Malformed("no packet id".into()));
    }
    None
}

impl Decoder for InboundCodec {
    type Item = Inbound;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, DecodeError> {
        if let State::Skip { left, .. } = &mut self.state {
            let n = (*left).min(src.len());
            src.advance(n);
            *left -= n;
            if *left > 0 {
                return Ok(None);
            }
            let State::Skip { discarded, .. } = std::mem::replace(&mut self.state, State::Header) else {
                unreachable!("matched above")
            };
            return Ok(Some(Inbound::Discarded(discarded)));
        }
        let Some((remaining, hlen)) = fixed_header(src)? else {
            return Ok(None);
        };
        let first = src[0];
        let is_publish = first >> 4 == PUBLISH;
        let total = hlen + remaining as usize;
        if remaining > self.max_remaining {
            if !is_publish {
                return Err(DecodeError::MaxSizeExceeded {
                    size: remaining,
                    max: self.max_remaining,
                });
            }
            // Wait for the topic and packet id (at most 64 KiB), then skip the rest unbuffered.
            let Some(tlen) = src
                .get(hlen..hlen + 2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            else {
                return Ok(None);
            };
            let head = (2 + tlen + 2).min(remaining as usize);
            if src.len() < hlen + head {
                src.reserve(hlen + head - src.len());
                return Ok(None);
            }
            let discarded = publish_head(first, &src[hlen..hlen + head], Why::TooLarge { size: remaining });
            src.advance(hlen);
            self.state = State::Skip {
                left: remaining as usize,
                discarded,
            };
            return self.decode(src);
        }
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        let mut fallback = None;
        if is_publish {
            let body = &frame[hlen..];
            if let Some(why) = publish_problem(first, body) {
                return Ok(Some(Inbound::Discarded(publish_head(first, body, why))));
            }
            fallback = Some(publish_head(first, &[], Why::Malformed(String::new())));
        }
        // A 3.1.1 CONNACK (remaining length 2; an MQTT 5 one has at least its properties' length).
        let v3 = !self.v5 || (first >> 4 == CONNACK && remaining == 2);
        let decoded = if v3 {
            Codec::new(0)
                .decode(&mut frame)
                .map(|p| p.map(|(p, _)| Inbound::Packet(p)))
        } else {
            v5::Codec::new(0, 0)
                .decode(&mut frame)
                .and_then(|p| p.map(|(p, _)| from_v5(p)).transpose())
        };
        match (decoded, fallback) {
            (Ok(Some(inbound)), _) => Ok(Some(inbound)),
            (Ok(None), _) => Err(DecodeError::InvalidLength),
            // Checked above; kept in case rmqtt refuses something more.
            (Err(e), Some(mut d)) => {
                d.why = Why::Malformed(e.to_string());
                Ok(Some(Inbound::Discarded(d)))
            }
            (Err(e), None) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rmqtt::codec::types::{Publish, QoS};
    use tokio_util::codec::Encoder;

    fn publish(topic: &[u8], payload_len: usize, qos: u8, id: u16) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic);
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.extend(std::iter::repeat_n(b'x', payload_len));
        let mut p = vec![0x30 | (qos << 1)];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            p.push(b);
            if n == 0 {
                break;
            }
        }
        p.extend(body);
        p
    }

    fn ping_resp() -> Vec<u8> {
        vec![0xd0, 0]
    }

    /// Feeds `bytes` in chunks of `chunk` and collects everything decoded.
    fn feed(codec: &mut InboundCodec, bytes: &[u8], chunk: usize) -> Vec<Inbound> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            buf.extend_from_slice(c);
            while let Some(i) = codec.decode(&mut buf).unwrap() {
                out.push(i);
            }
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        out
    }

    #[test]
    fn an_oversize_publish_is_skipped_whole_and_the_stream_stays_in_sync() {
        for chunk in [1, 7, 1000, 1 << 20] {
            let mut codec = InboundCodec::new(1024);
            let mut wire = publish(b"big/topic", 5000, 1, 42);
            wire.extend(ping_resp());
            wire.extend(publish(b"small", 10, 1, 43));
            let out = feed(&mut codec, &wire, chunk);
            assert_eq!(out.len(), 3, "chunk {chunk}");
            match &out[0] {
                Inbound::Discarded(d) => {
                    assert_eq!(
                        d.why,
                        Why::TooLarge {
                            size: 2 + 9 + 2 + 5000
                        }
                    );
                    assert_eq!(
                        (d.qos, d.packet_id, d.topic.as_str()),
                        (1, NonZeroU16::new(42), "big/topic")
                    );
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(out[1], Inbound::Packet(Packet::PingResponse)));
            match &out[2] {
                Inbound::Packet(Packet::Publish(p)) => assert_eq!(p.packet_id, NonZeroU16::new(43)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_topic_that_is_not_utf8_is_discarded_with_its_packet_id() {
        let mut codec = InboundCodec::new(1 << 20);
        let mut wire = publish(b"cmd/\xff\xfe", 3, 2, 7);
        wire.extend(publish(b"cmd/ok", 3, 0, 0));
        let out = feed(&mut codec, &wire, 3);
        match &out[0] {
            Inbound::Discarded(d) => {
                assert_eq!(
                    (&d.why, d.qos, d.packet_id),
                    (&Why::TopicNotUtf8, 2, NonZeroU16::new(7))
                );
                assert_eq!(d.topic, "cmd/\u{fffd}\u{fffd}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&out[1], Inbound::Packet(Packet::Publish(p)) if p.topic == "cmd/ok"));
    }

    #[test]
    fn a_malformed_publish_is_discarded_and_other_packets_decode_as_rmqtt_does() {
        let mut codec = InboundCodec::new(1 << 20);
        // Empty topic, QoS 1.
        let mut wire = publish(b"", 3, 1, 9);
        let mut enc = Codec::new(0);
        let mut b = BytesMut::new();
        let p = Publish {
            dup: true,
            retain: true,
            qos: QoS::AtLeastOnce,
            topic: "a/b".into(),
            packet_id: NonZeroU16::new(5),
            payload: Bytes::from_static(b"hello"),
            properties: None,
        };
        enc.encode(Packet::Publish(Box::new(p.clone())), &mut b).unwrap();
        enc.encode(
            Packet::PublishAck {
                packet_id: NonZeroU16::new(3).unwrap(),
            },
            &mut b,
        )
        .unwrap();
        wire.extend_from_slice(&b);
        let out = feed(&mut codec, &wire, 2);
        assert!(
            matches!(&out[0], Inbound::Discarded(d) if matches!(d.why, Why::Malformed(_)) && d.packet_id == NonZeroU16::new(9))
        );
        assert!(matches!(&out[1], Inbound::Packet(Packet::Publish(q)) if **q == p));
        assert!(matches!(&out[2], Inbound::Packet(Packet::PublishAck { .. })));
    }

    /// Issue 15: over MQTT 5 the same rules hold (a v5 PUBLISH starts with the same topic and packet
    /// id; its properties follow), the packets come in the 3.1.1 model with their properties, and a
    /// 3.1.1 CONNACK (a 3.1.1 broker refusing MQTT 5) is still recognised.
    #[test]
    fn over_mqtt_5_the_same_rules_hold_and_properties_come_through() {
        let mut codec = InboundCodec::new(1024);
        codec.set_v5();
        let mut wire = vec![0x20, 2, 0, 1];
        wire.extend(publish(b"big/topic", 5000, 1, 42));
        wire.extend(publish(b"cmd/\xff", 3, 2, 7));
        let mut enc = v5::Codec::new(0, 0);
        let mut b = BytesMut::new();
        let props = v5::PublishProperties {
            user_properties: vec![("k".into(), "v".into())],
            content_type: Some("text/plain".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            message_expiry_interval: std::num::NonZeroU32::new(30),
            ..Default::default()
        };
        let p = Publish {
            dup: false,
            retain: true,
            qos: QoS::AtLeastOnce,
            topic: "a/b".into(),
            packet_id: NonZeroU16::new(5),
            payload: Bytes::from_static(b"hello"),
            properties: Some(props),
        };
        enc.encode(v5::Packet::Publish(Box::new(p.clone())), &mut b)
            .unwrap();
        enc.encode(
            v5::Packet::PublishAck(v5::PublishAck {
                packet_id: NonZeroU16::new(3).unwrap(),
                reason_code: v5::PublishAckReason::QuotaExceeded,
                properties: Vec::new(),
                reason_string: None,
            }),
            &mut b,
        )
        .unwrap();
        wire.extend_from_slice(&b);
        let out = feed(&mut codec, &wire, 5);
        assert_eq!(out.len(), 5, "{out:?}");
        assert!(matches!(
            &out[0],
            Inbound::Packet(Packet::ConnectAck(a)) if a.return_code == rmqtt::codec::v3::ConnectAckReason::UnacceptableProtocolVersion
        ));
        assert!(
            matches!(&out[1], Inbound::Discarded(d) if matches!(d.why, Why::TooLarge { .. }) && d.packet_id == NonZeroU16::new(42))
        );
        assert!(
            matches!(&out[2], Inbound::Discarded(d) if d.why == Why::TopicNotUtf8 && d.packet_id == NonZeroU16::new(7))
        );
        assert!(
            matches!(&out[3], Inbound::Packet(Packet::Publish(q)) if **q == p),
            "{:?}",
            out[3]
        );
        assert!(matches!(&out[4], Inbound::Packet(Packet::PublishAck { packet_id }) if packet_id.get() == 3));
    }

    #[test]
    fn an_oversize_packet_that_is_not_a_publish_is_an_error() {
        let mut codec = InboundCodec::new(16);
        let mut buf = BytesMut::from(&[0x90u8, 0x40][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::MaxSizeExceeded { .. })
        ));
        let mut codec = InboundCodec::new(16);
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(codec.decode(&mut buf).is_err(), "a five-byte remaining length");
    }
}
