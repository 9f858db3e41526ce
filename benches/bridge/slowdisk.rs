//! The slow disk of the slow-disk row: an `LD_PRELOAD` shim (`slowsync.c`) that makes every fsync,
//! fdatasync and sync_file_range of one process take 10 ms more. It is compiled here with `cc` into
//! `target/bench-slowsync/` at run time and preloaded into the mqtt-uplink child process of that row
//! only (the appliance runs as a child of the benchmark, never in-process). The shim counts the syncs
//! it delayed in a shared 8-byte file, which tells that it took effect.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};

/// Extra time of every sync.
pub const DELAY_US: u64 = 10_000;
/// The `"disk"` of the rows measured with the shim.
pub const NAME: &str = "slow-10ms";

const SOURCE: &str = include_str!("slowsync.c");

/// Builds the shim once per run; its path.
pub fn shim() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn build() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-slowsync");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("slowsync.c");
    std::fs::write(&src, SOURCE)?;
    let lib = dir.join("libslowsync.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .context("running cc (the slow-disk row needs a C compiler)")?;
    if !out.status.success() {
        bail!(
            "cc failed to build the slow-disk shim: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(lib)
}

/// The shim as applied to one process: the library and the counter file it increments.
pub struct SlowDisk {
    pub lib: PathBuf,
    pub counter: PathBuf,
}

impl SlowDisk {
    /// A fresh counter (on tmpfs when there is one: dirtying its page must not count as the edge's
    /// disk writes) next to the shim built for this run.
    pub fn new(tag: &str, fallback_dir: &Path) -> anyhow::Result<SlowDisk> {
        let lib = shim()?;
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { shm } else { fallback_dir };
        let counter = dir.join(format!("mqtt-uplink-bench-{}-{tag}.syncs", std::process::id()));
        std::fs::write(&counter, 0u64.to_le_bytes())?;
        Ok(SlowDisk { lib, counter })
    }

    /// The environment that applies the shim to a child process.
    pub fn env(&self) -> [(&'static str, String); 3] {
        [
            ("LD_PRELOAD", self.lib.display().to_string()),
            ("SLOWSYNC_COUNTER", self.counter.display().to_string()),
            ("SLOWSYNC_DELAY_US", DELAY_US.to_string()),
        ]
    }

    /// Syncs delayed so far.
    pub fn syncs(&self) -> u64 {
        std::fs::read(&self.counter)
            .ok()
            .and_then(|b| b.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap())))
            .unwrap_or(0)
    }

    /// Whether `pid` has the shim mapped.
    pub fn loaded_in(&self, pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .is_ok_and(|m| m.contains(&*self.lib.to_string_lossy()))
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.counter);
    }
}
