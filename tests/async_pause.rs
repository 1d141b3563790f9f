//! Asynchronous pause (`POST /sandboxes/{id}/pause` with `{"sync": false}`,
//! the SDK's `beta_pause()` default): the pause answers once the vCPUs are
//! stopped and the VM captured; the worker writes the snapshot in the
//! background, keeps the VM meanwhile, and `stasis.snapshotDurable` says
//! when the snapshot is on disk.
//!
//! The VM tests run the built-in test guest (`base`: an endless workload
//! that checks its own memory and publishes its round) with the worker's
//! fault hook `STASIS_FAULT=hold-pause-write:NAME`, which holds the
//! background write until the file NAME exists in the sandbox's directory
//! (the one host directory a jailed worker sees): the tests act while the snapshot is
//! certainly not durable, without racing the write. They need /dev/kvm and
//! fail loudly without it (or print a "SKIPPED (not passed)" banner with
//! STASIS_ALLOW_SKIP=1).

mod api_support;
mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use api_support::{check_paused, process_dead, wait_until, Server};
use serde_json::json;

/// Bound (s) on waiting for the guest or a write: real guests share two
/// busy cores with everything else.
const PATIENCE: u64 = 120;

struct Setup {
    tmp: tempfile::TempDir,
    /// The file that releases held background writes.
    release: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        // Relative: in each sandbox's directory, the one host directory a
        // jailed worker sees.
        let release = PathBuf::from("release-write");
        Setup { tmp, release }
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    /// A VM-backend server whose workers hold background writes until
    /// [`Setup::release`] exists.
    fn start_vm(&self) -> Server {
        let fault = format!("hold-pause-write:{}", self.release.display());
        Server::try_start_env(
            &self.data(),
            &["--backend", "vm"],
            &[("STASIS_FAULT", fault.as_str())],
        )
        .unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    /// Where the release file of sandbox `id` goes.
    fn release_of(&self, id: &str) -> PathBuf {
        self.data().join("sandboxes").join(id).join(&self.release)
    }

    /// Releases the held writes of every sandbox.
    fn release_writes(&self) {
        let sandboxes = self.data().join("sandboxes");
        // No sandbox directory yet: nothing is held.
        let Ok(dirs) = std::fs::read_dir(&sandboxes) else {
            return;
        };
        for e in dirs.flatten() {
            if e.path().is_dir() {
                std::fs::write(e.path().join(&self.release), b"go").unwrap();
            }
        }
    }
}

fn pause(s: &Server, id: &str, sync: bool) {
    let started = Instant::now();
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({ "sync": sync }));
    assert_eq!(
        r.status,
        204,
        "pause sync={sync}: {} / log:\n{}",
        r.body,
        s.log()
    );
    eprintln!(
        "pause sync={sync} answered in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
}

fn durable(s: &Server, id: &str) -> Option<bool> {
    s.info(id).json()["stasis"]["snapshotDurable"].as_bool()
}

/// Snapshot dirs (complete ones: `snapshot-N`) of a sandbox.
fn complete_snapshots(data: &Path, id: &str) -> Vec<String> {
    std::fs::read_dir(data.join("sandboxes").join(id))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.strip_prefix("snapshot-")
                        .is_some_and(|g| g.parse::<u64>().is_ok())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Paused with `sync: false` while the write is held: paused, not durable,
/// the worker alive and no snapshot on disk yet; once released: durable,
/// the worker gone, the snapshot complete; a connect then resumes from it.
#[test]
fn vm_async_pause_answers_before_the_snapshot_is_durable() {
    if !common::kvm_or_skip("vm_async_pause_answers_before_the_snapshot_is_durable") {
        return;
    }
    let st = Setup::new();
    let s = st.start_vm();
    let id = s.create(json!({"templateID": "base"}));
    let pid = s.worker_pid(&id).unwrap();
    s.wait_round(&id, 2, PATIENCE);

    pause(&s, &id, false);
    let d = s.info(&id).json();
    assert_eq!(d["state"], "paused", "{d}");
    assert_eq!(d["stasis"]["snapshotDurable"], false, "{d}");
    let at_pause = d["stasis"]["pausedAtRound"]
        .as_u64()
        .expect("pausedAtRound");
    assert_eq!(d["stasis"]["guestRound"].as_u64(), Some(at_pause), "{d}");
    assert!(
        !process_dead(pid),
        "the worker must keep the VM while writing"
    );
    assert!(
        complete_snapshots(&st.data(), &id).is_empty(),
        "nothing durable while the write is held"
    );
    // The guest is stopped: its round does not move while paused.
    assert_eq!(
        s.info(&id).json()["stasis"]["guestRound"].as_u64(),
        Some(at_pause)
    );

    st.release_writes();
    assert!(
        wait_until(PATIENCE, || durable(&s, &id) == Some(true)),
        "the snapshot never became durable; log:\n{}",
        s.log()
    );
    assert_eq!(check_paused(&s, &id, Some(pid)), at_pause);

    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 120}));
    assert_eq!(r.status, 201, "{} / log:\n{}", r.body, s.log());
    assert_ne!(s.worker_pid(&id), Some(pid), "resumed by a new worker");
    assert!(s.round(&id) >= at_pause);
    s.wait_round(&id, at_pause + 3, PATIENCE);
    assert_eq!(durable(&s, &id), None, "running: no snapshot to speak of");
}

