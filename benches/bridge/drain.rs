//! The drain section (issue 18): the hour after an outage. A device publishes QoS 1 at `rate` msg/s
//! (99 % on `sensors/#`, priority 0; 1 % on `alarms/#`, priority 5) to mqtt-uplink (in-process, its
//! defaults but a large outbox); the uplink reaches a plaintext mosquitto 2 on loopback through a
//! gate in this file that counts the bytes the uplink writes and that, for the outage, closes every
//! connection and stops listening (the cloud unreachable: connections refused). After `drain_secs`
//! the gate opens again, and the devices go on publishing. Measured, with and without
//! `[outbox] drain_max_msgs_per_s = drain_budget`:
//! - the time from the gate's opening to the first alarm at the cloud (a subscriber on the broker);
//! - the drain time: from the opening until the outbox holds no more than 0.2 s of traffic;
//! - the bytes per second the uplink wrote during the drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::report::{DrainRun, Results};
use crate::support::appliance::Publisher;
use crate::support::front::PlainBroker;
use crate::support::v5::V5;
use crate::support::{mosquitto_passwd, tempdir, App};
use crate::{progress, Settings};

const DEV_PW: &str = "dev-Passw0rd-long";
/// One message in this many is an alarm (1 %).
const PRIO_EVERY: u64 = 100;

pub async fn run(s: &Settings, rep: usize, res: &mut Results) {
    for budget in [None, Some(s.drain_budget)] {
        res.load_samples.push(crate::procstat::loadavg1());
        progress(&format!(
            "rep {}/{} drain: {} s outage at {} msg/s, budget {}",
            rep + 1,
            s.reps,
            s.drain_secs,
            s.drain_rate,
            budget.map_or("none".into(), |b| format!("{b} msg/s"))
        ));
        match one(s, rep, budget).await {
            Ok(d) => {
                progress(&format!(
                    "  backlog {} messages; first alarm {:.2} s after the cloud returned; drained in {:.1} s; \
                     {:.0} B/s on the uplink while draining",
                    d.backlog, d.first_priority_s, d.drain_s, d.uplink_bytes_per_s
                ));
                res.drain.push(d);
            }
            Err(e) => res.error(format!("drain rep {rep} budget {budget:?}: {e:#}")),
        }
        res.load_samples.push(crate::procstat::loadavg1());
    }
}

/// A TCP gate before the broker: passes everything, counts the bytes its clients write; closed, it
/// cuts every connection and does not listen (connection refused).
struct Gate {
    addr: SocketAddr,
    upstream: u16,
    bytes: Arc<AtomicU64>,
    open: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gate {
    async fn start(upstream: u16) -> anyhow::Result<Gate> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let (open, _) = watch::channel(true);
        let mut g = Gate {
            addr,
            upstream,
            bytes: Arc::new(AtomicU64::new(0)),
            open,
            task: None,
        };
        g.listen(l);
        Ok(g)
    }

    fn listen(&mut self, l: tokio::net::TcpListener) {
        let (bytes, upstream, open) = (self.bytes.clone(), self.upstream, self.open.clone());
        self.task = Some(tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let (bytes, mut closed) = (bytes.clone(), open.subscribe());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = pass(c, upstream, bytes) => {}
                        _ = closed.wait_for(|o| !*o) => {}
                    }
                });
            }
        }));
    }

    /// The outage: every connection cut, nothing listening.
    fn close(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.open.send_replace(false);
    }

    /// Listening again on the same address.
    async fn reopen(&mut self) -> anyhow::Result<()> {
        self.open.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        let l = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => bail!("binding the gate again: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.listen(l);
        Ok(())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
    }
}

async fn pass(mut c: tokio::net::TcpStream, upstream: u16, bytes: Arc<AtomicU64>) -> std::io::Result<()> {
    let u = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    let (mut cr, mut cw) = c.split();
    let (mut ur, mut uw) = u.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            uw.write_all(&buf[..n]).await?;
        }
    };
    let down = tokio::io::copy(&mut ur, &mut cw);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    Ok(())
}

