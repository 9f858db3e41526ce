//! A real MQTT 5 client (rumqttc's v5 API) for tests: its event loop runs in a task and every packet
//! the broker sends is handed over a channel, so a test can wait for the next PUBLISH, SUBACK or
//! DISCONNECT with a deadline. The loop stops at the first connection error (no reconnect).

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnAck, Filter, Packet, Publish, SubAck};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

#[allow(unused_imports)]
pub use rumqttc::v5::mqttbytes::v5::{PublishProperties, SubscribeReasonCode};

/// What the broker sent, or how the connection ended.
#[derive(Debug)]
pub enum Got {
    Packet(Box<Packet>),
    /// The event loop returned an error (the connection is gone).
    Closed(String),
}

pub struct V5 {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Got>,
    task: tokio::task::JoinHandle<()>,
}

/// Options for `client_id` at `addr` with a password login (empty user: anonymous), clean start.
pub fn options(addr: SocketAddr, client_id: &str, user: &str, password: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if !user.is_empty() {
        o.set_credentials(user, password);
    }
    o
}

impl V5 {
    /// Connects and waits for the CONNACK (`Err` with what came instead).
    pub async fn connect(options: MqttOptions) -> Result<(V5, ConnAck), String> {
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Got::Packet(Box::new(p))).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Got::Closed(e.to_string()));
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Got::Packet(p))) => match *p {
                Packet::ConnAck(ack) => Ok((V5 { client, rx, task }, ack)),
                other => Err(format!("{other:?}")),
            },
            other => {
                task.abort();
                Err(format!("{other:?}"))
            }
        }
    }

    /// The next packet within `t`.
    pub async fn next(&mut self, t: Duration) -> Option<Got> {
        tokio::time::timeout(t, self.rx.recv()).await.ok().flatten()
    }

    /// The next PUBLISH within `t` (other packets are skipped).
    pub async fn publish(&mut self, t: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Got::Packet(p) => {
                    if let Packet::Publish(p) = *p {
                        // The site's status documents (`[uplink] status_topic`, on by default) are
                        // not the traffic the tests look at: tests/status_gaps.rs reads them.
                        if super::is_site_status(&String::from_utf8_lossy(&p.topic), &p.payload) {
                            continue;
                        }
                        return Some(p);
                    }
                }
                Got::Closed(_) => return None,
            }
        }
    }

    /// Every PUBLISH that arrives within `t`.
    pub async fn publishes_within(&mut self, t: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + t;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return out;
            }
            match self.publish(left).await {
                Some(p) => out.push(p),
                None => return out,
            }
        }
    }

    /// The next SUBACK within `t` (PUBLISHes before it are dropped).
    pub async fn suback(&mut self, t: Duration) -> SubAck {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Got::Packet(p)) => {
                    if let Packet::SubAck(a) = *p {
                        return a;
                    }
                }
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    }

    /// Subscribes to one filter and returns its SUBACK reason code.
    pub async fn subscribe(&mut self, filter: Filter) -> SubscribeReasonCode {
        self.client.subscribe_many(vec![filter]).await.unwrap();
        let ack = self.suback(Duration::from_secs(10)).await;
        ack.return_codes[0]
    }

    /// Subscribes to `filter` at QoS 1 with default options.
    pub async fn sub(&mut self, filter: &str) -> SubscribeReasonCode {
        self.subscribe(Filter::new(filter, QoS::AtLeastOnce)).await
    }

    /// How the connection ended, within `t`: the DISCONNECT's reason code if the broker sent one
    /// (`Ok`), or the error text (`Err`); `None` while it is still up.
    pub async fn ended(&mut self, t: Duration) -> Option<Result<u8, String>> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Got::Packet(p) => {
                    if let Packet::Disconnect(d) = *p {
                        return Some(Ok(d.reason_code as u8));
                    }
                }
                Got::Closed(e) => return Some(Err(e)),
            }
        }
    }
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A PUBLISH's topic as text.
pub fn topic(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}
