//! Issue 13's two proofs of the promise "a QoS 1 message a device got a PUBACK for is never lost",
//! against the real binary, a real cloud (mosquitto) and raw MQTT devices:
//!
//! - `no_puback_before_the_sync_that_covers_it`: the appliance runs under `strace -f` while one device
//!   keeps 500 QoS 1 messages in flight; from the trace alone, every PUBACK written to the device's
//!   socket comes after a write of that message's record to an outbox segment and an
//!   `fdatasync`/`fsync` of that segment, the write started after the read that carried the PUBLISH
//!   and the sync ended before the PUBACK's write started.
//! - `a_full_disk_refuses_reports_and_loses_nothing`: the state directory is a size-limited tmpfs
//!   that a filler file fills while an MQTT 5 and an MQTT 3.1.1 device publish: refused messages get
//!   PUBACK 0x83 (or 0x80/0x97) or a disconnect, never a success PUBACK; the refusal is logged (peer, reason)
//!   and counted; `/healthz` says "outbox store failing"; once the filler is removed the appliance
//!   acknowledges again without a restart, and every message that got a success PUBACK reaches the
//!   cloud.
//!
//! Both need what CI has and a laptop may not (strace with ptrace permission; root to mount a
//! tmpfs): without it they fail under `CI=true` and skip loudly elsewhere (`support::unavailable`).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use mqtt_uplink::config::MetricsBind;
use support::appliance::ChildApp;
use support::cloud::{Cloud, Sub};
use support::raw::{self, Raw};
use support::site::{Site, Uplink};
use support::{free_port, tempdir, unavailable};

const T: Duration = Duration::from_secs(30);
const PW: &str = "proof-Passw0rd-long";

/// The appliance's config, the devices' passwords and ACL (each user writes `sensors/USER/#`) and
/// the uplink password written into `dir`: device listener on `listen`, `/metrics` on
/// `metrics_port`, uplink to `broker_port`, `extra` TOML at the end.
fn site(dir: &Path, users: &[&str], listen: u16, broker_port: u16, metrics_port: u16, extra: &str) -> String {
    let mut site = Site::new(dir).listener(listen);
    let mut acl = String::new();
    for u in users {
        site = site.user(u, PW);
        acl.push_str(&format!("user {u}\ntopic readwrite sensors/{u}/#\n"));
    }
    site.acl(&acl)
        .metrics(metrics_port)
        .uplink(Uplink::port(broker_port).transports(&["tls"]).quick())
        .map_out("sensors/#", "sites/plant-7/")
        .raw(extra)
        .toml()
}

// ---------------------------------------------------------------------------------------------
// Proof 1: no PUBACK before its sync, from an strace of the appliance.
// ---------------------------------------------------------------------------------------------

/// Messages the device publishes in all (packet ids 1..=TOTAL, never reused) and keeps in flight.
const TOTAL: u16 = 2000;
const IN_FLIGHT: usize = 500;

/// Payload of message `n`: a marker the trace search finds in the outbox's record writes.
fn proof_payload(n: u16) -> String {
    format!("DPROOF{n:06}")
}

/// The syscalls traced: every way a socket is read or written, the record writes, the syncs.
const TRACED: &str =
    "read,readv,recvfrom,recvmsg,write,writev,sendto,sendmsg,pwrite64,pwritev,pwritev2,fdatasync,fsync";

/// One traced system call, put back together when strace printed it in two lines (`<unfinished
/// ...>` / `<... resumed>`). `start` and `end` are the indices of the lines holding its entry and
/// its exit: strace handles one event at a time, and a tracee stays stopped at an event until strace
/// has handled it, so a call whose `end` is below another's `start` returned before that one began
/// (no clock involved).
#[derive(Debug)]
struct Call {
    name: String,
    /// What `-yy` says the fd is: `TCP:[local->remote]`, or a path.
    fd: String,
    /// Bytes read or written (`ret` of them).
    data: Vec<u8>,
    ret: i64,
    start: usize,
    end: usize,
}

/// Decodes strace's `-xx` escapes (`\xNN`), leaving other characters as they are.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 4);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1] == b'x' {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 2..i + 4]).unwrap_or("zz"), 16) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The string literals of a call's arguments, concatenated (a `read`'s buffer, a `writev`'s
/// `iov_base`s in order). A literal strace cut short (`"..."...`) fails the test: raise `-s`.
fn literals(args: &str, line: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = args;
    while let Some(open) = rest.find('"') {
        let after = &rest[open + 1..];
        let close = after
            .find('"')
            .unwrap_or_else(|| panic!("trace line {line}: unterminated string"));
        out.extend(unescape(&after[..close]));
        rest = &after[close + 1..];
        assert!(
            !rest.starts_with("..."),
            "trace line {line}: strace truncated a buffer (raise -s)"
        );
    }
    out
}

