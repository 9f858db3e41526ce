//! MQTT protocol stream dispatcher and version-specific stream implementations.
//!
//! Provides protocol version negotiation ([`Dispatcher::mqtt`]) and version-specific
//! MQTT v3.1.1/v5.0 stream types ([`v3::MqttStream`], [`v5::MqttStream`]) with send/recv
//! methods for all MQTT packet types.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use futures::SinkExt;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::error::MqttError;
use crate::{Builder, Result};
use rmqtt_codec::cert::CertInfo;
use rmqtt_codec::error::{DecodeError, SendPacketError};
use rmqtt_codec::v3::Codec as CodecV3;
use rmqtt_codec::v5::Codec as CodecV5;
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
use rmqtt_codec::{MqttCodec, MqttPacket};

/// mqtt-uplink patch: why a connection was closed before its session started.
#[derive(Debug, Clone, Copy)]
pub enum HandshakeRefusal<'a> {
    /// No TLS handshake, first packet or CONNECT within `handshake_timeout`.
    Timeout,
    /// The first packet or the CONNECT could not be decoded, or was not a CONNECT.
    Malformed(&'a str),
}

/// mqtt-uplink patch: told the peer's address and the reason whenever a connection is closed before
/// its CONNECT was read (see [`HandshakeRefusal`]); set per listener with
/// [`Builder::on_handshake_refused`], so two servers in one process keep their own.
#[derive(Clone, Default)]
pub struct HandshakeRefusedHook(Option<Arc<dyn Fn(SocketAddr, HandshakeRefusal<'_>) + Send + Sync>>);

impl HandshakeRefusedHook {
    pub fn new(hook: impl Fn(SocketAddr, HandshakeRefusal<'_>) + Send + Sync + 'static) -> Self {
        HandshakeRefusedHook(Some(Arc::new(hook)))
    }
}

impl std::fmt::Debug for HandshakeRefusedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "HandshakeRefusedHook(set)" } else { "HandshakeRefusedHook(none)" })
    }
}

pub(crate) fn handshake_refused(cfg: &Builder, peer: SocketAddr, why: HandshakeRefusal<'_>) {
    if let Some(hook) = &cfg.on_handshake_refused.0 {
        hook(peer, why);
    }
}

/// mqtt-uplink patch: reports a failed CONNECT read (a peer that closed is not reported).
fn report_connect_error(cfg: &Builder, peer: SocketAddr, e: &anyhow::Error) {
    if matches!(e.downcast_ref::<MqttError>(), Some(MqttError::ReadTimeout)) {
        handshake_refused(cfg, peer, HandshakeRefusal::Timeout);
    } else {
        handshake_refused(cfg, peer, HandshakeRefusal::Malformed(&e.to_string()));
    }
}

/// mqtt-uplink patch: what a connection's socket still has to deliver to its peer.
///
/// A write to a peer that reads slowly waits until the kernel wakes the writer, which it does only
/// once a third of the socket's send buffer (autotuned to megabytes) has drained: a subscriber
/// reading 1,000 small messages a second took longer than `send_timeout` to drain that much and
/// was closed as a slow consumer although it was reading. The send timeout now ends a write only
/// when the socket delivered nothing during it: on expiry, if the bytes queued in the socket (the
/// `TIOCOUTQ` ioctl: sent but not acknowledged by the peer, plus not yet sent) went down since the
/// write started or was last extended, the peer is reading and the write waits another
/// `send_timeout`. A socket without a file descriptor (QUIC) keeps the plain timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct OutQueue(Option<std::os::fd::RawFd>);

impl OutQueue {
    /// The queue of `socket`, which must outlive every use of the returned value (it is kept
    /// beside the socket, in the same connection).
    pub fn of(socket: &impl std::os::fd::AsRawFd) -> Self {
        OutQueue(Some(socket.as_raw_fd()))
    }

    /// Bytes in the socket's send queue, if known.
    #[allow(unsafe_code)] // one ioctl on the connection's own socket; no safe wrapper in our dependencies
    fn bytes(self) -> Option<u64> {
        let fd = self.0?;
        let mut n: libc::c_int = 0;
        // SAFETY: `fd` is the connection's open socket (see `of`); TIOCOUTQ writes one c_int.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
        (rc == 0 && n >= 0).then_some(n as u64)
    }
}

