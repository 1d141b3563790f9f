//! Disk integrity on real KVM with the built-in test guest (which runs with
//! a copy-on-write disk attached; the test writes the disk from the host
//! through the VM's own disk path, as tests/virtio_snapshot.rs does):
//!
//! - a flipped byte in a snapshot's overlay data stops the restored VM with
//!   an error naming the overlay and the block's offset, eager and lazy, in
//!   this process and in a fresh `stasis resume`;
//! - a flipped byte in the disk map is a clear restore error, the same ways;
//! - a snapshot is immutable whatever the VM does next: the VM runs on and
//!   overwrites block 0 and writes a new block, and the snapshot, resumed in
//!   this process and in a fresh one, still has the old block 0;
//! - (not asserted) write/read throughput with checksums, and what copying
//!   a hard-linked overlay away costs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stasis::error_chain as chain;
use stasis::guest::Workload;
use stasis::vmm::virtio::cow::{self, CowDisk};
use stasis::vmm::virtio::SNAPSHOT_OVERLAY;
use stasis::vmm::{
    Console, DiskConfig, ExitReason, Kernel, RestoreMode, RestorePaths, Vm, VmConfig,
};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");
const OLD0: &[u8] = b"block0-old";
const NEW0: &[u8] = b"block0-NEW";
/// Offset of a block written before the snapshot.
const MARK: u64 = 64 * 1024;

/// A guest that runs until stopped: only a fault (or the test) ends it.
fn forever() -> Workload {
    Workload {
        mib: 8,
        rounds: 0,
        seed: 11,
        report: 0,
        base_mib: 16,
    }
}

/// A 1 MiB base image of 0x11 and an overlay with `OLD0` in block 0 and
/// "stasis" at 64 KiB.
fn disk(dir: &Path) -> DiskConfig {
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let overlay = dir.join("overlay");
    let mut d = CowDisk::open(&base, &overlay).unwrap();
    d.write_at(0, OLD0).unwrap();
    d.write_at(MARK, b"stasis").unwrap();
    drop(d);
    DiskConfig {
        base,
        overlay: Some(overlay),
    }
}

fn boot(dir: &Path) -> Vm {
    Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: forever().cmdline(),
        mem_bytes: 64 << 20,
        console: Console::Sink,
        disk: Some(disk(dir)),
        ..VmConfig::default()
    })
    .expect("boot with a disk")
}

fn wait_round(vm: &Vm, round: u64) {
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round >= round)
    });
    assert!(
        vm.exited().is_none(),
        "guest ended early: {:?}",
        vm.exited()
    );
}

