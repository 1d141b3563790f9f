//! Per-sandbox metrics and logs, in the shapes novita-sandbox 2.1.1 parses.
//!
//! A sampler task wakes every [`interval`] (`STASIS_METRICS_INTERVAL_MS`,
//! default 5000) and, for each running sandbox, reads host-side facts:
//! - **CPU**: user+system time of the sandbox's worker process and all its
//!   descendants (`/proc/<pid>/stat`; a VM's vCPU threads are the worker's
//!   threads, the fake backend's agent and its processes are its
//!   descendants) since the last sample, as a percentage of the sandbox's
//!   vCPUs over the elapsed time (0–100);
//! - **memory**: resident memory of that process tree (`memUsed`), against
//!   the template's memory (`memTotal`);
//! - **disk**: bytes allocated by the sandbox's directory (its disk overlay,
//!   or the fake backend's files), against the template's disk size.
//!
//! Each sandbox keeps its last [`HISTORY`] samples while it lives (paused
//! sandboxes keep theirs; a killed one's go with it).
//!
//! The same task tails the sandbox's `console.log` (the guest's serial
//! console, or the fake backend's agent output): each new line is kept
//! (the last [`LOG_LINES`]) with the time stasis read it, in milliseconds,
//! made unique and increasing (a burst of lines gets consecutive
//! milliseconds) so that paging by timestamp neither repeats nor skips.
//!
//! Routes (in `routes.rs`): `GET /sandboxes/{id}/metrics?start=&end=`
//! (Unix seconds, inclusive), `GET /sandboxes/metrics?sandbox_ids=a,b`
//! (each sandbox's latest sample), `GET /sandboxes/{id}/logs?start=&limit=`
//! (`start` in Unix ms, default limit 1000) and
//! `GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=`.
//! Paging past the end is an empty page; an unknown or killed sandbox is
//! a 404.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::manager::now_ms;
use super::models::rfc3339;

/// Samples kept per sandbox (an hour at the default interval).
pub const HISTORY: usize = 720;
/// Console lines kept per sandbox.
pub const LOG_LINES: usize = 10_000;
/// Longest console line kept (longer ones are cut).
const MAX_LINE: usize = 8192;
/// Most console bytes read per sandbox per tick.
const MAX_READ: u64 = 4 << 20;
/// Most directory entries walked to size a sandbox's disk.
const MAX_WALK: usize = 100_000;

/// The sampling interval: `STASIS_METRICS_INTERVAL_MS`, default 5 s.
pub fn interval() -> Duration {
    std::env::var("STASIS_METRICS_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms >= 10)
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(5))
}

/// What the manager tells the sampler about a live sandbox.
#[derive(Debug, Clone)]
pub struct SandboxFacts {
    pub id: String,
    /// Running and not being paused/resumed.
    pub running: bool,
    pub worker_pid: Option<u32>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub dir: PathBuf,
}

/// SDK model `SandboxMetric`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_total: u64,
    pub mem_used: u64,
    pub disk_total: u64,
    pub disk_used: u64,
    pub timestamp: String,
    pub timestamp_unix: i64,
}

/// One console line.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub ms: i64,
    pub line: String,
}

#[derive(Default)]
struct PerSandbox {
    samples: VecDeque<Sample>,
    /// CPU ticks of the tree and when they were read.
    last_cpu: Option<(u64, Instant)>,
    logs: VecDeque<LogLine>,
    log_offset: u64,
    partial: Vec<u8>,
    last_ms: i64,
}

/// Metrics and logs of every sandbox.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<HashMap<String, PerSandbox>>,
}

/// `(pid, ppid, utime+stime ticks, rss pages)` of every process.
fn all_procs() -> Vec<(u32, u32, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces and parentheses).
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] = state (field 3), so field n is f[n - 3].
        let num = |n: usize| {
            f.get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.push((pid, num(4) as u32, num(14) + num(15), num(24)));
    }
    out
}

/// CPU ticks and resident bytes of `root` and its descendants.
fn tree_usage(procs: &[(u32, u32, u64, u64)], root: u32) -> (u64, u64) {
    let mut members = vec![root];
    let mut i = 0;
    while i < members.len() {
        let p = members[i];
        members.extend(procs.iter().filter(|x| x.1 == p).map(|x| x.0));
        i += 1;
    }
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    procs
        .iter()
        .filter(|x| members.contains(&x.0))
        .fold((0, 0), |(c, m), x| (c + x.2, m + x.3 * page))
}

/// Size of the filesystem holding `dir` (a sandbox without a disk of its
/// own: the fake backend's files live there).
fn fs_size(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) == 0 {
            st.f_blocks.saturating_mul(st.f_frsize)
        } else {
            0
        }
    }
}

