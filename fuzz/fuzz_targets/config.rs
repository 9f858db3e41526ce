//! Any text as a config file: `parse` never panics, and every error renders (file, line, key).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/nonexistent/mqtt-uplink-fuzz/mqtt-uplink.toml");
    if let Err(errors) = mqtt_uplink::config::parse(path, text) {
        let shown = errors.to_string();
        assert!(!shown.is_empty());
    }
});