/// mqtt-uplink patch: `fut` with `limit` as the longest time the socket may deliver nothing (see
/// [`OutQueue`]); `None` when it did not finish and the peer took nothing for `limit`.
async fn with_progress_timeout<F: std::future::Future>(limit: Duration, queue: OutQueue, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut last = queue.bytes();
    loop {
        match tokio::time::timeout(limit, fut.as_mut()).await {
            Ok(v) => return Some(v),
            Err(_) => match (last, queue.bytes()) {
                (Some(before), Some(now)) if now < before => last = Some(now),
                _ => return None,
            },
        }
    }
}

/// mqtt-uplink patch: a connection holds read and write buffers only while it is busy.
///
/// tokio-util's `Framed` allocates 8 KiB for reading and 8 KiB for writing per connection and keeps
/// them for the connection's life: about 16 KiB of the ~18 KiB an idle device connection cost.
/// Here a connection starts without buffers (`Dispatcher::new`): the codec reserves what each frame
/// needs, so a packet is read whole in two or three reads. A second packet within `IDLE_RELEASE`
/// of the previous one gets the read buffer's full capacity back, so a busy connection reads as
/// before; after `IDLE_RELEASE` without a packet, both buffers, if empty, are given back again.
pub struct IdleBuffers {
    /// Armed while the connection holds buffers to give back.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Packets read so far, and when the timer was last armed.
    packets: u64,
    seen: u64,
    /// The connection holds no buffers: since when its last packet was read, if any.
    released: Option<Option<tokio::time::Instant>>,
}

impl Default for IdleBuffers {
    fn default() -> Self {
        IdleBuffers { timer: None, packets: 0, seen: 0, released: Some(None) }
    }
}

/// mqtt-uplink patch: how long a connection reads nothing before its buffers are given back.
pub const IDLE_RELEASE: Duration = Duration::from_secs(2);
/// mqtt-uplink patch: the read buffer of a busy connection (tokio-util's initial capacity), also
/// the size of a write buffer that is flushed before it takes more.
pub(crate) const BUSY_CAPACITY: usize = 8 * 1024;

