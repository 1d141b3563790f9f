//! Snapshots are untrusted input (issue 14, item 4), on real KVM with the
//! built-in test guest: a crafted `state.bin` (checksum recomputed) whose
//! recorded disk base and vsock socket point at victim files outside the
//! snapshot makes no restore (library, `stasis resume`) or `snapshot info`
//! open, use or delete them — the paths come from the caller; a sparse
//! 200 GiB `state.bin` is a clear error, not an out-of-memory abort.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stasis::error_chain as chain;
use stasis::guest::Workload;
use stasis::snapshot::format;
use stasis::vmm::virtio::cow::CowDisk;
use stasis::vmm::virtio::DeviceKind;
use stasis::vmm::{Console, DiskConfig, Kernel, RestoreMode, RestorePaths, Vm, VmConfig, VmState};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");

/// A paused test-guest VM with a disk and a vsock device, snapshotted into
/// `dir/snap`; returns (snapshot, base image).
fn snapshot_with_devices(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let overlay = dir.join("overlay");
    let mut d = CowDisk::open(&base, &overlay).unwrap();
    d.write_at(4096, b"stasis").unwrap();
    drop(d);
    let w = Workload {
        mib: 8,
        rounds: 1_000_000,
        seed: 3,
        report: 0,
        base_mib: 16,
    };
    let mut vm = Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: w.cmdline(),
        mem_bytes: 64 << 20,
        console: Console::Sink,
        disk: Some(DiskConfig {
            base: base.clone(),
            overlay: Some(overlay),
        }),
        vsock: Some(dir.join("boot.sock")),
        ..VmConfig::default()
    })
    .expect("boot with a disk and vsock");
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round >= 1)
    });
    assert!(vm.exited().is_none(), "guest ended: {:?}", vm.exited());
    vm.pause().unwrap();
    let snap = dir.join("snap");
    vm.snapshot(&snap).unwrap();
    drop(vm);
    (snap, base)
}

/// Rewrites `snap/state.bin` with the disk base and vsock socket pointing
/// at the victims, checksum recomputed.
fn craft(snap: &Path, victim_base: &Path, victim_sock: &Path) {
    let p = snap.join("state.bin");
    let mut st: VmState = format::decode(&std::fs::read(&p).unwrap()).unwrap();
    let mut seen = (false, false);
    for d in &mut st.virtio.devices {
        match &mut d.kind {
            DeviceKind::Block { base, .. } => {
                *base = victim_base.to_owned();
                seen.0 = true;
            }
            DeviceKind::Vsock { uds, .. } => {
                *uds = victim_sock.to_owned();
                seen.1 = true;
            }
            // No path to point anywhere: the tap is the caller's.
            DeviceKind::Net { .. } => {}
        }
    }
    assert_eq!(seen, (true, true), "the snapshot has both devices");
    std::fs::write(&p, format::encode(&st).unwrap()).unwrap();
}

struct Victim {
    path: PathBuf,
    content: Vec<u8>,
    mtime: std::time::SystemTime,
}

impl Victim {
    fn new(path: PathBuf, content: &[u8]) -> Victim {
        std::fs::write(&path, content).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        Victim {
            path,
            content: content.to_vec(),
            mtime,
        }
    }

    fn assert_untouched(&self, when: &str) {
        let m = std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("{when}: victim {} is gone: {e}", self.path.display()));
        assert!(m.is_file(), "{when}: victim replaced");
        assert_eq!(m.modified().unwrap(), self.mtime, "{when}: victim modified");
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            self.content,
            "{when}: victim content changed"
        );
    }
}

