//! The application side of a tunnelled TCP connection.
//!
//! Owns [`WgStream`], the `AsyncRead + AsyncWrite` handle returned by
//! [`super::WgTransport::connect`]. It shares no lock with the tunnel task: bytes travel in
//! bounded channels of `Bytes` chunks, so a slow network blocks `poll_write` (real backpressure)
//! and a slow reader closes the TCP window (the task stops reading from smoltcp).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::oneshot;

use super::stats::WgStats;

/// Largest chunk a single `poll_write` takes (and the task hands to a single `poll_read`):
/// bounds the memory of one channel slot.
pub(super) const CHUNK: usize = 16 * 1024;

/// Slots in each direction's channel. With [`CHUNK`] this bounds the bytes queued between the
/// application and the TCP buffers to 512 KiB per direction.
pub(super) const CHANNEL_SLOTS: usize = 32;

/// Why a connection ended abnormally; turned into an `io::Error` for the application.
#[derive(Clone, Debug)]
pub(super) struct Failure {
    pub(super) kind: io::ErrorKind,
    pub(super) msg: String,
}

impl Failure {
    pub(super) fn new(kind: io::ErrorKind, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
        }
    }

    fn to_io(&self) -> io::Error {
        io::Error::new(self.kind, self.msg.clone())
    }
}

/// How the task ends the download direction: `Ok` is a clean EOF (the broker sent FIN).
pub(super) type Outcome = Result<(), Failure>;

/// The task's ends of the channels to one [`WgStream`].
pub(super) struct TaskEnds {
    /// Upload chunks. Sent by `WgStream::poll_write`; closed when the stream is shut down or
    /// dropped, which makes the task send the rest and then FIN.
    pub(super) up_rx: mpsc::Receiver<Bytes>,
    /// Download chunks. Sent by the task when smoltcp has received data and a slot is free;
    /// the task drops it after sending `end_tx` (EOF or error). Closed on the stream side when
    /// the stream is dropped: the task then discards incoming data.
    pub(super) down_tx: mpsc::Sender<Bytes>,
    /// How the download direction ended. Sent once by the task right before it drops
    /// `down_tx`; dropped unsent only if the task dies unexpectedly.
    pub(super) end_tx: oneshot::Sender<Outcome>,
    /// Sent once by the task when, after the upload channel closed, all data and our FIN were
    /// acknowledged by the broker (`Ok`) or the bounded wait for that gave up (`Err`).
    pub(super) flushed_tx: oneshot::Sender<Outcome>,
}

type Reserve = Pin<Box<dyn Future<Output = Result<OwnedPermit<Bytes>, SendError<()>>> + Send + Sync>>;

/// A TCP byte stream to the broker through the WireGuard tunnel.
///
/// Dropping it (or `shutdown()`) does not lose data: the tunnel task sends everything already
/// written, then FIN, and waits (bounded) for the acknowledgement before it exits. The task
/// runs on the tokio runtime, so before the process exits, prefer `shutdown().await`: it
/// resolves only once the broker acknowledged all data and our FIN (or fails if it did not).
///
/// Reads fail (instead of hanging) when the tunnel dies: TCP keep-alive inside the tunnel plus
/// a timeout of three keep-alive intervals, an expired WireGuard session, or persistent UDP
/// errors. The caller then reconnects with [`super::WgTransport::connect`].
pub struct WgStream {
    /// Upload channel (see [`TaskEnds::up_rx`]); `None` after shutdown, or while a slot is being
    /// reserved (the sender then lives inside `reserve`).
    up_tx: Option<mpsc::Sender<Bytes>>,
    /// Pending wait for a free upload slot (the backpressure point).
    reserve: Option<Reserve>,
    /// Download channel (see [`TaskEnds::down_tx`]).
    down_rx: mpsc::Receiver<Bytes>,
    /// Rest of the last download chunk not yet copied to the reader.
    read_buf: Bytes,
    /// See [`TaskEnds::end_tx`]; taken once resolved into `ended`.
    end_rx: Option<oneshot::Receiver<Outcome>>,
    /// See [`TaskEnds::flushed_tx`]; taken once `poll_shutdown` has seen it.
    flushed_rx: Option<oneshot::Receiver<Outcome>>,
    /// How the connection ended, once known.
    ended: Option<Outcome>,
    stats: Arc<WgStats>,
}

