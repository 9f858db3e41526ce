//! Which transport carries the session, and when to try again: the uplink's failover and reconnect
//! decisions as a state machine that does no I/O.
//!
//! Events in: [`connect_failed`](Failover::connect_failed) / [`connected`](Failover::connected)
//! (the transport asked for gave no session / gave one), [`session_ended`](Failover::session_ended)
//! (transport down), [`probe_result`](Failover::probe_result) (a preferred transport was probed while
//! a fallback carries the session). Out: [`poll`](Failover::poll) says what to do next (connect
//! over transport `i`, or wait), [`connected`](Failover::connected) names the transport switched
//! from (to count), [`session_ended`](Failover::session_ended) whether to fail over or return at once.
//! Time is always passed in.
//!
//! The rules (docs/architecture.md, "Transport health and failover"):
//! - A pass tries the chain in order from where it starts, each transport once. The first that gives
//!   a session carries it.
//! - A session that ends moves at once to the next transport, at most one lap of the chain
//!   (`hops`), so a chain whose every transport connects and then fails still backs off.
//! - A pass that gives no session, or the end of a lap, waits: a cloud that cannot be reached is
//!   retried promptly ([`Backoff::prompt_delay`]) for [`RECOVERY_WINDOW`] after a session that
//!   worked was lost; a cloud that answered and refused, a session that never worked, and everything
//!   after the window get the jittered doubling ([`Backoff::next_delay`]), which a session that worked
//!   resets. Each wait starts the next pass from the most preferred transport.
//! - While a fallback carries the session, the transports before it are probed; the most preferred
//!   one that passes every probe for `return_after` gets the session back.
//! - Several broker addresses (`broker = [a, b]`): the chain is made of [`Route`]s by [`routes`]. A
//!   transport that dials the broker itself (direct TLS) is one route per address, in the list's
//!   order, all before the next transport; a tunnel (SSH, WireGuard) forwards to its own one address
//!   and is one route. The rules above then apply to routes: a dead address is skipped within the
//!   pass, a pass with every address dead waits as usual, and a session on a later address probes
//!   the earlier ones and returns to the first that stays healthy.

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::uplink::backoff::{Backoff, HEALTHY_RESET, RECOVERY_WINDOW};

/// Prompt retries are logged at warn level at most once per this; the ones in between at debug.
pub const QUIET_LOG: Duration = Duration::from_secs(10);

/// One entry of the chain: transport `transport` (its index in `transports`), with TLS to broker
/// address `address` (its index in `broker`; 0 for a tunnel, whose TLS names the first address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub transport: usize,
    pub address: usize,
}

/// The chain for transports in order of preference, `dials[i]` saying whether transport `i` dials
/// the broker address itself (direct TLS) rather than forwarding to one of its own, and `addresses`
/// broker addresses (at least one): every address over a dialing transport, in order, before the
/// next transport.
pub fn routes(dials: &[bool], addresses: usize) -> Vec<Route> {
    let mut out = Vec::new();
    for (transport, &dial) in dials.iter().enumerate() {
        let n = if dial { addresses.max(1) } else { 1 };
        out.extend((0..n).map(|address| Route { transport, address }));
    }
    out
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Open a session over transport `transport` (stream, TLS, CONNECT). `pass_start`: the first of
    /// a pass. `loud`: its failure is logged at warn level (else at debug, a prompt retry between
    /// logged ones).
    Connect {
        transport: usize,
        pass_start: bool,
        loud: bool,
    },
    /// No session: wait before the next pass.
    Wait(Wait),
}

/// A wait before the next pass, and how to report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub delay: Duration,
    /// Something answered and said no (or the session never worked): the doubling backoff.
    pub refused: bool,
    pub kind: WaitKind,
    /// The recovery window ran out with this wait (reported once).
    pub window_ended: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitKind {
    /// The doubling backoff (logged at warn level).
    Backoff,
    /// A prompt retry after a healthy session was lost `down_for` ago; `logged`: `Some(retries not
    /// logged since the last one)` when this one is to be logged at warn level (else debug).
    Prompt { down_for: Duration, logged: Option<u64> },
}

/// What to do after a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The session failed: move at once to transport `to`.
    FailOver { to: usize },
    /// A probe found preferred transport `to` healthy for `return_after`: go back to it at once.
    Return { to: usize },
    /// The lap is over: [`Failover::poll`] says how long to wait.
    Wait,
}