/// A connect while the write runs (held: it never ends by itself) resumes
/// at once from the memory the worker kept (same worker process, no restore
/// from disk): the write is abandoned, nothing half-written is left, and
/// the guest goes on from its round, its memory checks passing (it
/// advances). A later synchronous pause and a resume from disk work as
/// usual.
#[test]
fn vm_connect_during_the_write_resumes_from_memory() {
    if !common::kvm_or_skip("vm_connect_during_the_write_resumes_from_memory") {
        return;
    }
    let st = Setup::new();
    let s = st.start_vm();
    let id = s.create(json!({"templateID": "base"}));
    let pid = s.worker_pid(&id).unwrap();
    s.wait_round(&id, 2, PATIENCE);
    pause(&s, &id, false);
    let at_pause = s.info(&id).json()["stasis"]["pausedAtRound"]
        .as_u64()
        .unwrap();

    // The write is still held: only an abandoned write lets this answer.
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 120}));
    assert_eq!(r.status, 201, "{} / log:\n{}", r.body, s.log());
    assert!(!st.release_of(&id).exists());
    let d = s.info(&id).json();
    assert_eq!(d["state"], "running", "{d}");
    assert_eq!(
        d["stasis"]["workerPid"].as_i64(),
        Some(pid as i64),
        "resumed in the same worker, from memory: {d}"
    );
    assert!(d["stasis"]["snapshotDurable"].is_null(), "{d}");
    assert!(s.round(&id) >= at_pause);
    let later = s.wait_round(&id, at_pause + 3, PATIENCE);
    assert!(
        complete_snapshots(&st.data(), &id).is_empty(),
        "the abandoned write left a snapshot"
    );
    let leftovers: Vec<_> = std::fs::read_dir(st.data().join("sandboxes").join(&id))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written files left: {leftovers:?}"
    );

    // An ordinary (synchronous) pause and a resume from disk afterwards.
    st.release_writes();
    pause(&s, &id, true);
    assert_eq!(durable(&s, &id), Some(true));
    let at_second = check_paused(&s, &id, Some(pid));
    assert!(at_second >= later);
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 120}));
    assert_eq!(r.status, 201, "{} / log:\n{}", r.body, s.log());
    assert!(s.round(&id) >= at_second);
    s.wait_round(&id, at_second + 3, PATIENCE);
}

