//! Guest memory backings (hugetlb 2 MiB pages, THP, 4 KiB) on real KVM,
//! proven by result: the checksum workload ends with the independent Rust
//! model's checksum on every backing, a snapshot taken on any backing
//! restores (eagerly and lazily, in this process and in fresh processes)
//! on every other, a pause from huge-page memory stays sparse, and a pool
//! too small is a clear error at create, never a SIGBUS later.
//!
//! The hugetlb tests need free 2 MiB pages (`.ci/run` reserves them through
//! `/proc/sys/vm/nr_hugepages`); without them they fail loudly, or with
//! `STASIS_ALLOW_SKIP=1` print a SKIPPED banner. The tests of this file run
//! one at a time (they share the pool). Random pause points are seeded:
//! `STASIS_TEST_SEED=<n>` replays a run; the seed is printed.

mod api_support;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stasis::guest::{self, Workload};
use stasis::snapshot::uffd::{HugeFill, HUGE_FILL_ENV};
use stasis::vmm::memory::{HugePool, MemoryBacking};
use stasis::vmm::{
    Console, ConsoleBuffer, ExitReason, RestoreMode, RestoreOpts, RestorePaths, Vm, VmConfig,
};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");
const ALL: [MemoryBacking; 3] = [
    MemoryBacking::Hugetlb,
    MemoryBacking::Thp,
    MemoryBacking::Small,
];

/// The tests of this file share the hugetlb pool: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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

/// KVM is usable and the pool has `bytes` of free huge pages; else fails
/// loudly (or, with STASIS_ALLOW_SKIP=1, prints a SKIPPED banner).
fn ready(test: &str, bytes: u64) -> bool {
    if !common::kvm_or_skip(test) {
        return false;
    }
    let pool = HugePool::read();
    if pool.available() * (2 << 20) >= bytes {
        return true;
    }
    let msg = format!(
        "{test}: needs {} MiB of free 2 MiB huge pages, the pool has {} pages free \
         (reserve them: echo 1200 > /proc/sys/vm/nr_hugepages)",
        bytes >> 20,
        pool.available()
    );
    if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("\n*** SKIPPED (not passed): {msg} ***\n");
        false
    } else {
        panic!("{msg}; set STASIS_ALLOW_SKIP=1 to skip explicitly");
    }
}

fn workload(rounds: u64, seed: u64) -> Workload {
    Workload {
        mib: 24,
        rounds,
        seed,
        report: 0,
        base_mib: 16,
    }
}

fn boot(w: &Workload, mem_bytes: u64, backing: MemoryBacking, console: &ConsoleBuffer) -> Vm {
    let vm = Vm::boot(VmConfig {
        cmdline: w.cmdline(),
        mem_bytes,
        console: Console::Buffer(console.clone()),
        memory_backing: backing,
        ..VmConfig::default()
    })
    .unwrap_or_else(|e| panic!("boot on {backing}: {}", stasis::error_chain(&e)));
    assert_eq!(vm.config().memory_backing, backing, "backing in use");
    vm
}

fn wait_round(vm: &Vm, past: u64) {
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round > past)
    });
}

fn finish(vm: Vm, console: &ConsoleBuffer, w: &Workload, what: &str) {
    assert_eq!(
        vm.wait(Some(Duration::from_secs(300))),
        Some(ExitReason::GuestExit(0)),
        "{what}"
    );
    drop(vm);
    assert_eq!(
        guest::parse_checksum(&console.text()),
        Some(guest::reference(w).checksum),
        "{what}: console:\n{}",
        console.text()
    );
}

#[test]
fn every_backing_runs_the_checksum_workload() {
    let _g = serial();
    if !ready("every backing", 64 << 20) {
        return;
    }
    for b in ALL {
        let w = workload(300, 11);
        let console = ConsoleBuffer::new();
        let vm = boot(&w, 64 << 20, b, &console);
        finish(vm, &console, &w, &format!("run on {b}"));
    }
}