#[test]
fn crafted_paths_in_state_are_never_used() {
    if !common::kvm_or_skip("crafted_paths_in_state_are_never_used") {
        return;
    }
    let dir = common::scratch("crafted-paths");
    let (snap, base) = snapshot_with_devices(&dir);
    // Victims outside the snapshot; the base victim has another size, so
    // a restore that used it as the disk would fail its size check.
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let vbase = Victim::new(outside.join("secret-disk"), &[0x5a; 8192]);
    let vsock = Victim::new(outside.join("precious"), b"do not delete me");
    craft(&snap, &vbase.path, &vsock.path);

    // No paths given: clear errors, nothing touched.
    match Vm::restore(&snap, RestoreMode::Eager, Console::Sink, None) {
        Ok(_) => panic!("restore without a disk base must fail"),
        Err(e) => {
            let e = chain(&e);
            assert!(e.contains("its base image must be given"), "{e}");
            assert!(e.contains("which is not used"), "{e}");
        }
    }
    let only_disk = RestorePaths {
        disk_base: Some(&base),
        vsock: None,
        ..Default::default()
    };
    match Vm::restore_with(&snap, RestoreMode::Eager, Console::Sink, None, only_disk) {
        Ok(_) => panic!("restore without a vsock path must fail"),
        Err(e) => {
            let e = chain(&e);
            assert!(e.contains("host socket path must be given"), "{e}");
        }
    }
    vbase.assert_untouched("restore without paths");
    vsock.assert_untouched("restore without paths");

    // The caller's paths: the VM runs on them; the victims are untouched.
    let sock = dir.join("given.sock");
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let copy = dir.join(format!("copy-{mode:?}"));
        copy_dir(&snap, &copy);
        let paths = RestorePaths {
            disk_base: Some(&base),
            vsock: Some(&sock),
            ..Default::default()
        };
        let (vm, _) = Vm::restore_with(&copy, mode, Console::Sink, None, paths)
            .unwrap_or_else(|e| panic!("{mode:?}: {}", chain(&e)));
        let cfg = vm.config();
        assert_eq!(
            cfg.disk.as_ref().map(|d| d.base.as_path()),
            Some(base.as_path())
        );
        assert_eq!(cfg.vsock.as_deref(), Some(sock.as_path()));
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
        drop(vm);
        vbase.assert_untouched("restore with the caller's paths");
        vsock.assert_untouched("restore with the caller's paths");
    }

    // `stasis resume` without --disk: a clear error, nothing touched.
    let out = Command::new(BIN)
        .args(["resume", "--eager"])
        .arg(&snap)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("its base image must be given"), "{err}");
    // With --disk but no --vsock: refused before the victim socket path
    // could be bound (the muxer would delete what is there).
    let out = Command::new(BIN)
        .args(["resume", "--eager", "--disk"])
        .arg(&base)
        .arg(&snap)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("host socket path must be given"), "{err}");
    vbase.assert_untouched("stasis resume");
    vsock.assert_untouched("stasis resume");

    // `snapshot info` shows the recorded base without opening it.
    let out = Command::new(BIN)
        .args(["snapshot", "info"])
        .arg(&snap)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("checksums OK"), "{text}");
    assert!(text.contains("not opened"), "{text}");
    vbase.assert_untouched("snapshot info");
    vsock.assert_untouched("snapshot info");
}

#[test]
fn huge_sparse_state_is_a_clear_error() {
    if !common::kvm_or_skip("huge_sparse_state_is_a_clear_error") {
        return;
    }
    let dir = common::scratch("crafted-huge");
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    std::fs::write(snap.join("memory.bin"), b"").unwrap();
    // A valid header whose body length matches a sparse 200 GiB file.
    let total: u64 = 200 << 30;
    let mut head = Vec::new();
    head.extend_from_slice(&format::MAGIC);
    head.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&(total - (format::HEADER_LEN + format::CRC_LEN) as u64).to_le_bytes());
    let state = snap.join("state.bin");
    std::fs::write(&state, &head).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(total)
        .unwrap();
    let want = format!("more than the {}-byte limit", format::MAX_STATE_LEN);

    match Vm::restore(&snap, RestoreMode::Lazy, Console::Sink, None) {
        Ok(_) => panic!("restore of a 200 GiB state must fail"),
        Err(e) => {
            let e = chain(&e);
            assert!(e.contains(&want), "{e}");
        }
    }
    let out = Command::new(BIN)
        .args(["snapshot", "info"])
        .arg(&snap)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&want), "{err}");
    // Failed cleanly (an error exit), not killed by a signal (OOM abort).
    assert_eq!(out.status.code(), Some(1), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
