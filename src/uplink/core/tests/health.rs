//! The health check: PINGREQ on time, a missing PINGRESP fails the connection, paused time does not count.

use super::*;

#[test]
fn the_health_check_pings_on_time_and_fails_the_connection_without_an_answer() {
    let mut r = Rig::new(4);
    let t0 = r.now;
    r.connect(true);
    let s = |x: u64| t0 + Duration::from_secs(x);
    assert_eq!(r.s.poll_timeout(), Some(s(5)));
    assert!(!r.s.proven());
    assert_eq!(r.s.handle_timeout(s(5)), Ok(()));
    r.perform();
    assert!(matches!(r.sent_now().last(), Some(Packet::PingRequest)));
    assert_eq!(r.s.poll_timeout(), Some(s(7)), "the deadline");
    r.now = s(6);
    r.receive(Packet::PingResponse);
    assert!(r.s.proven(), "an answered health check proves the connection");
    assert_eq!(r.s.poll_timeout(), Some(s(10)), "the next round trip");
    // Too early: nothing.
    assert_eq!(r.s.handle_timeout(s(9)), Ok(()));
    assert!(r.s.poll_action().is_none());
    assert_eq!(r.s.handle_timeout(s(10)), Ok(()));
    r.perform();
    assert!(matches!(r.sent_now().last(), Some(Packet::PingRequest)));
    assert_eq!(r.s.handle_timeout(s(11)), Ok(()));
    assert_eq!(
        r.s.handle_timeout(s(12)),
        Err(Failure::HealthCheck(Duration::from_secs(2)))
    );
    assert_eq!(
        Failure::HealthCheck(Duration::from_secs(2)).to_string(),
        "health check failed: no PINGRESP within 2s"
    );
}

#[test]
fn time_paused_on_purpose_does_not_count_against_the_pingresp() {
    let mut r = Rig::new(4);
    r.s = Session::new(
        Settings {
            max_in_msgs_per_s: 1,
            ..settings(4)
        },
        Filters::new(),
    );
    let t0 = r.now;
    let ms = |x: u64| t0 + Duration::from_millis(x);
    r.connect(true);
    r.s.handle_timeout(ms(5_000)).unwrap();
    r.perform();
    // Deadline at 7 s. Two cloud messages at 6.5 s: over 1/s, reading pauses for a second.
    r.now = ms(6_500);
    r.cloud_publish("sites/p7/cmd/1", QoS::AtLeastOnce, Some(1), false);
    assert!(r.s.reading());
    r.cloud_publish("sites/p7/cmd/2", QoS::AtLeastOnce, Some(2), false);
    assert!(!r.s.reading(), "paused");
    assert_eq!(
        r.s.poll_timeout(),
        Some(ms(7_500)),
        "the pause's end, not the deadline"
    );
    assert_eq!(r.s.handle_timeout(ms(7_500)), Ok(()), "not failed while paused");
    assert!(r.s.reading());
    assert_eq!(
        r.s.poll_timeout(),
        Some(ms(8_000)),
        "the deadline moved by the pause"
    );
    assert!(r.s.handle_timeout(ms(8_000)).is_err());
}
