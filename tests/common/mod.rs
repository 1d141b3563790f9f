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

/// A fresh scratch directory under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