impl IdleBuffers {
    /// `io.poll_next`, giving the buffers back after `IDLE_RELEASE` without a packet.
    pub(crate) fn poll_next<Io>(
        &mut self,
        io: &mut Framed<Io, MqttCodec>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<(MqttPacket, u32), rmqtt_codec::error::DecodeError>>>
    where
        Io: AsyncRead + Unpin,
    {
        use futures::Stream as _;
        use std::future::Future as _;
        use std::task::Poll;
        use tokio::time::Instant;
        use tokio_util::bytes::BytesMut;
        loop {
            if let Poll::Ready(next) = std::pin::Pin::new(&mut *io).poll_next(cx) {
                self.packets = self.packets.wrapping_add(1);
                if let Some(last) = self.released {
                    let now = Instant::now();
                    if last.is_some_and(|t| now.duration_since(t) < IDLE_RELEASE) {
                        // Busy again: the full read buffer back.
                        self.released = None;
                        io.read_buffer_mut().reserve(BUSY_CAPACITY);
                    } else {
                        self.released = Some(Some(now));
                    }
                }
                return Poll::Ready(next);
            }
            if self.released.is_some() {
                return Poll::Pending;
            }
            let timer = match &mut self.timer {
                Some(t) => t,
                None => {
                    self.seen = self.packets;
                    self.timer.insert(Box::pin(tokio::time::sleep(IDLE_RELEASE)))
                }
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.seen != self.packets {
                // Packets were read since the timer was armed: wait another period.
                self.seen = self.packets;
                timer.as_mut().reset(Instant::now() + IDLE_RELEASE);
                continue;
            }
            self.timer = None;
            if io.read_buffer().is_empty() && io.write_buffer().is_empty() {
                *io.read_buffer_mut() = BytesMut::new();
                *io.write_buffer_mut() = BytesMut::new();
                self.released = Some(None);
            }
            // Poll the stream again: its read registers the waker (on the new, empty, buffer).
        }
    }
}

/// MQTT protocol dispatcher handling version negotiation
///
/// Manages initial protocol detection and creates version-specific streams
pub struct Dispatcher<Io> {
    /// Framed IO layer with MQTT codec
    pub(crate) io: Framed<Io, MqttCodec>,
    /// Remote client's network address
    pub remote_addr: SocketAddr,
    /// Shared configuration builder
    pub cfg: Arc<Builder>,

    pub cert_info: Option<CertInfo>,
    /// mqtt-uplink patch: the socket's send queue (`OutQueue`).
    pub out_queue: OutQueue,
}

impl<Io> Dispatcher<Io>
where
    Io: AsyncRead + AsyncWrite + Unpin,
{
    /// Creates a new Dispatcher instance
    pub(crate) fn new(
        io: Io,
        remote_addr: SocketAddr,
        cert_info: Option<CertInfo>,
        cfg: Arc<Builder>,
        out_queue: OutQueue,
    ) -> Self {
        // mqtt-uplink patch: no buffers until there is something to read or write (`IdleBuffers`);
        // was `Framed::new`, 8 KiB each.
        let mut io = Framed::with_capacity(io, MqttCodec::Version(VersionCodec), 0);
        io.set_backpressure_boundary(BUSY_CAPACITY);
        Dispatcher { io, remote_addr, cfg, cert_info, out_queue }
    }

    /// Negotiates protocol version and returns appropriate stream
    #[inline]
    pub async fn mqtt(mut self) -> Result<MqttStream<Io>> {
        Ok(match self.probe_version().await? {
            ProtocolVersion::MQTT3 => MqttStream::V3(v3::MqttStream {
                io: self.io,
                remote_addr: self.remote_addr,
                cfg: self.cfg,
                #[cfg(feature = "tls")]
                cert_info: self.cert_info,
                idle: IdleBuffers::default(),
                out_queue: self.out_queue,
            }),
            ProtocolVersion::MQTT5 => MqttStream::V5(v5::MqttStream {
                io: self.io,
                remote_addr: self.remote_addr,
                cfg: self.cfg,
                #[cfg(feature = "tls")]
                cert_info: self.cert_info,
                idle: IdleBuffers::default(),
                out_queue: self.out_queue,
            }),
        })
    }

    /// Detects protocol version from initial handshake
    #[inline]
    async fn probe_version(&mut self) -> Result<ProtocolVersion> {
        // mqtt-uplink patch: a peer that sends no (or a partial) first packet is closed after
        // `handshake_timeout`, like one that stalls the TLS handshake; unpatched, it held its socket
        // and task for ever.
        let first = match tokio::time::timeout(self.cfg.handshake_timeout, self.io.next()).await {
            Ok(first) => first,
            Err(_) => {
                handshake_refused(&self.cfg, self.remote_addr, HandshakeRefusal::Timeout);
                return Err(crate::MqttError::ReadTimeout.into());
            }
        };
        let ver = match first {
            Some(Ok((MqttPacket::Version(ver), _))) => ver,
            None => return Err(anyhow!(DecodeError::InvalidProtocol)),
            Some(Err(e)) => {
                let e = anyhow::Error::from(e);
                handshake_refused(&self.cfg, self.remote_addr, HandshakeRefusal::Malformed(&e.to_string()));
                return Err(e);
            }
            Some(Ok(_)) => {
                handshake_refused(&self.cfg, self.remote_addr, HandshakeRefusal::Malformed("first packet is not a CONNECT"));
                return Err(anyhow!(DecodeError::InvalidProtocol));
            }
        };

        let codec = match ver {
            ProtocolVersion::MQTT3 => MqttCodec::V3(CodecV3::new(self.cfg.max_packet_size)),
            ProtocolVersion::MQTT5 => {
                MqttCodec::V5(CodecV5::new(self.cfg.max_packet_size, self.cfg.max_packet_size))
            }
        };

        *self.io.codec_mut() = codec;
        Ok(ver)
    }
}

/// Version-specific MQTT protocol streams
pub enum MqttStream<Io> {
    /// MQTT v3.1.1 implementation
    V3(v3::MqttStream<Io>),
    /// MQTT v5.0 implementation
    V5(v5::MqttStream<Io>),
}

pub mod v3 {

    use std::net::SocketAddr;
    use std::num::NonZeroU16;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio_util::codec::Framed;

    use crate::error::MqttError;
    use crate::{Builder, Error, Result};
    #[cfg(feature = "tls")]
    use rmqtt_codec::cert::CertInfo;
    use rmqtt_codec::error::DecodeError;
    use rmqtt_codec::types::Publish;
    use rmqtt_codec::v3::{Connect, ConnectAckReason, Packet as PacketV3, Packet};
    use rmqtt_codec::{MqttCodec, MqttPacket};

    /// MQTT v3.1.1 protocol stream implementation
    pub struct MqttStream<Io> {
        /// Framed IO layer with MQTT codec
        pub io: Framed<Io, MqttCodec>,
        /// Remote client's network address
        pub remote_addr: SocketAddr,
        /// Shared configuration builder
        pub cfg: Arc<Builder>,
        #[cfg(feature = "tls")]
        /// TLS certificate information (if available)
        pub cert_info: Option<CertInfo>,
        /// mqtt-uplink patch: gives the buffers of a quiet connection back.
        pub idle: crate::stream::IdleBuffers,
        /// mqtt-uplink patch: the socket's send queue, for the send timeout.
        pub out_queue: crate::stream::OutQueue,
    }

    /// # Examples
    /// ```
    /// use std::net::{SocketAddr, IpAddr, Ipv4Addr};
    /// use std::sync::Arc;
    /// use tokio::net::TcpStream;
    /// use tokio_util::codec::Framed;
    /// use rmqtt_codec::{MqttCodec, types::Publish};
    /// use rmqtt_net::{Builder,v3};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 1883);
    /// let stream = TcpStream::connect(addr).await?;
    /// let mut mqtt_stream = v3::MqttStream {
    ///     io: Framed::new(stream, MqttCodec::V3(Default::default())),
    ///     remote_addr: addr,
    ///     cfg: Arc::new(Builder::default()),
    ///     cert_info: None,
    ///     idle: Default::default(),
    /// };
    ///
    /// // Send a PING request
    /// mqtt_stream.send_ping_request().await?;
    /// # Ok(())
    /// # }
    /// ```
    impl<Io> MqttStream<Io>
    where
        Io: AsyncRead + AsyncWrite + Unpin,
    {
        /// Sends DISCONNECT packet and flushes buffers
        #[inline]
        pub async fn send_disconnect(&mut self) -> Result<()> {
            self.send(PacketV3::Disconnect).await?;
            self.flush().await
        }

        /// Publishes a message to the broker
        #[inline]
        pub async fn send_publish(&mut self, publish: Box<Publish>) -> Result<()> {
            self.send(PacketV3::Publish(publish)).await
        }

        /// Acknowledges a received publish (QoS 1)
        #[inline]
        pub async fn send_publish_ack(&mut self, packet_id: NonZeroU16) -> Result<()> {
            self.send(PacketV3::PublishAck { packet_id }).await
        }

        /// Confirms receipt of a publish (QoS 2 step 1)
        #[inline]
        pub async fn send_publish_received(&mut self, packet_id: NonZeroU16) -> Result<()> {
            self.send(PacketV3::PublishReceived { packet_id }).await
        }

        /// Releases a stored publish (QoS 2 step 2)
        #[inline]
        pub async fn send_publish_release(&mut self, packet_id: NonZeroU16) -> Result<()> {
            self.send(PacketV3::PublishRelease { packet_id }).await
        }

        /// Confirms publish completion (QoS 2 step 3)
        #[inline]
        pub async fn send_publish_complete(&mut self, packet_id: NonZeroU16) -> Result<()> {
            self.send(PacketV3::PublishComplete { packet_id }).await
        }

        /// Acknowledges a subscription request
        #[inline]
        pub async fn send_subscribe_ack(
            &mut self,
            packet_id: NonZeroU16,
            status: Vec<rmqtt_codec::v3::SubscribeReturnCode>,
        ) -> Result<()> {
            self.send(PacketV3::SubscribeAck { packet_id, status }).await
        }

        /// Acknowledges an unsubscribe request
        #[inline]
        pub async fn send_unsubscribe_ack(&mut self, packet_id: NonZeroU16) -> Result<()> {
            self.send(PacketV3::UnsubscribeAck { packet_id }).await
        }

        /// Initiates connection to the broker
        #[inline]
        pub async fn send_connect(&mut self, connect: rmqtt_codec::v3::Connect) -> Result<()> {
            self.send(PacketV3::Connect(Box::new(connect))).await
        }

        /// Responds to connection request
        #[inline]
        pub async fn send_connect_ack(
            &mut self,
            return_code: ConnectAckReason,
            session_present: bool,
        ) -> Result<()> {
            self.send(PacketV3::ConnectAck(rmqtt_codec::v3::ConnectAck { session_present, return_code }))
                .await
        }

        /// Sends keep-alive ping request
        #[inline]
        pub async fn send_ping_request(&mut self) -> Result<()> {
            self.send(PacketV3::PingRequest {}).await
        }

        /// Responds to ping request
        #[inline]
        pub async fn send_ping_response(&mut self) -> Result<()> {
            self.send(PacketV3::PingResponse {}).await
        }

        /// Generic packet sending method
        #[inline]
        pub async fn send(&mut self, packet: rmqtt_codec::v3::Packet) -> Result<()> {
            super::send(&mut self.io, MqttPacket::V3(packet), self.cfg.send_timeout, self.out_queue).await
        }

        // mqtt-uplink patch: queue a packet without flushing, so that several acknowledgements
        // leave in one socket write (`flush` sends them).
        /// Queues a packet in the write buffer without flushing it
        #[inline]
        pub async fn feed(&mut self, packet: rmqtt_codec::v3::Packet) -> Result<()> {
            super::feed(&mut self.io, MqttPacket::V3(packet), self.cfg.send_timeout, self.out_queue).await
        }

        /// Flushes write buffers
        #[inline]
        pub async fn flush(&mut self) -> Result<()> {
            super::flush(&mut self.io, self.cfg.send_timeout, self.out_queue).await
        }

        /// Closes the connection gracefully
        #[inline]
        pub async fn close(&mut self) -> Result<()> {
            super::close(&mut self.io, self.cfg.send_timeout, self.out_queue).await
        }

        /// Receives next packet with timeout
        #[inline]
        pub async fn recv(&mut self, tm: Duration) -> Result<Option<rmqtt_codec::v3::Packet>> {
            match tokio::time::timeout(tm, self.next()).await {
                Ok(Some(Ok(msg))) => Ok(Some(msg)),
                Ok(Some(Err(e))) => Err(e),
                Ok(None) => Ok(None),
                Err(_) => Err(MqttError::ReadTimeout.into()),
            }
        }

        /// Waits for CONNECT packet with timeout
        #[inline]
        pub async fn recv_connect(&mut self, tm: Duration) -> Result<Box<Connect>> {
            let connect = match self.recv(tm).await {
                #[allow(unused_mut)]
                Ok(Some(Packet::Connect(mut connect))) => {
                    #[cfg(feature = "tls")]
                    {
                        // Subject DN takes precedence over CN when both
                        // flags are set: full DN includes O/OU/CN and is
                        // self-namespacing across CAs.
                        if let Some(cert) = &self.cert_info {
                            if self.cfg.cert_subject_dn_as_username && !cert.subject.is_empty() {
                                connect.username = Some(cert.subject.clone().into());
                            } else if self.cfg.cert_cn_as_username {
                                if let Some(cn) = &cert.common_name {
                                    connect.username = Some(cn.clone().into());
                                }
                            }
                        }
                        if self.cfg.collect_cert_info {
                            connect.cert = self.cert_info.clone();
                        }
                    }
                    connect
                }
                Err(e) => {
                    // mqtt-uplink patch: report it.
                    super::report_connect_error(&self.cfg, self.remote_addr, &e);
                    return Err(e);
                }
                Ok(None) => {
                    return Err(MqttError::InvalidProtocol.into());
                }
                Ok(Some(_)) => {
                    // mqtt-uplink patch: report it.
                    super::handshake_refused(
                        &self.cfg,
                        self.remote_addr,
                        super::HandshakeRefusal::Malformed("expected CONNECT, got another packet"),
                    );
                    return Err(MqttError::InvalidProtocol.into());
                }
            };
            Ok(connect)
        }
    }

    impl<Io> futures::Stream for MqttStream<Io>
    where
        Io: AsyncRead + Unpin,
    {
        type Item = Result<rmqtt_codec::v3::Packet>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            // mqtt-uplink patch: through `IdleBuffers` (was `Pin::new(&mut self.io).poll_next(cx)`).
            let this = &mut *self;
            let next = this.idle.poll_next(&mut this.io, cx);
            Poll::Ready(match futures::ready!(next) {
                Some(Ok((MqttPacket::V3(packet), _))) => Some(Ok(packet)),
                Some(Ok(_)) => Some(Err(MqttError::Decode(DecodeError::MalformedPacket).into())),
                Some(Err(e)) => Some(Err(Error::from(e))),
                None => None,
            })
        }
    }
}

pub mod v5 {
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio_util::codec::Framed;

