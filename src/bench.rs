//! `stasis bench`: measures pause and resume of the built-in test guest at
//! several guest sizes and touched fractions, against the raw sequential
//! write rate of the same disk measured in the same run. Prints a table and,
//! optionally, JSON.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::guest::Workload;
use crate::snapshot::uffd::HugeFill;
use crate::vmm::memory::MemoryBacking;
use crate::vmm::{Console, RestoreMode, RestorePaths, Vm, VmConfig};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] crate::vmm::Error),
    /// Scratch files failed.
    #[error("benchmark scratch I/O in {path}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest stopped making progress or ended.
    #[error("guest {0}")]
    Guest(String),
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Memory backing in use (hugetlb, thp or 4k), the same for boot and
    /// both restores.
    pub backing: String,
    /// Boot until the workload finished its first pass over the touched
    /// memory (fill + one round) (ms).
    pub boot_touch_ms: f64,
    /// Guest memory, MiB.
    pub guest_mib: u64,
    /// Memory the workload touched, MiB.
    pub touched_mib: u64,
    /// vCPUs stopped (ms).
    pub stop_ms: f64,
    /// Pause to disk, from request to durable snapshot (ms).
    pub pause_ms: f64,
    /// Pause seconds per GiB of guest memory.
    pub pause_s_per_gib_guest: f64,
    /// Pause seconds per GiB of touched memory.
    pub pause_s_per_gib_touched: f64,
    /// Bytes written to the memory file (MiB).
    pub written_mib: f64,
    /// Memory-file write throughput (GB/s, scan + write + fsync).
    pub write_gbps: f64,
    /// Raw sequential write rate of the same disk, same size, same run (GB/s).
    pub raw_write_gbps: f64,
    /// write_gbps / raw_write_gbps.
    pub write_vs_raw: f64,
    /// Lazy restore: call to vCPUs running (ms).
    pub resume_to_running_ms: f64,
    /// Lazy restore: until the working set was resident (ms).
    pub working_set_resident_ms: f64,
    /// Lazy restore: until all stored memory was resident (ms).
    pub all_resident_ms: f64,
    /// Lazy fill rate while the guest runs (GB/s).
    pub lazy_fill_gbps: f64,
    /// Eager restore: call to vCPUs running (ms).
    pub eager_restore_ms: f64,
    /// Steady-state time of one workload round before the pause (ms).
    pub steady_round_ms: f64,
    /// Time from lazy resume until the guest finished its next round (ms).
    pub first_round_after_resume_ms: f64,
    /// first_round_after_resume / steady_round.
    pub slowdown: f64,
    /// The memory file was written with O_DIRECT.
    pub direct_io: bool,
    /// Time spent computing page checksums during the pause (summed over
    /// writer threads, which interleave it with their writes) (ms).
    pub pause_hash_ms: f64,
    /// Same run, same disk: writing as many bytes as the pause wrote, the
    /// way a pause does, with page checksums: best of two (ms).
    pub probe_with_sums_ms: f64,
    /// The same without page checksums: best of two (ms).
    pub probe_without_sums_ms: f64,
    /// Lazy restore: faulting threads found stalled and woken by the
    /// loader's idle timeout (a lost wake-up; must be 0).
    pub timeout_wakes: u64,
    /// hugetlb fill method of the lazy-restore columns above (the
    /// default); empty on other backings.
    pub fill: String,
    /// Every lazy restore of this case, in the order run: on hugetlb each
    /// fill method twice, alternating (default first); elsewhere one.
    pub lazy_runs: Vec<LazyRun>,
}

/// One lazy restore of a case's snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct LazyRun {
    /// hugetlb fill method (`copy` or `continue`), empty elsewhere.
    pub fill: String,
    /// Call to vCPUs running (ms).
    pub resume_to_running_ms: f64,
    /// Until the working set was resident (ms).
    pub working_set_resident_ms: f64,
    /// Until all stored memory was resident (ms).
    pub all_resident_ms: f64,
    /// Until the guest finished its next round (ms).
    pub first_round_after_resume_ms: f64,
    /// Faulters woken by the loader's timeout (must be 0).
    pub timeout_wakes: u64,
    /// Restore phases, cumulative from the call (ms): state read, VM and
    /// memory mapped, loader started, vCPUs and devices restored.
    pub phase_state_ms: f64,
    /// See `phase_state_ms`.
    pub phase_shell_ms: f64,
    /// See `phase_state_ms`.
    pub phase_memory_ms: f64,
    /// See `phase_state_ms`.
    pub phase_vcpus_ms: f64,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Guest sizes in bytes.
    pub sizes: Vec<u64>,
    /// Touched fractions in percent.
    pub percents: Vec<u64>,
    /// Scratch directory (on the disk to measure).
    pub dir: PathBuf,
    /// Memory backings, each measured in turn (empty: `auto`).
    pub backings: Vec<MemoryBacking>,
}

