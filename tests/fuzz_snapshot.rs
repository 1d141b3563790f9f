//! Property tests of the snapshot parsers (issue 14, item 8): `state.bin`
//! (`snapshot::format::decode`, and `persist::inspect` on a whole snapshot
//! directory) and the disk map (`cow::read_map`) get arbitrary bytes and
//! mutated valid files, with their length fields and checksums recomputed
//! so the mutations reach the decoders behind them. They must never panic:
//! always `Ok` or an `Err` with a message.
//!
//! Seeded: `STASIS_FUZZ_SEED` (decimal) overrides the default; the seed is
//! printed. The `state.bin` mutation test boots the test guest once (KVM).

mod common;

use std::path::Path;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use stasis::snapshot::format;
use stasis::vmm::persist::inspect;
use stasis::vmm::virtio::cow::{self, CowDisk};
use stasis::vmm::{Console, Kernel, Vm, VmConfig, VmState};

const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
const DEFAULT_SEED: u64 = 0x5745_1515;

fn runner(test: &str, cases: u32) -> TestRunner {
    let seed: u64 = std::env::var("STASIS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    println!("{test}: seed {seed} (STASIS_FUZZ_SEED={seed} reproduces), {cases} cases");
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    )
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// Overwrite 8 bytes with an extreme little-endian integer (lengths,
    /// counts, offsets).
    Word(usize, u64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let extreme = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(u32::MAX as u64),
        Just(1 << 40),
        any::<u64>(),
    ];
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), vec(any::<u8>(), 1..64)).prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), 1usize..256).prop_map(|(i, n)| Edit::Remove(i, n)),
        (any::<usize>(), extreme).prop_map(|(i, w)| Edit::Word(i, w)),
    ]
}

/// Applies `edits` to `b[from..]` (the part after a header the caller
/// rewrites).
fn apply(b: &mut Vec<u8>, from: usize, edits: &[Edit]) {
    for e in edits {
        let n = b.len().saturating_sub(from).max(1);
        match e {
            Edit::Flip(i, x) => {
                if b.len() > from {
                    let i = from + i % n;
                    b[i] ^= x;
                }
            }
            Edit::Set(i, x) => {
                if b.len() > from {
                    let i = from + i % n;
                    b[i] = *x;
                }
            }
            Edit::Truncate(i) => b.truncate(from + i % n),
            Edit::Insert(i, bytes) => {
                let at = (from + i % n).min(b.len());
                b.splice(at..at, bytes.iter().copied());
            }
            Edit::Remove(i, k) => {
                if b.len() > from {
                    let at = from + i % n;
                    let end = (at + k).min(b.len());
                    b.drain(at..end);
                }
            }
            Edit::Word(i, w) => {
                if b.len() >= from + 8 {
                    let at = from + i % (b.len() - from - 7);
                    b[at..at + 8].copy_from_slice(&w.to_le_bytes());
                }
            }
        }
    }
}

/// A state file around `body`: magic, version, length, CRC64 (what
/// `format::encode` writes), so the body reaches the decoder.
fn wrap_state(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + format::HEADER_LEN + format::CRC_LEN);
    out.extend_from_slice(&format::MAGIC);
    out.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_state(bytes: &[u8]) -> Result<(), String> {
    match format::decode::<VmState>(bytes) {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().is_empty() => Err("an error without a message".into()),
        Err(_) => Ok(()),
    }
}

#[test]
fn state_bin_parser_takes_arbitrary_bytes_without_panicking() {
    let mut r = runner("state_bin_arbitrary", 2000);
    let input = prop_oneof![
        vec(any::<u8>(), 0..256),
        vec(any::<u8>(), 0..4096).prop_map(|b| wrap_state(&b)),
    ];
    r.run(&input, |bytes| {
        decode_state(&bytes).map_err(TestCaseError::fail)?;
        Ok(())
    })
    .unwrap();
}

