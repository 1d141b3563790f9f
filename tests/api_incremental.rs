//! Incremental pause through the API (VM backend, jailed workers: the
//! default as root): a sandbox resumed from its own snapshot pauses into a
//! child layer holding only the pages its guest wrote since the resume.
//!
//! The guest is the built-in test guest on a template that fills 32 MiB at
//! boot but whose rounds touch only the first MiB (`stasis.hot=1`): a full
//! pause stores the 32 MiB, an incremental one about the hot MiB (the 2 MiB
//! blocks around it on hugetlb memory). The test checks, from the
//! snapshot's own accounting (`state.bin`, shown as
//! `stasis.lastPauseMemoryBytes`), that the second pause's layer is a small
//! fraction of the first; that every paused generation's guest state
//! (its status page, read through the chain) matches an independent model
//! of the workload; that the chain stays within its depth limit (a full
//! layer after `MAX_CHAIN_DEPTH` parents), exactly the chain's generations
//! stay on disk and deleting the sandbox removes them all; that a failed
//! write of an incremental layer (`STASIS_FAULT=fail-pause-write:NAME`)
//! leaves no half layer and the sandbox running and pausable; and that a
//! user snapshot of a sandbox paused incrementally is taken from a full
//! layer.
//!
//! Needs /dev/kvm: fails loudly without it (or prints a "SKIPPED (not
//! passed)" banner with STASIS_ALLOW_SKIP=1).

mod api_support;
mod common;

use std::path::{Path, PathBuf};

use api_support::{check_paused, snapshot_chain, Server};
use serde_json::json;
use stasis::snapshot::layers::{ChainFile, MAX_CHAIN_DEPTH};

/// Bound (s) on waiting for the guest: two busy cores.
const PATIENCE: u64 = 120;
/// The template's workload: 32 MiB filled, rounds over the first MiB.
const MIB: u64 = 32;
const HOT: u64 = 1;
const SEED: u64 = 7;
/// The fault file (in the sandbox's directory) that fails snapshot writes.
const FAIL_FILE: &str = "fail-write";

/// An independent model of the test guest's rounds over its hot pages.
struct Model {
    mem: Vec<u64>,
    acc: u64,
    round: u64,
}

impl Model {
    fn new() -> Model {
        let mut x = SEED | 1;
        let mem = (0..(HOT << 17))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect();
        Model {
            mem,
            acc: 0xcbf2_9ce4_8422_2325,
            round: 0,
        }
    }

    /// `acc` after round `r` (rounds only go forward).
    fn acc_at(&mut self, r: u64) -> u64 {
        assert!(r >= self.round, "the model only goes forward");
        while self.round < r {
            self.round += 1;
            let r = self.round;
            for p in 0..(HOT << 8) as usize {
                let j = p * 512 + ((r.wrapping_mul(7) as usize).wrapping_add(p) & 511);
                let v = self.mem[j]
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(r);
                self.mem[j] = v;
                self.acc = (self.acc ^ v).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
        self.acc
    }
}

/// The guest's status page in the snapshot whose chain is `chain`
/// (nearest first): from the nearest layer that stores the page.
fn status_in(chain: &[PathBuf]) -> stasis::guest::GuestStatus {
    use std::os::unix::fs::FileExt;
    let page = (stasis::guest::STATUS_ADDR / 4096) as usize;
    let layer = chain
        .iter()
        .find(|d| state(d).memory.present.get(page))
        .expect("no layer stores the status page");
    let f = std::fs::File::open(layer.join("memory.bin")).unwrap();
    let mut buf = [0u8; 40];
    f.read_exact_at(&mut buf, stasis::guest::STATUS_ADDR)
        .unwrap();
    stasis::guest::GuestStatus::parse(&buf).expect("status page")
}

fn state(dir: &Path) -> stasis::vmm::VmState {
    stasis::snapshot::SnapshotDir::open(dir)
        .and_then(|d| d.load_state())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// What one pause left: the layer count and page bytes the API reports.
struct Paused {
    layers: u64,
    memory_bytes: u64,
    round: u64,
}

/// Pauses `id` and checks the result against its files and the model.
fn pause_and_check(s: &Server, id: &str, model: &mut Model) -> Paused {
    let pid = s.worker_pid(id);
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "pause: {} / log:\n{}", r.body, s.log());
    // Exactly the chain on disk, the usage reported over it, the round.
    let round = check_paused(s, id, pid);
    let chain = snapshot_chain(s, id);
    let d = s.info(id).json();
    let layers = d["stasis"]["snapshotLayers"].as_u64().expect("layers");
    assert_eq!(layers as usize, chain.len(), "{d}");
    assert!(layers as usize <= MAX_CHAIN_DEPTH + 1, "{d}");
    // The snapshot's own accounting.
    let own = state(&chain[0]).memory.bytes_stored;
    assert_eq!(
        d["stasis"]["lastPauseMemoryBytes"].as_u64(),
        Some(own),
        "{d}"
    );
    let dir_bytes = api_support::files_usage(&chain[0]).0;
    assert_eq!(d["stasis"]["lastPauseBytes"].as_u64(), Some(dir_bytes));
    let parents = ChainFile::read(&chain[0])
        .unwrap()
        .map(|c| c.parents.len())
        .unwrap_or(0);
    assert_eq!(parents + 1, chain.len());
    // The guest's memory through the chain matches the model: `acc` is
    // published before the round, so a pause between the two shows the
    // next round's `acc`.
    let st = status_in(&chain);
    assert_eq!(st.round, round);
    assert_eq!(st.phase, stasis::guest::Phase::Rounds);
    let want = model.acc_at(round);
    let next = model.acc_at(round + 1);
    assert!(
        st.acc == want || st.acc == next,
        "round {round}: acc {:#x}, the model says {want:#x} (or {next:#x} for the next round)",
        st.acc
    );
    eprintln!(
        "pause at round {round}: {layers} layer(s), this layer {} KiB of pages ({} KiB on disk)",
        own >> 10,
        dir_bytes >> 10
    );
    Paused {
        layers,
        memory_bytes: own,
        round,
    }
}

/// Resumes `id` in a fresh worker and waits until its guest went past
/// `at_pause`.
fn resume_past(s: &Server, id: &str, at_pause: u64) {
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 300}));
    assert_eq!(r.status, 201, "resume: {} / log:\n{}", r.body, s.log());
    let first = s.round(id);
    assert!(
        first >= at_pause,
        "resumed at round {first}, paused at {at_pause}"
    );
    s.wait_round(id, at_pause + 1000, PATIENCE);
}

