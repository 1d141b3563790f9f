//! Warm templates (`src/api/warm.rs`) through the API, on real KVM with the
//! built-in test guest (`--backend vm`, jailed):
//!
//! - a template's first create boots cold and is followed by one template
//!   snapshot in the store (kind template, not listed by `GET /snapshots`);
//!   the next creates resume from it (`stasis.warmSnapshot` names it) and
//!   each keeps its own guest state (one paused, the other runs on; the
//!   resumed one goes on from its own round);
//! - a changed input (the template's memory) gives another snapshot id: the
//!   next create boots cold and the rebuilt snapshot replaces the old one;
//! - a template snapshot whose manifest names another host fingerprint is
//!   refused: the create boots cold, one warning is logged, and it is
//!   rebuilt;
//! - concurrent first creates build exactly one template snapshot;
//! - `DELETE /templates/{name}` deletes it; `--no-warm-templates` builds
//!   none.
//!
//! Divergence of agent sandboxes made from one template snapshot (entropy,
//! env vars, own files) is `tests/sdk/test_warm_templates.py`, run by
//! `sdk_warm_templates_diverge` (fake backend, host agent).
//!
//! The order of the concurrent creates is the only randomness: none is
//! seeded since none is drawn.

mod api_support;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use api_support::{wait_until, Server};
use serde_json::json;
use stasis::snapshot::manifest::{HostFingerprint, Manifest, SnapshotKind};
use stasis::snapshot::store::SnapshotStore;

const BIN: &str = env!("CARGO_BIN_EXE_stasis");

/// The store's template snapshots of `template`.
fn template_snapshots(data: &Path, template: &str) -> Vec<Manifest> {
    SnapshotStore::open(data.join("snapshots"))
        .unwrap()
        .list()
        .into_iter()
        .filter(|m| {
            m.kind == SnapshotKind::Template
                && m.labels.get("template").map(String::as_str) == Some(template)
        })
        .collect()
}

/// Waits until `template` has exactly one template snapshot; returns it.
fn wait_for_snapshot(s: &Server, data: &Path, template: &str, not: Option<&str>) -> Manifest {
    assert!(
        wait_until(120, || {
            let v = template_snapshots(data, template);
            v.len() == 1 && Some(v[0].id.as_str()) != not
        }),
        "no template snapshot of {template}: {:?} / {}",
        template_snapshots(data, template),
        s.log()
    );
    template_snapshots(data, template).remove(0)
}

fn warm_of(s: &Server, id: &str) -> Option<String> {
    s.info(id).json()["stasis"]["warmSnapshot"]
        .as_str()
        .map(str::to_owned)
}

fn write_template(data: &Path, name: &str, memory_mb: u64) {
    std::fs::create_dir_all(data.join("templates")).unwrap();
    std::fs::write(
        data.join(format!("templates/{name}.json")),
        json!({"kernel": "testguest", "cmdline": "stasis.mib=8 stasis.rounds=0 stasis.seed=7",
               "memoryMB": memory_mb, "vcpus": 1})
        .to_string(),
    )
    .unwrap();
}

fn kill(s: &Server, id: &str) {
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
}

#[test]
fn vm_second_create_resumes_the_template_snapshot_and_each_keeps_its_state() {
    if !common::kvm_or_skip("vm_second_create_resumes_the_template_snapshot") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start(&data, &["--backend", "vm"]);
    let first = s.create(json!({"templateID": "base", "timeout": 300}));
    assert_eq!(warm_of(&s, &first), None, "the first create boots cold");
    let snap = wait_for_snapshot(&s, &data, "base", None);
    assert!(snap.id.starts_with("warm-"), "{}", snap.id);
    assert!(snap.labels["inputs"].contains("kernel=testguest:"));
    // The server's own: not among the SDK's snapshots.
    assert_eq!(s.get("/snapshots").json(), json!([]));

    let a = s.create(json!({"templateID": "base", "timeout": 300}));
    let b = s.create(json!({"templateID": "base", "timeout": 300}));
    for k in [&a, &b] {
        assert_eq!(warm_of(&s, k).as_deref(), Some(snap.id.as_str()), "{k}");
        assert!(
            wait_until(60, || s.round_opt(k).is_some_and(|r| r > 2)),
            "{k} made no progress: {}",
            s.log()
        );
    }
    // Each keeps its own state: a paused, b runs on; a resumes from its own
    // round.
    assert_eq!(
        s.post(&format!("/sandboxes/{a}/pause"), json!({})).status,
        204
    );
    let a_at = s.info(&a).json()["stasis"]["pausedAtRound"]
        .as_u64()
        .unwrap();
    let b_at = s.round(&b);
    assert!(
        wait_until(60, || s.round(&b) > b_at + 3),
        "b stopped with a"
    );
    assert_eq!(s.round(&a), a_at, "a paused guest does not move");
    let r = s.post(&format!("/sandboxes/{a}/connect"), json!({"timeout": 60}));
    assert_eq!(r.status, 201, "{} / {}", r.body, s.log());
    let resumed = s.round(&a);
    assert!(resumed >= a_at, "a went back: {resumed} < {a_at}");
    assert!(wait_until(60, || s.round(&a) > a_at + 2));
    // Only one template snapshot was built, and it is unchanged.
    assert_eq!(template_snapshots(&data, "base").len(), 1);
    for k in [&first, &a, &b] {
        kill(&s, k);
    }

    // DELETE /templates/{name}: its template snapshot goes; the next create
    // boots cold (and builds it again).
    assert_eq!(s.req("DELETE", "/templates/base", None).status, 204);
    assert!(template_snapshots(&data, "base").is_empty());
    let c = s.create(json!({"templateID": "base", "timeout": 300}));
    assert_eq!(warm_of(&s, &c), None);
    wait_for_snapshot(&s, &data, "base", None);
    kill(&s, &c);
    s.req("DELETE", "/templates/nosuch", None).assert_error(404);
}

