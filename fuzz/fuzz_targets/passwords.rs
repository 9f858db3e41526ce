//! Any text as a password file: `parse` never panics and every user it keeps has a hash.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mqtt_uplink::passwords::PasswordFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = PasswordFile::parse(text) {
        for user in file.users() {
            assert!(file.hash_text(user).is_some(), "{user:?} without a hash");
        }
    }
});
