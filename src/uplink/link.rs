//! One MQTT connection to the cloud broker that keeps reading while it writes.
//!
//! A write can wait on the transport's flow control: an SSH channel's window, or the TCP window inside
//! the WireGuard tunnel. If the session stopped reading meanwhile, the acknowledgements piling up on
//! the other side can block the very messages (an SSH window adjust) that would let the write go on:
//! russh stops reading its socket when a channel's receive buffer is full, and the link wedges. So every
//! write here is driven together with the reader; packets read during a write wait in a backlog that
//! [`Link::next`] hands out first. The backlog is bounded (the cloud's in-flight window keeps it
//! small; a broker that floods past the bound ends the session). A write that makes no progress for
//! `write_timeout` ends the session too, so a dead peer cannot hold it forever.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use rmqtt::codec::v3::{Codec, Packet};
use tokio::io::{ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::decode::{Inbound, InboundCodec};
use crate::transport::BoxStream;

/// Packets read during writes and not yet handled, at most.
const MAX_BACKLOG: usize = 65_536;

/// A framed MQTT 3.1.1 connection, split so reads go on during writes.
pub struct Link {
    rx: FramedRead<ReadHalf<BoxStream>, InboundCodec>,
    tx: FramedWrite<WriteHalf<BoxStream>, Codec>,
    backlog: VecDeque<Inbound>,
    write_timeout: Duration,
}

impl Link {
    /// `max_inbound` bounds the remaining length of packets taken from the broker: a PUBLISH over it
    /// is skipped and reported as [`Inbound::Discarded`], anything else over it ends the stream.
    pub fn new(stream: BoxStream, max_inbound: u32, write_timeout: Duration) -> Self {
        let (r, w) = tokio::io::split(stream);
        Link {
            rx: FramedRead::new(r, InboundCodec::new(max_inbound)),
            tx: FramedWrite::new(w, Codec::new(0)),
            backlog: VecDeque::new(),
            write_timeout,
        }
    }

    /// The next packet from the broker: first those read during writes, then the wire.
    /// `None` when the broker closed the connection.
    pub async fn next(&mut self) -> Option<anyhow::Result<Inbound>> {
        if let Some(p) = self.backlog.pop_front() {
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
        } = self;
        drive(tx.flush(), rx, backlog, *write_timeout).await
    }

    /// Buffers and writes out one packet.
    pub async fn send(&mut self, p: Packet) -> anyhow::Result<()> {
        let Link {
            rx,
            tx,
            backlog,
            write_timeout,
        } = self;
        drive(tx.send(p), rx, backlog, *write_timeout).await
    }
}

/// Runs `write` to completion while reading into `backlog`.
async fn drive<E: std::fmt::Display>(
    write: impl Future<Output = Result<(), E>>,
    rx: &mut FramedRead<ReadHalf<BoxStream>, InboundCodec>,
    backlog: &mut VecDeque<Inbound>,
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
            p = rx.next(), if reading => match p {
                Some(Ok(p)) => {
                    if backlog.len() >= MAX_BACKLOG {
                        bail!("the cloud broker sent more than {MAX_BACKLOG} packets during one write");
                    }
                    backlog.push_back(p);
                }
                Some(Err(e)) => bail!("reading from the cloud broker: {e}"),
                // Closed for reading: let the write finish or fail on its own.
                None => reading = false,
            },
        }
    }
}
