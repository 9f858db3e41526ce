//! The guard's resource limits. Password verification memory and the verification cache: 50 logins
//! with distinct argon2id passwords, all at once, then the same 50 again (RSS printed; the bound is
//! generous, it proves "bounded", not a figure; run without `MALLOC_MMAP_THRESHOLD_`, so it holds for
//! a binary started by hand). And `max_connections_per_address` against the running appliance, with
//! 127.0.0.2 as a second source address.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use mqtt_uplink::config::DuplicatePolicy;
use mqtt_uplink::guard::acl::Acl;
use mqtt_uplink::guard::passwords::{hash_argon2id, PasswordFile};
use mqtt_uplink::guard::{Guard, Login, Policy};
use support::raw::{self, Raw};
use support::{tempdir, write_secret, App};

const USERS: usize = 50;

fn password(i: usize) -> String {
    format!("Distinct-Passw0rd-{i:02}")
}

async fn login_all(guard: &Guard) -> usize {
    let tasks: Vec<_> = (0..USERS)
        .map(|i| {
            let guard = guard.clone();
            tokio::spawn(async move {
                let user = format!("user{i:02}");
                let pw = password(i);
                let client_id = format!("c{i}");
                guard
                    .authenticate(Login {
                        peer: None,
                        listener: None,
                        user: Some(&user),
                        password: Some(pw.as_bytes()),
                        client_id: &client_id,
                        cert_identity: false,
                    })
                    .await
                    .is_ok()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_logins_keep_memory_bounded_and_repeats_hit_the_cache() {
    assert!(
        std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none(),
        "measured without the allocator setting"
    );
    let mut text = String::new();
    for i in 0..USERS {
        text.push_str(&format!("user{i:02}:{}\n", hash_argon2id(password(i).as_bytes())));
    }
    let policy = Policy {
        passwords: Some(PasswordFile::parse(&text).unwrap()),
        acl: Acl::allow_all(),
        allow_anonymous: false,
        client_id_pattern: None,
        duplicate_client_id: DuplicatePolicy::Takeover,
    };
    let guard = Guard::new(policy);
    let rss0 = support::raw::rss_kib();
    let t = Instant::now();
    assert_eq!(login_all(&guard).await, USERS);
    let first = t.elapsed();
    let rss1 = support::raw::rss_kib();
    let t = Instant::now();
    assert_eq!(login_all(&guard).await, USERS);
    let second = t.elapsed();
    let rss2 = support::raw::rss_kib();
    assert_eq!(
        guard.hash_runs(),
        USERS as u64,
        "the second round came from the cache"
    );
    // A wrong password is never served from the cache, and a reload empties it.
    let wrong = Login {
        peer: None,
        listener: None,
        user: Some("user00"),
        password: Some(b"Distinct-Passw0rd-01"),
        client_id: "c",
        cert_identity: false,
    };
    assert!(guard.authenticate(wrong).await.is_err());
    assert_eq!(guard.hash_runs(), USERS as u64 + 1);
    guard.replace(Policy {
        passwords: Some(PasswordFile::parse(&text).unwrap()),
        acl: Acl::allow_all(),
        allow_anonymous: false,
        client_id_pattern: None,
        duplicate_client_id: DuplicatePolicy::Takeover,
    });
    let right = Login {
        password: Some(b"Distinct-Passw0rd-00"),
        ..wrong
    };
    assert!(guard.authenticate(right).await.is_ok());
    assert_eq!(guard.hash_runs(), USERS as u64 + 2, "reload cleared the cache");
    println!(
        "guard memory: {USERS} distinct argon2id logins in {first:?}: RSS {rss0} KiB -> {rss1} KiB \
         (+{} KiB); same {USERS} again in {second:?}: RSS {rss2} KiB",
        rss1.saturating_sub(rss0)
    );
    // ~19 MiB per concurrent verification; two run at a time. Without the fix this grew by
    // hundreds of MiB.
    assert!(
        rss2 < rss0 + 96 * 1024,
        "RSS grew {} KiB",
        rss2.saturating_sub(rss0)
    );
    // Once idle, the password-check threads give their working memory back to the system (other
    // tests of this file may check passwords meanwhile: wait for all of them, bounded).
    let held = mqtt_uplink::guard::passwords::argon2_memory_held();
    assert!(
        held >= 19 << 20,
        "the checks keep their working memory while busy: {held} B"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while mqtt_uplink::guard::passwords::argon2_memory_held() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss3 = support::raw::rss_kib();
    println!("guard memory once idle: RSS {rss3} KiB");
    assert_eq!(
        mqtt_uplink::guard::passwords::argon2_memory_held(),
        0,
        "argon2 working memory still held after 60 s"
    );
    assert!(
        rss3 + 16 * 1024 < rss2,
        "freed argon2 memory went back to the system: RSS {rss2} -> {rss3} KiB"
    );
}

const PW: &str = "Limits-Test-Passw0rd";

async fn login_from(app: &App, src: Ipv4Addr, client_id: &str) -> (Raw, Option<u8>) {
    let mut c = Raw::connect_from(IpAddr::V4(src), app.addr).await;
    let code = c
        .login(&raw::connect(client_id.as_bytes(), true, Some("dev"), Some(PW)))
        .await;
    (c, code)
}

/// The appliance with one password user `dev` and `[limits] LIMIT`.
async fn limited_site(dir: &std::path::Path, limit: &str) -> App {
    let hash = hash_argon2id(PW.as_bytes());
    write_secret(&dir.join("passwords"), &format!("dev:{hash}\n"));
    std::fs::write(dir.join("acl"), "user dev\ntopic read x\n").unwrap();
    let toml = format!(
        "[site]\nid = \"limits\"\nstate_dir = \"state\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n\
         [auth]\npassword_file = \"passwords\"\nacl_file = \"acl\"\n\n[limits]\n{limit}\n"
    );
    App::start(dir, &toml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_limited_per_address() {
    let dir = tempdir();
    let app = limited_site(dir.path(), "max_connections_per_address = 3").await;
    let counted = || {
        app.counters
            .refusals
            .with_label_values(&["too many connections from this address"])
            .get()
    };
    let before = counted();
    let one = Ipv4Addr::new(127, 0, 0, 1);
    let mut held = Vec::new();
    for i in 0..3 {
        let (c, code) = login_from(&app, one, &format!("a{i}")).await;
        assert_eq!(code, Some(0), "connection {i} from 127.0.0.1");
        held.push(c);
    }
    let (mut fourth, code) = login_from(&app, one, "a3").await;
    assert_eq!(
        code,
        Some(5),
        "the 4th from 127.0.0.1 is refused (not authorised)"
    );
    assert!(fourth.closed_within(Duration::from_secs(15)).await);
    assert_eq!(counted(), before + 1, "counted once");
    // Another address is not affected.
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let mut others = Vec::new();
    for i in 0..3 {
        let (c, code) = login_from(&app, other, &format!("b{i}")).await;
        assert_eq!(code, Some(0), "connection {i} from 127.0.0.2");
        others.push(c);
    }
    // The held ones still work, and a closed one frees its slot.
    held[0].send(&[0xc0, 0]).await.unwrap();
    assert_eq!(
        held[0].read(Duration::from_secs(15)).await.map(|p| p.0),
        Some(0xd0)
    );
    drop(held.pop());
    // The slot is freed when the broker's disconnect hook runs: retried with a deadline.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut freed = false;
    let mut tries = 0;
    while Instant::now() < deadline && tries < 30 {
        tries += 1;
        let (c, code) = login_from(&app, one, &format!("again{tries}")).await;
        if code == Some(0) {
            held.push(c);
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(freed, "a closed connection frees its slot");
    app.stop().await;
}

/// A CONNECT refused by rmqtt itself (the session limit) is a refusal like the guard's: counted
/// with its reason, and the device gets "server unavailable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_limit_refusals_are_counted() {
    let dir = tempdir();
    let app = limited_site(dir.path(), "max_connections = 2").await;
    let counted = || {
        app.counters
            .refusals
            .with_label_values(&[mqtt_uplink::guard::Refusal::SessionLimit.as_str()])
            .get()
    };
    let before = counted();
    let one = Ipv4Addr::new(127, 0, 0, 1);
    let (_a, code) = login_from(&app, one, "full-a").await;
    assert_eq!(code, Some(0));
    let (_b, code) = login_from(&app, one, "full-b").await;
    assert_eq!(code, Some(0));
    let (mut third, code) = login_from(&app, one, "full-c").await;
    assert_eq!(code, Some(3), "the third session is refused: server unavailable");
    assert!(third.closed_within(Duration::from_secs(15)).await);
    assert_eq!(counted(), before + 1, "counted once");
    app.stop().await;
}
