//! The uplink's decisions, without I/O: [`Session`] (the MQTT session, 5 or 3.1.1, to the cloud: in-flight
//! window, acknowledgements, subscriptions, health check, read pacing) and [`Failover`] (which
//! transport carries it, when to fail over, return or wait). Both take events with the time passed
//! in and return actions; neither reads a clock, a socket or a file. The async shell around them is
//! `uplink::session` (reads, writes, the outbox, the bridge) and `UplinkTask::run` (transports,
//! probes, sleeps).
//!
//! Modelled on the sans-I/O protocol cores of quinn-proto (`Connection::handle_event`,
//! `poll_transmit`, `poll_timeout`) and boringtun's `noise::Tunn`: the tests below drive them with
//! an in-memory cloud in microseconds.

pub mod failover;
pub mod mqtt5;
mod pacing;
pub mod session;
pub mod status;

pub use failover::{routes, Failover, Next, Probed, Route, Step, Wait, WaitKind};
pub use mqtt5::{AfterRefusal, Aliases, Peer, Refusal, Versions};
pub use session::{Action, Delivery, Dropped, Failure, Session, Settings};
pub use status::{Marks, StatusSettings};

#[cfg(test)]
mod tests;