/// What a probe result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// Healthy for this long, not yet `return_after`.
    Passed { healthy_for: Duration },
    /// Healthy for `return_after`: the session is to return to it ([`Failover::session_ended`]
    /// says so once the shell has ended the session).
    Return { healthy_for: Duration },
    /// Failed; `again`: it had passed before (its healthy period starts over).
    Failed { again: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The next poll starts a pass at `start`.
    Idle,
    /// A pass is under way: `tried` transports from `start` gave no session; `refused`: one of them
    /// reached something that said no.
    Trying { tried: usize, refused: bool, loud: bool },
    /// Transport `transport` carries a session, since `since`.
    Carrying { transport: usize, since: Instant },
    /// The pass or lap is over without a session: the next poll waits.
    Over { refused: bool },
}

/// Log throttle of prompt retries: when one was last logged and how many were not since.
#[derive(Debug, Default, Clone)]
struct Quiet {
    last: Option<Instant>,
    held: u64,
}

impl Quiet {
    fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|t| now.saturating_duration_since(t) >= QUIET_LOG)
    }

    /// `Some(retries not logged since the last one)` when this one is to be logged.
    fn take(&mut self, now: Instant) -> Option<u64> {
        if self.due(now) {
            self.last = Some(now);
            Some(std::mem::take(&mut self.held))
        } else {
            self.held += 1;
            None
        }
    }
}

/// The failover and reconnect decisions over a chain of `n` transports, in order of preference.
#[derive(Debug, Clone)]
pub struct Failover {
    n: usize,
    backoff: Backoff,
    return_after: Duration,
    state: State,
    /// Where the next pass starts.
    start: usize,
    /// The transport that carried the last session.
    last: Option<usize>,
    /// Immediate failovers since the last wait: at most one lap of the chain.
    hops: usize,
    /// When the last healthy session was lost: for `RECOVERY_WINDOW` after it, an unreachable cloud
    /// is retried promptly.
    recovering: Option<Instant>,
    quiet: Quiet,
    /// Per preferred transport (those before the carrying one), since when it has passed every probe.
    healthy_since: Vec<Option<Instant>>,
    /// A probe found this transport healthy long enough: the session returns to it.
    returning: Option<usize>,
}

impl Failover {
    /// `n` transports (at least one), `return_after` the healthy period a preferred transport needs
    /// before the session returns to it.
    pub fn new(n: usize, backoff: Backoff, return_after: Duration) -> Self {
        Failover {
            n: n.max(1),
            backoff,
            return_after,
            state: State::Idle,
            start: 0,
            last: None,
            hops: 0,
            recovering: None,
            quiet: Quiet::default(),
            healthy_since: Vec::new(),
            returning: None,
        }
    }

    /// What to do next, at `now`. Asked again without an event in between, it says the same (a
    /// wait is computed once, then the next pass starts).
    pub fn poll(&mut self, now: Instant) -> Step {
        match self.state {
            State::Idle => {
                let in_window = self
                    .recovering
                    .is_some_and(|t| now.saturating_duration_since(t) < RECOVERY_WINDOW);
                let loud = !in_window || self.quiet.due(now);
                self.state = State::Trying {
                    tried: 0,
                    refused: false,
                    loud,
                };
                Step::Connect {
                    transport: self.start,
                    pass_start: true,
                    loud,
                }
            }
            State::Trying { tried, loud, .. } => Step::Connect {
                transport: (self.start + tried) % self.n,
                pass_start: tried == 0,
                loud,
            },
            State::Over { refused } => {
                self.state = State::Idle;
                Step::Wait(self.wait(now, refused))
            }
            State::Carrying { transport, .. } => {
                // The shell asks while a session is up only by mistake: the session is over.
                debug_assert!(false, "poll while transport {transport} carries the session");
                self.state = State::Over { refused: false };
                self.poll(now)
            }
        }
    }

    /// Event: the transport of the last [`Step::Connect`] gave no session; `refused`: something
    /// answered and said no (TLS, CONNACK, SSH login or host key...), rather than nothing answering.
    pub fn connect_failed(&mut self, refused: bool) {
        if let State::Trying {
            tried,
            refused: r,
            loud,
        } = self.state
        {
            let tried = tried + 1;
            let refused = r || refused;
            self.state = if tried < self.n {
                State::Trying { tried, refused, loud }
            } else {
                State::Over { refused }
            };
        }
    }