/// Every (from, to) pair of backings: pause on one, restore on the other
/// (lazily and eagerly, alternating), the workload ends with the model's
/// checksum.
#[test]
fn a_snapshot_taken_on_any_backing_restores_on_every_other() {
    let _g = serial();
    if !ready("cross-backing restore", 2 * (64 << 20)) {
        return;
    }
    let mut rng = test_rng("cross-backing restore");
    let dir = common::scratch("backing-cross");
    let mut k = 0;
    for from in ALL {
        for to in ALL {
            let w = workload(2000, 20 + k);
            let console = ConsoleBuffer::new();
            let mut vm = boot(&w, 64 << 20, from, &console);
            wait_round(&vm, rng.random_range(1..200));
            assert!(vm.exited().is_none(), "workload ended before the pause");
            vm.pause().unwrap();
            let before = vm.guest_status().unwrap();
            let snap = dir.join(format!("{from}-{to}"));
            vm.snapshot(&snap).unwrap();
            drop(vm);
            let mode = if k % 2 == 0 {
                RestoreMode::Lazy
            } else {
                RestoreMode::Eager
            };
            let (vm, _) = Vm::restore_backed(
                &snap,
                mode,
                Console::Buffer(console.clone()),
                None,
                RestorePaths::default(),
                to,
            )
            .unwrap_or_else(|e| panic!("{from} -> {to}: {}", stasis::error_chain(&e)));
            assert_eq!(vm.config().memory_backing, to);
            // From the paused state on (a round may already have run).
            let now = vm.guest_status().unwrap();
            assert!(
                now == before || now.round > before.round,
                "{from} -> {to}: resumed at {now:?}, paused at {before:?}"
            );
            if mode == RestoreMode::Lazy {
                vm.wait_memory_complete().unwrap();
            }
            finish(vm, &console, &w, &format!("{from} -> {to} ({mode:?})"));
            std::fs::remove_dir_all(&snap).unwrap();
            k += 1;
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A pause from huge-page memory writes only the 4 KiB pages that hold
/// data: zero 4 KiB pages inside touched 2 MiB pages are holes.
#[test]
fn a_pause_from_huge_pages_stays_sparse() {
    let _g = serial();
    if !ready("sparse on huge pages", 512 << 20) {
        return;
    }
    let dir = common::scratch("backing-sparse");
    for b in [MemoryBacking::Hugetlb, MemoryBacking::Thp] {
        let w = Workload {
            mib: 8,
            rounds: 0,
            seed: 5,
            report: 0,
            base_mib: 16,
        };
        let console = ConsoleBuffer::new();
        let mut vm = boot(&w, 512 << 20, b, &console);
        wait_round(&vm, 2);
        vm.pause().unwrap();
        let snap = dir.join(b.name());
        let st = vm.snapshot(&snap).unwrap();
        drop(vm);
        // 8 MiB of work plus a few pages of guest image and tables, as on
        // 4 KiB memory (tests/snapshot_kvm.rs).
        assert!(
            (8 << 20..12 << 20).contains(&st.bytes_written),
            "{b}: wrote {} bytes",
            st.bytes_written
        );
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(snap.join("memory.bin")).unwrap();
        assert_eq!(md.len(), 512 << 20);
        let allocated = md.blocks() * 512;
        assert!(
            (8 << 20..16 << 20).contains(&allocated),
            "{b}: memory.bin has {allocated} bytes allocated"
        );
        std::fs::remove_dir_all(&snap).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Lazy restore onto hugetlb, with each fill method (`UFFDIO_COPY` of
/// whole 2 MiB pages, and `UFFDIO_CONTINUE` after filling the memfd's page
/// cache): the restore reports the method asked for, the guest gets
/// exactly its memory back (it ends with the model's checksum), every
/// present page was verified, and COPY copied whole huge pages.
#[test]
fn lazy_restore_on_hugetlb_fills_whole_huge_pages() {
    let _g = serial();
    if !ready("lazy hugetlb", 2 * (128 << 20)) {
        return;
    }
    let dir = common::scratch("backing-lazy");
    let w = Workload {
        mib: 64,
        ..workload(400, 31)
    };
    let console = ConsoleBuffer::new();
    let mut vm = boot(&w, 128 << 20, MemoryBacking::Small, &console);
    wait_round(&vm, 20);
    vm.pause().unwrap();
    let before = vm.guest_status().unwrap();
    let snap = dir.join("s");
    vm.snapshot(&snap).unwrap();
    drop(vm);
    let (st, _) = stasis::vmm::persist::inspect(&snap).unwrap();
    let present = st.memory.present.count_ones() as u64;
    // Each method twice from the same snapshot (a run leaves it intact).
    for fill in [
        HugeFill::Continue,
        HugeFill::Copy,
        HugeFill::Continue,
        HugeFill::Copy,
    ] {
        let console = ConsoleBuffer::new();
        let (vm, rs) = Vm::restore_opts(
            &snap,
            RestoreMode::Lazy,
            Console::Buffer(console.clone()),
            None,
            RestorePaths::default(),
            MemoryBacking::Hugetlb,
            RestoreOpts {
                huge_fill: Some(fill),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{fill}: {}", stasis::error_chain(&e)));
        assert_eq!(
            rs.huge_fill,
            Some(fill),
            "fill method in use (this kernel must offer UFFD_FEATURE_MINOR_HUGETLBFS)"
        );
        assert_eq!(vm.config().memory_backing, MemoryBacking::Hugetlb);
        // It goes on from the paused state (it may already have run a
        // round by now; the final checksum checks every round).
        let now = vm.guest_status().unwrap();
        assert!(
            now == before || now.round > before.round,
            "{fill}: resumed at {now:?}, paused at {before:?}"
        );
        vm.wait_memory_complete().unwrap();
        let l = vm.lazy_stats().expect("lazy");
        use std::sync::atomic::Ordering::Relaxed;
        let copied = l.bytes_copied.load(Relaxed);
        match fill {
            HugeFill::Copy => assert!(
                copied > 0 && copied % (2 << 20) == 0,
                "copy: copied {copied} bytes"
            ),
            HugeFill::Continue => assert_eq!(copied, present * 4096, "continue: bytes read"),
        }
        let verified = l.pages_verified.load(Relaxed);
        // CONTINUE verifies each page once (one thread claims a block);
        // with COPY the fault thread and the prefetcher may both read one.
        match fill {
            HugeFill::Continue => assert_eq!(verified, present),
            HugeFill::Copy => assert!(verified >= present, "copy: {verified} < {present}"),
        }
        assert_eq!(l.timeout_wakes.load(Relaxed), 0);
        finish(vm, &console, &w, &format!("lazy on hugetlb, {fill}"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Fresh processes on hugetlb: run, then lazy resumes filled with
/// CONTINUE, COPY and CONTINUE again (`STASIS_HUGETLB_FILL`), each paused
/// at a seeded random point by a signal; the last finishes with the
/// model's checksum, and each resume logs the method it used.
#[test]
fn fresh_process_pause_resume_on_hugetlb_with_each_fill() {
    let steps = ["", "continue", "copy", "continue"].map(|fill| Step {
        backing: "hugetlb",
        fill,
    });
    fresh_process_chain(
        "fresh-process hugetlb fills",
        43,
        &steps,
        |i, step, text| {
            assert!(text.contains("hugetlb memory"), "process {i}:\n{text}");
            if i > 0 {
                let want = format!("filled with UFFDIO_{}", step.fill.to_uppercase());
                assert!(
                    text.contains(&want),
                    "process {i} does not log {want:?}:\n{text}"
                );
            }
        },
    );
}

/// One flipped byte in a present page of `memory.bin`: a lazy resume on
/// hugetlb fails with the error naming the file and the page's offset, with
/// either fill method, in a fresh process, and the guest never finishes
/// on wrong memory (with CONTINUE the bad block was written into the
/// memfd's page cache, verified there and never mapped).
#[test]
fn corrupted_page_is_a_clear_error_on_hugetlb_with_each_fill() {
    let _g = serial();
    if !ready("corrupted page on hugetlb", 64 << 20) {
        return;
    }
    let mut rng = test_rng("corrupted page on hugetlb");
    let w = workload(3000, 47);
    let console = ConsoleBuffer::new();
    let mut vm = boot(&w, 64 << 20, MemoryBacking::Hugetlb, &console);
    wait_round(&vm, 3);
    vm.pause().unwrap();
    assert!(vm.exited().is_none(), "guest ended before the pause");
    let dir = common::scratch("backing-badmem");
    let snap = dir.join("good");
    vm.snapshot(&snap).unwrap();
    drop(vm);
    let (st, _) = stasis::vmm::persist::inspect(&snap).unwrap();
    let present: Vec<usize> = st.memory.present.iter_ones().collect();
    let page = present[rng.random_range(0..present.len())];
    let off = page as u64 * 4096 + rng.random_range(0..4096u64);
    for fill in ["continue", "copy"] {
        let bad = dir.join(fill);
        std::fs::create_dir_all(&bad).unwrap();
        for f in ["state.bin", "memory.bin"] {
            std::fs::copy(snap.join(f), bad.join(f)).unwrap();
        }
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(bad.join("memory.bin"))
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, off).unwrap();
            f.write_all_at(&[b[0] ^ 0x20], off).unwrap();
        }
        let file = bad.join("memory.bin").canonicalize().unwrap();
        let want = format!(
            "memory file {}: checksum mismatch in the page at offset {:#x}",
            file.display(),
            page * 4096
        );
        let con = dir.join(format!("{fill}.txt"));
        let out = Command::new(BIN)
            .arg("resume")
            .arg(&bad)
            .args(["--lazy", "--memory-backing", "hugetlb", "--console"])
            .arg(&con)
            .env(HUGE_FILL_ENV, fill)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{fill}: corrupted snapshot accepted:\n{err}"
        );
        assert!(err.contains(&want), "{fill}: want {want:?} in:\n{err}");
        let text = std::fs::read_to_string(&con).unwrap_or_default();
        assert_eq!(
            guest::parse_checksum(&text),
            None,
            "{fill}: the guest finished on corrupted memory"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn last_round(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("round ")?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Fresh processes: run on hugetlb, resume on THP, then 4k, then hugetlb,
/// each time lazily, paused at seeded random points by a signal; the last
/// one finishes with the model's checksum. Each process logs its backing.
#[test]
fn fresh_process_chain_across_backings() {
    let steps = ["hugetlb", "thp", "4k", "hugetlb"].map(|backing| Step { backing, fill: "" });
    fresh_process_chain("fresh-process chain", 41, &steps, |i, step, text| {
        let b = step.backing;
        assert!(
            text.contains(&format!("{b} memory")),
            "process {i} does not log its backing {b}:\n{text}"
        );
    });
}

/// One process of [`fresh_process_chain`]: its `--memory-backing` and, for
/// a resume, its hugetlb fill method (`STASIS_HUGETLB_FILL`; "" for the
/// default).
struct Step {
    backing: &'static str,
    fill: &'static str,
}

/// Runs the workload in a chain of fresh processes: the first `stasis run`,
/// each next one a lazy `stasis resume` of the previous one's snapshot,
/// every process but the last paused at a seeded random round by a signal;
/// the last finishes with the model's checksum. `check(i, step, log)` reads
/// each process's log.
fn fresh_process_chain(test: &str, seed: u64, steps: &[Step], check: impl Fn(usize, &Step, &str)) {
    let _g = serial();
    if !ready(test, 64 << 20) {
        return;
    }
    let mut rng = test_rng(test);
    let w = Workload {
        report: 50,
        ..workload(3000, seed)
    };
    let dir = common::scratch(&test.replace(' ', "-"));
    let console = |i: usize| dir.join(format!("console{i}.txt"));
    let log = |i: usize| dir.join(format!("log{i}.txt"));
    let snap = |i: usize| dir.join(format!("snap{i}"));
    for (i, step) in steps.iter().enumerate() {
        let mut cmd = Command::new(BIN);
        if i == 0 {
            cmd.args(["run", "--mem", "64M", "--cmdline", &w.cmdline()]);
        } else {
            cmd.arg("resume").arg(snap(i - 1)).arg("--lazy");
        }
        if !step.fill.is_empty() {
            cmd.env(HUGE_FILL_ENV, step.fill);
        }
        cmd.args(["--memory-backing", step.backing])
            .arg("--console")
            .arg(console(i))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log(i)).unwrap());
        let last = i == steps.len() - 1;
        if !last {
            cmd.arg("--snapshot-on-signal").arg(snap(i));
        }
        let mut child = cmd.spawn().unwrap();
        if last {
            let st = child.wait().unwrap();
            let text = std::fs::read_to_string(log(i)).unwrap();
            assert!(st.success(), "{text}");
        } else {
            let after = if i == 0 {
                0
            } else {
                last_round(&console(i - 1))
            } + rng.random_range(1..300);
            common::wait_for(Duration::from_secs(120), "guest progress", || {
                last_round(&console(i)) > after || child.try_wait().unwrap().is_some()
            });
            assert!(child.try_wait().unwrap().is_none(), "guest finished early");
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
            assert!(child.wait().unwrap().success());
            assert!(snap(i).join("state.bin").is_file());
        }
        check(i, step, &std::fs::read_to_string(log(i)).unwrap());
    }
    let text = std::fs::read_to_string(console(steps.len() - 1)).unwrap();
    assert_eq!(
        guest::parse_checksum(&text),
        Some(guest::reference(&w).checksum),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A guest larger than the pool: a one-line error naming nr_hugepages at
/// create, from the library and the CLI; VMs already running are unaffected.
#[test]
fn a_pool_too_small_is_a_clear_error_at_create() {
    let _g = serial();
    if !ready("pool too small", 64 << 20) {
        return;
    }
    let w = workload(300, 51);
    let console = ConsoleBuffer::new();
    let vm = boot(&w, 64 << 20, MemoryBacking::Hugetlb, &console);
    let too_big = (HugePool::read().total + 64) * (2 << 20);
    let e = Vm::boot(VmConfig {
        cmdline: w.cmdline(),
        mem_bytes: too_big,
        memory_backing: MemoryBacking::Hugetlb,
        ..VmConfig::default()
    })
    .err()
    .expect("a guest larger than the pool was created");
    let msg = stasis::error_chain(&e);
    assert!(msg.contains("nr_hugepages"), "{msg}");
    // auto falls back instead.
    let v2 = Vm::boot(VmConfig {
        cmdline: w.cmdline(),
        mem_bytes: too_big,
        ..VmConfig::default()
    })
    .unwrap();
    assert_ne!(v2.config().memory_backing, MemoryBacking::Hugetlb);
    drop(v2);
    let out = Command::new(BIN)
        .args(["run", "--memory-backing", "hugetlb", "--mem"])
        .arg(format!("{}M", too_big >> 20))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nr_hugepages") && err.trim().lines().count() == 1,
        "{err}"
    );
    finish(vm, &console, &w, "the VM running alongside");
}

/// On auto and hugetlb, a size that is not a multiple of 2 MiB is rounded
/// up; on 4k it is kept.
#[test]
fn odd_sizes_are_rounded_up_to_2_mib() {
    let _g = serial();
    if !ready("odd sizes", 66 << 20) {
        return;
    }
    let w = workload(50, 61);
    let odd = (64 << 20) + 4096;
    for (b, want) in [
        (MemoryBacking::Hugetlb, 66 << 20),
        (MemoryBacking::Small, odd),
    ] {
        let console = ConsoleBuffer::new();
        let vm = boot(&w, odd, b, &console);
        assert_eq!(vm.config().mem_bytes, want, "{b}");
        finish(vm, &console, &w, &format!("odd size on {b}"));
    }
}

/// Through the API: `serve --memory-backing hugetlb` runs sandboxes on
/// hugetlb memory (shown by `GET /sandboxes/{id}` as
/// `stasis.memoryBacking`, across pause and connect); a template whose
/// guest does not fit the pool is refused with 429 naming nr_hugepages,
/// and the running sandbox is unaffected.
#[test]
fn api_shows_the_backing_and_a_full_pool_is_429() {
    let _g = serial();
    if !ready("api backing", 64 << 20) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("templates")).unwrap();
    let too_big_mb = (HugePool::read().total + 64) * 2;
    std::fs::write(
        data.join("templates").join("big.json"),
        serde_json::json!({
            "kernel": "testguest",
            "memoryMB": too_big_mb,
            "vcpus": 1,
            "memoryBacking": "hugetlb"
        })
        .to_string(),
    )
    .unwrap();
    let s = api_support::Server::start(&data, &["--backend", "vm", "--memory-backing", "hugetlb"]);
    let id = s.create(serde_json::json!({"templateID": "base", "timeout": 300}));
    let backing = |s: &api_support::Server| s.info(&id).json()["stasis"]["memoryBacking"].clone();
    assert_eq!(backing(&s), "hugetlb", "{}", s.info(&id).body);
    let r2 = s.post(
        "/sandboxes",
        serde_json::json!({"templateID": "big", "timeout": 300}),
    );
    assert_eq!(r2.status, 429, "{}", r2.body);
    assert!(r2.body.contains("nr_hugepages"), "{}", r2.body);
    let before = s.round(&id);
    assert!(
        api_support::wait_until(60, || s.round(&id) > before),
        "the running sandbox stopped making progress"
    );
    let r = s.post(&format!("/sandboxes/{id}/pause"), serde_json::json!({}));
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(backing(&s).is_null(), "a paused sandbox has no memory");
    let r = s.post(
        &format!("/sandboxes/{id}/connect"),
        serde_json::json!({"timeout": 120}),
    );
    assert_eq!(r.status, 201, "{} / log:\n{}", r.body, s.log());
    assert_eq!(backing(&s), "hugetlb");
    let r = s.req("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
}