impl WgStream {
    /// Creates the stream and the task's ends of its channels.
    pub(super) fn pair(stats: Arc<WgStats>) -> (Self, TaskEnds) {
        let (up_tx, up_rx) = mpsc::channel(CHANNEL_SLOTS);
        let (down_tx, down_rx) = mpsc::channel(CHANNEL_SLOTS);
        let (end_tx, end_rx) = oneshot::channel();
        let (flushed_tx, flushed_rx) = oneshot::channel();
        let stream = Self {
            up_tx: Some(up_tx),
            reserve: None,
            down_rx,
            read_buf: Bytes::new(),
            end_rx: Some(end_rx),
            flushed_rx: Some(flushed_rx),
            ended: None,
            stats,
        };
        (
            stream,
            TaskEnds {
                up_rx,
                down_tx,
                end_tx,
                flushed_tx,
            },
        )
    }

    /// Counters of this connection (wake-ups, queued bytes, dropped packets...).
    pub fn stats(&self) -> Arc<WgStats> {
        self.stats.clone()
    }

    /// Event-loop iterations of the tunnel task so far (see [`WgStats::wakeups`]).
    pub fn wakeups(&self) -> u64 {
        self.stats.wakeups()
    }

    /// Resolves how the connection ended, after the task closed a channel.
    fn outcome(&mut self) -> Outcome {
        if self.ended.is_none() {
            let got = self.end_rx.take().map(|mut rx| rx.try_recv());
            self.ended = Some(match got {
                Some(Ok(outcome)) => outcome,
                _ => Err(Failure::new(
                    io::ErrorKind::BrokenPipe,
                    "WireGuard tunnel task ended unexpectedly",
                )),
            });
        }
        self.ended.clone().unwrap_or(Ok(()))
    }

    fn write_error(&mut self) -> io::Error {
        match self.outcome() {
            Err(f) => f.to_io(),
            Ok(()) => io::Error::new(io::ErrorKind::BrokenPipe, "the broker closed the connection"),
        }
    }

    fn queue(&self, buf: &[u8]) -> Bytes {
        let n = buf.len().min(CHUNK);
        // Counted before sending so the task can never subtract bytes that were not added yet.
        self.stats.add_queued(n as u64);
        Bytes::copy_from_slice(&buf[..n])
    }
}

impl AsyncRead for WgStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            // Data queued before the end is always delivered first; only once the task has
            // dropped its sender (`None`) does the outcome (EOF or error) count.
            match ready!(this.down_rx.poll_recv(cx)) {
                Some(chunk) => {
                    this.stats
                        .bytes_down
                        .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    this.read_buf = chunk;
                }
                None => return Poll::Ready(this.outcome().map_err(|f| f.to_io())),
            }
        }
    }
}

impl AsyncWrite for WgStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if let Some(reserve) = this.reserve.as_mut() {
                let res = ready!(reserve.as_mut().poll(cx));
                this.reserve = None;
                return match res {
                    Ok(permit) => {
                        let chunk = this.queue(buf);
                        let n = chunk.len();
                        this.up_tx = Some(permit.send(chunk));
                        Poll::Ready(Ok(n))
                    }
                    Err(_) => Poll::Ready(Err(this.write_error())),
                };
            }
            let Some(tx) = this.up_tx.as_ref() else {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "write after shutdown",
                )));
            };
            // Fast path: a free slot, no allocation.
            let full = match tx.try_reserve() {
                Ok(permit) => {
                    let chunk = this.queue(buf);
                    let n = chunk.len();
                    permit.send(chunk);
                    return Poll::Ready(Ok(n));
                }
                Err(e) => matches!(e, TrySendError::Full(())),
            };
            if !full {
                return Poll::Ready(Err(this.write_error()));
            }
            // Channel full: the task is not taking data because the TCP send buffer is full.
            // Wait for a slot; the loop polls the reservation so the waker is registered.
            if let Some(tx) = this.up_tx.take() {
                this.reserve = Some(Box::pin(tx.reserve_owned()));
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is already owned by the tunnel task, which sends it as fast as TCP
        // allows; there is no buffer in this handle to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Closing the upload channel tells the task: send what is queued, then FIN.
        this.up_tx = None;
        this.reserve = None;
        let Some(rx) = this.flushed_rx.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let res = ready!(Pin::new(rx).poll(cx));
        this.flushed_rx = None;
        Poll::Ready(match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(f)) => Err(f.to_io()),
            Err(_) => Err(this.write_error()),
        })
    }
}

impl std::fmt::Debug for WgStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgStream")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

// The contract the main crate relies on (TLS and MQTT are layered on top of this type).
const _: () = {
    fn assert_stream<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static>() {}
    let _ = assert_stream::<WgStream>;
};
