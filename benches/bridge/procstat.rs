//! What the edge processes cost, read from /proc: resident memory, CPU time (per process and summed
//! per thread from schedstat for sub-tick precision), context switches (wake-ups), bytes written to
//! disk.

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn status_field(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident set size in KiB, summed over `pids`.
pub fn rss_kb(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_field(*p, "VmRSS:")).sum()
}

/// Peak resident set size (VmHWM, the kernel's high-water mark over the process's life) in KiB, summed
/// over `pids`.
pub fn hwm_kb(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_field(*p, "VmHWM:")).sum()
}

/// `write_bytes` of `/proc/PID/io`, summed over `pids`: the bytes these processes caused to be sent to
/// the storage layer (counted when a page is dirtied, so a 4 KiB page rewritten after each sync counts
/// 4 KiB each time; the filesystem's journal, written by the kernel, is not included).
pub fn write_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            fs::read_to_string(format!("/proc/{p}/io"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("write_bytes:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0)
        })
        .sum()
}

fn clk_tck() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// User + system CPU time in microseconds (whole process, including exited threads), summed.
pub fn cpu_us(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                return 0;
            };
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return 0;
            };
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields after the command: state(0) ppid(1) ... utime(11) stime(12).
            let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            ticks * 1_000_000 / clk_tck()
        })
        .sum()
}

fn tasks(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// On-CPU nanoseconds summed over the live threads of `pids` (schedstat: exact, not tick-based).
pub fn sched_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .flat_map(|p| tasks(*p))
        .filter_map(|t| fs::read_to_string(format!("{t}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Voluntary + involuntary context switches summed over the live threads of `pids`.
pub fn ctxt_switches(pids: &[u32]) -> u64 {
    pids.iter()
        .flat_map(|p| tasks(*p))
        .filter_map(|t| fs::read_to_string(format!("{t}/status")).ok())
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
                .sum::<u64>()
        })
        .sum()
}

/// Samples the summed RSS of `pids` every 20 ms on a thread and keeps the peak.
pub struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    pub fn start(pids: Vec<u32>) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kb(&pids)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 10 minutes of sampling.
            for _ in 0..30_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                p.fetch_max(rss_kb(&pids), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PeakRss {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// The 1-minute load average.
pub fn loadavg1() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// This process's open-file limit (RLIMIT_NOFILE, soft), from `/proc/self/limits`; the edges it
/// starts inherit it.
pub fn nofile_limit() -> Option<u64> {
    fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}
