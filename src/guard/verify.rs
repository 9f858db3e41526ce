//! Where password hashes are checked: a few long-lived worker threads, one per core from two up to
//! four ([`verify_threads`]; so at most four threads ever hold argon2 working memory, ~19 MiB each at
//! the default parameters, which each reuses, and gives back after [`RELEASE_AFTER`] idle), and a
//! cache of recent successes so a device that reconnects with the same credentials does not cost a
//! hash run each time.
//!
//! The cache is deliberately not kept across a restart. Persisted, its tags and their key would sit
//! together in the state directory, and whoever can read it could test password guesses against the
//! cached accounts at HMAC speed instead of argon2's: the very work the hash exists to impose. A
//! reconnect storm after a restart therefore pays one verification per device, spread over the
//! workers; where that is too slow the operator chooses the hash (mosquitto's `$7$` PBKDF2 at a
//! lower iteration count, or argon2id with smaller parameters) per account in the password file.
//!
//! The cache stores only a keyed hash (HMAC-SHA256 under a random per-process key) of the user, the
//! password and the stored hash string: no password, nothing an attacker could test guesses against
//! offline. Only successes are cached, so every wrong guess still costs a full verification. A
//! changed hash never matches an old entry, and the guard clears the cache on every policy reload.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, LazyLock, Mutex};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Fewest worker threads for password verification.
pub const MIN_VERIFY_THREADS: usize = 2;
/// Most worker threads: each may hold argon2's working memory (~19 MiB at the default parameters),
/// and the unit runs under MemoryMax=256M.
pub const MAX_VERIFY_THREADS: usize = 4;

/// Worker threads for password verification: one per core the process may use, within
/// [`MIN_VERIFY_THREADS`]..=[`MAX_VERIFY_THREADS`].
pub fn verify_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(MIN_VERIFY_THREADS)
        .clamp(MIN_VERIFY_THREADS, MAX_VERIFY_THREADS)
}

/// How long a password-check thread keeps its argon2 working memory (~19 MiB) with no check to run.
/// A storm's checks follow each other closely and keep it; an appliance at rest gives it back.
pub const RELEASE_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Successful verifications remembered at most (32 bytes each); the oldest is forgotten first.
pub const CACHE_CAPACITY: usize = 4096;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of long-lived threads that run password verifications in submission order.
pub struct VerifyPool {
    queue: Arc<Queue>,
    threads: usize,
}

/// The checks waiting for a thread. A condition variable rather than a shared channel receiver:
/// every idle thread waits on it at once, each with its own timeout, so each gives its working
/// memory back on time (a thread blocked on a receiver's lock could not).
#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

