//! virtio devices on real KVM with the built-in test guest: a VM with a
//! copy-on-write disk boots (ioeventfds and irqfds accepted by KVM), pauses
//! into a snapshot that carries the disk's overlay and map, and restores
//! from it eagerly and lazily, in this process and in a fresh one, with its
//! workload finishing with the model's checksum. Bad disk input in a
//! snapshot is a clear, specific error (corrupted overlay data and the
//! snapshot's immutability: tests/disk_integrity.rs). (The guest's own use of the devices needs
//! Linux: see the manual nested-emulation run in the issue report.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stasis::guest::{self, Workload};
use stasis::vmm::virtio::cow::{self, CowDisk};
use stasis::vmm::virtio::{DeviceKind, SNAPSHOT_OVERLAY};
use stasis::vmm::{Console, DiskConfig, Kernel, RestoreMode, RestorePaths, Vm, VmConfig};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");

fn workload() -> Workload {
    Workload {
        mib: 8,
        rounds: 60,
        seed: 7,
        report: 0,
        base_mib: 16,
    }
}

/// The caller-given paths of a restore with a disk over `base`.
fn with_base(base: &Path) -> RestorePaths<'_> {
    RestorePaths {
        disk_base: Some(base),
        vsock: None,
        ..Default::default()
    }
}

/// A 1 MiB base image and an overlay holding "stasis" at 64 KiB.
fn disk(dir: &Path) -> DiskConfig {
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let overlay = dir.join("overlay");
    let mut d = CowDisk::open(&base, &overlay).unwrap();
    d.write_at(64 * 1024, b"stasis").unwrap();
    drop(d);
    DiskConfig {
        base,
        overlay: Some(overlay),
    }
}

fn boot(dir: &Path) -> Vm {
    let w = workload();
    Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: w.cmdline(),
        mem_bytes: 64 << 20,
        console: Console::Sink,
        disk: Some(disk(dir)),
        ..VmConfig::default()
    })
    .expect("boot with a disk")
}

fn pause_into(vm: &mut Vm, snap: &Path) {
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round >= 2)
    });
    assert!(
        vm.exited().is_none(),
        "guest ended early: {:?}",
        vm.exited()
    );
    vm.pause().unwrap();
    vm.snapshot(snap).unwrap();
}

fn read_saved(snap: &Path, base: &Path) -> Vec<u8> {
    let d = CowDisk::open(base, &snap.join(SNAPSHOT_OVERLAY)).unwrap();
    let mut b = vec![0u8; 8];
    d.read_at(64 * 1024 - 1, &mut b).unwrap();
    b
}