    use crate::error::MqttError;
    use crate::{Builder, Error, Result};
    #[cfg(feature = "tls")]
    use rmqtt_codec::cert::CertInfo;
    use rmqtt_codec::error::DecodeError;
    use rmqtt_codec::types::Publish;
    use rmqtt_codec::v5::{Auth, Connect, Disconnect, Packet as PacketV5, Packet};
    use rmqtt_codec::{MqttCodec, MqttPacket};

    /// MQTT v5.0 protocol stream implementation
    pub struct MqttStream<Io> {
        /// Framed IO layer with MQTT codec
        pub io: Framed<Io, MqttCodec>,
        /// Remote client's network address
        pub remote_addr: SocketAddr,
        /// Shared configuration builder
        pub cfg: Arc<Builder>,
        #[cfg(feature = "tls")]
        /// TLS certificate information (if available)
        pub cert_info: Option<CertInfo>,
        /// mqtt-uplink patch: gives the buffers of a quiet connection back.
        pub idle: crate::stream::IdleBuffers,
        /// mqtt-uplink patch: the socket's send queue, for the send timeout.
        pub out_queue: crate::stream::OutQueue,
    }

    /// # Examples
    /// ```
    /// use std::net::{SocketAddr, IpAddr, Ipv4Addr};
    /// use std::sync::Arc;
    /// use tokio::net::TcpStream;
    /// use tokio_util::codec::Framed;
    /// use rmqtt_codec::{MqttCodec, types::Publish};
    /// use rmqtt_net::{Builder,v5};
    /// use rmqtt_codec::v5::Connect;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 1883);
    /// let stream = TcpStream::connect(addr).await?;
    /// let mut mqtt_stream = v5::MqttStream {
    ///     io: Framed::new(stream, MqttCodec::V5(Default::default())),
    ///     remote_addr: addr,
    ///     cfg: Arc::new(Builder::default()),
    ///     cert_info: None
    /// };
    ///
    /// // Send authentication packet
    /// mqtt_stream.send_auth(rmqtt_codec::v5::Auth::default()).await?;
    /// # Ok(())
    /// # }
    /// ```
    impl<Io> MqttStream<Io>
    where
        Io: AsyncRead + AsyncWrite + Unpin,
    {
        /// Sends DISCONNECT packet with reason code
        #[inline]
        pub async fn send_disconnect(&mut self, disc: Disconnect) -> Result<()> {
            self.send(PacketV5::Disconnect(disc)).await?;
            self.flush().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok(())
        }

        /// Publishes a message to the broker
        #[inline]
        pub async fn send_publish(&mut self, publish: Box<Publish>) -> Result<()> {
            self.send(PacketV5::Publish(publish)).await
        }

        /// Acknowledges a received publish (QoS 1)
        #[inline]
        pub async fn send_publish_ack(&mut self, ack: rmqtt_codec::v5::PublishAck) -> Result<()> {
            self.send(PacketV5::PublishAck(ack)).await
        }

        /// Confirms receipt of a publish (QoS 2 step 1)
        #[inline]
        pub async fn send_publish_received(&mut self, ack: rmqtt_codec::v5::PublishAck) -> Result<()> {
            self.send(PacketV5::PublishReceived(ack)).await
        }

        /// Releases a stored publish (QoS 2 step 2)
        #[inline]
        pub async fn send_publish_release(&mut self, ack2: rmqtt_codec::v5::PublishAck2) -> Result<()> {
            self.send(PacketV5::PublishRelease(ack2)).await
        }

        /// Confirms publish completion (QoS 2 step 3)
        #[inline]
        pub async fn send_publish_complete(&mut self, ack2: rmqtt_codec::v5::PublishAck2) -> Result<()> {
            self.send(PacketV5::PublishComplete(ack2)).await
        }

        /// Acknowledges a subscription request
        #[inline]
        pub async fn send_subscribe_ack(&mut self, ack: rmqtt_codec::v5::SubscribeAck) -> Result<()> {
            self.send(PacketV5::SubscribeAck(ack)).await
        }

        /// Acknowledges an unsubscribe request
        #[inline]
        pub async fn send_unsubscribe_ack(&mut self, unack: rmqtt_codec::v5::UnsubscribeAck) -> Result<()> {
            self.send(PacketV5::UnsubscribeAck(unack)).await
        }

        /// Initiates connection to the broker
        #[inline]
        pub async fn send_connect(&mut self, connect: rmqtt_codec::v5::Connect) -> Result<()> {
            self.send(PacketV5::Connect(Box::new(connect))).await
        }

        /// Responds to connection request
        #[inline]
        pub async fn send_connect_ack(&mut self, ack: rmqtt_codec::v5::ConnectAck) -> Result<()> {
            self.send(PacketV5::ConnectAck(Box::new(ack))).await
        }

        /// Sends keep-alive ping request
        #[inline]
        pub async fn send_ping_request(&mut self) -> Result<()> {
            self.send(PacketV5::PingRequest {}).await
        }

        /// Responds to ping request
        #[inline]
        pub async fn send_ping_response(&mut self) -> Result<()> {
            self.send(PacketV5::PingResponse {}).await
        }

        /// Sends authentication exchange packet
        #[inline]
        pub async fn send_auth(&mut self, auth: Auth) -> Result<()> {
            self.send(PacketV5::Auth(auth)).await
        }

        /// Generic packet sending method
        #[inline]
        pub async fn send(&mut self, packet: rmqtt_codec::v5::Packet) -> Result<()> {
            super::send(&mut self.io, MqttPacket::V5(packet), self.cfg.send_timeout, self.out_queue).await
        }

        // mqtt-uplink patch: queue a packet without flushing, so that several acknowledgements
        // leave in one socket write (`flush` sends them).
        /// Queues a packet in the write buffer without flushing it
        #[inline]
        pub async fn feed(&mut self, packet: rmqtt_codec::v5::Packet) -> Result<()> {
            super::feed(&mut self.io, MqttPacket::V5(packet), self.cfg.send_timeout, self.out_queue).await
        }

        /// Flushes write buffers
        #[inline]
        pub async fn flush(&mut self) -> Result<()> {
            super::flush(&mut self.io, self.cfg.send_timeout, self.out_queue).await
        }

        /// Closes the connection gracefully
        #[inline]
        pub async fn close(&mut self) -> Result<()> {
            super::close(&mut self.io, self.cfg.send_timeout, self.out_queue).await
        }

        /// Receives next packet with timeout
        #[inline]
        pub async fn recv(&mut self, tm: Duration) -> Result<Option<rmqtt_codec::v5::Packet>> {
            match tokio::time::timeout(tm, self.next()).await {
                Ok(Some(Ok(msg))) => Ok(Some(msg)),
                Ok(Some(Err(e))) => Err(e),
                Ok(None) => Ok(None),
                Err(_) => Err(MqttError::ReadTimeout.into()),
            }
        }

        /// Waits for CONNECT packet with timeout
        #[inline]
        pub async fn recv_connect(&mut self, tm: Duration) -> Result<Box<Connect>> {
            let connect = match self.recv(tm).await {
                #[allow(unused_mut)]
                Ok(Some(Packet::Connect(mut connect))) => {
                    #[cfg(feature = "tls")]
                    {
                        // Subject DN takes precedence over CN when both
                        // flags are set: full DN includes O/OU/CN and is
                        // self-namespacing across CAs.
                        if let Some(cert) = &self.cert_info {
                            if self.cfg.cert_subject_dn_as_username && !cert.subject.is_empty() {
                                connect.username = Some(cert.subject.clone().into());
                            } else if self.cfg.cert_cn_as_username {
                                if let Some(cn) = &cert.common_name {
                                    connect.username = Some(cn.clone().into());
                                }
                            }
                        }
                        if self.cfg.collect_cert_info {
                            connect.cert = self.cert_info.clone();
                        }
                    }
                    connect
                }
                Err(e) => {
                    // mqtt-uplink patch: report it.
                    super::report_connect_error(&self.cfg, self.remote_addr, &e);
                    return Err(e);
                }
                Ok(None) => {
                    return Err(MqttError::InvalidProtocol.into());
                }
                Ok(Some(_)) => {
                    // mqtt-uplink patch: report it.
                    super::handshake_refused(
                        &self.cfg,
                        self.remote_addr,
                        super::HandshakeRefusal::Malformed("expected CONNECT, got another packet"),
                    );
                    return Err(MqttError::InvalidProtocol.into());
                }
            };
            Ok(connect)
        }
    }

