//! Reusable snapshots on real KVM with the built-in test guest: a snapshot
//! in the store (`<data>/snapshots/<id>/` with its manifest) is resumed by
//! two fresh processes at the same time, each with its own disk overlay
//! forked from the snapshot's; both finish with the model's checksum and
//! the snapshot's files are byte-for-byte what they were.
//!
//! Random choices are seeded: `STASIS_TEST_SEED=<n>` replays a run; the
//! seed is always printed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use stasis::guest::{self, Workload};
use stasis::snapshot::manifest::{Manifest, SnapshotKind};
use stasis::snapshot::store::{ImportOpts, SnapshotStore};
use stasis::vmm::virtio::cow::CowDisk;
use stasis::vmm::{Console, DiskConfig, Kernel, Vm, VmConfig};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");

fn seed(test: &str) -> u64 {
    let s = std::env::var("STASIS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: STASIS_TEST_SEED={s}");
    s
}

/// CRC-64 of every file of a snapshot directory, by name.
fn digest(dir: &Path) -> Vec<(String, u64, u64)> {
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let b = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                b.len() as u64,
                crc.checksum(&b),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn one_snapshot_resumed_twice_concurrently_in_fresh_processes() {
    if !common::kvm_or_skip("one_snapshot_resumed_twice_concurrently_in_fresh_processes") {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("concurrent-resume"));
    let w = Workload {
        mib: 16,
        rounds: 400 + rng.random_range(0..200),
        seed: rng.random(),
        report: 50,
        base_mib: 16,
    };
    let dir = common::scratch("reusable-snapshot");
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let overlay = dir.join("overlay");
    let mut d = CowDisk::open(&base, &overlay).unwrap();
    d.write_at(64 * 1024, b"stasis").unwrap();
    drop(d);
    let mut vm = Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: w.cmdline(),
        mem_bytes: 64 << 20,
        console: Console::Sink,
        disk: Some(DiskConfig {
            base: base.clone(),
            overlay: Some(overlay),
        }),
        ..VmConfig::default()
    })
    .unwrap();
    let past = rng.random_range(1..50);
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round >= past)
    });
    assert!(vm.exited().is_none(), "guest ended early");
    vm.pause().unwrap();
    let tmp = dir.join("snapshots").join(".incoming");
    std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
    vm.snapshot(&tmp).unwrap();
    drop(vm);

    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let s = store
        .import(
            &tmp,
            "base-1",
            ImportOpts {
                kind: SnapshotKind::User,
                source_sandbox: None,
                labels: Default::default(),
            },
        )
        .unwrap();
    assert_eq!(Manifest::read_from(&s.dir).unwrap(), s.manifest);
    assert_eq!(s.manifest.disk_layer.as_deref(), Some("disk.overlay"));
    let before = digest(&s.dir);

    // Two fresh processes resume the same snapshot at the same time.
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new(BIN)
                .arg("resume")
                .arg(&s.dir)
                .arg("--lazy")
                .arg("--disk")
                .arg(&base)
                .arg("--overlay")
                .arg(dir.join(format!("own{i}")))
                .arg("--console")
                .arg(dir.join(format!("console{i}.txt")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let want = guest::reference(&w).checksum;
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "resume {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.join(format!("console{i}.txt"))).unwrap();
        assert_eq!(guest::parse_checksum(&text), Some(want), "resume {i}:\n{text}");
        // Each has its own overlay, holding the snapshot's disk.
        let own = CowDisk::open_existing(&base, &dir.join(format!("own{i}"))).unwrap();
        let mut buf = [0u8; 6];
        own.read_at(64 * 1024, &mut buf).unwrap();
        assert_eq!(&buf, b"stasis");
    }
    assert_eq!(digest(&s.dir), before, "a resume changed the snapshot");

    // `snapshot info` shows the manifest and its layer.
    let out = Command::new(BIN)
        .args(["snapshot", "info"])
        .arg(&s.dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("id base-1") && text.contains("layer 0:") && text.contains("full"),
        "{text}"
    );
    store.delete("base-1").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