    /// Event: the transport of the last [`Step::Connect`] gave a session at `now`. Returns the
    /// transport that carried the previous session when it was another one (a switch, to count).
    pub fn connected(&mut self, now: Instant) -> Option<usize> {
        let State::Trying { tried, .. } = self.state else {
            return None;
        };
        let transport = (self.start + tried) % self.n;
        self.state = State::Carrying {
            transport,
            since: now,
        };
        self.healthy_since = vec![None; transport];
        self.returning = None;
        self.last.replace(transport).filter(|&prev| prev != transport)
    }

    /// The transport carrying the session, if one does.
    pub fn carrying(&self) -> Option<usize> {
        match self.state {
            State::Carrying { transport, .. } => Some(transport),
            _ => None,
        }
    }

    /// The transports to probe while the session is carried (the preferred ones before it).
    pub fn probe_targets(&self) -> Range<usize> {
        0..self.healthy_since.len()
    }

    /// Event: preferred transport `j` was probed at `now`.
    pub fn probe_result(&mut self, j: usize, ok: bool, now: Instant) -> Probed {
        let Some(since) = self.healthy_since.get_mut(j) else {
            return Probed::Failed { again: false };
        };
        if !ok {
            return Probed::Failed {
                again: since.take().is_some(),
            };
        }
        let healthy_for = now.saturating_duration_since(*since.get_or_insert(now));
        if healthy_for >= self.return_after {
            if self.returning.is_none_or(|r| j < r) {
                self.returning = Some(j);
            }
            Probed::Return { healthy_for }
        } else {
            Probed::Passed { healthy_for }
        }
    }

    /// Event: the session ended at `now` (it failed, or the shell ended it after
    /// [`Probed::Return`]). `proven`: the cloud acknowledged a message or answered a health check.
    pub fn session_ended(&mut self, now: Instant, proven: bool) -> Next {
        let State::Carrying { transport, since } = self.state else {
            self.state = State::Idle;
            return Next::Wait;
        };
        self.healthy_since.clear();
        if let Some(to) = self.returning.take() {
            self.hops = 0;
            self.start = to;
            self.state = State::Idle;
            return Next::Return { to };
        }
        let healthy = proven || now.saturating_duration_since(since) >= HEALTHY_RESET;
        if healthy {
            self.backoff.reset();
            self.recovering = Some(now);
            self.quiet = Quiet::default();
        }
        if self.hops + 1 < self.n {
            self.hops += 1;
            self.start = (transport + 1) % self.n;
            self.state = State::Idle;
            return Next::FailOver { to: self.start };
        }
        // A session that never worked is treated like a refusal: a cloud that drops the uplink
        // right after CONNACK is backed off from.
        self.state = State::Over { refused: !healthy };
        Next::Wait
    }