    impl<Io> futures::Stream for MqttStream<Io>
    where
        Io: AsyncRead + Unpin,
    {
        type Item = Result<rmqtt_codec::v5::Packet>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            // mqtt-uplink patch: through `IdleBuffers` (was `Pin::new(&mut self.io).poll_next(cx)`).
            let this = &mut *self;
            let next = this.idle.poll_next(&mut this.io, cx);
            Poll::Ready(match futures::ready!(next) {
                Some(Ok((MqttPacket::V5(packet), _))) => Some(Ok(packet)),
                Some(Ok(_)) => Some(Err(MqttError::Decode(DecodeError::MalformedPacket).into())),
                Some(Err(e)) => Some(Err(Error::from(e))),
                None => None,
            })
        }
    }
}

#[inline]
async fn send<Io>(io: &mut Framed<Io, MqttCodec>, packet: MqttPacket, send_timeout: Duration, out_queue: OutQueue) -> Result<()>
where
    Io: AsyncWrite + Unpin,
{
    if send_timeout.is_zero() {
        io.send(packet).await?;
        Ok(())
    } else {
        // mqtt-uplink patch: the timeout counts only time in which the peer took nothing.
        match with_progress_timeout(send_timeout, out_queue, io.send(packet)).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(MqttError::SendPacket(SendPacketError::Encode(e))),
            None => Err(MqttError::WriteTimeout),
        }?;
        Ok(())
    }
}