/// A second pause during the write reuses the first: `sync: false` answers
/// at once, `sync: true` answers only once the snapshot is durable.
#[test]
fn vm_second_pause_during_the_write_reuses_it() {
    if !common::kvm_or_skip("vm_second_pause_during_the_write_reuses_it") {
        return;
    }
    let st = Setup::new();
    let s = st.start_vm();
    let id = s.create(json!({"templateID": "base"}));
    let pid = s.worker_pid(&id).unwrap();
    s.wait_round(&id, 2, PATIENCE);
    pause(&s, &id, false);
    pause(&s, &id, false);
    assert_eq!(durable(&s, &id), Some(false));

    let addr = s.addr;
    let path = format!("/sandboxes/{id}/pause");
    let release = st.release_of(&id);
    let sync_pause = std::thread::spawn(move || {
        let body = json!({"sync": true}).to_string();
        let r = api_support::http(
            addr,
            "POST",
            &path,
            &[("Content-Type", "application/json")],
            Some(&body),
        );
        // Causality, not timing: a synchronous pause may only answer after
        // the write was released.
        (r, release.exists())
    });
    assert_eq!(durable(&s, &id), Some(false));
    st.release_writes();
    let (r, released_before) = sync_pause.join().unwrap();
    assert_eq!(r.status, 204, "{} / log:\n{}", r.body, s.log());
    assert!(
        released_before,
        "sync pause answered before the write could end"
    );
    assert_eq!(
        durable(&s, &id),
        Some(true),
        "sync pause answered, not durable"
    );
    check_paused(&s, &id, Some(pid));
    // A pause of a durably paused sandbox is a conflict, as before.
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({"sync": false}));
    assert_eq!(r.status, 409, "{}", r.body);
}

/// SIGTERM while a write is held: the server exits only once the snapshot
/// is durable; the next server resumes the sandbox from it, the guest going
/// on from its round.
#[test]
fn vm_shutdown_waits_for_the_background_write() {
    if !common::kvm_or_skip("vm_shutdown_waits_for_the_background_write") {
        return;
    }
    let st = Setup::new();
    let mut s = st.start_vm();
    let id = s.create(json!({"templateID": "base"}));
    s.wait_round(&id, 2, PATIENCE);
    pause(&s, &id, false);
    let at_pause = s.info(&id).json()["stasis"]["pausedAtRound"]
        .as_u64()
        .unwrap();
    assert_eq!(durable(&s, &id), Some(false));

    let pid = s.child.id() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Still serving the write: the server has not exited.
    assert!(s.child.try_wait().unwrap().is_none(), "{}", s.log());
    st.release_writes();
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}; log:\n{}", s.log());
    assert!(
        s.log().contains("snapshot durable before shutdown"),
        "{}",
        s.log()
    );
    assert_eq!(complete_snapshots(&st.data(), &id).len(), 1);

    let s = st.start_vm();
    let d = s.info(&id).json();
    assert_eq!(d["state"], "paused", "{d}");
    assert_eq!(d["stasis"]["snapshotDurable"], true, "{d}");
    assert_eq!(check_paused(&s, &id, None), at_pause);
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 120}));
    assert_eq!(r.status, 201, "{} / log:\n{}", r.body, s.log());
    assert!(s.round(&id) >= at_pause);
    s.wait_round(&id, at_pause + 3, PATIENCE);
}

