//! Incremental pause on real KVM: a VM resumed from a snapshot with write
//! tracking pauses into a child memory layer holding only the pages written
//! since the resume, and a resume of the chain (eager and lazy, in a fresh
//! process) ends the workload with the model's checksum. Also the chain
//! depth limit and a damaged or missing parent layer (a clear error naming
//! the layer).
//!
//! The pages changed are chosen at random (seeded: `STASIS_TEST_SEED=<n>`
//! replays a run; the seed is always printed) in guest memory the test
//! guest never touches, and written from the host while the VM is paused.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stasis::guest::{self, Workload};
use stasis::snapshot::dirty::Mode;
use stasis::snapshot::layers::{ChainFile, LAYERS_FILE, MAX_CHAIN_DEPTH};
use stasis::snapshot::SnapshotDir;
use stasis::vmm::memory::MemoryBacking;
use stasis::vmm::{
    Console, ConsoleBuffer, Kernel, RestoreMode, RestoreOpts, RestorePaths, SnapshotOpts, Vm,
    VmConfig, VmState,
};
use vm_memory::{Bytes, GuestAddress};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");
const PAGE: u64 = 4096;
/// Guest memory of the test VMs.
const MEM: u64 = 64 << 20;
/// The host writes its pages from here on (the guest works at 16-17 MiB).
const FREE_BASE: u64 = 32 << 20;

fn test_rng(test: &str) -> StdRng {
    let seed = std::env::var("STASIS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: STASIS_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// 1 MiB of work at 16 MiB, long enough to be paused a few times.
fn workload() -> Workload {
    Workload {
        mib: 1,
        rounds: 400_000,
        seed: 77,
        report: 0,
        base_mib: 16,
    }
}

fn boot(w: &Workload) -> Vm {
    Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: w.cmdline(),
        mem_bytes: MEM,
        console: Console::Sink,
        ..VmConfig::default()
    })
    .unwrap()
}

fn wait_round(vm: &Vm, past: u64) {
    common::wait_for(Duration::from_secs(60), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round > past)
    });
    assert!(vm.exited().is_none(), "guest finished too early");
}

