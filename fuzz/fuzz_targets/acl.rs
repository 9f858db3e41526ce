//! Any text as an ACL file; when it parses, checks with user, client id and topic taken from the
//! input never panic, and a topic the ACL lets a user publish is a valid topic name.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mqtt_uplink::acl::Acl;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The ACL, then (after a NUL) a user, a client id and a topic, one per line.
    let (acl, probe) = text.split_once('\0').unwrap_or((text, "dev\ndev-1\nsensors/a"));
    let Ok(acl) = Acl::parse(acl) else { return };
    let mut parts = probe.splitn(3, '\n');
    let user = parts.next().filter(|u| !u.is_empty());
    let client_id = parts.next().unwrap_or("");
    let topic = parts.next().unwrap_or("");
    if acl.check_publish(user, client_id, topic).allowed {
        assert!(
            mqtt_uplink::topic::validate_name(topic).is_ok(),
            "published to {topic:?}"
        );
    }
    let _ = acl.check_subscribe(user, client_id, topic);
});