const GIB: f64 = (1u64 << 30) as f64;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` of non-zero data sequentially in 4 MiB O_DIRECT writes
/// (as the snapshot writer does; buffered where the filesystem lacks
/// O_DIRECT) and fsyncs: the disk's raw sequential write rate in GB/s.
pub fn raw_write_rate(dir: &Path, bytes: u64) -> Result<f64, Error> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = dir.join("raw-write.tmp");
    let chunk = 4usize << 20;
    let buf = crate::snapshot::memfile::AnonMapping::new(chunk).map_err(io_err(&path))?;
    // SAFETY: `buf` is our own fresh, writable mapping of `chunk` bytes.
    let data = unsafe {
        std::ptr::write_bytes(buf.addr(), 0xa5, chunk);
        std::slice::from_raw_parts(buf.addr() as *const u8, chunk)
    };
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&path)
    };
    let t = Instant::now();
    let f = open(true).or_else(|_| open(false)).map_err(io_err(&path))?;
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(chunk as u64) as usize;
        let n = n.next_multiple_of(4096).min(chunk);
        f.write_all_at(&data[..n], off).map_err(io_err(&path))?;
        off += n as u64;
    }
    f.sync_all().map_err(io_err(&path))?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).map_err(io_err(&path))?;
    Ok(off as f64 / secs / 1e9)
}

fn wait_round(vm: &Vm, past: u64, limit: Duration) -> Result<(u64, Instant), Error> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = vm.guest_status() {
            if s.round > past {
                return Ok((s.round, Instant::now()));
            }
        }
        if let Some(r) = vm.exited() {
            return Err(Error::Guest(format!("ended: {r}")));
        }
        if Instant::now() > end {
            return Err(Error::Guest(format!(
                "made no progress past round {past} in {limit:?}"
            )));
        }
        std::hint::spin_loop();
    }
}

/// Average round time over at least `min` of running.
fn steady_round(vm: &Vm, min: Duration) -> Result<f64, Error> {
    let r0 = vm.guest_status().map(|s| s.round).unwrap_or(0);
    let (r1, t1) = wait_round(vm, r0, Duration::from_secs(120))?;
    let mut r = r1;
    loop {
        let (r2, t2) = wait_round(vm, r, Duration::from_secs(120))?;
        r = r2;
        if t2 - t1 >= min {
            return Ok((t2 - t1).as_secs_f64() * 1e3 / (r2 - r1) as f64);
        }
    }
}

/// Measures one guest size and touched fraction on `auto` memory.
pub fn run_case(dir: &Path, mem_bytes: u64, percent: u64) -> Result<CaseResult, Error> {
    run_case_backed(dir, mem_bytes, percent, MemoryBacking::Auto)
}

/// Measures one guest size and touched fraction on a memory backing (boot
/// and both restores on it).
pub fn run_case_backed(
    dir: &Path,
    mem_bytes: u64,
    percent: u64,
    backing: MemoryBacking,
) -> Result<CaseResult, Error> {
    let mem_mib = mem_bytes >> 20;
    let touched_mib = (mem_mib * percent / 100).clamp(1, mem_mib - 17);
    let w = Workload {
        mib: touched_mib,
        rounds: 0,
        seed: 1234,
        report: 0,
        base_mib: 16,
    };
    let t_boot = Instant::now();
    let mut vm = Vm::boot(VmConfig {
        cmdline: w.cmdline(),
        mem_bytes,
        memory_backing: backing,
        ..VmConfig::default()
    })?;
    let backing = vm.config().memory_backing;
    let (_, t1) = wait_round(&vm, 0, Duration::from_secs(600))?;
    let boot_touch = t1 - t_boot;
    // Past the fill and the first rounds, then steady state.
    wait_round(&vm, 2, Duration::from_secs(600))?;
    let steady = steady_round(&vm, Duration::from_millis(300))?;

    let snap = dir.join(format!("snap-{mem_mib}-{percent}"));
    let _ = std::fs::remove_dir_all(&snap);
    let t = Instant::now();
    vm.pause()?;
    let stop = t.elapsed();
    let paused_round = vm.guest_status().map(|s| s.round).unwrap_or(0);
    let st = vm.snapshot(&snap)?;
    let pause = t.elapsed();
    drop(vm);
    let raw = raw_write_rate(dir, st.bytes_written.max(64 << 20))?;
    // What the checksums cost a pause: the pause's write, with and without
    // them, alternated, best of two each.
    let (mut with_sums, mut without_sums) = (f64::MAX, f64::MAX);
    let probe_bytes = (st.bytes_written.max(4096)) as usize;
    for sums in [true, false, true, false] {
        let r = crate::snapshot::memfile::pause_write_probe(probe_bytes, dir, sums)
            .map_err(|e| Error::Guest(format!("write probe: {e}")))?;
        let ms = r.elapsed.as_secs_f64() * 1e3;
        let best = if sums {
            &mut with_sums
        } else {
            &mut without_sums
        };
        *best = best.min(ms);
    }
    let write_gbps = st.bytes_written as f64 / st.memory_time.as_secs_f64() / 1e9;

    // Eager restore, for comparison.
    let restore = |mode| {
        Vm::restore_backed(
            &snap,
            mode,
            Console::Sink,
            None,
            RestorePaths::default(),
            backing,
        )
    };
    let (vm, es) = restore(RestoreMode::Eager)?;
    drop(vm);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // Lazy restores: on hugetlb every fill method, alternated, twice each
    // (the same snapshot, its file warm in the page cache for all).
    let fills: Vec<Option<HugeFill>> = if backing == MemoryBacking::Hugetlb {
        let d = HugeFill::default();
        let o = match d {
            HugeFill::Copy => HugeFill::Continue,
            HugeFill::Continue => HugeFill::Copy,
        };
        vec![Some(d), Some(o), Some(d), Some(o)]
    } else {
        vec![None]
    };
    let mut lazy_runs = Vec::new();
    let mut first = None;
    for fill in fills {
        let t = Instant::now();
        let (vm, rs) = Vm::restore_opts(
            &snap,
            RestoreMode::Lazy,
            Console::Sink,
            None,
            RestorePaths::default(),
            backing,
            crate::vmm::RestoreOpts {
                huge_fill: fill,
                ..Default::default()
            },
        )?;
        let (_, t_round) = wait_round(&vm, paused_round, Duration::from_secs(600))?;
        let first_round = t_round - t;
        let ws = vm.wait_working_set()?.unwrap_or_default();
        let all = vm.wait_memory_complete()?.unwrap_or_default();
        let timeout_wakes = vm.lazy_stats().map_or(0, |l| {
            l.timeout_wakes.load(std::sync::atomic::Ordering::Relaxed)
        });
        drop(vm);
        let run = LazyRun {
            fill: rs
                .huge_fill
                .map(|f| f.name().to_owned())
                .unwrap_or_default(),
            resume_to_running_ms: ms(rs.to_running),
            working_set_resident_ms: ms(ws),
            all_resident_ms: ms(all),
            first_round_after_resume_ms: ms(first_round),
            timeout_wakes,
            phase_state_ms: ms(rs.phases.state),
            phase_shell_ms: ms(rs.phases.shell),
            phase_memory_ms: ms(rs.phases.memory),
            phase_vcpus_ms: ms(rs.phases.vcpus),
        };
        if first.is_none() {
            first = Some((rs, all, ws, first_round, timeout_wakes));
        }
        lazy_runs.push(run);
    }
    let (rs, all, ws, first_round, timeout_wakes) = first.expect("at least one lazy restore");
    let _ = std::fs::remove_dir_all(&snap);

    Ok(CaseResult {
        backing: backing.name().into(),
        boot_touch_ms: ms(boot_touch),
        guest_mib: mem_mib,
        touched_mib,
        stop_ms: ms(stop),
        pause_ms: ms(pause),
        pause_s_per_gib_guest: pause.as_secs_f64() / (mem_bytes as f64 / GIB),
        pause_s_per_gib_touched: pause.as_secs_f64() / (touched_mib as f64 / 1024.0),
        written_mib: st.bytes_written as f64 / (1 << 20) as f64,
        write_gbps,
        raw_write_gbps: raw,
        write_vs_raw: write_gbps / raw,
        resume_to_running_ms: ms(rs.to_running),
        working_set_resident_ms: ms(ws),
        all_resident_ms: ms(all),
        lazy_fill_gbps: if all.is_zero() {
            0.0
        } else {
            rs.bytes_stored as f64 / all.as_secs_f64() / 1e9
        },
        eager_restore_ms: ms(es.to_running),
        steady_round_ms: steady,
        first_round_after_resume_ms: ms(first_round),
        slowdown: ms(first_round) / steady,
        direct_io: st.direct_io,
        pause_hash_ms: ms(st.hash_time),
        probe_with_sums_ms: with_sums,
        probe_without_sums_ms: without_sums,
        timeout_wakes,
        fill: rs
            .huge_fill
            .map(|f| f.name().to_owned())
            .unwrap_or_default(),
        lazy_runs,
    })
}

/// Runs every case, printing each row as it completes.
pub fn run(opts: &BenchOpts, out: &mut dyn Write) -> Result<Vec<CaseResult>, Error> {
    std::fs::create_dir_all(&opts.dir).map_err(io_err(&opts.dir))?;
    let _ = writeln!(out, "{}", crate::vmm::backing::describe_host());
    let _ = writeln!(
        out,
        "{:>7} {:>8} {:>7} {:>8} | {:>8} {:>7} {:>7} | {:>8} {:>6} {:>6} {:>5} | {:>7} {:>7} {:>8} {:>6} | {:>7} | {:>7} {:>8} {:>6}",
        "backing", "boot+tch", "guest", "touched", "pause", "s/GiB", "s/GiB", "written", "write", "raw", "ratio",
        "resume", "ws-res", "all-res", "fill", "eager", "round", "1st-rnd", "slow"
    );
    let _ = writeln!(
        out,
        "{:>7} {:>8} {:>7} {:>8} | {:>8} {:>7} {:>7} | {:>8} {:>6} {:>6} {:>5} | {:>7} {:>7} {:>8} {:>6} | {:>7} | {:>7} {:>8} {:>6}",
        "", "ms", "MiB", "MiB", "ms", "guest", "touched", "MiB", "GB/s", "GB/s", "", "ms", "ms", "ms", "GB/s", "ms", "ms", "ms", "x"
    );
    let mut rows = Vec::new();
    let backings = if opts.backings.is_empty() {
        vec![MemoryBacking::Auto]
    } else {
        opts.backings.clone()
    };
    for &size in &opts.sizes {
        for &pct in &opts.percents {
            for &backing in &backings {
                let r = run_case_backed(&opts.dir, size, pct, backing)?;
                let _ = writeln!(
                out,
                "{:>7} {:>8.0} {:>7} {:>8} | {:>8.1} {:>7.3} {:>7.3} | {:>8.1} {:>6.2} {:>6.2} {:>5.2} | {:>7.2} {:>7.1} {:>8.1} {:>6.2} | {:>7.1} | {:>7.2} {:>8.1} {:>6.1}",
                r.backing,
                r.boot_touch_ms,
                r.guest_mib,
                r.touched_mib,
                r.pause_ms,
                r.pause_s_per_gib_guest,
                r.pause_s_per_gib_touched,
                r.written_mib,
                r.write_gbps,
                r.raw_write_gbps,
                r.write_vs_raw,
                r.resume_to_running_ms,
                r.working_set_resident_ms,
                r.all_resident_ms,
                r.lazy_fill_gbps,
                r.eager_restore_ms,
                r.steady_round_ms,
                r.first_round_after_resume_ms,
                r.slowdown
            );
                let _ = writeln!(
                out,
                "{:>16}   checksums: {:.1} ms hashing in the pause ({} write{}); same write with / without checksums: {:.1} / {:.1} ms; lazy faulters woken by timeout: {}",
                "",
                r.pause_hash_ms,
                if r.direct_io { "O_DIRECT" } else { "buffered" },
                if r.direct_io { "" } else { ", O_DIRECT unavailable" },
                r.probe_with_sums_ms,
                r.probe_without_sums_ms,
                r.timeout_wakes
            );
                for l in &r.lazy_runs {
                    let _ = writeln!(
                        out,
                        "{:>16}   lazy resume{}: running {:.1} ms (state {:.1}, VM+memory {:.1}, loader {:.1}, vCPUs+devices {:.1}, start {:.1}), ws resident {:.1} ms, all resident {:.1} ms, 1st round {:.1} ms, timeout wakes {}",
                        "",
                        if l.fill.is_empty() {
                            String::new()
                        } else {
                            format!(" [{:>8}]", l.fill)
                        },
                        l.resume_to_running_ms,
                        l.phase_state_ms,
                        l.phase_shell_ms - l.phase_state_ms,
                        l.phase_memory_ms - l.phase_shell_ms,
                        l.phase_vcpus_ms - l.phase_memory_ms,
                        l.resume_to_running_ms - l.phase_vcpus_ms,
                        l.working_set_resident_ms,
                        l.all_resident_ms,
                        l.first_round_after_resume_ms,
                        l.timeout_wakes
                    );
                }
                let _ = out.flush();
                rows.push(r);
            }
        }
    }
    Ok(rows)
}

/// One incremental-pause case: the same paused VM written as a child layer
/// (only what changed since its resume) and as a full layer.
#[derive(Debug, Clone, Serialize)]
pub struct IncrementalResult {
    /// Memory backing in use.
    pub backing: String,
    /// Guest memory, MiB.
    pub guest_mib: u64,
    /// Memory the guest rewrote after the resume, MiB.
    pub changed_mib: u64,
    /// The full snapshot the VM was resumed from stores this much (MiB).
    pub parent_mib: f64,
    /// Incremental pause: request to durable child layer (ms).
    pub incremental_ms: f64,
    /// Bytes the child layer stores (MiB).
    pub incremental_mib: f64,
    /// Full pause of the same state, request to durable snapshot (ms; the
    /// lazy loader had finished before, so no wait is included).
    pub full_ms: f64,
    /// Bytes the full layer stores (MiB).
    pub full_mib: f64,
    /// incremental_ms / full_ms.
    pub time_ratio: f64,
    /// incremental_mib / full_mib.
    pub bytes_ratio: f64,
}

/// Measures an incremental pause: boots a guest of `mem_bytes`, fills all
/// of its memory (the guest's work area plus host-written data), pauses it
/// into a full snapshot, resumes that lazily with write tracking, lets the
/// guest rewrite its work area (`percent` of memory) at least once, pauses,
/// then writes the same paused state as a child layer and as a full layer.
pub fn run_incremental(
    dir: &Path,
    mem_bytes: u64,
    percent: u64,
    backing: MemoryBacking,
) -> Result<IncrementalResult, Error> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    let mem_mib = mem_bytes >> 20;
    let changed_mib = (mem_mib * percent / 100).clamp(1, mem_mib - 17);
    let w = Workload {
        mib: changed_mib,
        rounds: 0,
        seed: 4321,
        report: 0,
        base_mib: 16,
    };
    let mut vm = Vm::boot(VmConfig {
        cmdline: w.cmdline(),
        mem_bytes,
        memory_backing: backing,
        ..VmConfig::default()
    })?;
    let backing = vm.config().memory_backing;
    wait_round(&vm, 1, Duration::from_secs(600))?;
    vm.pause()?;
    // Everything outside the work area (and the guest's low pages) holds
    // data too, so that a full layer is the whole guest.
    let work_end = (w.base_mib + w.mib) << 20;
    let chunk = vec![0xa5u8; 1 << 20];
    for r in vm.memory().iter() {
        let (start, len) = (r.start_addr().0, r.len());
        let mut a = start.max(work_end);
        while a < start + len {
            let n = (start + len - a).min(chunk.len() as u64) as usize;
            vm.memory()
                .write_slice(&chunk[..n], GuestAddress(a))
                .map_err(|e| Error::Guest(format!("filling guest memory: {e}")))?;
            a += n as u64;
        }
    }
    let tag = format!("{mem_mib}-{percent}");
    let s0 = dir.join(format!("incr-parent-{tag}"));
    let si = dir.join(format!("incr-child-{tag}"));
    let sf = dir.join(format!("incr-full-{tag}"));
    for d in [&s0, &si, &sf] {
        let _ = std::fs::remove_dir_all(d);
    }
    let parent = vm.snapshot(&s0)?;
    drop(vm);

    let (mut vm, _) = Vm::restore_opts(
        &s0,
        RestoreMode::Lazy,
        Console::Sink,
        None,
        RestorePaths::default(),
        backing,
        crate::vmm::RestoreOpts {
            track_writes: true,
            ..Default::default()
        },
    )?;
    // Two rounds: every page of the work area rewritten at least once.
    let r0 = vm.guest_status().map(|s| s.round).unwrap_or(0);
    wait_round(&vm, r0 + 2, Duration::from_secs(600))?;
    vm.pause()?;
    // The full pause must not pay for the lazy loader: let it finish first.
    vm.wait_memory_complete()?;
    let incr = vm.snapshot_with(
        &si,
        crate::vmm::SnapshotOpts {
            incremental: true,
            ..Default::default()
        },
    )?;
    let full = vm.snapshot(&sf)?;
    drop(vm);
    for d in [&s0, &si, &sf] {
        let _ = std::fs::remove_dir_all(d);
    }
    if incr.parent.is_none() {
        return Err(Error::Guest(
            "the incremental pause wrote a full layer (no write tracking here?)".into(),
        ));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(IncrementalResult {
        backing: backing.name().into(),
        guest_mib: mem_mib,
        changed_mib,
        parent_mib: mib(parent.bytes_written),
        incremental_ms: ms(incr.total),
        incremental_mib: mib(incr.bytes_written),
        full_ms: ms(full.total),
        full_mib: mib(full.bytes_written),
        time_ratio: incr.total.as_secs_f64() / full.total.as_secs_f64(),
        bytes_ratio: incr.bytes_written as f64 / full.bytes_written.max(1) as f64,
    })
}

/// Runs the incremental case for every size, percent and backing, printing
/// incremental and full pause side by side.
pub fn run_incremental_all(
    opts: &BenchOpts,
    out: &mut dyn Write,
) -> Result<Vec<IncrementalResult>, Error> {
    std::fs::create_dir_all(&opts.dir).map_err(io_err(&opts.dir))?;
    let _ = writeln!(
        out,
        "incremental pause: resume (lazy, write tracking) a full snapshot, the guest rewrites N % of memory, pause as a child layer and as a full layer"
    );
    let _ = writeln!(
        out,
        "{:>7} {:>7} {:>8} {:>8} | {:>10} {:>10} | {:>10} {:>10} | {:>6} {:>6}",
        "backing", "guest", "changed", "parent", "incr", "incr", "full", "full", "time", "bytes"
    );
    let _ = writeln!(
        out,
        "{:>7} {:>7} {:>8} {:>8} | {:>10} {:>10} | {:>10} {:>10} | {:>6} {:>6}",
        "", "MiB", "MiB", "MiB", "ms", "MiB", "ms", "MiB", "ratio", "ratio"
    );
    let backings = if opts.backings.is_empty() {
        vec![MemoryBacking::Auto]
    } else {
        opts.backings.clone()
    };
    let mut rows = Vec::new();
    for &size in &opts.sizes {
        for &pct in &opts.percents {
            for &backing in &backings {
                let r = run_incremental(&opts.dir, size, pct, backing)?;
                let _ = writeln!(
                    out,
                    "{:>7} {:>7} {:>8} {:>8.1} | {:>10.1} {:>10.1} | {:>10.1} {:>10.1} | {:>6.3} {:>6.3}",
                    r.backing,
                    r.guest_mib,
                    r.changed_mib,
                    r.parent_mib,
                    r.incremental_ms,
                    r.incremental_mib,
                    r.full_ms,
                    r.full_mib,
                    r.time_ratio,
                    r.bytes_ratio
                );
                let _ = out.flush();
                rows.push(r);
            }
        }
    }
    Ok(rows)
}