#[test]
fn vm_a_changed_input_rebuilds_and_a_foreign_fingerprint_boots_cold() {
    if !common::kvm_or_skip("vm_a_changed_input_rebuilds") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_template(&data, "t", 64);
    let s = Server::start(&data, &["--backend", "vm"]);
    let x = s.create(json!({"templateID": "t", "timeout": 300}));
    let old = wait_for_snapshot(&s, &data, "t", None);
    let y = s.create(json!({"templateID": "t", "timeout": 300}));
    assert_eq!(warm_of(&s, &y).as_deref(), Some(old.id.as_str()));

    // Input change (memory): cold boot, then a new snapshot replaces it.
    write_template(&data, "t", 96);
    let z = s.create(json!({"templateID": "t", "timeout": 300}));
    assert_eq!(warm_of(&s, &z), None, "a changed template boots cold");
    let new = wait_for_snapshot(&s, &data, "t", Some(&old.id));
    assert_ne!(new.id, old.id);
    assert!(new.labels["inputs"].contains(&format!("memory={}", 96u64 << 20)));
    let w = s.create(json!({"templateID": "t", "timeout": 300}));
    assert_eq!(warm_of(&s, &w).as_deref(), Some(new.id.as_str()));
    // The sandbox resumed from the deleted snapshot runs on.
    let r = s.round(&y);
    assert!(wait_until(60, || s.round(&y) > r), "y stopped");

    // Another host's fingerprint: refused, cold boot, one log line; the
    // rebuild replaces it.
    let store = SnapshotStore::open(data.join("snapshots")).unwrap();
    let dir = store.path(&new.id).unwrap();
    let mut m = Manifest::read_from(&dir).unwrap();
    m.fingerprint.cpu_signature ^= 0x10;
    m.write_to(&dir).unwrap();
    let v = s.create(json!({"templateID": "t", "timeout": 300}));
    assert_eq!(warm_of(&s, &v), None, "a foreign snapshot is not resumed");
    assert!(
        wait_until(30, || s.log().contains("template snapshot refused")),
        "{}",
        s.log()
    );
    assert_eq!(
        s.log().matches("template snapshot refused").count(),
        1,
        "{}",
        s.log()
    );
    let log_has = |what: &str| s.log().contains(what);
    assert!(log_has("different host"), "{}", s.log());
    assert!(wait_until(120, || {
        store
            .get(&new.id)
            .is_ok_and(|g| g.manifest.fingerprint == HostFingerprint::current())
    }));
    let u = s.create(json!({"templateID": "t", "timeout": 300}));
    assert_eq!(warm_of(&s, &u).as_deref(), Some(new.id.as_str()));
    for k in [&x, &y, &z, &w, &v, &u] {
        let r = s.round(k);
        assert!(wait_until(60, || s.round(k) > r), "{k} stopped");
        kill(&s, k);
    }
}

#[test]
fn vm_concurrent_first_creates_build_one_template_snapshot() {
    if !common::kvm_or_skip("vm_concurrent_first_creates_build_one_template_snapshot") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_template(&data, "cc", 64);
    let s = std::sync::Arc::new(Server::start(&data, &["--backend", "vm"]));
    let ids: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                sc.spawn(move || s.create(json!({"templateID": "cc", "timeout": 300})))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let snap = wait_for_snapshot(&s, &data, "cc", None);
    let more = s.create(json!({"templateID": "cc", "timeout": 300}));
    assert_eq!(warm_of(&s, &more).as_deref(), Some(snap.id.as_str()));
    // Exactly one was built and saved; no half-written one is left.
    assert_eq!(
        s.log().matches("template snapshot saved").count(),
        1,
        "{}",
        s.log()
    );
    let names: Vec<String> = std::fs::read_dir(data.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![snap.id.clone()]);
    for k in ids.iter().chain([&more]) {
        kill(&s, k);
    }
}

#[test]
fn no_warm_templates_boots_every_create_cold() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start(&data, &["--no-warm-templates"]);
    let a = s.create(json!({"templateID": "base", "timeout": 300}));
    // Another create finishes after any build the first could have started.
    let b = s.create(json!({"templateID": "base", "timeout": 300}));
    assert_eq!(warm_of(&s, &b), None);
    assert!(template_snapshots(&data, "base").is_empty());
    kill(&s, &a);
    kill(&s, &b);
    // Warm on (fake backend): the same creates are served warm.
    drop(s);
    let s = Server::start(&data, &[]);
    let a = s.create(json!({"templateID": "base", "timeout": 300}));
    let snap = wait_for_snapshot(&s, &data, "base", None);
    let b = s.create(json!({"templateID": "base", "timeout": 300}));
    assert_eq!(warm_of(&s, &b).as_deref(), Some(snap.id.as_str()));
    kill(&s, &a);
    kill(&s, &b);
}

/// Agent sandboxes created from one template snapshot diverge (fresh
/// entropy, their own env vars and files): `tests/sdk/test_warm_templates.py`
/// through `tests/sdk/run.sh` (fake backend, host agent).
#[test]
fn sdk_warm_templates_diverge() {
    let agent = Path::new(BIN).with_file_name("stasis-envd");
    assert!(agent.is_file(), "{} is missing", agent.display());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("test_warm_templates.py")
        .env("STASIS_BIN", BIN)
        .env("STASIS_BACKEND", "fake")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run tests/sdk/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "SDK warm template tests failed");
    assert!(text.contains(" passed"), "no test passed");
}