#[test]
fn vm_incremental_pause_through_the_api() {
    if !common::kvm_or_skip("vm_incremental_pause_through_the_api") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("templates")).unwrap();
    let spec = json!({
        "kernel": "testguest",
        "cmdline": format!(
            "stasis.mib={MIB} stasis.hot={HOT} stasis.rounds=0 stasis.seed={SEED} stasis.report=0 stasis.base=16"
        ),
        "memoryMB": 64,
        "vcpus": 1,
        "warm": false,
    });
    std::fs::write(data.join("templates/hot.json"), spec.to_string()).unwrap();
    let fault = format!("fail-pause-write:{FAIL_FILE}");
    let s = Server::try_start_env(
        &data,
        &["--backend", "vm"],
        &[("STASIS_FAULT", fault.as_str())],
    )
    .unwrap_or_else(|e| panic!("server did not start: {e}"));
    let id = s.create(json!({"templateID": "hot", "timeout": 300}));
    let sandbox = data.join("sandboxes").join(&id);
    let mut model = Model::new();
    s.wait_round(&id, 1000, PATIENCE);

    // A booted sandbox pauses fully.
    let first = pause_and_check(&s, &id, &mut model);
    assert_eq!(first.layers, 1);
    assert!(
        first.memory_bytes >= MIB << 20,
        "the full layer stores the filled memory: {} bytes",
        first.memory_bytes
    );

    // Resumed from it, the guest writes its hot MiB: a child layer, a
    // small fraction of the full one.
    resume_past(&s, &id, first.round);
    let second = pause_and_check(&s, &id, &mut model);
    assert_eq!(second.layers, 2);
    assert!(
        second.memory_bytes * 4 <= first.memory_bytes,
        "incremental layer {} bytes, full layer {} bytes",
        second.memory_bytes,
        first.memory_bytes
    );

    // A failed write of the next incremental layer: the sandbox keeps
    // running, no half layer is left, the next pause works.
    resume_past(&s, &id, second.round);
    let pid = s.worker_pid(&id).unwrap();
    let before: Vec<PathBuf> = snapshot_entries(&sandbox);
    std::fs::write(sandbox.join(FAIL_FILE), b"").unwrap();
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    r.assert_error(500);
    assert!(r.body.contains("keeps running"), "{}", r.body);
    assert_eq!(s.info(&id).json()["state"], "running");
    assert_eq!(s.worker_pid(&id), Some(pid), "the same worker goes on");
    assert_eq!(snapshot_entries(&sandbox), before, "a half layer was left");
    let r0 = s.round(&id);
    s.wait_round(&id, r0 + 1000, PATIENCE);
    std::fs::remove_file(sandbox.join(FAIL_FILE)).unwrap();

    // MAX_CHAIN_DEPTH + 1 more pauses: the chain grows to its limit, then
    // a full layer starts a new one.
    let mut layers = vec![first.layers, second.layers];
    let mut last = pause_and_check(&s, &id, &mut model);
    layers.push(last.layers);
    for _ in 0..MAX_CHAIN_DEPTH {
        resume_past(&s, &id, last.round);
        last = pause_and_check(&s, &id, &mut model);
        layers.push(last.layers);
    }
    let depth = MAX_CHAIN_DEPTH as u64;
    let want: Vec<u64> = (1..=depth + 1).chain(1..=2).collect();
    assert_eq!(layers, want, "layers after each pause");

    // A user snapshot of a sandbox paused incrementally is a full layer
    // (taken after a brief resume); the sandbox stays paused and its
    // chain is then that one full layer.
    assert_eq!(last.layers, 2);
    let r = s.post(&format!("/sandboxes/{id}/snapshots"), json!({}));
    assert_eq!(r.status, 201, "{} / log:\n{}", r.body, s.log());
    let d = s.info(&id).json();
    assert_eq!(d["state"], "paused", "{d}");
    assert_eq!(d["stasis"]["snapshotLayers"], 1, "{d}");
    let after = check_paused(&s, &id, None);
    assert!(after >= last.round);
    assert_eq!(snapshot_chain(&s, &id).len(), 1);
    let sid = r.json()["snapshotID"].as_str().unwrap().to_string();
    let stored = data.join("snapshots").join(&sid);
    assert!(stored.join("state.bin").is_file(), "{}", stored.display());
    assert!(
        !stored.join(stasis::snapshot::layers::LAYERS_FILE).exists(),
        "the stored snapshot has parent layers"
    );

    // Deleting the sandbox removes every generation.
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    assert!(!sandbox.exists(), "{} is left", sandbox.display());
}

/// The `snapshot-*` entries of a sandbox directory, sorted.
fn snapshot_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}