// mqtt-uplink patch: `send` without the flush (see `feed` above).
#[inline]
async fn feed<Io>(io: &mut Framed<Io, MqttCodec>, packet: MqttPacket, send_timeout: Duration, out_queue: OutQueue) -> Result<()>
where
    Io: AsyncWrite + Unpin,
{
    if send_timeout.is_zero() {
        io.feed(packet).await?;
        Ok(())
    } else {
        // mqtt-uplink patch: the timeout counts only time in which the peer took nothing.
        match with_progress_timeout(send_timeout, out_queue, io.feed(packet)).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(MqttError::SendPacket(SendPacketError::Encode(e))),
            None => Err(MqttError::WriteTimeout),
        }?;
        Ok(())
    }
}

#[inline]
async fn flush<Io>(io: &mut Framed<Io, MqttCodec>, send_timeout: Duration, out_queue: OutQueue) -> Result<()>
where
    Io: AsyncWrite + Unpin,
{
    if send_timeout.is_zero() {
        io.flush().await?;
        Ok(())
    } else {
        // mqtt-uplink patch: the timeout counts only time in which the peer took nothing.
        match with_progress_timeout(send_timeout, out_queue, io.flush()).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(MqttError::SendPacket(SendPacketError::Encode(e))),
            None => Err(MqttError::FlushTimeout),
        }?;
        Ok(())
    }
}

#[inline]
async fn close<Io>(io: &mut Framed<Io, MqttCodec>, send_timeout: Duration, out_queue: OutQueue) -> Result<()>
where
    Io: AsyncWrite + Unpin,
{
    if send_timeout.is_zero() {
        io.close().await?;
        Ok(())
    } else {
        // mqtt-uplink patch: the timeout counts only time in which the peer took nothing.
        match with_progress_timeout(send_timeout, out_queue, io.close()).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(MqttError::Encode(e)),
            None => Err(MqttError::CloseTimeout),
        }?;
        Ok(())
    }
}