    fn wait(&mut self, now: Instant, refused: bool) -> Wait {
        self.start = 0;
        self.hops = 0;
        let since = self.recovering.map(|t| now.saturating_duration_since(t));
        let prompt = !refused && since.is_some_and(|s| s < RECOVERY_WINDOW);
        let window_ended = since.is_some_and(|s| s >= RECOVERY_WINDOW);
        if window_ended {
            self.recovering = None;
        }
        let (delay, kind) = if prompt {
            (
                self.backoff.prompt_delay(),
                WaitKind::Prompt {
                    down_for: since.unwrap_or_default(),
                    logged: self.quiet.take(now),
                },
            )
        } else {
            (self.backoff.next_delay(), WaitKind::Backoff)
        };
        Wait {
            delay,
            refused,
            kind,
            window_ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::backoff::{PROMPT_MAX, PROMPT_MIN};

    const MIN: Duration = Duration::from_millis(1_000);
    const MAX: Duration = Duration::from_millis(60_000);
    const RETURN_AFTER: Duration = Duration::from_secs(30);

    fn failover(n: usize) -> Failover {
        Failover::new(n, Backoff::new(MIN, MAX), RETURN_AFTER)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Asserts the next step connects over `transport`.
    #[track_caller]
    fn expect_connect(f: &mut Failover, now: Instant, transport: usize) -> bool {
        match f.poll(now) {
            Step::Connect {
                transport: t, loud, ..
            } => {
                assert_eq!(t, transport, "connect over");
                loud
            }
            other => panic!("expected Connect({transport}), got {other:?}"),
        }
    }

    #[track_caller]
    fn expect_wait(f: &mut Failover, now: Instant) -> Wait {
        match f.poll(now) {
            Step::Wait(w) => w,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn a_pass_tries_each_transport_once_in_order_then_waits_and_starts_again_from_the_first() {
        let t0 = Instant::now();
        let mut f = failover(3);
        for pass in 0..3 {
            for i in 0..3 {
                expect_connect(&mut f, t0, i);
                f.connect_failed(false);
            }
            let w = expect_wait(&mut f, t0);
            // Never connected: no recovery window, so the doubling applies even to an unreachable cloud.
            assert_eq!(w.kind, WaitKind::Backoff, "pass {pass}");
            let ceiling = MIN * (1 << pass);
            assert!(w.delay >= MIN && w.delay <= ceiling, "pass {pass}: {:?}", w.delay);
        }
        expect_connect(&mut f, t0, 0);
    }

    #[test]
    fn a_failed_session_fails_over_at_once_for_one_lap_then_backs_off() {
        let t0 = Instant::now();
        let mut f = failover(3);
        expect_connect(&mut f, t0, 0);
        assert_eq!(f.connected(t0), None, "the first session is no switch");
        // Fails within a second, never proven: next transport at once.
        assert_eq!(f.session_ended(t0 + secs(1), false), Next::FailOver { to: 1 });
        expect_connect(&mut f, t0 + secs(1), 1);
        assert_eq!(f.connected(t0 + secs(1)), Some(0), "switched from 0");
        assert_eq!(f.session_ended(t0 + secs(2), false), Next::FailOver { to: 2 });
        expect_connect(&mut f, t0 + secs(2), 2);
        assert_eq!(f.connected(t0 + secs(2)), Some(1));
        // A lap: the third failure in a row backs off, as a refusal (no session worked).
        assert_eq!(f.session_ended(t0 + secs(3), false), Next::Wait);
        let w = expect_wait(&mut f, t0 + secs(3));
        assert!(w.refused);
        assert_eq!(w.kind, WaitKind::Backoff);
        // The next pass starts from the most preferred transport.
        expect_connect(&mut f, t0 + secs(4), 0);
        assert_eq!(f.connected(t0 + secs(4)), Some(2));
    }

    #[test]
    fn a_connect_failure_mid_chain_moves_on_within_the_pass() {
        let t0 = Instant::now();
        let mut f = failover(3);
        expect_connect(&mut f, t0, 0);
        f.connected(t0);
        assert_eq!(f.session_ended(t0 + secs(1), true), Next::FailOver { to: 1 });
        // 1 gives no stream: 2 in the same pass, then 0 (the pass wraps round once).
        expect_connect(&mut f, t0 + secs(1), 1);
        f.connect_failed(false);
        expect_connect(&mut f, t0 + secs(1), 2);
        f.connect_failed(false);
        expect_connect(&mut f, t0 + secs(1), 0);
        assert_eq!(
            f.connected(t0 + secs(1)),
            None,
            "back on the transport of the last session"
        );
        assert_eq!(f.carrying(), Some(0));
    }

    #[test]
    fn after_a_healthy_session_an_unreachable_cloud_is_retried_promptly_for_the_window() {
        let t0 = Instant::now();
        let mut f = failover(1);
        // Grow the doubling first: it must be reset by the healthy session.
        for _ in 0..5 {
            expect_connect(&mut f, t0, 0);
            f.connect_failed(true);
            expect_wait(&mut f, t0);
        }
        expect_connect(&mut f, t0, 0);
        f.connected(t0);
        // Lasted HEALTHY_RESET without traffic: healthy.
        let lost = t0 + HEALTHY_RESET;
        assert_eq!(f.session_ended(lost, false), Next::Wait);
        let w = expect_wait(&mut f, lost);
        assert!(!w.refused);
        assert!(w.delay >= PROMPT_MIN && w.delay <= PROMPT_MAX, "{:?}", w.delay);
        assert_eq!(
            w.kind,
            WaitKind::Prompt {
                down_for: Duration::ZERO,
                logged: Some(0)
            }
        );
        // Unreachable retries inside the window: prompt, logged once per QUIET_LOG.
        let mut logged = 0;
        let mut at = lost;
        while at < lost + secs(60) {
            at += secs(1);
            assert!(expect_connect(&mut f, at, 0) == f.quiet.due(at), "loud when due");
            f.connect_failed(false);
            let w = expect_wait(&mut f, at);
            match w.kind {
                WaitKind::Prompt { logged: l, .. } => logged += usize::from(l.is_some()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(logged, 6, "one warn line per 10 s over a minute");
        // A refusal inside the window still gets the doubling, from its reset start.
        expect_connect(&mut f, at, 0);
        f.connect_failed(true);
        let w = expect_wait(&mut f, at);
        assert_eq!(w.kind, WaitKind::Backoff);
        assert!(w.delay <= MIN, "the doubling was reset: {:?}", w.delay);
        // Past the window: the doubling, and the window's end is reported once.
        let late = lost + RECOVERY_WINDOW;
        expect_connect(&mut f, late, 0);
        f.connect_failed(false);
        let w = expect_wait(&mut f, late);
        assert!(w.window_ended);
        assert_eq!(w.kind, WaitKind::Backoff);
        expect_connect(&mut f, late, 0);
        f.connect_failed(false);
        assert!(!expect_wait(&mut f, late).window_ended);
    }

    #[test]
    fn a_session_that_never_worked_is_backed_off_from() {
        let t0 = Instant::now();
        let mut f = failover(1);
        expect_connect(&mut f, t0, 0);
        f.connected(t0);
        // Dropped right after CONNACK, nothing acknowledged, short: not healthy.
        assert_eq!(f.session_ended(t0 + secs(1), false), Next::Wait);
        let w = expect_wait(&mut f, t0 + secs(1));
        assert!(w.refused);
        assert_eq!(w.kind, WaitKind::Backoff);
        // Proven (a PUBACK or PINGRESP) counts even when short.
        expect_connect(&mut f, t0 + secs(2), 0);
        f.connected(t0 + secs(2));
        f.session_ended(t0 + secs(3), true);
        assert!(matches!(
            expect_wait(&mut f, t0 + secs(3)).kind,
            WaitKind::Prompt { .. }
        ));
    }

    #[test]
    fn a_preferred_transport_gets_the_session_back_after_a_healthy_period() {
        let t0 = Instant::now();
        let mut f = failover(3);
        expect_connect(&mut f, t0, 0);
        f.connect_failed(false);
        expect_connect(&mut f, t0, 1);
        f.connected(t0);
        assert_eq!(
            f.probe_targets(),
            0..1,
            "only the more preferred transport is probed"
        );
        let p = |s| t0 + secs(s);
        assert_eq!(
            f.probe_result(0, true, p(5)),
            Probed::Passed {
                healthy_for: Duration::ZERO
            }
        );
        assert_eq!(
            f.probe_result(0, true, p(20)),
            Probed::Passed {
                healthy_for: secs(15)
            }
        );
        // A failed probe starts the healthy period over.
        assert_eq!(f.probe_result(0, false, p(25)), Probed::Failed { again: true });
        assert_eq!(f.probe_result(0, false, p(26)), Probed::Failed { again: false });
        assert!(matches!(f.probe_result(0, true, p(30)), Probed::Passed { .. }));
        assert!(matches!(f.probe_result(0, true, p(59)), Probed::Passed { .. }));
        assert_eq!(
            f.probe_result(0, true, p(60)),
            Probed::Return {
                healthy_for: RETURN_AFTER
            }
        );
        // The shell ends the session: it returns, without backoff, and the switch is counted.
        assert_eq!(f.session_ended(p(60), true), Next::Return { to: 0 });
        expect_connect(&mut f, p(60), 0);
        assert_eq!(f.connected(p(60)), Some(1));
        assert_eq!(
            f.probe_targets(),
            0..0,
            "on the preferred transport nothing is probed"
        );
    }

    #[test]
    fn the_most_preferred_healthy_transport_is_returned_to() {
        let t0 = Instant::now();
        let mut f = failover(3);
        for i in 0..2 {
            expect_connect(&mut f, t0, i);
            f.connect_failed(false);
        }
        expect_connect(&mut f, t0, 2);
        f.connected(t0);
        assert_eq!(f.probe_targets(), 0..2);
        f.probe_result(0, true, t0);
        f.probe_result(1, true, t0);
        assert!(matches!(
            f.probe_result(1, true, t0 + RETURN_AFTER),
            Probed::Return { .. }
        ));
        assert!(matches!(
            f.probe_result(0, true, t0 + RETURN_AFTER),
            Probed::Return { .. }
        ));
        assert_eq!(f.session_ended(t0 + RETURN_AFTER, true), Next::Return { to: 0 });
    }

    #[test]
    fn each_address_goes_over_the_direct_transport_before_the_next_transport() {
        let r = |transport, address| Route { transport, address };
        // ["tls"] with [a, b, c].
        assert_eq!(routes(&[true], 3), [r(0, 0), r(0, 1), r(0, 2)]);
        // ["wireguard", "ssh", "tls"] with [a, b]: the tunnels forward to their own address.
        assert_eq!(
            routes(&[false, false, true], 2),
            [r(0, 0), r(1, 0), r(2, 0), r(2, 1)]
        );
        // ["tls", "ssh"] with [a, b]: both addresses directly, then the bastion.
        assert_eq!(routes(&[true, false], 2), [r(0, 0), r(0, 1), r(1, 0)]);
        // One address: the chain is the transports.
        assert_eq!(routes(&[false, true], 1), [r(0, 0), r(1, 0)]);
    }

    #[test]
    fn a_dead_first_address_is_skipped_within_the_pass_and_all_dead_backs_off() {
        let t0 = Instant::now();
        let chain = routes(&[true, false], 2); // tls a, tls b, ssh
        let mut f = failover(chain.len());
        // a refuses the TCP connection: b at once, no wait in between.
        expect_connect(&mut f, t0, 0);
        f.connect_failed(false);
        expect_connect(&mut f, t0, 1);
        assert_eq!(
            chain[1],
            Route {
                transport: 0,
                address: 1
            }
        );
        assert_eq!(f.connected(t0), None, "the first session is no switch");
        // On b, a is probed (it is preferred) and gets the session back once healthy.
        assert_eq!(f.probe_targets(), 0..1);
        f.probe_result(0, true, t0 + secs(10));
        assert!(matches!(
            f.probe_result(0, true, t0 + secs(10) + RETURN_AFTER),
            Probed::Return { .. }
        ));
        assert_eq!(
            f.session_ended(t0 + secs(10) + RETURN_AFTER, true),
            Next::Return { to: 0 }
        );
        let t1 = t0 + secs(100);
        expect_connect(&mut f, t1, 0);
        assert_eq!(f.connected(t1), Some(1), "from b back to a");
        // Lost after working: b, then the bastion, at once.
        assert_eq!(f.session_ended(t1 + secs(20), true), Next::FailOver { to: 1 });
        expect_connect(&mut f, t1 + secs(20), 1);
        f.connect_failed(false);
        expect_connect(&mut f, t1 + secs(20), 2);
        f.connect_failed(false);
        // The pass wraps round to a, then waits (promptly: a session worked and nothing refused).
        expect_connect(&mut f, t1 + secs(20), 0);
        f.connect_failed(false);
        let w = expect_wait(&mut f, t1 + secs(20));
        assert!(matches!(w.kind, WaitKind::Prompt { .. }), "{w:?}");
        // A fresh pass starts from the first address again.
        expect_connect(&mut f, t1 + secs(21), 0);
        f.connect_failed(true);
        expect_connect(&mut f, t1 + secs(21), 1);
        f.connect_failed(true);
        expect_connect(&mut f, t1 + secs(21), 2);
        f.connect_failed(true);
        assert_eq!(
            expect_wait(&mut f, t1 + secs(21)).kind,
            WaitKind::Backoff,
            "refused: doubling"
        );
        expect_connect(&mut f, t1 + secs(22), 0);
    }

    #[test]
    fn a_return_does_not_count_as_a_hop() {
        let t0 = Instant::now();
        let mut f = failover(2);
        expect_connect(&mut f, t0, 0);
        f.connected(t0);
        assert_eq!(f.session_ended(t0, false), Next::FailOver { to: 1 });
        expect_connect(&mut f, t0, 1);
        f.connected(t0);
        f.probe_result(0, true, t0);
        f.probe_result(0, true, t0 + RETURN_AFTER);
        assert_eq!(f.session_ended(t0 + RETURN_AFTER, true), Next::Return { to: 0 });
        expect_connect(&mut f, t0 + RETURN_AFTER, 0);
        f.connected(t0 + RETURN_AFTER);
        // The return reset the lap: a failure now fails over again rather than backing off.
        assert_eq!(
            f.session_ended(t0 + RETURN_AFTER + secs(1), false),
            Next::FailOver { to: 1 }
        );
    }
}
