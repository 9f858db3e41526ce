//! AWS IoT Core (`profile = "aws-iot"`): its published message broker limits, checked by `check`
//! against the client id and the cloud side of every mapping.
//!
//! Reserved topics: AWS reserves everything under `$aws/`. Mappings may use the device shadow and
//! jobs topics of the thing whose name is the client id (`$aws/things/{client_id}/shadow/...` and
//! `$aws/things/{client_id}/jobs/...`), nothing else under `$aws/` (Basic Ingest `$aws/rules/` is not
//! supported).

/// The ALPN protocol name for MQTT with client certificates on port 443.
pub const ALPN: &str = "x-amzn-mqtt-ca";
/// Client id: bytes at most.
pub const MAX_CLIENT_ID: usize = 128;
/// Topic name or filter: UTF-8 bytes at most.
pub const MAX_TOPIC_BYTES: usize = 256;
/// Forward slashes in a topic name or filter at most (8 levels).
pub const MAX_SLASHES: usize = 7;
/// Payload bytes at most (128 KB).
pub const MAX_PAYLOAD: u32 = 128 * 1024;

/// Why `client_id` is refused by AWS IoT Core, if it is. `probes`: the uplink also connects as
/// `{client_id}-probe` to check a preferred transport.
pub fn client_id_problem(client_id: &str, probes: bool) -> Option<String> {
    let longest = client_id.len() + if probes { "-probe".len() } else { 0 };
    if client_id.is_empty() {
        Some("AWS IoT Core needs a client id (usually the thing name)".into())
    } else if longest > MAX_CLIENT_ID {
        Some(format!(
            "{} bytes{}: AWS IoT Core takes client ids of at most {MAX_CLIENT_ID} bytes",
            longest,
            if probes {
                " with the \"-probe\" suffix of a transport probe"
            } else {
                ""
            }
        ))
    } else {
        None
    }
}

/// Why the cloud-side topic (name or filter) `topic` breaks AWS IoT Core's limits, if it does.
pub fn topic_problem(topic: &str, client_id: &str) -> Option<String> {
    if topic.len() > MAX_TOPIC_BYTES {
        return Some(format!(
            "`{topic}` is {} bytes: AWS IoT Core takes topics of at most {MAX_TOPIC_BYTES} bytes",
            topic.len()
        ));
    }
    let slashes = topic.matches('/').count();
    if slashes > MAX_SLASHES {
        return Some(format!(
            "`{topic}` has {slashes} forward slashes: AWS IoT Core takes at most {MAX_SLASHES} (8 levels)"
        ));
    }
    if let Some(rest) = topic.strip_prefix("$aws/") {
        let thing = format!("things/{client_id}/");
        let allowed = rest
            .strip_prefix(&thing)
            .is_some_and(|r| r.starts_with("shadow/") || r.starts_with("jobs/"));
        if !allowed {
            return Some(format!(
                "`{topic}`: `$aws/` is reserved by AWS IoT Core; only the shadow and jobs topics of \
                 this thing (`$aws/things/{client_id}/shadow/...`, `$aws/things/{client_id}/jobs/...`) \
                 may be mapped"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_limits() {
        assert!(topic_problem(&"a".repeat(256), "t").is_none());
        assert!(topic_problem(&"a".repeat(257), "t")
            .unwrap()
            .contains("257 bytes"));
        assert!(topic_problem("a/b/c/d/e/f/g/h", "t").is_none());
        assert!(topic_problem("a/b/c/d/e/f/g/h/i", "t")
            .unwrap()
            .contains("8 forward slashes"));
        assert!(topic_problem("$aws/things/t/shadow/update", "t").is_none());
        assert!(topic_problem("$aws/things/t/jobs/notify", "t").is_none());
        assert!(topic_problem("$aws/things/other/shadow/update", "t").is_some());
        assert!(topic_problem("$aws/rules/r/x", "t").is_some());
        assert!(topic_problem("$awsx/y", "t").is_none());
        assert!(client_id_problem(&"c".repeat(128), false).is_none());
        assert!(client_id_problem(&"c".repeat(123), true)
            .unwrap()
            .contains("-probe"));
        assert!(client_id_problem(&"c".repeat(122), true).is_none());
        assert!(client_id_problem("", false).is_some());
    }
}
