//! Tier-2 tests: the built-in test guest on real KVM, checked against the
//! independent Rust model; bad input to the VMM.

mod common;

use std::time::Duration;

use stasis::guest::{self, Workload};
use stasis::vmm::{Console, ConsoleBuffer, ExitReason, Kernel, Vm, VmConfig};

fn boot(w: &Workload, mem_bytes: u64, console: &ConsoleBuffer) -> Vm {
    Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: w.cmdline(),
        mem_bytes,
        console: Console::Buffer(console.clone()),
        ..VmConfig::default()
    })
    .expect("boot")
}

#[test]
fn test_guest_checksum_matches_the_rust_model() {
    if !common::kvm_or_skip("test_guest_checksum_matches_the_rust_model") {
        return;
    }
    let w = Workload {
        mib: 24,
        rounds: 7,
        seed: 0xfeed,
        report: 1,
        base_mib: 16,
    };
    let console = ConsoleBuffer::new();
    let vm = boot(&w, 64 << 20, &console);
    let reason = vm.wait(Some(Duration::from_secs(120)));
    assert_eq!(reason, Some(ExitReason::GuestExit(0)), "{}", console.text());
    let exp = guest::reference(&w);
    assert_eq!(guest::parse_checksum(&console.text()), Some(exp.checksum));
    // Every progress line matches the model's per-round hash.
    for (r, acc) in exp.acc_per_round.iter().enumerate() {
        let line = format!("round {} acc={acc:016x}", r + 1);
        assert!(
            console.text().contains(&line),
            "missing '{line}' in:\n{}",
            console.text()
        );
    }
    let st = vm.guest_status().expect("status page");
    assert_eq!((st.round, st.checksum), (7, exp.checksum));
}

#[test]
fn work_memory_spans_the_mmio_gap() {
    if !common::kvm_or_skip("work_memory_spans_the_mmio_gap") {
        return;
    }
    // RAM below the gap ends at 3 GiB; the work area starts 8 MiB below it
    // and its last 24 MiB live above 4 GiB.
    let w = Workload {
        mib: 32,
        rounds: 3,
        seed: 3,
        report: 0,
        base_mib: 3064,
    };
    let console = ConsoleBuffer::new();
    let vm = boot(&w, (3 << 30) + (64 << 20), &console);
    assert_eq!(
        vm.wait(Some(Duration::from_secs(300))),
        Some(ExitReason::GuestExit(0)),
        "{}",
        console.text()
    );
    assert_eq!(
        guest::parse_checksum(&console.text()),
        Some(guest::reference(&w).checksum)
    );
}

#[test]
fn pause_and_resume_in_place_lose_nothing() {
    if !common::kvm_or_skip("pause_and_resume_in_place_lose_nothing") {
        return;
    }
    let w = Workload {
        mib: 16,
        rounds: 4000,
        seed: 11,
        report: 0,
        base_mib: 16,
    };
    let console = ConsoleBuffer::new();
    let mut vm = boot(&w, 64 << 20, &console);
    let mut last = 0;
    for i in 0..20 {
        common::wait_for(Duration::from_secs(60), "progress", || {
            vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round > last)
        });
        if vm.exited().is_some() {
            break;
        }
        vm.pause().unwrap();
        let s = vm.guest_status().unwrap();
        assert!(
            s.round >= last,
            "round went back from {last} to {} at pause {i}",
            s.round
        );
        // While paused, nothing moves.
        assert_eq!(vm.guest_status().unwrap(), s);
        last = s.round;
        vm.resume().unwrap();
    }
    assert_eq!(
        vm.wait(Some(Duration::from_secs(60))),
        Some(ExitReason::GuestExit(0))
    );
    assert_eq!(
        guest::parse_checksum(&console.text()),
        Some(guest::reference(&w).checksum)
    );
}

/// A minimal ELF whose entry is `code`, loaded at 1 MiB.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x100000u64.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
    e[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    e[ph + 16..ph + 24].copy_from_slice(&0x100000u64.to_le_bytes()); // vaddr
    e[ph + 24..ph + 32].copy_from_slice(&0x100000u64.to_le_bytes()); // paddr
    e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    e
}

#[test]
fn a_triple_fault_ends_the_vm_with_its_reason_and_rip() {
    if !common::kvm_or_skip("a_triple_fault_ends_the_vm_with_its_reason_and_rip") {
        return;
    }
    let dir = common::scratch("triple");
    let k = dir.join("ud2.elf");
    // ud2 with an empty IDT: #UD -> #DF -> triple fault.
    std::fs::write(&k, tiny_elf(&[0x0f, 0x0b])).unwrap();
    let vm = Vm::boot(VmConfig {
        kernel: Kernel::Path(k),
        cmdline: String::new(),
        mem_bytes: 64 << 20,
        ..VmConfig::default()
    })
    .unwrap();
    let r = vm.wait(Some(Duration::from_secs(60))).expect("VM ended");
    assert!(!r.is_clean());
    let msg = r.to_string();
    assert!(
        matches!(
            r,
            ExitReason::TripleFault { .. } | ExitReason::InternalError { .. }
        ),
        "{msg}"
    );
    assert!(msg.contains("rip=0x10000"), "{msg}");
}

#[test]
fn bad_configs_are_refused_with_clear_errors() {
    if !common::kvm_or_skip("bad_configs_are_refused_with_clear_errors") {
        return;
    }
    let base = VmConfig::default();
    let e = Vm::boot(VmConfig {
        mem_bytes: 1 << 20,
        ..base.clone()
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("not valid"), "{e}");
    let e = Vm::boot(VmConfig {
        vcpus: 0,
        ..base.clone()
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("vCPUs"), "{e}");
    let e = Vm::boot(VmConfig {
        kernel: Kernel::Path("/nonexistent/vmlinux".into()),
        ..base.clone()
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("cannot read kernel"), "{e}");
    let e = Vm::boot(VmConfig {
        cmdline: "x".repeat(10_000),
        ..base
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("command line"), "{e}");
}
