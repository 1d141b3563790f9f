//! Every call the worker makes into a VM lives here, behind [`VmBackend`].
//!
//! Two implementations:
//! - [`FakeVm`]: a thread that counts "rounds" like the built-in test guest's
//!   endless workload; pause writes the counter into the snapshot directory
//!   (atomically: a temporary directory renamed into place) and restore reads
//!   it back and continues. It lets the server, the worker and the SDK path be
//!   tested without KVM.
//! - `RealVm`: calls `stasis::vmm::Vm`; its VM runs on this worker's own
//!   vCPU threads, never on the server's async runtime.
//!
//! The fake understands two extra kernel-command-line words, for tests:
//! `stasis.fake.pause_ms=N` (pause takes N ms) and `stasis.fake.fail=boot`
//! (boot fails).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::protocol::{BackendKind, BootConfig, ConsoleSpec, GuestProgress, RestoreModeSpec};
use super::Error;

/// A running VM as the worker sees it.
pub(crate) trait VmBackend: Send {
    /// Stops the vCPUs and writes a snapshot to `dir` (which must not exist;
    /// it appears atomically). On error the VM is running again.
    fn pause_and_snapshot(&mut self, dir: &Path) -> Result<Option<GuestProgress>, Error>;
    /// `Some(reason)` once the guest stopped on its own.
    fn exited(&self) -> Option<String>;
    /// Test-guest progress, if the guest reports any.
    fn guest(&self) -> Option<GuestProgress>;
    /// Kills the VM.
    fn kill(self: Box<Self>);
}

/// Boots a VM with the chosen backend.
pub(crate) fn boot(backend: BackendKind, cfg: &BootConfig) -> Result<Box<dyn VmBackend>, Error> {
    match backend {
        BackendKind::Fake => Ok(Box::new(FakeVm::boot(cfg)?)),
        BackendKind::Vm => real::boot(cfg),
    }
}

/// Restores a VM from `dir` with the chosen backend.
pub(crate) fn restore(
    backend: BackendKind,
    dir: &Path,
    mode: RestoreModeSpec,
    console: &ConsoleSpec,
) -> Result<Box<dyn VmBackend>, Error> {
    match backend {
        BackendKind::Fake => Ok(Box::new(FakeVm::restore(dir)?)),
        BackendKind::Vm => real::restore(dir, mode, console),
    }
}

/// Total size of the regular files under `dir` (the snapshot's footprint).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

const FAKE_STATE_FILE: &str = "fake-vm.json";
/// How long the fake guest takes for one round.
const FAKE_ROUND: Duration = Duration::from_millis(2);

#[derive(Serialize, Deserialize)]
struct FakeState {
    round: u64,
    acc: u64,
    cmdline: String,
}

struct FakeShared {
    round: AtomicU64,
    acc: AtomicU64,
    stop: AtomicBool,
}

/// The fake VM: one thread advancing a counter.
pub(crate) struct FakeVm {
    shared: Arc<FakeShared>,
    thread: Option<JoinHandle<()>>,
    cmdline: String,
    pause_delay: Duration,
}

fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl FakeVm {
    fn boot(cfg: &BootConfig) -> Result<Self, Error> {
        if cmdline_value(&cfg.cmdline, "stasis.fake.fail") == Some("boot") {
            return Err(Error::Vm("fake boot failure requested by cmdline".into()));
        }
        let seed = cmdline_value(&cfg.cmdline, "stasis.seed")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(Self::start(0, seed, cfg.cmdline.clone()))
    }

    fn restore(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(FAKE_STATE_FILE);
        let bytes =
            fs::read(&path).map_err(|e| Error::Io(format!("read {}", path.display()), e))?;
        let st: FakeState = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Vm(format!("corrupt fake snapshot {}: {e}", path.display())))?;
        Ok(Self::start(st.round, st.acc, st.cmdline))
    }

    fn start(round: u64, acc: u64, cmdline: String) -> Self {
        let shared = Arc::new(FakeShared {
            round: AtomicU64::new(round),
            acc: AtomicU64::new(acc),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                let r = s.round.load(Ordering::Relaxed) + 1;
                let a = s
                    .acc
                    .load(Ordering::Relaxed)
                    .wrapping_mul(31)
                    .wrapping_add(r);
                s.acc.store(a, Ordering::Relaxed);
                s.round.store(r, Ordering::Release);
                // The fake guest's speed, not synchronisation.
                std::thread::sleep(FAKE_ROUND);
            }
        });
        let pause_delay = Duration::from_millis(
            cmdline_value(&cmdline, "stasis.fake.pause_ms")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        );
        FakeVm {
            shared,
            thread: Some(thread),
            cmdline,
            pause_delay,
        }
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn write_snapshot(&self, dir: &Path) -> Result<(), Error> {
        let st = FakeState {
            round: self.shared.round.load(Ordering::Acquire),
            acc: self.shared.acc.load(Ordering::Acquire),
            cmdline: self.cmdline.clone(),
        };
        let mut tmp = dir.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e| Error::Io(what, e)
        };
        if dir.exists() {
            return Err(Error::Vm(format!(
                "snapshot dir {} already exists",
                dir.display()
            )));
        }
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        let body = serde_json::to_vec(&st).map_err(|e| Error::Vm(e.to_string()))?;
        let file = tmp.join(FAKE_STATE_FILE);
        fs::write(&file, body).map_err(io("write", &file))?;
        fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", &file))?;
        fs::rename(&tmp, dir).map_err(io("rename", dir))?;
        if let Some(parent) = dir.parent() {
            let _ = fs::File::open(parent).and_then(|f| f.sync_all());
        }
        Ok(())
    }
}

impl VmBackend for FakeVm {
    fn pause_and_snapshot(&mut self, dir: &Path) -> Result<Option<GuestProgress>, Error> {
        self.stop_thread();
        if !self.pause_delay.is_zero() {
            // Simulates a slow snapshot, for concurrency tests.
            std::thread::sleep(self.pause_delay);
        }
        let guest = self.guest();
        match self.write_snapshot(dir) {
            Ok(()) => Ok(guest),
            Err(e) => {
                // Keep running, as the real VM resumes on a failed snapshot.
                let round = self.shared.round.load(Ordering::Acquire);
                let acc = self.shared.acc.load(Ordering::Acquire);
                let again = FakeVm::start(round, acc, self.cmdline.clone());
                *self = again;
                Err(e)
            }
        }
    }

    fn exited(&self) -> Option<String> {
        match &self.thread {
            Some(t) if t.is_finished() => Some("fake guest thread ended".into()),
            _ => None,
        }
    }

    fn guest(&self) -> Option<GuestProgress> {
        Some(GuestProgress {
            round: self.shared.round.load(Ordering::Acquire),
            acc: self.shared.acc.load(Ordering::Acquire),
        })
    }

