//! Counters shared between the tunnel task and the stream handle.
//!
//! Owns [`WgStats`]. Plain atomics, written by one side and read by anyone: they are
//! observability only and never used for synchronisation between the task and the stream.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one tunnel connection. Obtain with [`super::WgStream::stats`].
#[derive(Debug, Default)]
pub struct WgStats {
    /// Iterations of the tunnel task's event loop (each is one wake-up).
    pub(super) wakeups: AtomicU64,
    /// Bytes accepted by `poll_write` but not yet moved into the TCP send buffer.
    pub(super) upload_queued: AtomicU64,
    /// High-water mark of `upload_queued`.
    pub(super) upload_queued_max: AtomicU64,
    /// Inner packets dropped because their source is not the broker.
    pub(super) dropped_foreign: AtomicU64,
    /// UDP datagrams that WireGuard rejected (bad MAC, unknown index, replay...).
    pub(super) rejected_datagrams: AtomicU64,
    /// Payload bytes written by the application and handed to TCP.
    pub(super) bytes_up: AtomicU64,
    /// Payload bytes delivered to the application.
    pub(super) bytes_down: AtomicU64,
}

impl WgStats {
    /// Number of times the tunnel task woke up (one event-loop iteration each). An idle tunnel
    /// wakes about 4 times a second (the WireGuard timer tick), not more.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Relaxed)
    }

    /// Upload bytes queued between the writer and the TCP send buffer right now. Bounded by
    /// the channel capacity times the chunk size: this is the upload backpressure.
    pub fn upload_queued_bytes(&self) -> u64 {
        self.upload_queued.load(Relaxed)
    }

    /// Highest value [`Self::upload_queued_bytes`] ever had on this connection.
    pub fn upload_queued_bytes_max(&self) -> u64 {
        self.upload_queued_max.load(Relaxed)
    }

    /// Inner packets dropped because their source address is not the broker's.
    pub fn dropped_foreign_packets(&self) -> u64 {
        self.dropped_foreign.load(Relaxed)
    }

    /// UDP datagrams rejected by WireGuard (failed authentication, replays, unknown session).
    pub fn rejected_datagrams(&self) -> u64 {
        self.rejected_datagrams.load(Relaxed)
    }

    /// Payload bytes moved from the application into the TCP connection.
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up.load(Relaxed)
    }

    /// Payload bytes delivered from the TCP connection to the application.
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down.load(Relaxed)
    }

    pub(super) fn add_queued(&self, n: u64) {
        let now = self.upload_queued.fetch_add(n, Relaxed) + n;
        self.upload_queued_max.fetch_max(now, Relaxed);
    }

    pub(super) fn sub_queued(&self, n: u64) {
        self.upload_queued.fetch_sub(n, Relaxed);
        self.bytes_up.fetch_add(n, Relaxed);
    }
}

impl WgStats {
    /// Queued upload bytes thrown away because the connection died before they could be sent.
    pub(super) fn discard_queued(&self, n: u64) {
        self.upload_queued.fetch_sub(n, Relaxed);
    }
}