/// Boots, runs a little and pauses into `snap`; returns the paused VM.
fn snapshot(dir: &Path, snap: &Path) -> Vm {
    let mut vm = boot(dir);
    wait_round(&vm, 2);
    vm.pause().unwrap();
    vm.snapshot(snap).unwrap();
    vm
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn flip(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

/// The caller-given paths of a restore with the disk over `dir`'s
/// `base.img`.
fn with_base(dir: &Path) -> RestorePaths<'static> {
    let base: &'static Path = Box::leak(dir.join("base.img").into_boxed_path());
    RestorePaths {
        disk_base: Some(base),
        vsock: None,
        ..Default::default()
    }
}

/// Runs `stasis` with `args`, bounded; returns (success, stderr).
fn run_bounded(args: &[&str], limit: Duration) -> (bool, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "stasis {args:?} still running after {limit:?}: {}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.success(), reader.join().unwrap())
}

fn assert_corrupt_block(msg: &str, overlay: &Path) {
    let want = format!(
        "disk overlay {} is corrupted: the 4096-byte block at offset {MARK} does not match its checksum",
        overlay.display()
    );
    assert!(msg.contains(&want), "expected «{want}» in: {msg}");
}

#[test]
fn corrupted_overlay_data_stops_the_restored_vm_eager_lazy_and_fresh_process() {
    if !common::kvm_or_skip(
        "corrupted_overlay_data_stops_the_restored_vm_eager_lazy_and_fresh_process",
    ) {
        return;
    }
    let dir = common::scratch("disk-corrupt-data");
    let base_s = dir.join("base.img").display().to_string();
    let snap = dir.join("snap");
    drop(snapshot(&dir, &snap));
    // One flipped byte inside the written block at 64 KiB.
    flip(&snap.join(SNAPSHOT_OVERLAY), MARK + 2);

    for (mode, name) in [(RestoreMode::Eager, "eager"), (RestoreMode::Lazy, "lazy")] {
        let copy = dir.join(name);
        copy_dir(&snap, &copy);
        // The map is fine, so the restore starts; the overlay's check finds
        // the block and the VM stops with the error (the guest would run
        // forever otherwise).
        let (vm, _) =
            Vm::restore_with(&copy, mode, Console::Sink, None, with_base(&dir)).expect(name);
        match vm.wait(Some(Duration::from_secs(120))) {
            Some(ExitReason::Error(m)) => {
                assert!(m.starts_with("disk data corrupted: "), "{name}: {m}");
                assert_corrupt_block(&m, &copy.join(SNAPSHOT_OVERLAY));
            }
            other => panic!("{name}: expected a disk corruption error, got {other:?}"),
        }
        // A read of the block through the disk path is refused too.
        let r = vm
            .with_disk(|d| d.read_at(MARK, &mut [0u8; 6]))
            .expect("a disk");
        assert_corrupt_block(&r.unwrap_err().to_string(), &copy.join(SNAPSHOT_OVERLAY));
    }
    for flag in ["--eager", "--lazy"] {
        let copy = dir.join(format!("fresh{flag}"));
        copy_dir(&snap, &copy);
        let (ok, err) = run_bounded(
            &["resume", copy.to_str().unwrap(), flag, "--disk", &base_s],
            Duration::from_secs(180),
        );
        assert!(
            !ok,
            "stasis resume {flag} of a corrupted overlay succeeded: {err}"
        );
        assert!(err.contains("disk data corrupted"), "{flag}: {err}");
        assert_corrupt_block(&err, &copy.join(SNAPSHOT_OVERLAY));
    }
}

#[test]
fn corrupted_disk_map_is_a_clear_error_eager_lazy_and_fresh_process() {
    if !common::kvm_or_skip("corrupted_disk_map_is_a_clear_error_eager_lazy_and_fresh_process") {
        return;
    }
    let dir = common::scratch("disk-corrupt-map");
    let base_s = dir.join("base.img").display().to_string();
    let snap = dir.join("snap");
    drop(snapshot(&dir, &snap));
    let map = cow::map_path(&snap.join(SNAPSHOT_OVERLAY));
    let n = std::fs::metadata(&map).unwrap().len();
    // A byte among the block checksums (just before the map's own CRC).
    flip(&map, n - 10);
    let want = |copy: &Path| {
        format!(
            "disk allocation map {} is invalid: checksum mismatch (corrupted or truncated)",
            cow::map_path(&copy.join(SNAPSHOT_OVERLAY)).display()
        )
    };
    for (mode, name) in [(RestoreMode::Eager, "eager"), (RestoreMode::Lazy, "lazy")] {
        let copy = dir.join(name);
        copy_dir(&snap, &copy);
        let e = match Vm::restore_with(&copy, mode, Console::Sink, None, with_base(&dir)) {
            Ok(_) => panic!("{name}: restore with a corrupted map succeeded"),
            Err(e) => chain(&e),
        };
        assert!(e.contains(&want(&copy)), "{name}: {e}");
    }
    for flag in ["--eager", "--lazy"] {
        let copy = dir.join(format!("fresh{flag}"));
        copy_dir(&snap, &copy);
        let (ok, err) = run_bounded(
            &["resume", copy.to_str().unwrap(), flag, "--disk", &base_s],
            Duration::from_secs(180),
        );
        assert!(!ok, "{flag}: {err}");
        assert!(err.contains(&want(&copy)), "{flag}: {err}");
    }
}

fn read_block0(d: &CowDisk) -> Vec<u8> {
    let mut b = vec![0u8; OLD0.len()];
    d.read_at(0, &mut b).unwrap();
    b
}

#[test]
fn a_snapshot_is_immutable_when_the_vm_runs_on() {
    if !common::kvm_or_skip("a_snapshot_is_immutable_when_the_vm_runs_on") {
        return;
    }
    let dir = common::scratch("disk-immutable");
    let snap = dir.join("snap");
    let mut vm = snapshot(&dir, &snap);
    let shared = vm.with_disk(|d| d.is_shared()).unwrap();
    eprintln!("snapshot overlay stored as a hard link (shared until the next write): {shared}");
    // The VM runs on and, running, overwrites block 0 and writes a new block.
    vm.resume().unwrap();
    let r = vm.guest_status().unwrap().round;
    wait_round(&vm, r + 1);
    let unshared = vm
        .with_disk(|d| {
            d.write_at(0, NEW0).unwrap();
            d.write_at(128 * 1024, b"fresh!").unwrap();
            d.flush().unwrap();
            assert!(!d.is_shared());
            read_block0(d)
        })
        .unwrap();
    assert_eq!(unshared, NEW0);
    wait_round(&vm, r + 2);
    drop(vm);

    // In this process: the snapshot's disk has the old block 0 and not the
    // new block.
    let copy = dir.join("inproc");
    copy_dir(&snap, &copy);
    let (vm, _) = Vm::restore_with(
        &copy,
        RestoreMode::Lazy,
        Console::Sink,
        None,
        with_base(&dir),
    )
    .unwrap();
    let (b0, fresh) = vm
        .with_disk(|d| {
            let mut f = [0u8; 6];
            d.read_at(128 * 1024, &mut f).unwrap();
            (read_block0(d), f)
        })
        .unwrap();
    assert_eq!(b0, OLD0);
    assert_eq!(fresh, [0x11; 6]);
    wait_round(&vm, vm.guest_status().unwrap().round + 1);
    drop(vm);

    // In a fresh process: resume, let it run, pause it into snap2 on
    // SIGUSR1; snap2's disk (the snapshot's, moved along) has the old
    // block 0, and every block matches its checksum (a snapshot changed
    // under its map would not).
    let copy = dir.join("fresh");
    copy_dir(&snap, &copy);
    let snap2 = dir.join("snap2");
    let mut child = Command::new(BIN)
        .args([
            "resume",
            copy.to_str().unwrap(),
            "--lazy",
            "--disk",
            dir.join("base.img").to_str().unwrap(),
            "--snapshot-on-signal",
        ])
        .arg(&snap2)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let l2 = log.clone();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = l2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    common::wait_for(
        Duration::from_secs(120),
        "the fresh process to resume",
        || log.lock().unwrap().contains("stasis: resumed") || child.try_wait().unwrap().is_some(),
    );
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    assert_eq!(rc, 0);
    let end = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("stasis resume did not pause: {}", log.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "stasis resume: {log}");
    assert!(log.contains("paused into"), "{log}");
    let d = CowDisk::open_existing(&dir.join("base.img"), &snap2.join(SNAPSHOT_OVERLAY)).unwrap();
    assert_eq!(d.verify_all().unwrap(), 2);
    assert_eq!(read_block0(&d), OLD0);
    let mut f = [0u8; 6];
    d.read_at(128 * 1024, &mut f).unwrap();
    assert_eq!(f, [0x11; 6]);
    // The original snapshot directory is unchanged too.
    let d = CowDisk::open_existing(&dir.join("base.img"), &snap.join(SNAPSHOT_OVERLAY)).unwrap();
    assert_eq!(read_block0(&d), OLD0);
}

/// Seeded bytes (xorshift64*).
fn seeded(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn mib_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64()
}

/// Not a pass/fail test of speed: prints what checksums cost on writes and
/// reads, and what the copy of a hard-linked overlay costs (64 MiB).
#[test]
fn measure_checksum_and_unshare_costs() {
    let seed: u64 = std::env::var("STASIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d15c);
    eprintln!("seed {seed} (STASIS_SEED overrides)");
    let dir = common::scratch("disk-measure");
    const SIZE: usize = 64 << 20;
    const REQ: usize = 1 << 20;
    let base = dir.join("base.img");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(128 << 20).unwrap();
    drop(f);
    let data = seeded(seed, SIZE);

    // CRC32C alone.
    let t = Instant::now();
    let mut acc = 0u32;
    for c in data.chunks(4096) {
        acc ^= cow::crc32c(c);
    }
    let crc_t = t.elapsed();

    // Raw pwrite of the same requests to a plain file (the pre-checksum
    // data path), then the copy-on-write disk.
    use std::os::unix::fs::FileExt;
    let raw = std::fs::File::create(dir.join("raw")).unwrap();
    raw.set_len(128 << 20).unwrap();
    let t = Instant::now();
    for (i, c) in data.chunks(REQ).enumerate() {
        raw.write_all_at(c, (i * REQ) as u64).unwrap();
    }
    let raw_w = t.elapsed();
    raw.sync_data().unwrap();
    let raw_t = t.elapsed();

    let ov = dir.join("ov");
    let mut d = CowDisk::open(&base, &ov).unwrap();
    let t = Instant::now();
    for (i, c) in data.chunks(REQ).enumerate() {
        d.write_at((i * REQ) as u64, c).unwrap();
    }
    let cow_w = t.elapsed();
    d.flush().unwrap();
    let cow_t = t.elapsed();

    let mut back = vec![0u8; REQ];
    let t = Instant::now();
    for i in 0..SIZE / REQ {
        d.read_at((i * REQ) as u64, &mut back).unwrap();
    }
    let read_t = t.elapsed();
    assert_eq!(back, data[SIZE - REQ..]);

    // A guest's small synchronous write: 4 KiB over a written block, then
    // a flush (fdatasync, and the map with its checksums rewritten).
    let t = Instant::now();
    for i in 0..50u64 {
        d.write_at(i * 4096, &data[..4096]).unwrap();
        d.flush().unwrap();
    }
    let flush_t = t.elapsed() / 50;
    let t = Instant::now();
    for i in 0..50u64 {
        raw.write_all_at(&data[..4096], i * 4096).unwrap();
        raw.sync_data().unwrap();
    }
    let raw_flush_t = t.elapsed() / 50;

    // Snapshot (hard link on ext4/tmpfs), then the first write copies.
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let t = Instant::now();
    let how = d.save_into(&snap, "disk").unwrap();
    let save_t = t.elapsed();
    let t = Instant::now();
    let stats = d.unshare().unwrap();
    let unshare_t = t.elapsed();
    eprintln!(
        "crc32c {:.0} MiB/s (x{acc:08x}); 64 MiB in 1 MiB writes (page cache / with fdatasync): \
         plain file {:.0} / {:.0} MiB/s, checksummed overlay {:.0} / {:.0} MiB/s; checked reads \
         {:.0} MiB/s",
        mib_s(SIZE, crc_t),
        mib_s(SIZE, raw_w),
        mib_s(SIZE, raw_t),
        mib_s(SIZE, cow_w),
        mib_s(SIZE, cow_t),
        mib_s(SIZE, read_t)
    );
    eprintln!(
        "4 KiB write + flush (map of 16384 checksums rewritten): {:.2} ms; plain file write + \
         fdatasync: {:.2} ms",
        flush_t.as_secs_f64() * 1e3,
        raw_flush_t.as_secs_f64() * 1e3
    );
    eprintln!(
        "snapshot of a 64 MiB-written overlay: {how} in {:.2} ms; copy away before the next write: \
         {:?} in {:.1} ms",
        save_t.as_secs_f64() * 1e3,
        stats.map(|s| s.blocks),
        unshare_t.as_secs_f64() * 1e3
    );
}