    fn kill(mut self: Box<Self>) {
        self.stop_thread();
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The real VMM.
mod real {
    use std::path::Path;

    use super::{Error, GuestProgress, VmBackend};
    use crate::vmm;
    use crate::worker::protocol::{BootConfig, ConsoleSpec, KernelSpec, RestoreModeSpec};

    struct RealVm {
        vm: vmm::Vm,
    }

    fn console(c: &ConsoleSpec) -> vmm::Console {
        match c {
            ConsoleSpec::Sink => vmm::Console::Sink,
            ConsoleSpec::Stdout => vmm::Console::Stdout,
            ConsoleSpec::File(p) => vmm::Console::File(p.clone()),
        }
    }

    pub(super) fn boot(cfg: &BootConfig) -> Result<Box<dyn VmBackend>, Error> {
        let vm_cfg = vmm::VmConfig {
            kernel: match &cfg.kernel {
                KernelSpec::TestGuest => vmm::Kernel::TestGuest,
                KernelSpec::Path(p) => vmm::Kernel::Path(p.clone()),
            },
            initrd: cfg.initrd.clone(),
            cmdline: cfg.cmdline.clone(),
            mem_bytes: cfg.mem_bytes,
            vcpus: cfg.vcpus,
            console: console(&cfg.console),
            disk: None,
            vsock: None,
        };
        let vm = vmm::Vm::boot(vm_cfg).map_err(|e| Error::Vm(e.to_string()))?;
        Ok(Box::new(RealVm { vm }))
    }

    pub(super) fn restore(
        dir: &Path,
        mode: RestoreModeSpec,
        c: &ConsoleSpec,
    ) -> Result<Box<dyn VmBackend>, Error> {
        let mode = match mode {
            RestoreModeSpec::Eager => vmm::RestoreMode::Eager,
            RestoreModeSpec::Lazy => vmm::RestoreMode::Lazy,
        };
        let (vm, _) =
            vmm::Vm::restore(dir, mode, console(c), None).map_err(|e| Error::Vm(e.to_string()))?;
        Ok(Box::new(RealVm { vm }))
    }

    impl VmBackend for RealVm {
        fn pause_and_snapshot(&mut self, dir: &Path) -> Result<Option<GuestProgress>, Error> {
            self.vm
                .pause()
                .map_err(|e| Error::Vm(format!("pause: {e}")))?;
            let guest = self.guest();
            if let Err(e) = self.vm.snapshot(dir) {
                let resumed = self.vm.resume();
                return Err(Error::Vm(match resumed {
                    Ok(()) => format!("snapshot: {e}"),
                    Err(r) => format!("snapshot: {e}; resume after it failed too: {r}"),
                }));
            }
            Ok(guest)
        }

        fn exited(&self) -> Option<String> {
            self.vm.exited().map(|r| r.to_string())
        }

        fn guest(&self) -> Option<GuestProgress> {
            self.vm.guest_status().map(|g| GuestProgress {
                round: g.round,
                acc: g.acc,
            })
        }

        fn kill(self: Box<Self>) {
            self.vm.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::protocol::KernelSpec;
    use std::time::Instant;

    fn cfg(cmdline: &str) -> BootConfig {
        BootConfig {
            kernel: KernelSpec::TestGuest,
            initrd: None,
            cmdline: cmdline.into(),
            mem_bytes: 64 << 20,
            vcpus: 1,
            console: ConsoleSpec::Sink,
        }
    }

    fn wait_round_above(vm: &dyn VmBackend, min: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = vm.guest().unwrap().round;
            if r > min {
                return r;
            }
            assert!(Instant::now() < deadline, "fake guest stuck at {r}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn fake_pause_restore_continues() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        let mut vm = boot(BackendKind::Fake, &cfg("stasis.seed=5")).unwrap();
        wait_round_above(vm.as_ref(), 3);
        let at_pause = vm.pause_and_snapshot(&dir).unwrap().unwrap();
        vm.kill();
        assert!(dir.join(FAKE_STATE_FILE).exists());
        assert!(dir_bytes(&dir) > 0);
        let vm2 = restore(
            BackendKind::Fake,
            &dir,
            RestoreModeSpec::Lazy,
            &ConsoleSpec::Sink,
        )
        .unwrap();
        assert!(vm2.guest().unwrap().round >= at_pause.round);
        wait_round_above(vm2.as_ref(), at_pause.round);
        assert!(vm2.exited().is_none());
        vm2.kill();
    }

    #[test]
    fn fake_snapshot_into_existing_dir_fails_and_keeps_running() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = boot(BackendKind::Fake, &cfg("")).unwrap();
        let err = vm.pause_and_snapshot(tmp.path());
        assert!(err.is_err());
        let r = vm.guest().unwrap().round;
        wait_round_above(vm.as_ref(), r);
        vm.kill();
    }

    #[test]
    fn fake_boot_failure_and_missing_snapshot() {
        assert!(boot(BackendKind::Fake, &cfg("stasis.fake.fail=boot")).is_err());
        let tmp = tempfile::tempdir().unwrap();
        assert!(restore(
            BackendKind::Fake,
            &tmp.path().join("none"),
            RestoreModeSpec::Eager,
            &ConsoleSpec::Sink
        )
        .is_err());
    }

    #[test]
    fn cmdline_values() {
        assert_eq!(
            cmdline_value("a=1 stasis.seed=9 b", "stasis.seed"),
            Some("9")
        );
        assert_eq!(cmdline_value("stasis.seedx=9", "stasis.seed"), None);
    }
}