/// A real snapshot of the test guest (KVM), in `dir/snap`.
fn real_snapshot(dir: &Path) -> std::path::PathBuf {
    let mut vm = Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: "stasis.mib=4 stasis.rounds=0 stasis.seed=7 stasis.report=0 stasis.base=16".into(),
        mem_bytes: 64 << 20,
        console: Console::Sink,
        ..VmConfig::default()
    })
    .expect("boot the test guest");
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round >= 1)
    });
    vm.pause().unwrap();
    let snap = dir.join("snap");
    vm.snapshot(&snap).unwrap();
    snap
}

#[test]
fn mutated_real_state_bin_is_ok_or_a_clear_error() {
    if !common::kvm_or_skip("mutated_real_state_bin_is_ok_or_a_clear_error") {
        return;
    }
    let dir = common::scratch("fuzz-state");
    let snap = real_snapshot(&dir);
    let valid = std::fs::read(snap.join("state.bin")).unwrap();
    let body = valid[format::HEADER_LEN..valid.len() - format::CRC_LEN].to_vec();
    format::decode::<VmState>(&valid).expect("the unmodified state decodes");
    // Mutated bodies, re-wrapped with a valid header and checksum.
    let mut r = runner("state_bin_mutated", 1000);
    r.run(&vec(edit(), 1..6), |edits| {
        let mut b = body.clone();
        apply(&mut b, 0, &edits);
        decode_state(&wrap_state(&b)).map_err(TestCaseError::fail)?;
        Ok(())
    })
    .unwrap();
    // A few through `inspect` on the whole directory (memory file checks
    // included).
    let state = snap.join("state.bin");
    let mut r = runner("state_bin_mutated_inspect", 48);
    r.run(&vec(edit(), 1..4), |edits| {
        let mut b = body.clone();
        apply(&mut b, 0, &edits);
        std::fs::write(&state, wrap_state(&b)).unwrap();
        if let Err(e) = inspect(&snap) {
            prop_assert!(!e.to_string().is_empty());
        }
        Ok(())
    })
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrites a map's trailing CRC64 so edits reach the parser behind it.
fn reseal_map(b: &mut [u8]) {
    if b.len() >= 8 {
        let off = b.len() - 8;
        let crc = CRC64.checksum(&b[..off]);
        b[off..].copy_from_slice(&crc.to_le_bytes());
    }
}

#[test]
fn disk_map_parser_takes_arbitrary_and_mutated_maps() {
    let dir = common::scratch("fuzz-map");
    let size: u64 = 1 << 20;
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x11u8; size as usize]).unwrap();
    let overlay = dir.join("overlay");
    let mut d = CowDisk::open(&base, &overlay).unwrap();
    for off in [0u64, 4096, 65536, size - 4096] {
        d.write_at(off, b"stasis map fuzz").unwrap();
    }
    d.flush().unwrap();
    drop(d);
    let map_file = cow::map_path(&overlay);
    let valid = std::fs::read(&map_file).unwrap();
    let (map, _) = cow::read_map(&map_file, size).expect("the valid map reads");
    assert_eq!(map.count_ones(), 4);
    let probe = dir.join("probe.map");
    let check = |bytes: &[u8], size: u64| -> Result<(), TestCaseError> {
        std::fs::write(&probe, bytes).unwrap();
        match cow::read_map(&probe, size) {
            Ok((map, crcs)) => {
                prop_assert_eq!(crcs.len() as u64, size.div_ceil(4096));
                prop_assert!(map.count_ones() as u64 <= size.div_ceil(4096));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    };
    let sizes = prop_oneof![
        Just(size),
        Just(0u64),
        Just(4096u64),
        Just(size + 1),
        Just(u64::MAX),
        0u64..(1 << 24),
    ];
    let mut r = runner("disk_map_arbitrary", 1000);
    r.run(&(vec(any::<u8>(), 0..512), sizes.clone()), |(bytes, sz)| {
        check(&bytes, sz)
    })
    .unwrap();
    let mut r = runner("disk_map_mutated", 1500);
    r.run(
        &(vec(edit(), 1..6), any::<bool>(), sizes),
        |(edits, reseal, sz)| {
            let mut b = valid.clone();
            // The magic stays (or the parser stops there); everything after
            // it, checksum included, is fair game.
            apply(&mut b, 8, &edits);
            if reseal {
                reseal_map(&mut b);
            }
            check(&b, sz)
        },
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
