//! Devices on the appliance's listener, played by the real mosquitto_pub and mosquitto_sub.

use std::process::Command;
use std::time::Duration;

use super::cloud::Sub;

/// One device account on 127.0.0.1:`port`.
pub struct Device<'a> {
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
}

impl Device<'_> {
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-u",
            self.user,
            "-P",
            self.password,
        ]);
        cmd
    }

    /// mosquitto_pub once; returns (success, stderr).
    pub fn publish(&self, topic: &str, msg: &str, extra: &[&str]) -> (bool, String) {
        let out = self
            .command("mosquitto_pub")
            .args(["-t", topic, "-m", msg])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// mosquitto_sub at QoS 1 printing `topic payload` lines, as soon as it is spawned.
    pub fn subscribe(&self, filter: &str, extra: &[&str]) -> Sub {
        Sub::spawn(
            self.command("mosquitto_sub")
                .args(["-v", "-q", "1", "-t", filter])
                .args(extra),
        )
    }

    /// Like [`Device::subscribe`], returned once the subscription is live: it also subscribes to
    /// `probe` and publishes there until a probe comes back (probe lines are not kept).
    pub fn subscribe_ready(&self, filter: &str, probe: &str) -> Sub {
        let mut sub = self.subscribe(filter, &["-t", probe]);
        for _ in 0..50 {
            self.publish(probe, "probe", &[]);
            if sub.wait_probe(probe, Duration::from_millis(200)) {
                return sub;
            }
        }
        panic!("device subscriber on {filter} never became ready");
    }
}
