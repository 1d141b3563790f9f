//! Criterion benchmark: pause-to-disk and lazy resume of a 256 MiB test
//! guest with 32 MiB touched. `stasis bench` covers more sizes and
//! reports fill rates and slowdowns; this one gives criterion's statistics.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use stasis::guest::Workload;
use stasis::vmm::{Console, RestoreMode, Vm, VmConfig};

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("stasis-criterion-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn booted() -> Vm {
    let w = Workload {
        mib: 32,
        rounds: 0,
        seed: 9,
        report: 0,
        base_mib: 16,
    };
    let vm = Vm::boot(VmConfig {
        cmdline: w.cmdline(),
        mem_bytes: 256 << 20,
        ..VmConfig::default()
    })
    .unwrap();
    while vm.guest_status().is_none_or(|s| s.round < 2) {
        std::thread::yield_now();
    }
    vm
}

fn pause_resume(c: &mut Criterion) {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("*** SKIPPED: no /dev/kvm ***");
        return;
    }
    let dir = scratch();
    let mut g = c.benchmark_group("256MiB-guest-32MiB-touched");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("pause_to_disk", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let mut vm = booted();
                let snap = dir.join(format!("p{i}"));
                let t = Instant::now();
                vm.pause().unwrap();
                vm.snapshot(&snap).unwrap();
                total += t.elapsed();
                drop(vm);
                std::fs::remove_dir_all(&snap).unwrap();
            }
            total
        })
    });
    let snap = dir.join("resume");
    let _ = std::fs::remove_dir_all(&snap);
    let mut vm = booted();
    vm.pause().unwrap();
    vm.snapshot(&snap).unwrap();
    drop(vm);
    g.bench_function("lazy_resume_to_running", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let (vm, _) = Vm::restore(&snap, RestoreMode::Lazy, Console::Sink, None).unwrap();
                total += t.elapsed();
                drop(vm);
            }
            total
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, pause_resume);
criterion_main!(benches);