/// A crash (kill -9) before the snapshot is durable loses the sandbox
/// exactly as a crash loses a running one: the next server reports it gone
/// and removes its files. A kill during the write ends the worker at once.
#[test]
fn vm_crash_before_durability_loses_the_sandbox_like_a_running_one() {
    if !common::kvm_or_skip("vm_crash_before_durability_loses_the_sandbox_like_a_running_one") {
        return;
    }
    let st = Setup::new();
    let mut s = st.start_vm();
    let a = s.create(json!({"templateID": "base"}));
    let b = s.create(json!({"templateID": "base"}));
    let b_pid = s.worker_pid(&b).unwrap();
    s.wait_round(&a, 1, PATIENCE);
    s.wait_round(&b, 1, PATIENCE);
    pause(&s, &a, false);
    pause(&s, &b, false);
    // Kill during the write: the held worker goes, the sandbox with it.
    let r = s.req("DELETE", &format!("/sandboxes/{b}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        wait_until(20, || process_dead(b_pid)),
        "worker outlived the kill"
    );
    assert_eq!(s.info(&b).status, 404);

    s.kill9();
    let s = st.start_vm();
    let r = s.info(&a);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("running"),
        "gone like a running sandbox: {}",
        r.body
    );
    let dir = st.data().join("sandboxes").join(&a);
    assert!(wait_until(20, || !dir.exists()), "files of {a} left");
}

/// The fake backend keeps the API's states: `sync: false` answers with the
/// snapshot already durable (the fake guest has no memory to write).
#[test]
fn fake_async_pause_is_durable_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), &[]);
    let id = s.create(json!({"templateID": "base"}));
    let pid = s.worker_pid(&id).unwrap();
    assert!(wait_until(20, || s.round_opt(&id).is_some_and(|r| r >= 1)));
    pause(&s, &id, false);
    assert_eq!(durable(&s, &id), Some(true));
    let at_pause = check_paused(&s, &id, Some(pid));
    // Another pause: a conflict, as for any paused sandbox.
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({"sync": false}));
    assert_eq!(r.status, 409, "{}", r.body);
    // No body, or a body without `sync`: synchronous, as before.
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(s.round(&id) >= at_pause);
    let r = s.req("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(durable(&s, &id), Some(true));
    // A malformed body is a clear 400.
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({"sync": "yes"}));
    assert_eq!(r.status, 400, "{}", r.body);
}

/// A connect right after an unheld `sync: false` pause of a guest with
/// 384 MiB touched, so the write is likely still running: whichever way the
/// race goes (write abandoned midway, or already complete), the sandbox
/// resumes from memory in the same worker, the guest goes on (its memory
/// checks passing), and what is left on disk is either nothing or one
/// complete snapshot: never a half-written one.
#[test]
fn vm_connect_racing_a_running_write_leaves_no_partial_snapshot() {
    if !common::kvm_or_skip("vm_connect_racing_a_running_write_leaves_no_partial_snapshot") {
        return;
    }
    let st = Setup::new();
    let templates = st.data().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    let workload = stasis::guest::Workload {
        mib: 384,
        rounds: 0,
        seed: 7,
        report: 0,
        base_mib: 16,
    };
    let spec = json!({
        "kernel": "testguest",
        "cmdline": workload.cmdline(),
        "memoryMB": 512,
        "vcpus": 1,
    });
    std::fs::write(templates.join("big.json"), spec.to_string()).unwrap();
    let s = st.start_vm();
    let id = s.create(json!({"templateID": "big"}));
    // Nothing is held in this test.
    st.release_writes();
    let pid = s.worker_pid(&id).unwrap();
    s.wait_round(&id, 2, PATIENCE);
    pause(&s, &id, false);
    let at_pause = s.info(&id).json()["stasis"]["pausedAtRound"]
        .as_u64()
        .unwrap();
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 120}));
    assert_eq!(r.status, 201, "{} / log:\n{}", r.body, s.log());
    assert_eq!(s.worker_pid(&id), Some(pid), "resumed from memory");
    s.wait_round(&id, at_pause + 2, PATIENCE);
    let names: Vec<String> = std::fs::read_dir(st.data().join("sandboxes").join(&id))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot"))
        .collect();
    let complete = complete_snapshots(&st.data(), &id);
    eprintln!("after the race: {names:?} (complete: {complete:?})");
    assert_eq!(names, complete, "a half-written snapshot was left");
    assert!(complete.len() <= 1, "{complete:?}");
    pause(&s, &id, true);
    let at_second = check_paused(&s, &id, Some(pid));
    assert!(at_second >= at_pause);
}