fn restore_tracked(dir: &Path, mode: RestoreMode) -> Vm {
    Vm::restore_opts(
        dir,
        mode,
        Console::Sink,
        None,
        RestorePaths::default(),
        MemoryBacking::Auto,
        RestoreOpts {
            track_writes: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}", stasis::error_chain(&e)))
    .0
}

fn incremental(vm: &mut Vm, to: &Path) -> stasis::vmm::SnapshotStats {
    vm.snapshot_with(
        to,
        SnapshotOpts {
            incremental: true,
            ..SnapshotOpts::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}", stasis::error_chain(&e)))
}

fn state(dir: &Path) -> VmState {
    SnapshotDir::open(dir).unwrap().load_state().unwrap()
}

/// The page-sized pattern of guest page `page` written by generation
/// `tag` (never all zero: it starts with the page number).
fn pattern(page: u64, tag: u8) -> Vec<u8> {
    let mut data = vec![tag; PAGE as usize];
    data[..8].copy_from_slice(&page.to_le_bytes());
    data
}

/// Writes [`pattern`] at guest page `page`.
fn write_page(vm: &Vm, page: u64, tag: u8) {
    vm.memory()
        .write_slice(&pattern(page, tag), GuestAddress(page * PAGE))
        .unwrap();
}

fn read_page(vm: &Vm, page: u64) -> Vec<u8> {
    let mut data = vec![0u8; PAGE as usize];
    vm.memory()
        .read_slice(&mut data, GuestAddress(page * PAGE))
        .unwrap();
    data
}

/// Resumes `snap` in a fresh `stasis resume` process and checks the
/// workload's final checksum against the model.
fn finish_in_fresh_process(snap: &Path, mode: &str, dir: &Path, w: &Workload) {
    let console = dir.join(format!("console-{mode}.txt"));
    let out = Command::new(BIN)
        .arg("resume")
        .arg(snap)
        .arg(format!("--{mode}"))
        .arg("--console")
        .arg(&console)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(
        guest::parse_checksum(&text),
        Some(guest::reference(w).checksum),
        "console after resuming the chain:\n{text}"
    );
}

/// Boots, runs a little, pauses into a full snapshot `dir/s0`.
fn full_snapshot(dir: &Path, w: &Workload) -> PathBuf {
    let mut vm = boot(w);
    wait_round(&vm, 10);
    vm.pause().unwrap();
    let s0 = dir.join("s0");
    let st = vm.snapshot(&s0).unwrap();
    assert!(st.parent.is_none() && st.chain_depth == 0);
    assert!(!s0.join(LAYERS_FILE).exists());
    s0
}

fn changed_pages_only(mode: RestoreMode, name: &str) {
    let w = workload();
    let dir = common::scratch(name);
    let mut rng = test_rng(name);
    let s0 = full_snapshot(&dir, &w);
    let full_bytes = state(&s0).memory.bytes_stored;

    let mut vm = restore_tracked(&s0, mode);
    let tracking = vm.write_tracking().expect("the resumed VM tracks writes");
    eprintln!("{name}: write tracking: {tracking}");
    // Let the guest write (through KVM) under tracking before the pause.
    let round = vm.guest_status().map_or(0, |s| s.round);
    wait_round(&vm, round + 2);
    vm.pause().unwrap();
    if forced_sync() {
        assert_eq!(tracking, Mode::Sync);
        assert!(
            vm.write_tracking_faults() > 0,
            "no write-protect fault was resolved"
        );
    }
    let k = rng.random_range(20..200u64);
    let free_pages = (MEM - FREE_BASE) / PAGE;
    let mut changed = BTreeSet::new();
    while changed.len() < k as usize {
        changed.insert(FREE_BASE / PAGE + rng.random_range(0..free_pages));
    }
    let faults_before = vm.write_tracking_faults();
    for &p in &changed {
        write_page(&vm, p, 0x5a);
    }
    if forced_sync() && mode == RestoreMode::Lazy {
        // The first host write into a block of holes finds its page
        // missing, then in place write-protected: a write-protect fault,
        // resolved (the block's other holes are zero pages, which a write
        // replaces without one).
        assert!(vm.write_tracking_faults() > faults_before);
    }
    let s1 = dir.join("s1");
    let st = incremental(&mut vm, &s1);
    drop(vm);
    assert_eq!(st.parent.as_deref(), Some(s0.as_path()));
    assert_eq!(st.chain_depth, 1);

    // The child's own accounting: exactly the changed pages, plus only
    // pages the guest itself may have written since the resume (its work
    // area, status page, stack: all below the end of its work area).
    let m = state(&s1).memory;
    let stored: BTreeSet<u64> = m.present.iter_ones().map(|p| p as u64).collect();
    let missing: Vec<_> = changed.difference(&stored).collect();
    assert!(missing.is_empty(), "changed pages not stored: {missing:?}");
    let guest_end = (w.base_mib + w.mib) << 20;
    let extra: Vec<_> = stored
        .difference(&changed)
        .filter(|&&p| p * PAGE >= guest_end)
        .collect();
    assert!(extra.is_empty(), "unchanged pages stored: {extra:?}");
    let guest_pages = stored.len() as u64 - k;
    assert!(
        guest_pages <= (w.mib << 20) / PAGE + 64,
        "{guest_pages} pages of the guest's own"
    );
    assert_eq!(m.bytes_stored, stored.len() as u64 * PAGE);
    assert_eq!(st.bytes_written, m.bytes_stored);
    eprintln!(
        "{name}: {k} pages changed by the host, {guest_pages} by the guest: child layer {} KiB, full layer {} KiB",
        m.bytes_stored >> 10,
        full_bytes >> 10
    );
    let chain = ChainFile::read(&s1).unwrap().unwrap();
    assert_eq!(chain.parents.len(), 1);
    assert_eq!(chain.parents[0].name, "s0");
    assert_eq!(chain.parents[0].resolve(&s1).unwrap(), s0);
    // `snapshot info` shows the layers, their bytes and parents.
    let out = Command::new(BIN)
        .args(["snapshot", "info"])
        .arg(&s1)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{info}");
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    for want in [
        "layers:          2 (nearest first".to_string(),
        format!(
            "layer 0:       this snapshot, {}, parent {}",
            mib(m.bytes_stored),
            s0.display()
        ),
        format!(
            "layer 1:       {}, {}, full layer (intact)",
            s0.display(),
            mib(full_bytes)
        ),
    ] {
        assert!(info.contains(&want), "{want:?} not in:\n{info}");
    }

    // The chain resumes with the child's pages over the parent's.
    let (mut vm, _) = Vm::restore(&s1, mode, Console::Sink, None).unwrap();
    vm.pause().unwrap();
    for &p in &changed {
        assert_eq!(read_page(&vm, p), pattern(p, 0x5a), "page {p}");
    }
    drop(vm);
    let m = if mode == RestoreMode::Eager {
        "eager"
    } else {
        "lazy"
    };
    finish_in_fresh_process(&s1, m, &dir, &w);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn incremental_pause_stores_only_changed_pages_eager() {
    if common::kvm_or_skip("incremental eager") {
        changed_pages_only(RestoreMode::Eager, "incr-eager");
    }
}

#[test]
fn incremental_pause_stores_only_changed_pages_lazy() {
    if common::kvm_or_skip("incremental lazy") {
        changed_pages_only(RestoreMode::Lazy, "incr-lazy");
    }
}

/// True if this process was started with `STASIS_WRITE_TRACKING=sync`.
fn forced_sync() -> bool {
    std::env::var("STASIS_WRITE_TRACKING").is_ok_and(|v| v.trim().eq_ignore_ascii_case("sync"))
}

/// Runs `test` of this binary again in a child process with
/// `STASIS_WRITE_TRACKING=sync` (read once per process, so it needs its own
/// process): the same assertions under synchronous write protection.
fn rerun_with_sync_wp(test: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("STASIS_WRITE_TRACKING", "sync")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    if !text.contains("SKIPPED") {
        assert!(text.contains("write tracking: sync"), "{text}");
    }
    eprintln!("{text}");
}

#[test]
fn incremental_pause_with_sync_write_protection_eager() {
    rerun_with_sync_wp("incremental_pause_stores_only_changed_pages_eager");
}

#[test]
fn incremental_pause_with_sync_write_protection_lazy() {
    rerun_with_sync_wp("incremental_pause_stores_only_changed_pages_lazy");
}

#[test]
fn chain_depth_is_bounded_by_a_full_layer() {
    if !common::kvm_or_skip("chain depth") {
        return;
    }
    let w = workload();
    let dir = common::scratch("incr-depth");
    let mut prev = full_snapshot(&dir, &w);
    let mut tags = Vec::new();
    for i in 1..=MAX_CHAIN_DEPTH + 1 {
        let mode = if i % 2 == 0 {
            RestoreMode::Lazy
        } else {
            RestoreMode::Eager
        };
        let mut vm = restore_tracked(&prev, mode);
        vm.pause().unwrap();
        // Each generation overwrites one page and adds one.
        let page = FREE_BASE / PAGE + i as u64;
        write_page(&vm, FREE_BASE / PAGE, i as u8);
        write_page(&vm, page, i as u8);
        tags.push(page);
        let next = dir.join(format!("s{i}"));
        let st = incremental(&mut vm, &next);
        drop(vm);
        if i <= MAX_CHAIN_DEPTH {
            assert_eq!(st.chain_depth, i, "generation {i}");
            assert_eq!(ChainFile::read(&next).unwrap().unwrap().parents.len(), i);
        } else {
            // Past the limit: a full layer, no parent.
            assert_eq!(st.chain_depth, 0);
            assert!(st.parent.is_none());
            assert!(!next.join(LAYERS_FILE).exists());
        }
        prev = next;
    }
    // The last (full) snapshot holds every generation's pages.
    let (mut vm, _) = Vm::restore(&prev, RestoreMode::Eager, Console::Sink, None).unwrap();
    vm.pause().unwrap();
    let last = MAX_CHAIN_DEPTH as u8 + 1;
    assert_eq!(
        read_page(&vm, FREE_BASE / PAGE),
        pattern(FREE_BASE / PAGE, last)
    );
    for (i, &p) in tags.iter().enumerate() {
        assert_eq!(read_page(&vm, p), pattern(p, i as u8 + 1), "page {p}");
    }
    drop(vm);
    // The deepest child (depth MAX) also resumes right, lazily.
    let deepest = dir.join(format!("s{MAX_CHAIN_DEPTH}"));
    finish_in_fresh_process(&deepest, "lazy", &dir, &w);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn restore_err(snap: &Path, mode: RestoreMode) -> String {
    match Vm::restore(snap, mode, Console::Buffer(ConsoleBuffer::new()), None) {
        Ok(_) => panic!("restore of a chain with a bad layer succeeded"),
        Err(e) => stasis::error_chain(&e),
    }
}

#[test]
fn damaged_or_missing_parent_layer_is_a_clear_error() {
    if !common::kvm_or_skip("bad parent") {
        return;
    }
    let w = workload();
    let dir = common::scratch("incr-bad");
    let s0 = full_snapshot(&dir, &w);
    let mut vm = restore_tracked(&s0, RestoreMode::Eager);
    vm.pause().unwrap();
    write_page(&vm, FREE_BASE / PAGE, 1);
    let s1 = dir.join("s1");
    incremental(&mut vm, &s1);
    drop(vm);
    let s0s = s0.display().to_string();

    // A damaged page in the parent's memory: the page's checksum, in the
    // parent's file.
    let mem = s0.join("memory.bin");
    let orig = std::fs::read(&mem).unwrap();
    let m0 = state(&s0).memory;
    // A page only the parent stores (one the child also stores overrides
    // it and is never read from the parent).
    let m1 = state(&s1).memory;
    let p = m0
        .present
        .iter_ones()
        .find(|&p| !m1.present.get(p))
        .expect("a page only the parent stores") as u64;
    let mut bad = orig.clone();
    bad[(p * PAGE + 100) as usize] ^= 0xff;
    std::fs::write(&mem, &bad).unwrap();
    let e = restore_err(&s1, RestoreMode::Eager);
    assert!(
        e.contains(&format!("{s0s}/memory.bin")) && e.contains("checksum mismatch"),
        "{e}"
    );
    std::fs::write(&mem, &orig).unwrap();

    // The parent's state rewritten (another snapshot in its place).
    let stf = s0.join("state.bin");
    let orig_state = std::fs::read(&stf).unwrap();
    let mut bad = orig_state.clone();
    let n = bad.len();
    bad[n / 2] ^= 1;
    std::fs::write(&stf, &bad).unwrap();
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let e = restore_err(&s1, mode);
        assert!(
            e.contains(&format!("memory layer {s0s} (parent 1 of")),
            "{e}"
        );
    }
    std::fs::write(&stf, &orig_state).unwrap();

    // A damaged chain file.
    let lf = s1.join(LAYERS_FILE);
    let orig_chain = std::fs::read(&lf).unwrap();
    let mut bad = orig_chain.clone();
    let n = bad.len();
    bad[n - 3] ^= 1;
    std::fs::write(&lf, &bad).unwrap();
    let e = restore_err(&s1, RestoreMode::Lazy);
    assert!(e.contains("layers.bin: bad layer chain file"), "{e}");
    std::fs::write(&lf, &orig_chain).unwrap();

    // The parent gone.
    let moved = dir.join("moved");
    std::fs::rename(&s0, &moved).unwrap();
    let e = restore_err(&s1, RestoreMode::Eager);
    assert!(
        e.contains(&format!("memory layer {s0s} (parent 1 of")) && e.contains("not a directory"),
        "{e}"
    );
    std::fs::rename(&moved, &s0).unwrap();
    // Put back, the chain resumes and finishes right.
    finish_in_fresh_process(&s1, "eager", &dir, &w);
    std::fs::remove_dir_all(&dir).unwrap();
}
