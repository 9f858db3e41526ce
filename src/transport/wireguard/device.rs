//! The virtual IP "device" between smoltcp and WireGuard.
//!
//! Owns two packet queues: `rx` holds decrypted IP packets from the peer waiting for smoltcp,
//! `tx` holds IP packets smoltcp produced waiting to be encrypted and sent over UDP. Both are
//! filled and drained by the tunnel task within one loop iteration, so they never grow beyond
//! one batch; nothing else touches them (no locks).

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// A point-to-point IP device (no link layer), as WireGuard is.
pub(super) struct TunnelDevice {
    /// Inner packets decapsulated from UDP, pushed by the tunnel task, consumed by smoltcp.
    rx: VecDeque<Vec<u8>>,
    /// Packets emitted by smoltcp, popped by the tunnel task and encapsulated.
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

impl TunnelDevice {
    pub(super) fn new(mtu: usize) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
        }
    }

    /// Queues a decrypted inner packet for smoltcp.
    pub(super) fn push_rx(&mut self, packet: Vec<u8>) {
        self.rx.push_back(packet);
    }

    /// Takes the next packet smoltcp wants to send.
    pub(super) fn pop_tx(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }
}

impl Device for TunnelDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((Rx(packet), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // One poll may emit a burst; the task sends the whole batch right after the poll.
        caps.max_burst_size = None;
        caps
    }
}

/// Receive token owning one decrypted packet.
pub(super) struct Rx(Vec<u8>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Transmit token appending one packet to the device's tx queue.
pub(super) struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}