/// Bytes allocated under `dir` (bounded walk; symlinks not followed).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            seen += 1;
            if seen > MAX_WALK {
                return total;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, PerSandbox>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One sampling pass over `facts` (blocking: reads /proc and files).
    pub fn sample(&self, facts: &[SandboxFacts]) {
        let procs = all_procs();
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|id, _| facts.iter().any(|f| &f.id == id));
        for f in facts {
            let st = map.entry(f.id.clone()).or_default();
            tail_console(st, &f.dir.join("console.log"));
            rotate_console(st, &f.dir.join("console.log"), MAX_CONSOLE_BYTES);
            if !f.running {
                st.last_cpu = None;
                continue;
            }
            let Some(pid) = f.worker_pid else { continue };
            let (ticks, rss) = tree_usage(&procs, pid);
            let cpus = f.cpu_count.max(1);
            let pct = match st.last_cpu {
                Some((t0, i0)) => {
                    let secs = now.duration_since(i0).as_secs_f64();
                    if secs > 0.0 {
                        let used = ticks.saturating_sub(t0) as f64 / hz;
                        (used / secs / f64::from(cpus) * 100.0).clamp(0.0, 100.0)
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            st.last_cpu = Some((ticks, now));
            let ms = now_ms();
            st.samples.push_back(Sample {
                cpu_count: cpus,
                cpu_used_pct: (pct * 100.0).round() / 100.0,
                mem_total: f.memory_mb << 20,
                mem_used: rss,
                disk_total: if f.disk_mb > 0 {
                    f.disk_mb << 20
                } else {
                    fs_size(&f.dir)
                },
                disk_used: allocated_bytes(&f.dir),
                timestamp: rfc3339(ms),
                timestamp_unix: ms / 1000,
            });
            while st.samples.len() > HISTORY {
                st.samples.pop_front();
            }
        }
    }

    /// Samples of `id` with `start <= timestampUnix <= end`.
    pub fn samples(&self, id: &str, start: Option<i64>, end: Option<i64>) -> Vec<Sample> {
        let map = self.lock();
        map.get(id)
            .map(|s| {
                s.samples
                    .iter()
                    .filter(|x| start.is_none_or(|a| x.timestamp_unix >= a))
                    .filter(|x| end.is_none_or(|b| x.timestamp_unix <= b))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The newest sample of `id`.
    pub fn latest(&self, id: &str) -> Option<Sample> {
        self.lock().get(id).and_then(|s| s.samples.back().cloned())
    }

    /// Console lines of `id`: from `cursor` (ms) forward, or up to it
    /// backward (newest first), at most `limit`, containing `search`.
    pub fn logs(
        &self,
        id: &str,
        cursor: Option<i64>,
        limit: usize,
        forward: bool,
        search: Option<&str>,
    ) -> Vec<LogLine> {
        let map = self.lock();
        let Some(s) = map.get(id) else {
            return Vec::new();
        };
        let ok = |l: &&LogLine| search.is_none_or(|q| l.line.contains(q));
        if forward {
            s.logs
                .iter()
                .filter(|l| cursor.is_none_or(|c| l.ms >= c))
                .filter(ok)
                .take(limit)
                .cloned()
                .collect()
        } else {
            s.logs
                .iter()
                .rev()
                .filter(|l| cursor.is_none_or(|c| l.ms <= c))
                .filter(ok)
                .take(limit)
                .cloned()
                .collect()
        }
    }
}

/// A console log is rotated once it reaches this size: it becomes
/// `console.log.1` (replacing the previous one) and starts over empty, so a
/// sandbox's console takes at most about twice this on disk, whatever its
/// guest prints (checked at each sampling tick).
pub const MAX_CONSOLE_BYTES: u64 = 1 << 20;

/// Rotates `path` (copy to `<path>.1`, then truncate: the worker appends
/// with `O_APPEND`, so its next write lands at the new start) once it has
/// reached `max` bytes and has been read to its end, or once it has grown
/// far past `max` (a guest printing faster than the tailer reads: its
/// unread lines are in `.1`).
fn rotate_console(st: &mut PerSandbox, path: &Path, max: u64) {
    let Ok(m) = std::fs::metadata(path) else {
        return;
    };
    let len = m.len();
    if len < max || (len != st.log_offset && len < 8 * max) {
        return;
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    if let Err(e) = std::fs::copy(path, &old) {
        tracing::warn!(file = %path.display(), "console log rotation failed: {e}");
        return;
    }
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => {
            if f.set_len(0).is_ok() {
                st.log_offset = 0;
                st.partial.clear();
            }
        }
        Err(e) => tracing::warn!(file = %path.display(), "console log rotation failed: {e}"),
    }
}

/// Reads what was appended to `path` since the last call.
fn tail_console(st: &mut PerSandbox, path: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < st.log_offset {
        // Truncated or rotated: start over.
        st.log_offset = 0;
        st.partial.clear();
    }
    if len == st.log_offset || f.seek(SeekFrom::Start(st.log_offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    let n = match f.take(MAX_READ).read_to_end(&mut buf) {
        Ok(n) => n,
        Err(_) => return,
    };
    st.log_offset += n as u64;
    st.partial.extend_from_slice(&buf);
    let now = now_ms();
    while let Some(i) = st.partial.iter().position(|&b| b == b'\n') {
        let raw: Vec<u8> = st.partial.drain(..=i).collect();
        let mut text = String::from_utf8_lossy(&raw[..raw.len() - 1]).into_owned();
        if text.ends_with('\r') {
            text.pop();
        }
        if text.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let ms = now.max(st.last_ms + 1);
        st.last_ms = ms;
        st.logs.push_back(LogLine { ms, line: text });
        while st.logs.len() > LOG_LINES {
            st.logs.pop_front();
        }
    }
    if st.partial.len() > MAX_LINE {
        // A very long line without its end yet: keep only its head.
        st.partial.truncate(MAX_LINE);
    }
}

/// Runs the sampler for the server's lifetime.
pub fn spawn_sampler(mgr: Arc<super::manager::Manager>, reg: Arc<Registry>) {
    let every = interval();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let facts = mgr.sandbox_facts();
            let reg = reg.clone();
            let _ = tokio::task::spawn_blocking(move || reg.sample(&facts)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn console_logs_are_capped_and_rotated() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        let reg = Registry::default();
        let facts = vec![SandboxFacts {
            id: "s".into(),
            running: false,
            worker_pid: None,
            cpu_count: 1,
            memory_mb: 64,
            disk_mb: 100,
            dir: d.path().to_path_buf(),
        }];
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let line = "x".repeat(1023);
        for round in 0..3u64 {
            // 1.5 MiB per round, through the worker's O_APPEND descriptor.
            for i in 0..1536 {
                writeln!(f, "{round}-{i} {line}").unwrap();
            }
            reg.sample(&facts);
            let len = std::fs::metadata(&log).unwrap().len();
            let old = std::fs::metadata(d.path().join("console.log.1"))
                .unwrap()
                .len();
            assert_eq!(len, 0, "round {round}: rotated after it was read");
            assert!((MAX_CONSOLE_BYTES..2 * MAX_CONSOLE_BYTES).contains(&old));
        }
        // The worker's next line lands at the start of the fresh file.
        writeln!(f, "after").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "after\n");
        reg.sample(&facts);
        let all = reg.logs("s", None, LOG_LINES, true, None);
        // Every line was read before its rotation.
        assert_eq!(all.len(), 3 * 1536 + 1);
        assert_eq!(all.last().unwrap().line, "after");
    }

    #[test]
    fn console_lines_page_without_repeats() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        std::fs::write(&log, "one\ntwo\r\nthr").unwrap();
        let reg = Registry::default();
        let facts = vec![SandboxFacts {
            id: "s".into(),
            running: false,
            worker_pid: None,
            cpu_count: 1,
            memory_mb: 64,
            disk_mb: 100,
            dir: d.path().to_path_buf(),
        }];
        reg.sample(&facts);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "ee").unwrap();
        for i in 0..50 {
            writeln!(f, "line {i}").unwrap();
        }
        reg.sample(&facts);
        let all = reg.logs("s", None, 1000, true, None);
        let lines: Vec<&str> = all.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(&lines[..4], ["one", "two", "three", "line 0"]);
        assert_eq!(lines.len(), 53);
        assert!(all.windows(2).all(|w| w[0].ms < w[1].ms));
        // Pages of 10 by cursor = last ms + 1 cover everything once.
        let mut got = Vec::new();
        let mut cursor = None;
        loop {
            let page = reg.logs("s", cursor, 10, true, None);
            if page.is_empty() {
                break;
            }
            cursor = Some(page.last().unwrap().ms + 1);
            got.extend(page.into_iter().map(|l| l.line));
        }
        assert_eq!(got, lines);
        let back = reg.logs("s", None, 2, false, None);
        assert_eq!(back[0].line, "line 49");
        assert_eq!(reg.logs("s", None, 100, true, Some("line 4")).len(), 11);
        // Truncation (rotation) starts over.
        std::fs::write(&log, "fresh\n").unwrap();
        reg.sample(&facts);
        assert_eq!(reg.logs("s", None, 1, false, None)[0].line, "fresh");
        // A sandbox that is gone loses its history.
        reg.sample(&[]);
        assert!(reg.logs("s", None, 10, true, None).is_empty());
    }

    #[test]
    fn a_busy_process_tree_shows_cpu_use() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("while :; do :; done")
            .spawn()
            .unwrap();
        let facts = vec![SandboxFacts {
            id: "busy".into(),
            running: true,
            worker_pid: Some(std::process::id()),
            cpu_count: 1,
            memory_mb: 64,
            disk_mb: 100,
            dir: d.path().to_path_buf(),
        }];
        let reg = Registry::default();
        reg.sample(&facts);
        // Poll until the child has used measurable CPU (bounded).
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            reg.sample(&facts);
            let last = reg.latest("busy").unwrap();
            if last.cpu_used_pct > 10.0 {
                assert!(last.mem_used > 0 && last.mem_total == 64 << 20);
                break;
            }
            assert!(Instant::now() < end, "no CPU use seen: {last:?}");
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(reg.samples("busy", None, None).len() >= 2);
        assert!(reg.samples("busy", Some(i64::MAX), None).is_empty());
    }
}
