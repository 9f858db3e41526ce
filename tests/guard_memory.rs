//! Password verification memory and the verification cache: 50 logins with distinct argon2id
//! passwords, all at once, then the same 50 again. RSS is printed; the bound is generous (it proves
//! "bounded", not a figure). Runs without `MALLOC_MMAP_THRESHOLD_`: the bound must hold for a binary
//! started by hand.

mod support;

use std::time::Instant;

use mqtt_uplink::config::DuplicatePolicy;
use mqtt_uplink::guard::acl::Acl;
use mqtt_uplink::guard::passwords::{hash_argon2id, PasswordFile};
use mqtt_uplink::guard::{Guard, Login, Policy};

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
}