fn parse_call(text: &str, start: usize, end: usize) -> Option<Call> {
    let open = text.find('(')?;
    let name = text[..open].to_string();
    let close = text.rfind(") = ")?;
    let args = &text[open + 1..close];
    let ret: i64 = text[close + 4..].split_whitespace().next()?.parse().ok()?;
    // The fd and its `-yy` annotation: `14<TCP:[127.0.0.1:1->127.0.0.1:2]>` or `9<\x2f...>`.
    let lt = args.find('<')?;
    if !args[..lt].chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let ann = &args[lt + 1..];
    let ann_end = if ann.contains(":[") && ann.find(":[") < ann.find('>') {
        ann.find("]>")? + 1
    } else {
        ann.find('>')?
    };
    let fd = String::from_utf8_lossy(&unescape(&ann[..ann_end])).into_owned();
    let mut data = literals(&ann[ann_end + 1..], start);
    if ret >= 0 && (ret as usize) < data.len() {
        data.truncate(ret as usize);
    }
    Some(Call {
        name,
        fd,
        data,
        ret,
        start,
        end,
    })
}

/// Every traced call in `strace -f` output, in the order strace printed their entries.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut pending: HashMap<u32, (String, usize)> = HashMap::new();
    let mut calls = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let line = line.trim_start();
        let digits = line.find(|c: char| !c.is_ascii_digit()).unwrap_or(line.len());
        let Ok(pid) = line[..digits].parse::<u32>() else {
            continue;
        };
        let rest = line[digits..].trim_start();
        // The timestamp, then the call.
        let Some(sp) = rest.find(' ') else { continue };
        let rest = &rest[sp + 1..];
        if rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some(at) = resumed.find(" resumed>") else {
                continue;
            };
            let Some((head, start)) = pending.remove(&pid) else {
                continue;
            };
            let whole = format!("{head}{}", &resumed[at + " resumed>".len()..]);
            calls.extend(parse_call(&whole, start, idx));
            continue;
        }
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, (head.to_string(), idx));
            continue;
        }
        calls.extend(parse_call(rest, idx, idx));
    }
    calls.sort_by_key(|c| c.start);
    calls
}

/// An MQTT packet cut out of a byte stream made of syscall buffers: its fixed header's first byte,
/// its body, and the call (index into the chunks) that carried its first and its last byte.
struct Packet {
    first: u8,
    body: Vec<u8>,
    first_chunk: usize,
    last_chunk: usize,
}

fn split_packets(chunks: &[&[u8]]) -> Vec<Packet> {
    let mut bytes = Vec::new();
    let mut owner = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        bytes.extend_from_slice(c);
        owner.extend(std::iter::repeat_n(i, c.len()));
    }
    let mut out = Vec::new();
    let mut off = 0;
    while off + 2 <= bytes.len() {
        let (mut len, mut mult, mut i) = (0usize, 1usize, off + 1);
        loop {
            let Some(&b) = bytes.get(i) else { return out };
            len += (b & 0x7f) as usize * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if i + len > bytes.len() {
            break;
        }
        out.push(Packet {
            first: bytes[off],
            body: bytes[i..i + len].to_vec(),
            first_chunk: owner[off],
            last_chunk: owner[i + len - 1],
        });
        off = i + len;
    }
    out
}