fn expect_checksum(vm: &Vm) {
    let r = vm.wait(Some(Duration::from_secs(300))).expect("guest ends");
    assert!(r.is_clean(), "{r}");
    let st = vm.guest_status().expect("status page");
    assert_eq!(st.checksum, guest::reference(&workload()).checksum);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn disk_travels_with_the_snapshot_and_restores_eager_and_lazy() {
    if !common::kvm_or_skip("disk_travels_with_the_snapshot_and_restores_eager_and_lazy") {
        return;
    }
    let dir = common::scratch("virtio-snap");
    let snap = dir.join("snap");
    let mut vm = boot(&dir);
    pause_into(&mut vm, &snap);
    let base = dir.join("base.img");
    // The snapshot holds the overlay and its map; the disk reads as before.
    assert!(snap.join(SNAPSHOT_OVERLAY).is_file());
    assert!(cow::map_path(&snap.join(SNAPSHOT_OVERLAY)).is_file());
    assert_eq!(read_saved(&snap, &base), b"\x11stasis\x11");
    let (st, _) = stasis::vmm::persist::inspect(&snap).unwrap();
    assert_eq!(st.virtio.devices.len(), 1);
    assert!(
        matches!(&st.virtio.devices[0].kind, DeviceKind::Block { size, .. } if *size == 1 << 20)
    );
    // The paused VM can run on after its snapshot.
    vm.resume().unwrap();
    expect_checksum(&vm);
    drop(vm);

    for (mode, name) in [(RestoreMode::Eager, "eager"), (RestoreMode::Lazy, "lazy")] {
        let copy = dir.join(name);
        copy_dir(&snap, &copy);
        let (vm, _) =
            Vm::restore_with(&copy, mode, Console::Sink, None, with_base(&base)).expect(name);
        let d = vm.config().disk.clone().expect("restored disk config");
        assert_eq!(
            d.overlay.as_deref(),
            Some(copy.join(SNAPSHOT_OVERLAY).as_path())
        );
        expect_checksum(&vm);
        drop(vm);
        assert_eq!(read_saved(&copy, &base), b"\x11stasis\x11", "{name}");
    }

    // A fresh process, pausing again into a second snapshot (the overlay
    // moves along) that restores once more.
    let snap2 = dir.join("snap2");
    let copy = dir.join("fresh");
    copy_dir(&snap, &copy);
    let out = Command::new(BIN)
        .args(["resume", "--eager", "--disk"])
        .arg(&base)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stasis resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut vm, _) = Vm::restore_with(
        &snap,
        RestoreMode::Lazy,
        Console::Sink,
        None,
        with_base(&base),
    )
    .unwrap();
    vm.pause().unwrap();
    vm.snapshot(&snap2).unwrap();
    drop(vm);
    std::fs::remove_dir_all(&snap).unwrap();
    assert_eq!(read_saved(&snap2, &base), b"\x11stasis\x11");
    let (vm, _) = Vm::restore_with(
        &snap2,
        RestoreMode::Lazy,
        Console::Sink,
        None,
        with_base(&base),
    )
    .unwrap();
    expect_checksum(&vm);
}

#[test]
fn bad_disk_input_is_a_clear_error() {
    if !common::kvm_or_skip("bad_disk_input_is_a_clear_error") {
        return;
    }
    let dir = common::scratch("virtio-bad");
    // Boot: a base image that does not exist.
    let e = Vm::boot(VmConfig {
        disk: Some(DiskConfig {
            base: dir.join("missing.img"),
            overlay: None,
        }),
        ..VmConfig::default()
    })
    .err()
    .expect("boot must fail")
    .to_string();
    assert!(e.contains("missing.img"), "{e}");

    let snap = dir.join("snap");
    let mut vm = boot(&dir);
    pause_into(&mut vm, &snap);
    drop(vm);
    let base = dir.join("base.img");
    let restore_err = |p: &Path| -> String {
        match Vm::restore_with(p, RestoreMode::Eager, Console::Sink, None, with_base(&base)) {
            Ok(_) => panic!("restore of {} must fail", p.display()),
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    s.push_str(": ");
                    s.push_str(&c.to_string());
                    src = c.source();
                }
                s
            }
        }
    };
    // A corrupted map.
    let c1 = dir.join("corrupt");
    copy_dir(&snap, &c1);
    let map: PathBuf = cow::map_path(&c1.join(SNAPSHOT_OVERLAY));
    let mut b = std::fs::read(&map).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    std::fs::write(&map, b).unwrap();
    let e = restore_err(&c1);
    let want = format!(
        "disk allocation map {} is invalid: checksum mismatch",
        map.display()
    );
    assert!(e.contains(&want), "{e}");
    // A missing overlay.
    let c2 = dir.join("no-overlay");
    copy_dir(&snap, &c2);
    std::fs::remove_file(c2.join(SNAPSHOT_OVERLAY)).unwrap();
    let e = restore_err(&c2);
    assert!(
        e.contains(&format!(
            "opening overlay {}",
            c2.join(SNAPSHOT_OVERLAY).display()
        )),
        "{e}"
    );
    // A base image that changed size.
    std::fs::write(dir.join("base.img"), vec![0u8; 4096]).unwrap();
    let e = restore_err(&snap);
    assert!(
        e.contains("is 1048576 bytes, but its base image is 4096"),
        "{e}"
    );
}