impl Queue {
    /// The next job; `None` when `holding` and nothing came for [`RELEASE_AFTER`].
    fn next(&self, holding: bool) -> Option<Job> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = std::time::Instant::now() + RELEASE_AFTER;
        loop {
            if let Some(job) = jobs.pop_front() {
                return Some(job);
            }
            if !holding {
                jobs = self.ready.wait(jobs).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            jobs = self
                .ready
                .wait_timeout(jobs, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl VerifyPool {
    fn new(threads: usize) -> VerifyPool {
        let queue = Arc::new(Queue::default());
        let mut started = 0;
        for i in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    // Whether this thread may hold argon2 working memory: after a check, until it
                    // has waited RELEASE_AFTER with nothing to do. Idle, it sleeps without a timeout.
                    let mut holding = false;
                    loop {
                        match queue.next(holding) {
                            Some(job) => {
                                // A panicking check must not shrink the pool; its caller sees a
                                // failure.
                                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                                holding = true;
                            }
                            None => {
                                crate::passwords::release_argon2_memory();
                                holding = false;
                            }
                        }
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::error!("cannot start password-check thread: {e}"),
            }
        }
        VerifyPool {
            queue,
            threads: started,
        }
    }

    /// Runs `f` on a worker; `None` when it panicked or no worker could be started.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if self.threads == 0 {
            return tokio::task::spawn_blocking(f).await.ok();
        }
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.queue
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(job);
        self.queue.ready.notify_one();
        result.await.ok()
    }
}

/// The process's password-check workers, started at the first check.
pub static POOL: LazyLock<VerifyPool> = LazyLock::new(|| VerifyPool::new(verify_threads()));

/// Recent successful verifications, as keyed hashes.
pub struct VerifyCache {
    key: [u8; 32],
    /// The tags, and their insertion order for eviction.
    inner: Mutex<(HashSet<Tag>, VecDeque<Tag>)>,
}

/// HMAC-SHA256 output.
type Tag = [u8; 32];

impl Default for VerifyCache {
    fn default() -> Self {
        VerifyCache::new()
    }
}

impl VerifyCache {
    /// An empty cache with a fresh random key.
    pub fn new() -> VerifyCache {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
        VerifyCache {
            key,
            inner: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    fn tag(&self, user: &str, password: &[u8], stored_hash: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        // Length-prefixed fields: no two different triples feed the same bytes.
        for field in [user.as_bytes(), password, stored_hash.as_bytes()] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac.finalize().into_bytes().into()
    }

    /// Did these exact credentials verify against this exact stored hash recently?
    pub fn contains(&self, user: &str, password: &[u8], stored_hash: &str) -> bool {
        let tag = self.tag(user, password, stored_hash);
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .contains(&tag)
    }

    /// Remembers a successful verification.
    pub fn insert(&self, user: &str, password: &[u8], stored_hash: &str) {
        let tag = self.tag(user, password, stored_hash);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *inner;
        if !set.insert(tag) {
            return;
        }
        order.push_back(tag);
        while order.len() > CACHE_CAPACITY {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
    }

    /// Forgets everything (the password file was reloaded).
    pub fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0.clear();
        inner.1.clear();
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Is the cache empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_on_all_three_fields_and_is_bounded() {
        let c = VerifyCache::new();
        c.insert("u", b"pw", "$h1");
        assert!(c.contains("u", b"pw", "$h1"));
        assert!(!c.contains("u", b"pw", "$h2"), "changed hash");
        assert!(!c.contains("u", b"pX", "$h1"), "other password");
        assert!(!c.contains("v", b"pw", "$h1"), "other user");
        // Field boundaries matter: ("ab", "c") is not ("a", "bc").
        c.insert("ab", b"c", "h");
        assert!(!c.contains("a", b"bc", "h"));
        assert!(!VerifyCache::new().contains("u", b"pw", "$h1"), "per-process key");
        for i in 0..CACHE_CAPACITY + 10 {
            c.insert(&format!("user{i}"), b"pw", "h");
        }
        assert_eq!(c.len(), CACHE_CAPACITY);
        assert!(!c.contains("u", b"pw", "$h1"), "oldest evicted");
        assert!(c.contains(&format!("user{}", CACHE_CAPACITY + 9), b"pw", "h"));
        c.clear();
        assert!(c.is_empty());
    }

    #[tokio::test]
    async fn pool_runs_jobs_on_at_most_verify_threads_named_threads_and_survives_a_panic() {
        let mut names = HashSet::new();
        for _ in 0..20 {
            let name = POOL
                .run(|| std::thread::current().name().unwrap_or("").to_string())
                .await
                .unwrap();
            names.insert(name);
        }
        assert!(names.len() <= verify_threads(), "{names:?}");
        assert!((MIN_VERIFY_THREADS..=MAX_VERIFY_THREADS).contains(&verify_threads()));
        assert!(
            names.iter().all(|n| n.starts_with("password-check-")),
            "{names:?}"
        );
        assert_eq!(POOL.run(|| -> u8 { panic!("boom") }).await, None);
        assert_eq!(POOL.run(|| 7).await, Some(7), "still running after a panic");
    }
}
