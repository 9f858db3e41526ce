//! One builder for the appliance's config in tests: the sections tests wrote again and again by hand
//! (site, listeners, auth with its password file and ACL, limits, metrics, the uplink to the test
//! cloud, transport sections, mappings), and the files they name, written as they are added.
//! `toml()` returns the text, so a test about one unusual key can still append or replace raw TOML.
//!
//! ```ignore
//! let toml = Site::new(dir)
//!     .user("dev1", DEV_PW)
//!     .acl("user dev1\ntopic readwrite sensors/#\n")
//!     .uplink(Uplink::port(cloud.port).transports(&["tls"]).quick())
//!     .map_out("sensors/#", "sites/plant-7/")
//!     .toml();
//! ```

use std::fmt::Display;
use std::path::{Path, PathBuf};

use super::cloud::{Cloud, UPLINK_PASSWORD, UPLINK_USER};
use super::sshd::Sshd;
use super::wgpeer::WgPeer;
use super::{mosquitto_passwd, write_secret};

/// `key = value` lines of one table, in the order they were set; setting a key again replaces it.
#[derive(Clone, Default)]
struct Table(Vec<(String, String)>);

impl Table {
    fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn unset(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn render(&self, out: &mut String) {
        for (k, v) in &self.0 {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
}

/// A TOML basic string (the values tests use need no escapes beyond `"` and `\`).
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The appliance's config, built section by section. Sections are written in a fixed order: `[site]`,
/// `[[listener]]`, `[auth]`, `[limits]`, `[metrics]`, `[uplink]`, transport sections, `[[map]]`,
/// then raw text.
pub struct Site {
    dir: PathBuf,
    site: Option<Table>,
    listeners: Vec<Table>,
    /// Lines `name:hash` of users added with [`Site::user_hashed`] (the whole file is rewritten).
    hashed: String,
    auth: Option<Table>,
    limits: Option<String>,
    metrics: Option<Table>,
    uplink: Option<Uplink>,
    sections: Vec<String>,
    maps: Vec<Table>,
    raw: String,
}

impl Site {
    /// `[site] id = "plant-7"`, `state_dir = "state"` (the test's own folder), nothing else yet.
    pub fn new(dir: &Path) -> Site {
        let mut site = Table::default();
        site.set("id", quote("plant-7"));
        site.set("state_dir", quote("state"));
        Site {
            dir: dir.to_path_buf(),
            site: Some(site),
            listeners: Vec::new(),
            hashed: String::new(),
            auth: None,
            limits: None,
            metrics: None,
            uplink: None,
            sections: Vec::new(),
            maps: Vec::new(),
            raw: String::new(),
        }
    }

    /// Another key of `[site]` (`value` is TOML: quote strings with `"`).
    pub fn site_key(mut self, key: &str, value: impl Display) -> Site {
        self.site
            .get_or_insert_with(Table::default)
            .set(key, value.to_string());
        self
    }

    /// No `[site]` section (`App::start` then adds `id = "test"` and `state_dir = "state"`).
    pub fn without_site(mut self) -> Site {
        self.site = None;
        self
    }

    /// A plain `[[listener]]` on 127.0.0.1:`port` (0: ephemeral).
    pub fn listener(self, port: u16) -> Site {
        self.listener_with(port, &[])
    }

    /// A `[[listener]]` on 127.0.0.1:`port` with more keys (`(key, TOML value)`): TLS, limits.
    pub fn listener_with(mut self, port: u16, keys: &[(&str, &str)]) -> Site {
        let mut l = Table::default();
        l.set("bind", quote(&format!("127.0.0.1:{port}")));
        for (k, v) in keys {
            l.set(k, v.to_string());
        }
        self.listeners.push(l);
        self
    }

    fn auth_files(&mut self) -> &mut Table {
        self.auth.get_or_insert_with(|| {
            let mut t = Table::default();
            t.set("password_file", quote("passwords"));
            t.set("acl_file", quote("acl"));
            t
        })
    }

    /// `[auth]` naming `passwords` and `acl`, written by the test (or by an earlier `Site`).
    pub fn auth(mut self) -> Site {
        self.auth_files();
        self
    }

    /// A device user in `passwords` (the real `mosquitto_passwd`, mode 0600) and `[auth]` naming it
    /// and `acl`.
    pub fn user(mut self, name: &str, password: &str) -> Site {
        mosquitto_passwd(&self.dir.join("passwords"), name, password);
        self.auth_files();
        self
    }

    /// A device user in `passwords` hashed with the appliance's own argon2id (faster to write than
    /// `mosquitto_passwd`'s), mode 0600, and `[auth]` naming it and `acl`.
    pub fn user_hashed(mut self, name: &str, password: &str) -> Site {
        let hash = mqtt_uplink::guard::passwords::hash_argon2id(password.as_bytes());
        self.hashed.push_str(&format!("{name}:{hash}\n"));
        write_secret(&self.dir.join("passwords"), &self.hashed);
        self.auth_files();
        self
    }

    /// The mosquitto-format ACL written to `acl`, and `[auth]` naming it and `passwords`.
    pub fn acl(mut self, text: &str) -> Site {
        std::fs::write(self.dir.join("acl"), text).unwrap();
        self.auth_files();
        self
    }

    /// Another key of `[auth]` (`value` is TOML).
    pub fn auth_key(mut self, key: &str, value: impl Display) -> Site {
        self.auth_files().set(key, value.to_string());
        self
    }

    /// `[limits]` with these lines.
    pub fn limits(mut self, lines: &str) -> Site {
        self.limits = Some(lines.to_string());
        self
    }

    /// `[metrics] bind = "127.0.0.1:PORT"`.
    pub fn metrics(self, port: u16) -> Site {
        self.metrics_bind(&format!("127.0.0.1:{port}"))
    }

    /// `[metrics] bind = "BIND"` (an address, or `unix:PATH`).
    pub fn metrics_bind(self, bind: &str) -> Site {
        self.metrics_key("bind", quote(bind))
    }

    /// Another key of `[metrics]` (`value` is TOML).
    pub fn metrics_key(mut self, key: &str, value: impl Display) -> Site {
        self.metrics
            .get_or_insert_with(Table::default)
            .set(key, value.to_string());
        self
    }

    /// `[uplink]`; writes `uplink.password` (mode 0600) when the uplink names it.
    pub fn uplink(mut self, uplink: Uplink) -> Site {
        if uplink.keys.get("password_file") == Some("\"uplink.password\"") {
            write_secret(&self.dir.join("uplink.password"), UPLINK_PASSWORD);
        }
        self.uplink = Some(uplink);
        self
    }

    /// Sets (or replaces) a key of the `[uplink]` already added (`value` is TOML).
    pub fn uplink_key(mut self, key: &str, value: impl Display) -> Site {
        let uplink = self.uplink.take().expect("an [uplink] to add the key to");
        self.uplink = Some(uplink.set(key, value));
        self
    }

    /// A section written after `[uplink]` as it is (a transport's `[uplink.ssh]`, `[uplink.proxy]`…).
    pub fn section(mut self, text: &str) -> Site {
        self.sections.push(text.to_string());
        self
    }

    /// `[[map]] direction = "out"`: local `topic` to the cloud under `remote_prefix`.
    pub fn map_out(mut self, topic: &str, remote_prefix: &str) -> Site {
        let mut m = Table::default();
        m.set("direction", quote("out"));
        m.set("topic", quote(topic));
        m.set("remote_prefix", quote(remote_prefix));
        self.maps.push(m);
        self
    }

    /// `[[map]] direction = "in"`: cloud `remote_prefix` + `topic` to local `local_prefix` + `topic`.
    pub fn map_in(mut self, topic: &str, local_prefix: &str, remote_prefix: &str) -> Site {
        let mut m = Table::default();
        m.set("direction", quote("in"));
        m.set("topic", quote(topic));
        m.set("local_prefix", quote(local_prefix));
        m.set("remote_prefix", quote(remote_prefix));
        self.maps.push(m);
        self
    }

    /// `[[map]]` with `direction` ("out", "in" or "both"), `topic` and `remote_prefix`; more keys with
    /// [`Site::map_key`].
    pub fn map(mut self, direction: &str, topic: &str, remote_prefix: &str) -> Site {
        let mut m = Table::default();
        m.set("direction", quote(direction));
        m.set("topic", quote(topic));
        m.set("remote_prefix", quote(remote_prefix));
        self.maps.push(m);
        self
    }

    /// Another key of the last `[[map]]` (`value` is TOML), e.g. `("qos", 1)`.
    pub fn map_key(mut self, key: &str, value: impl Display) -> Site {
        self.maps
            .last_mut()
            .expect("a [[map]] to add the key to")
            .set(key, value.to_string());
        self
    }

    /// Raw TOML after everything else (start it with a table header).
    pub fn raw(mut self, text: &str) -> Site {
        self.raw.push_str(text);
        self
    }

    /// The config text.
    pub fn toml(&self) -> String {
        let mut out = String::new();
        let table = |out: &mut String, header: &str, t: &Table| {
            out.push_str(&format!("\n{header}\n"));
            t.render(out);
        };
        if let Some(s) = &self.site {
            table(&mut out, "[site]", s);
        }
        for l in &self.listeners {
            table(&mut out, "[[listener]]", l);
        }
        if let Some(a) = &self.auth {
            table(&mut out, "[auth]", a);
        }
        if let Some(l) = &self.limits {
            out.push_str(&format!("\n[limits]\n{l}\n"));
        }
        if let Some(m) = &self.metrics {
            table(&mut out, "[metrics]", m);
        }
        if let Some(u) = &self.uplink {
            table(&mut out, "[uplink]", &u.keys);
            out.push_str(&u.extra);
        }
        for s in &self.sections {
            out.push('\n');
            out.push_str(s);
            out.push('\n');
        }
        for m in &self.maps {
            table(&mut out, "[[map]]", m);
        }
        if !self.raw.is_empty() {
            out.push('\n');
            out.push_str(&self.raw);
            out.push('\n');
        }
        out
    }
}

/// The `[uplink]` section: to the test cloud as [`UPLINK_USER`] with `uplink.password` and the
/// cloud's CA (`ca.pem`, written by [`Cloud`]), client id `plant-7-uplink`.
#[derive(Clone)]
pub struct Uplink {
    keys: Table,
    extra: String,
}

impl Uplink {
    /// To `broker` (a URL).
    pub fn to(broker: &str) -> Uplink {
        let mut keys = Table::default();
        keys.set("broker", quote(broker));
        keys.set("client_id", quote("plant-7-uplink"));
        keys.set("username", quote(UPLINK_USER));
        keys.set("password_file", quote("uplink.password"));
        keys.set("ca_file", quote("ca.pem"));
        Uplink {
            keys,
            extra: String::new(),
        }
    }

    /// No keys yet: a test about the uplink's keys sets them all.
    pub fn bare() -> Uplink {
        Uplink {
            keys: Table::default(),
            extra: String::new(),
        }
    }

    /// To `mqtts://localhost:PORT`.
    pub fn port(port: u16) -> Uplink {
        Self::to(&format!("mqtts://localhost:{port}"))
    }

    /// To the cloud's TLS listener ([`Cloud::url`]).
    pub fn cloud(cloud: &Cloud) -> Uplink {
        Self::to(&cloud.url())
    }

    /// `transports = [...]`, in order of preference.
    pub fn transports(self, names: &[&str]) -> Uplink {
        let list: Vec<String> = names.iter().map(|n| quote(n)).collect();
        self.set("transports", format!("[{}]", list.join(", ")))
    }

    /// Short timers for tests: keepalive 5 s, connect timeout 5 s, backoff 200-1000 ms.
    pub fn quick(self) -> Uplink {
        self.set("keepalive_s", 5)
            .set("connect_timeout_s", 5)
            .set("backoff_min_ms", 200)
            .set("backoff_max_ms", 1000)
    }

    /// The MQTT health check every second, 1 s to answer.
    pub fn health(self) -> Uplink {
        self.set("health_interval_s", 1).set("health_timeout_ms", 1000)
    }

    /// Failover timers: probe the preferred transports every second, return after 2 s healthy.
    pub fn failover(self) -> Uplink {
        self.set("probe_interval_s", 1).set("return_after_s", 2)
    }

    /// Sets (or replaces) a key; `value` is TOML (quote strings with `"`).
    pub fn set(mut self, key: &str, value: impl Display) -> Uplink {
        self.keys.set(key, value.to_string());
        self
    }

    /// Sets (or replaces) a key to a string.
    pub fn set_str(self, key: &str, value: &str) -> Uplink {
        self.set(key, quote(value))
    }

    /// Removes a key (e.g. `password_file` for a client certificate).
    pub fn unset(mut self, key: &str) -> Uplink {
        self.keys.unset(key);
        self
    }

    /// Raw lines at the end of `[uplink]` (keys of `[uplink]`, before any other section).
    pub fn lines(mut self, text: &str) -> Uplink {
        self.extra.push_str(text);
        if !text.is_empty() && !text.ends_with('\n') {
            self.extra.push('\n');
        }
        self
    }
}

/// The appliance's SSH key in `dir/ssh` (forwarding only to `forward_to`), a real sshd that
/// authorizes it, and its host key pinned in `dir/ssh/known_hosts`.
pub fn ssh_bastion(dir: &Path, forward_to: &str) -> Sshd {
    let keydir = dir.join("ssh");
    let line = mqtt_uplink::transport::ssh::keygen(&keydir, forward_to).unwrap();
    let sshd = Sshd::builder().authorized_key(line).start();
    std::fs::write(
        keydir.join("known_hosts"),
        format!("{}\n", sshd.host_key_known_hosts_line()),
    )
    .unwrap();
    sshd
}

/// `[uplink.ssh]` through `sshd` with the key and known hosts of [`ssh_bastion`], to `forward_to`.
pub fn ssh_section(sshd: &Sshd, forward_to: &str) -> String {
    format!(
        "[uplink.ssh]\nserver = \"127.0.0.1:{}\"\nuser = \"{}\"\nkey_file = \"ssh/id_ed25519\"\n\
         known_hosts = \"ssh/known_hosts\"\nforward_to = \"{forward_to}\"\n",
        sshd.port(),
        sshd.user(),
    )
}

/// [`ssh_bastion`] and its `[uplink.ssh]` section, with SSH keepalives every second (2 missed end
/// the session).
pub fn ssh_tunnel(dir: &Path, forward_to: &str) -> (Sshd, String) {
    let sshd = ssh_bastion(dir, forward_to);
    let section = format!(
        "{}keepalive_interval_s = 1\nkeepalive_max = 2\n",
        ssh_section(&sshd, forward_to)
    );
    (sshd, section)
}

/// The appliance's WireGuard keys in `dir/wg` and a hub (wireguard-go in a namespace of the test's
/// own) that accepts them; `None` when this machine cannot run the hub (the fixture reports it: a
/// loud skip, or a failure with `CI` set).
pub fn wg_hub(dir: &Path) -> Option<WgPeer> {
    let wgdir = dir.join("wg");
    std::fs::create_dir_all(&wgdir).unwrap();
    mqtt_uplink::transport::wireguard::keygen(&wgdir, None).unwrap();
    let our_pub = std::fs::read_to_string(wgdir.join("public.key")).unwrap();
    WgPeer::builder(our_pub.trim()).start()
}

/// `[uplink.wireguard]` to `peer`, reaching the broker at `broker` (`host:port` inside the tunnel),
/// keepalive every second.
pub fn wireguard_section(peer: &WgPeer, broker: &str) -> String {
    format!(
        "[uplink.wireguard]\nprivate_key_file = \"wg/private.key\"\npeer_public_key = \"{}\"\nendpoint = \"{}\"\n\
         address = \"{}\"\nbroker = \"{broker}\"\npersistent_keepalive_s = 1\n",
        peer.peer_public_key(),
        peer.endpoint(),
        peer.our_address(),
    )
}