/// The number in a payload carrying [`proof_payload`]'s marker.
fn marker_at(hay: &[u8], at: usize) -> Option<u16> {
    let digits = hay.get(at + 6..at + 12)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Every marker number in `hay`.
fn markers(hay: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 12 <= hay.len() {
        if &hay[i..i + 6] == b"DPROOF" {
            if let Some(n) = marker_at(hay, i) {
                out.push(n);
                i += 12;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// What the trace shows.
struct Verdict {
    pubacks: usize,
    syncs: usize,
    /// Distinct syncs that covered at least one acknowledged message (group commits).
    covering_syncs: usize,
    /// Most PUBLISHes read and not yet acknowledged at one moment, as the appliance's syscalls show.
    max_outstanding: usize,
    /// PUBACK packet ids seen.
    acked_ids: BTreeSet<u16>,
    /// Every PUBACK without a covering write + sync, described.
    violations: Vec<String>,
}

/// Checks, for every PUBACK written to the device's socket (`device` is its `-yy` annotation), that
/// the record of the message it acknowledges was written to an outbox segment by a call that began
/// after the read carrying the PUBLISH ended, and that an `fdatasync`/`fsync` of that same segment
/// began after that write ended and ended before the PUBACK's write began.
fn analyse(calls: &[Call], device: &str) -> Verdict {
    let is_seg = |c: &Call| c.fd.contains("/outbox/") && c.fd.ends_with(".seg");
    let reads: Vec<&Call> = calls
        .iter()
        .filter(|c| c.fd == device && c.ret > 0)
        .filter(|c| matches!(c.name.as_str(), "read" | "readv" | "recvfrom" | "recvmsg"))
        .collect();
    let writes: Vec<&Call> = calls
        .iter()
        .filter(|c| c.fd == device && c.ret > 0)
        .filter(|c| matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg"))
        .collect();
    let seg_writes: Vec<&Call> = calls
        .iter()
        .filter(|c| is_seg(c) && c.ret > 0)
        .filter(|c| matches!(c.name.as_str(), "write" | "pwrite64" | "pwritev" | "pwritev2"))
        .collect();
    let syncs: Vec<&Call> = calls
        .iter()
        .filter(|c| is_seg(c) && c.ret == 0 && matches!(c.name.as_str(), "fdatasync" | "fsync"))
        .collect();

    // PUBLISH packet id -> (message number, end of the read that completed it).
    let read_bytes: Vec<&[u8]> = reads.iter().map(|c| c.data.as_slice()).collect();
    let mut published: HashMap<u16, (u16, usize)> = HashMap::new();
    for p in split_packets(&read_bytes) {
        if p.first >> 4 != 3 || (p.first >> 1) & 3 == 0 {
            continue;
        }
        let tlen = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
        let pid = u16::from_be_bytes([p.body[2 + tlen], p.body[3 + tlen]]);
        let payload = &p.body[4 + tlen..];
        let n = markers(payload).first().copied().expect("a proof payload");
        published.insert(pid, (n, reads[p.last_chunk].end));
    }
    // Where each message's record was written: message number -> the seg writes holding it.
    let mut record_writes: HashMap<u16, Vec<&Call>> = HashMap::new();
    for w in &seg_writes {
        for n in markers(&w.data) {
            record_writes.entry(n).or_default().push(w);
        }
    }
    let write_bytes: Vec<&[u8]> = writes.iter().map(|c| c.data.as_slice()).collect();
    let mut v = Verdict {
        pubacks: 0,
        syncs: syncs.len(),
        covering_syncs: 0,
        max_outstanding: 0,
        acked_ids: BTreeSet::new(),
        violations: Vec::new(),
    };
    let mut used_syncs = BTreeSet::new();
    // (line, +1 read / -1 acknowledged), for the outstanding count.
    let mut events: Vec<(usize, i64)> = published.values().map(|&(_, end)| (end, 1)).collect();
    for p in split_packets(&write_bytes) {
        if p.first != 0x40 {
            continue;
        }
        v.pubacks += 1;
        let pid = u16::from_be_bytes([p.body[0], p.body[1]]);
        v.acked_ids.insert(pid);
        // The PUBACK leaves with the first write holding any of its bytes.
        let ack_start = writes[p.first_chunk].start;
        events.push((ack_start, -1));
        let Some(&(n, read_end)) = published.get(&pid) else {
            v.violations.push(format!(
                "PUBACK for packet id {pid} (trace line {}) with no PUBLISH read for it",
                ack_start + 1
            ));
            continue;
        };
        if read_end >= ack_start {
            v.violations.push(format!(
                "PUBACK for packet id {pid} (line {}) before its PUBLISH was read (line {})",
                ack_start + 1,
                read_end + 1
            ));
            continue;
        }
        let covered = record_writes
            .get(&n)
            .into_iter()
            .flatten()
            .filter(|w| w.start > read_end && w.end < ack_start)
            .find_map(|w| {
                syncs
                    .iter()
                    .find(|s| s.fd == w.fd && s.start > w.end && s.end < ack_start)
                    .map(|s| s.start)
            });
        match covered {
            Some(sync) => {
                used_syncs.insert(sync);
            }
            None => v.violations.push(format!(
                "PUBACK for packet id {pid} (message {n}) written at trace line {}: no write of its \
                 record to an outbox segment after its PUBLISH was read (line {}) followed by an \
                 fdatasync/fsync of that segment that ended before the PUBACK (record writes: {:?})",
                ack_start + 1,
                read_end + 1,
                record_writes
                    .get(&n)
                    .into_iter()
                    .flatten()
                    .map(|w| (w.start + 1, w.end + 1))
                    .collect::<Vec<_>>()
            )),
        }
    }
    v.covering_syncs = used_syncs.len();
    events.sort();
    let mut outstanding = 0i64;
    for (_, d) in events {
        outstanding += d;
        v.max_outstanding = v.max_outstanding.max(outstanding.max(0) as usize);
    }
    v
}

/// `strace` on this machine, able to trace; otherwise what is missing.
fn strace_usable() -> Result<(), String> {
    let out = Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .output()
        .map_err(|e| format!("strace is not installed ({e})"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "strace cannot trace here (ptrace not permitted?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The appliance binary under `strace -f`, writing its trace to `trace`. Stopped with SIGTERM to the
/// appliance itself (a SIGKILLed strace would leave it running, detached); killed on drop.
struct Traced {
    strace: Child,
    app_pid: Option<i32>,
}

impl Traced {
    fn start(dir: &Path, toml: &str, port: u16, trace: &Path) -> Traced {
        let config = dir.join("mqtt-uplink.toml");
        std::fs::write(&config, toml).unwrap();
        let log = std::fs::File::create(dir.join("appliance.log")).unwrap();
        let strace = Command::new("strace")
            .args(["-f", "--seccomp-bpf", "-ttt", "-T", "-yy", "-xx", "-s", "4194304"])
            .args(["-e", &format!("trace={TRACED}"), "-e", "signal=none", "-o"])
            .arg(trace)
            .arg("--")
            .arg(support::bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("strace runs");
        let mut t = Traced {
            strace,
            app_pid: None,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = t.strace.try_wait().unwrap() {
                panic!(
                    "the traced appliance exited ({status}) at start:\n{}",
                    read_log(dir)
                );
            }
            assert!(
                Instant::now() < deadline,
                "the traced appliance did not listen:\n{}",
                read_log(dir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = t.strace.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        t.app_pid = children.split_whitespace().next().and_then(|p| p.parse().ok());
        assert!(t.app_pid.is_some(), "strace has no child process");
        t
    }

    /// SIGTERM to the appliance, then waits for strace to write the rest of the trace and exit.
    fn stop(&mut self) {
        if let Some(pid) = self.app_pid.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.strace.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "strace did not exit after the appliance stopped"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(pid) = self.app_pid.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("appliance.log")).unwrap_or_default()
}

/// Issue 13, proof: no PUBACK before its sync. A raw MQTT 3.1.1 device publishes TOTAL QoS 1
/// messages keeping IN_FLIGHT unacknowledged (the pipelined path: the appliance reads on while
/// earlier PUBACKs wait for their sync); the trace must show, for every PUBACK, the record's write and
/// a sync of its segment between the PUBLISH's read and the PUBACK's write. Checked to fail against
/// a build whose log skips the fdatasync (see the commit message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_before_the_sync_that_covers_it() {
    const TEST: &str = "no_puback_before_the_sync_that_covers_it";
    if let Err(what) = strace_usable() {
        unavailable(TEST, &what);
        return;
    }
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let port = free_port();
    let trace = dir.path().join("trace.txt");
    let mut app = Traced::start(
        dir.path(),
        &site(dir.path(), &["dev1"], port, cloud.port, free_port(), ""),
        port,
        &trace,
    );
    assert!(
        support::wait_until(T, || read_log(dir.path()).contains("uplink connected")).await,
        "{}",
        read_log(dir.path())
    );

    // The device: every packet id used once; IN_FLIGHT written before the first PUBACK is read.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut dev = Raw::connect(addr).await;
    let dev_port = dev.sock.local_addr().unwrap().port();
    assert_eq!(
        dev.login(&raw::connect(b"proof-dev1", true, Some("dev1"), Some(PW)))
            .await,
        Some(0),
        "CONNACK"
    );
    let publish = |n: u16| raw::publish(b"sensors/dev1/seq", proof_payload(n).as_bytes(), 1, false, n);
    let mut next: u16 = 1;
    let mut first = Vec::new();
    while (next as usize) <= IN_FLIGHT {
        first.extend(publish(next));
        next += 1;
    }
    dev.send(&first).await.unwrap();
    let mut inflight = IN_FLIGHT;
    let mut device_acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while device_acked.len() < TOTAL as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((kind, body)) = dev.read(left).await else {
            panic!(
                "the device got {} of {TOTAL} PUBACKs before the connection ended or the deadline:\n{}",
                device_acked.len(),
                read_log(dir.path())
            );
        };
        if kind != 0x40 {
            continue;
        }
        let pid = u16::from_be_bytes([body[0], body[1]]);
        assert!(device_acked.insert(pid), "PUBACK {pid} twice");
        inflight -= 1;
        if next <= TOTAL {
            dev.send(&publish(next)).await.unwrap();
            next += 1;
            inflight += 1;
        }
    }
    assert_eq!(inflight, 0);
    dev.send(&[0xE0, 0x00]).await.unwrap();
    drop(dev);
    app.stop();

    let text = std::fs::read_to_string(&trace).unwrap();
    let calls = parse_trace(&text);
    let device = format!("TCP:[127.0.0.1:{port}->127.0.0.1:{dev_port}]");
    let v = analyse(&calls, &device);
    eprintln!(
        "trace: {} lines, {} calls; {} PUBACKs to the device, {} syncs of outbox segments ({} of them \
         covered acknowledged messages), at most {} PUBLISHes read and not yet acknowledged",
        text.lines().count(),
        calls.len(),
        v.pubacks,
        v.syncs,
        v.covering_syncs,
        v.max_outstanding
    );
    // Not vacuous: the trace saw the device's traffic and the syncs.
    assert!(
        v.pubacks >= IN_FLIGHT,
        "the trace shows {} PUBACKs on {device} (the parser missed the device's socket?)",
        v.pubacks
    );
    assert_eq!(
        v.acked_ids,
        device_acked.iter().copied().collect::<BTreeSet<u16>>(),
        "the trace's PUBACKs are the ones the device got"
    );
    assert!(
        v.syncs >= 1,
        "the trace shows no fdatasync/fsync of an outbox segment"
    );
    assert!(
        v.violations.is_empty(),
        "{} of {} PUBACKs were not covered by a sync, first ones:\n{}",
        v.violations.len(),
        v.pubacks,
        v.violations[..v.violations.len().min(5)].join("\n")
    );
}

/// The trace parser on the shapes strace prints (a call split by another thread's, a `writev`, a
/// hex-escaped path), so that a parser bug cannot make the proof above pass by seeing nothing.
#[test]
fn the_trace_parser_reads_strace_lines() {
    let text = r#"1828  1796611940.707535 recvfrom(14<TCP:[127.0.0.1:18931->127.0.0.1:43580]>, "\x32\x12\x00\x09\x73\x65\x6e\x73\x6f\x72\x73\x2f\x61\x00\x01\x68\x65\x6c\x6c\x6f", 8152, 0, NULL, NULL) = 20 <0.000102>
1831  1796611940.708061 pwrite64(9<\x2f\x73\x2f\x6f\x75\x74\x62\x6f\x78\x2f\x31\x2e\x73\x65\x67>, "\x68\x65\x6c\x6c\x6f", 5, 0 <unfinished ...>
1828  1796611940.708062 writev(14<TCP:[127.0.0.1:18931->127.0.0.1:43580]>, [{iov_base="\x40\x02", iov_len=2}, {iov_base="\x00\x01", iov_len=2}], 2) = 4 <0.000066>
1831  1796611940.708161 <... pwrite64 resumed>) = 5 <0.000171>
1827  1796611940.708162 read(3, 0x7ffd, 10) = -1 EAGAIN (Resource temporarily unavailable) <0.000005>
1831  1796611940.708171 fdatasync(9<\x2f\x73\x2f\x6f\x75\x74\x62\x6f\x78\x2f\x31\x2e\x73\x65\x67>) = 0 <0.000171>
1826  1796611941.229018 +++ exited with 0 +++
"#;
    let calls = parse_trace(text);
    let names: Vec<(&str, usize, usize)> = calls.iter().map(|c| (c.name.as_str(), c.start, c.end)).collect();
    assert_eq!(
        names,
        vec![
            ("recvfrom", 0, 0),
            ("pwrite64", 1, 3),
            ("writev", 2, 2),
            ("fdatasync", 5, 5)
        ]
    );
    assert_eq!(calls[0].fd, "TCP:[127.0.0.1:18931->127.0.0.1:43580]");
    assert_eq!(calls[0].data, b"\x32\x12\x00\x09sensors/a\x00\x01hello");
    assert_eq!(calls[1].fd, "/s/outbox/1.seg");
    assert_eq!(calls[1].data, b"hello");
    assert_eq!(calls[2].data, b"\x40\x02\x00\x01");
    let packets = split_packets(&[&calls[0].data, &calls[2].data]);
    assert_eq!(
        packets
            .iter()
            .map(|p| (p.first, p.first_chunk))
            .collect::<Vec<_>>(),
        vec![(0x32, 0), (0x40, 1)]
    );
    assert_eq!(markers(b"xxDPROOF000042yyDPROOF000007"), vec![42, 7]);
}

// ---------------------------------------------------------------------------------------------
// Proof 2: a disk that fails.
// ---------------------------------------------------------------------------------------------

/// A size-limited tmpfs mounted for the test (removed on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mib: u32) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| format!("mount(8) is not available ({e})"))?;
        if out.status.success() {
            Ok(Tmpfs(at.to_path_buf()))
        } else {
            Err(format!(
                "mounting a size-limited tmpfs needs root (CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a test that panicked with the appliance up): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes zeros into `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for _ in 0..4096 {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => return written,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // A short write leaves the file system full too; the next one says so.
    match f.write(&chunk) {
        Err(e) if e.raw_os_error() == Some(28) => written,
        other => panic!("{} never filled up: {other:?}", path.display()),
    }
}

/// A raw QoS 1 device (MQTT 5 or 3.1.1) that keeps exact accounts: which of its numbered messages
/// got a success PUBACK, which a refusal (MQTT 5 reason ≥ 0x80), which were outstanding when the
/// appliance closed the connection (an MQTT 3.1.1 device's refusal; sent again next time).
struct Device {
    v5: bool,
    user: &'static str,
    port: u16,
    payload: usize,
    next: u64,
    acked: BTreeSet<u64>,
    refused: BTreeMap<u64, u8>,
    unacked: BTreeSet<u64>,
    /// Connections the appliance closed with messages outstanding.
    disconnects: u32,
    /// Local ports of its connections (the log names the peer).
    ports: Vec<u16>,
}

/// What one connection of a device saw.
#[derive(Debug, Default)]
struct Round {
    acked: usize,
    refused: usize,
    closed_with_outstanding: usize,
}

impl Device {
    fn new(v5: bool, user: &'static str, port: u16) -> Device {
        Device {
            v5,
            user,
            port,
            payload: 64 << 10,
            next: 0,
            acked: BTreeSet::new(),
            refused: BTreeMap::new(),
            unacked: BTreeSet::new(),
            disconnects: 0,
            ports: Vec::new(),
        }
    }

    fn topic(&self) -> String {
        format!("sensors/{}/seq", self.user)
    }

    /// `USER-NUMBER ` and padding to the payload size.
    fn body(&self, n: u64) -> Vec<u8> {
        let mut b = format!("{}-{n:06} ", self.user).into_bytes();
        b.resize(self.payload, b'x');
        b
    }

    fn publish_packet(&self, n: u64, pid: u16) -> Vec<u8> {
        let topic = self.topic();
        if !self.v5 {
            return raw::publish(topic.as_bytes(), &self.body(n), 1, false, pid);
        }
        let mut b = (topic.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(&pid.to_be_bytes());
        b.push(0); // no properties
        b.extend(self.body(n));
        raw::packet(0x32, &b)
    }

    /// One connection: sends what is outstanding from before and `new` new messages, then waits
    /// for every answer (or the connection's end).
    async fn round(&mut self, new: u64) -> Round {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut c = Raw::connect(addr).await;
        self.ports.push(c.sock.local_addr().unwrap().port());
        let id = format!("{}-{}", self.user, if self.v5 { "v5" } else { "v3" });
        let connect = if self.v5 {
            raw::connect_v5(&id, self.user, PW, &[])
        } else {
            raw::connect(id.as_bytes(), true, Some(self.user), Some(PW))
        };
        assert_eq!(c.login(&connect).await, Some(0), "{} CONNACK", self.user);
        let mut numbers: Vec<u64> = std::mem::take(&mut self.unacked).into_iter().collect();
        numbers.extend(self.next..self.next + new);
        self.next += new;
        let mut waiting: HashMap<u16, u64> = HashMap::new();
        let mut bytes = Vec::new();
        for (i, &n) in numbers.iter().enumerate() {
            let pid = i as u16 + 1;
            waiting.insert(pid, n);
            bytes.extend(self.publish_packet(n, pid));
        }
        let mut r = Round::default();
        if c.send(&bytes).await.is_err() {
            // Closed under our feet: all of it is outstanding.
            r.closed_with_outstanding = waiting.len();
            self.unacked.extend(waiting.into_values());
            self.disconnects += 1;
            return r;
        }
        while !waiting.is_empty() {
            let asked = Instant::now();
            let Some((kind, body)) = c.read(T).await else {
                assert!(
                    asked.elapsed() < T,
                    "{}: {} messages neither answered nor the connection closed within {T:?}",
                    self.user,
                    waiting.len()
                );
                break;
            };
            if kind != 0x40 {
                continue;
            }
            let pid = u16::from_be_bytes([body[0], body[1]]);
            let Some(n) = waiting.remove(&pid) else {
                panic!(
                    "{}: PUBACK for packet id {pid}, which is not outstanding",
                    self.user
                )
            };
            let reason = if body.len() > 2 { body[2] } else { 0 };
            if reason < 0x80 {
                assert!(
                    !self.refused.contains_key(&n),
                    "{} message {n}: a success PUBACK after a refusal",
                    self.user
                );
                self.acked.insert(n);
                r.acked += 1;
            } else {
                assert!(self.v5, "an MQTT 3.1.1 device got a PUBACK with a reason code");
                // 0x83 (implementation specific error) is what the bridge answers a failed write;
                // 0x97 (quota exceeded) an outbox limit. Any reason from 0x80 up is a refusal.
                assert!(
                    matches!(reason, 0x80 | 0x83 | 0x97),
                    "{} message {n}: PUBACK reason {reason:#x} (expected 0x80, 0x83 or 0x97)",
                    self.user
                );
                self.refused.insert(n, reason);
                r.refused += 1;
            }
        }
        if !waiting.is_empty() {
            r.closed_with_outstanding = waiting.len();
            self.unacked.extend(waiting.into_values());
            self.disconnects += 1;
        } else {
            let _ = c.send(&[0xE0, 0x00]).await;
        }
        r
    }
}

/// A persistent subscriber on the cloud, returned once the cloud has saved its session (so that it
/// survives the cloud's stop while the appliance queues).
async fn accounting_sub(cloud: &mut Cloud, id: &str) -> Sub {
    support::sshd::append_line(&cloud.dir.join("cloud.conf"), "autosave_interval 1");
    cloud.restart();
    let since = SystemTime::now();
    let sub = cloud.subscribe_persistent_forever("sites/plant-7/#", id);
    let db = cloud.dir.join("mosquitto.db");
    let saved = support::wait_until(Duration::from_secs(10), || {
        std::fs::metadata(&db)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > since + Duration::from_millis(100))
    })
    .await;
    assert!(saved, "the cloud never saved its sessions to {}", db.display());
    sub
}

/// `(user, number)` of every proof message in the cloud subscriber's lines.
fn at_cloud(lines: &[String]) -> BTreeSet<(String, u64)> {
    lines
        .iter()
        .filter_map(|l| {
            let payload = l.split(' ').nth(1)?;
            let (user, n) = payload.split_once('-')?;
            Some((user.to_string(), n.parse().ok()?))
        })
        .collect()
}

async fn healthz(bind: &MetricsBind) -> (u16, String) {
    mqtt_uplink::ops::http::get(bind, "/healthz").await.unwrap()
}

async fn metric(bind: &MetricsBind, name: &str) -> Option<f64> {
    let (code, body) = mqtt_uplink::ops::http::get(bind, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let samples = mqtt_uplink::ops::status::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

/// Issue 13, proof: a disk that fails. The state directory is a 48 MiB tmpfs; the appliance's first
/// segment takes 16 MiB of it (preallocated) and a filler file the rest. The cloud is stopped, so
/// nothing leaves the outbox (a drained segment would be deleted and give its space back). Devices
/// publish 64 KiB messages: the segment fills, the next one cannot be allocated, and from then on
/// every write fails until the filler is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_reports_and_loses_nothing() {
    const TEST: &str = "a_full_disk_refuses_reports_and_loses_nothing";
    let dir = tempdir();
    let state = dir.path().join("state");
    // Declared before the appliance: dropped (unmounted) after it.
    let _tmpfs = match Tmpfs::mount(&state, 48) {
        Ok(m) => m,
        Err(what) => {
            unavailable(TEST, &what);
            return;
        }
    };
    let mut cloud = Cloud::start(dir.path());
    let mut sub = accounting_sub(&mut cloud, "acct-disk").await;
    let port = free_port();
    let metrics_port = free_port();
    let bind = MetricsBind::Tcp(([127, 0, 0, 1], metrics_port).into());
    // Outbox limits far above what the test queues: only the disk refuses.
    let limits = "\n[outbox]\nmax_bytes = 1073741824\nmax_bytes_per_user = 1073741824\n";
    let app = ChildApp::start(
        dir.path(),
        &site(
            dir.path(),
            &["dev5", "dev3"],
            port,
            cloud.port,
            metrics_port,
            limits,
        ),
        port,
    );
    assert!(
        support::wait_until(T, || app.log().contains("uplink connected")).await,
        "{}",
        app.log()
    );
    cloud.stop();

    let filler = state.join("filler");
    let filled = fill(&filler);
    eprintln!(
        "filler: {} MiB; the outbox's active segment has what is left of its 16 MiB",
        filled >> 20
    );

    let mut v5 = Device::new(true, "dev5", port);
    let mut v3 = Device::new(false, "dev3", port);
    // Until both devices have been refused (the segment takes about 250 of these messages).
    let mut rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while (v5.refused.is_empty() || v3.disconnects == 0) && rounds < 60 && Instant::now() < deadline {
        let a = v5.round(16).await;
        let b = v3.round(16).await;
        rounds += 1;
        eprintln!("round {rounds}: MQTT 5 {a:?}, MQTT 3.1.1 {b:?}");
    }
    assert!(
        !v5.refused.is_empty() && v3.disconnects > 0,
        "after {rounds} rounds the full disk refused nothing (MQTT 5 refusals {}, MQTT 3.1.1 \
         disconnects {}):\n{}",
        v5.refused.len(),
        v3.disconnects,
        app.log()
    );
    // One more round each on the full disk: still refused, never acknowledged.
    let a = v5.round(4).await;
    let b = v3.round(0).await;
    assert_eq!((a.acked, a.refused), (0, 4), "MQTT 5 on a full disk: {a:?}");
    assert!(
        b.acked == 0 && b.closed_with_outstanding > 0,
        "MQTT 3.1.1 on a full disk: {b:?}"
    );

    // Reported: /healthz names the outbox, the counter counts, the log names peer and reason.
    let (code, body) = healthz(&bind).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("outbox store failing: ") && l.contains("No space left on device")),
        "/healthz does not say the outbox store is failing:\n{body}"
    );
    let errors = metric(&bind, "mqtt_uplink_outbox_storage_errors_total")
        .await
        .expect("mqtt_uplink_outbox_storage_errors_total is exported");
    assert!(
        errors >= v5.refused.len() as f64,
        "storage errors counted {errors}, MQTT 5 refusals alone {}",
        v5.refused.len()
    );
    let log = app.log();
    for d in [&v5, &v3] {
        assert!(
            log.lines().any(|l| l.contains("outbox refused a message")
                && l.contains("No space left on device")
                && d.ports.iter().any(|p| l.contains(&format!("peer=127.0.0.1:{p}")))),
            "no refusal logged with {}'s address and the reason:\n{log}",
            d.user
        );
    }

    // Space returns: acknowledged again at once, without a restart (the MQTT 3.1.1 device first
    // sends again what the disconnects left unanswered).
    std::fs::remove_file(&filler).unwrap();
    let resent = v3.unacked.len();
    let b = v3.round(8).await;
    let a = v5.round(8).await;
    assert_eq!(
        (a.acked, a.refused, a.closed_with_outstanding),
        (8, 0, 0),
        "MQTT 5 after the space returned: {a:?}\n{}",
        app.log()
    );
    assert_eq!(
        (b.acked, b.closed_with_outstanding),
        (resent + 8, 0),
        "MQTT 3.1.1 after the space returned: {b:?}\n{}",
        app.log()
    );
    let (code, body) = healthz(&bind).await;
    assert!(
        !body.contains("outbox store failing"),
        "/healthz still says the store is failing after a write succeeded ({code}):\n{body}"
    );

    // The cloud returns: every message that got a success PUBACK arrives.
    cloud.start_again();
    let expected: BTreeSet<(String, u64)> = [&v5, &v3]
        .iter()
        .flat_map(|d| d.acked.iter().map(|&n| (d.user.to_string(), n)))
        .collect();
    let wait = Instant::now() + Duration::from_secs(90);
    let missing: Vec<(String, u64)> = loop {
        let got = at_cloud(sub.wait_lines(usize::MAX, Duration::from_millis(300)));
        let missing: Vec<(String, u64)> = expected.difference(&got).cloned().collect();
        if missing.is_empty() || Instant::now() >= wait {
            break missing;
        }
    };
    eprintln!(
        "acknowledged: MQTT 5 {} (refused {}), MQTT 3.1.1 {} ({} disconnects); storage errors {errors}",
        v5.acked.len(),
        v5.refused.len(),
        v3.acked.len(),
        v3.disconnects
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged messages (of {}) never reached the cloud, first: {:?}\n{}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(10)],
        app.log()
    );
    let until = Instant::now() + T;
    let mut health = healthz(&bind).await;
    while health.0 != 200 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = healthz(&bind).await;
    }
    assert_eq!(health.0, 200, "/healthz once the cloud is back: {}", health.1);
    assert!(!app.log().contains("panicked"), "{}", app.log());
}