async fn one(s: &Settings, rep: usize, budget: Option<u32>) -> anyhow::Result<DrainRun> {
    let dir = tempdir();
    let broker = PlainBroker::start(dir.path());
    let mut gate = Gate::start(broker.port).await?;
    mosquitto_passwd(&dir.path().join("passwords"), "dev", DEV_PW);
    std::fs::write(
        dir.path().join("acl"),
        "user dev\ntopic write sensors/#\ntopic write alarms/#\n",
    )?;
    let toml = format!(
        r#"
[site]
id = "p7"
state_dir = "state"

[[listener]]
bind = "127.0.0.1:0"

[auth]
password_file = "passwords"
acl_file = "acl"

[uplink]
broker = "mqtt://{gate}"
client_id = "p7-uplink"
backoff_min_ms = 200
backoff_max_ms = 2000

[outbox]
max_bytes = 1073741824
max_bytes_per_user = 1073741824
{budget}

[[map]]
direction = "out"
topic = "alarms/#"
remote_prefix = "sites/p7/"
priority = 5

[[map]]
direction = "out"
topic = "sensors/#"
remote_prefix = "sites/p7/"
"#,
        gate = gate.addr,
        budget = budget.map_or(String::new(), |b| format!("drain_max_msgs_per_s = {b}")),
    );
    let app = App::start(dir.path(), &toml).await;
    if !app.wait_connected(Duration::from_secs(20)).await {
        bail!("the uplink never connected");
    }
    // The cloud side: alarm arrivals, timed.
    let broker_addr: SocketAddr = ([127, 0, 0, 1], broker.port).into();
    let (mut obs, _) = V5::connect(crate::support::v5::options(broker_addr, "drain-obs", "", ""))
        .await
        .map_err(|e| anyhow::anyhow!("observer: {e}"))?;
    obs.sub("sites/p7/alarms/#").await;
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let a = arrivals.clone();
    let observer = tokio::spawn(async move {
        while let Some(_p) = obs.publish(Duration::from_secs(3600)).await {
            a.lock().unwrap().push(Instant::now());
        }
    });
    // The devices: sensors at 99 % of the rate (a QoS 1 device with its own accounting), alarms at
    // 1 % (an MQTT 5 device).
    let rate = s.drain_rate;
    let sensors = Publisher::start(
        app.port(),
        "dev",
        DEV_PW,
        "sensors/seq",
        rate - rate / PRIO_EVERY,
        u64::MAX,
    );
    let (alarm_dev, _) = V5::connect(crate::support::v5::options(app.addr, "dev-alarm", "dev", DEV_PW))
        .await
        .map_err(|e| anyhow::anyhow!("alarm device: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let every = Duration::from_secs_f64(PRIO_EVERY as f64 / rate as f64);
    let alarms = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut n = 0u64;
        while !st.load(Ordering::Relaxed) {
            tick.tick().await;
            let _ = alarm_dev
                .client
                .publish("alarms/boiler", QoS::AtLeastOnce, false, n.to_string())
                .await;
            n += 1;
        }
        drop(alarm_dev);
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    gate.close();
    let cut = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(s.drain_secs)).await;
    let backlog = app.outbox.depth() as u64;
    let outage_s = cut.elapsed().as_secs_f64();
    let bytes0 = gate.bytes.load(Ordering::Relaxed);
    gate.reopen().await?;
    let opened = Instant::now();
    // Drained: the outbox holds no more than 0.2 s of traffic again.
    let settled = (rate / 5).max(50) as usize;
    let cap = Duration::from_secs_f64(s.drain_secs * 20.0 + 120.0);
    let mut peak = backlog;
    let mut said = Instant::now();
    let drained = loop {
        let d = app.outbox.depth();
        peak = peak.max(d as u64);
        if said.elapsed() > Duration::from_secs(10) {
            progress(&format!(
                "  draining: {d} queued, uplink {:?}, {} B through the gate",
                *app.state.borrow(),
                gate.bytes.load(Ordering::Relaxed) - bytes0
            ));
            said = Instant::now();
        }
        if d <= settled {
            break Some(opened.elapsed());
        }
        if opened.elapsed() > cap {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let bytes1 = gate.bytes.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = sensors.stop().await;
    let _ = alarms.await;
    let first = arrivals.lock().unwrap().iter().find(|t| **t >= opened).copied();
    observer.abort();
    app.stop().await;
    let drain = drained.with_context(|| format!("the backlog did not drain within {cap:?}"))?;
    let first = first.context("no alarm arrived after the outage")?;
    Ok(DrainRun {
        rep,
        rate,
        priority_share: 1.0 / PRIO_EVERY as f64,
        outage_s,
        budget_msgs_per_s: budget,
        backlog,
        peak_depth: peak,
        first_priority_s: first.duration_since(opened).as_secs_f64(),
        drain_s: drain.as_secs_f64(),
        uplink_bytes: bytes1 - bytes0,
        uplink_bytes_per_s: (bytes1 - bytes0) as f64 / drain.as_secs_f64().max(1e-3),
    })
}
