//! Shared helpers for the KVM tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Whether KVM tests can run here. If not, they fail loudly — unless
/// STASIS_ALLOW_SKIP=1, in which case they print a SKIPPED banner (a skip
/// is never reported as a pass by our CI script, which doesn't set it).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            let msg = format!("{test}: /dev/kvm is not usable ({e})");
            if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
                eprintln!("\n*** SKIPPED (not passed): {msg} ***\n");
                false
            } else {
                panic!("{msg}; set STASIS_ALLOW_SKIP=1 to skip KVM tests explicitly");
            }
        }
    }
}

/// A fresh scratch directory under the target dir, `NAME-PID`. It stays
/// after the test for inspection; the next run that asks for `NAME` removes
/// the ones whose process is gone, so leftovers never pile up.
pub fn scratch(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    sweep_stale(root, name);
    let d = root.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes `root/NAME-PID` directories whose PID is no longer running.
pub fn sweep_stale(root: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(name))
            .and_then(|f| f.strip_prefix('-'))
            .and_then(|f| f.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
