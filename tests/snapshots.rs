//! Reusable snapshots on real KVM with the built-in test guest: a snapshot
//! in the store (`<data>/snapshots/<id>/` with its manifest) is resumed by
//! two fresh processes at the same time, each with its own disk overlay
//! forked from the snapshot's; both finish with the model's checksum and
//! the snapshot's files are byte-for-byte what they were.
//!
//! Through the API (fake backend, so it runs everywhere): a snapshot of a
//! running sandbox leaves it running with the same id and end time, holds
//! the guest's state at the snapshot, is listed (per sandbox, paginated as
//! the SDK reads it) and deleted through the SDK's routes; a sandbox busy
//! with a pause answers 409.
//!
//! Random choices are seeded: `STASIS_TEST_SEED=<n>` replays a run; the
//! seed is always printed.

mod api_support;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use stasis::guest::{self, Workload};
use stasis::snapshot::manifest::{Manifest, SnapshotKind};
use stasis::snapshot::store::{ImportOpts, SnapshotStore};
use stasis::vmm::virtio::cow::CowDisk;
use stasis::vmm::{Console, DiskConfig, Kernel, Vm, VmConfig};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");

fn seed(test: &str) -> u64 {
    let s = std::env::var("STASIS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: STASIS_TEST_SEED={s}");
    s
}

/// CRC-64 of every file of a snapshot directory, by name.
fn digest(dir: &Path) -> Vec<(String, u64, u64)> {
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let b = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                b.len() as u64,
                crc.checksum(&b),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn one_snapshot_resumed_twice_concurrently_in_fresh_processes() {
    if !common::kvm_or_skip("one_snapshot_resumed_twice_concurrently_in_fresh_processes") {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("concurrent-resume"));
    let w = Workload {
        mib: 16,
        rounds: 400 + rng.random_range(0..200),
        seed: rng.random(),
        report: 50,
        base_mib: 16,
    };
    let dir = common::scratch("reusable-snapshot");
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let overlay = dir.join("overlay");
    let mut d = CowDisk::open(&base, &overlay).unwrap();
    d.write_at(64 * 1024, b"stasis").unwrap();
    drop(d);
    let mut vm = Vm::boot(VmConfig {
        kernel: Kernel::TestGuest,
        cmdline: w.cmdline(),
        mem_bytes: 64 << 20,
        console: Console::Sink,
        disk: Some(DiskConfig {
            base: base.clone(),
            overlay: Some(overlay),
        }),
        ..VmConfig::default()
    })
    .unwrap();
    let past = rng.random_range(1..50);
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round >= past)
    });
    assert!(vm.exited().is_none(), "guest ended early");
    vm.pause().unwrap();
    let tmp = dir.join("snapshots").join(".incoming");
    std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
    vm.snapshot(&tmp).unwrap();
    drop(vm);

    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let s = store
        .import(
            &tmp,
            "base-1",
            ImportOpts {
                kind: SnapshotKind::User,
                source_sandbox: None,
                labels: Default::default(),
            },
        )
        .unwrap();
    assert_eq!(Manifest::read_from(&s.dir).unwrap(), s.manifest);
    assert_eq!(s.manifest.disk_layer.as_deref(), Some("disk.overlay"));
    let before = digest(&s.dir);

    // Two fresh processes resume the same snapshot at the same time.
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new(BIN)
                .arg("resume")
                .arg(&s.dir)
                .arg("--lazy")
                .arg("--disk")
                .arg(&base)
                .arg("--overlay")
                .arg(dir.join(format!("own{i}")))
                .arg("--console")
                .arg(dir.join(format!("console{i}.txt")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let want = guest::reference(&w).checksum;
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "resume {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.join(format!("console{i}.txt"))).unwrap();
        assert_eq!(
            guest::parse_checksum(&text),
            Some(want),
            "resume {i}:\n{text}"
        );
        // Each has its own overlay, holding the snapshot's disk.
        let own = CowDisk::open_existing(&base, &dir.join(format!("own{i}"))).unwrap();
        let mut buf = [0u8; 6];
        own.read_at(64 * 1024, &mut buf).unwrap();
        assert_eq!(&buf, b"stasis");
    }
    assert_eq!(digest(&s.dir), before, "a resume changed the snapshot");

    // `snapshot info` shows the manifest and its layer.
    let out = Command::new(BIN)
        .args(["snapshot", "info"])
        .arg(&s.dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("id base-1") && text.contains("layer 0:") && text.contains("full"),
        "{text}"
    );
    store.delete("base-1").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn api_snapshot_of_a_running_sandbox_list_and_delete() {
    use api_support::{wait_until, Server};
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("templates")).unwrap();
    std::fs::write(
        data.join("templates/slow.json"),
        r#"{"kernel": "testguest", "cmdline": "stasis.work=counter stasis.fake.pause_ms=2000", "memoryMB": 64, "vcpus": 1}"#,
    )
    .unwrap();
    let s = std::sync::Arc::new(Server::start(&data, &[]));
    let id = s.create(json!({"templateID": "base", "timeout": 300}));
    let other = s.create(json!({"templateID": "base", "timeout": 300}));
    assert!(wait_until(30, || s.round_opt(&id).is_some_and(|r| r > 2)));
    let end_before = s.info(&id).json()["endAt"].clone();

    // A running sandbox: snapshot, and it keeps running with its end time.
    let r = s.post(&format!("/sandboxes/{id}/snapshots"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    let sid = r.json()["snapshotID"].as_str().unwrap().to_string();
    assert_eq!(r.json()["names"], json!([sid]));
    let d = s.info(&id).json();
    assert_eq!(d["state"], "running", "{d}");
    assert_eq!(d["endAt"], end_before);
    // The snapshot holds the guest's state (read from its own file, in the
    // store with a valid manifest), and the sandbox moves on past it.
    let store = SnapshotStore::open(data.join("snapshots")).unwrap();
    let snap = store.get(&sid).unwrap();
    assert_eq!(snap.manifest.source_sandbox.as_deref(), Some(id.as_str()));
    let saved = api_support::round_in_snapshot(&snap.dir).expect("a round in the snapshot");
    assert!(saved > 2);
    assert!(wait_until(30, || s.round(&id) > saved + 2));
    // Still the same after the sandbox ran on.
    assert_eq!(api_support::round_in_snapshot(&snap.dir), Some(saved));

    // A paused sandbox: snapshot, it stays paused.
    assert_eq!(
        s.post(&format!("/sandboxes/{other}/pause"), json!({}))
            .status,
        204
    );
    let r = s.post(&format!("/sandboxes/{other}/snapshots"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(s.info(&other).json()["state"], "paused");
    for _ in 0..2 {
        assert_eq!(
            s.post(&format!("/sandboxes/{id}/snapshots"), json!({}))
                .status,
            201
        );
    }

    // Listing: all, per sandbox, and in pages as the SDK's paginator reads.
    let all = s.get("/snapshots").json();
    assert_eq!(all.as_array().unwrap().len(), 4, "{all}");
    let mine = s.get(&format!("/snapshots?sandboxID={id}")).json();
    assert_eq!(mine.as_array().unwrap().len(), 3, "{mine}");
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let q = match &next {
            Some(t) => format!("/snapshots?sandboxID={id}&limit=2&nextToken={t}"),
            None => format!("/snapshots?sandboxID={id}&limit=2"),
        };
        let r = s.get(&q);
        assert_eq!(r.status, 200, "{}", r.body);
        for it in r.json().as_array().unwrap() {
            seen.push(it["snapshotID"].as_str().unwrap().to_string());
        }
        next = r.header("x-next-token").map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], sid);
    s.get("/snapshots?limit=0").assert_error(400);
    s.get("/snapshots?nextToken=nope").assert_error(400);

    // 409 while the sandbox is busy pausing (the slow template).
    let slow = s.create(json!({"templateID": "slow", "timeout": 300}));
    let s2 = s.clone();
    let slow2 = slow.clone();
    let h = std::thread::spawn(move || {
        s2.post(&format!("/sandboxes/{slow2}/pause"), json!({}))
            .status
    });
    assert!(wait_until(20, || s.info(&slow).json()["stasis"]["busy"] == "pausing"));
    s.post(&format!("/sandboxes/{slow}/snapshots"), json!({}))
        .assert_error(409);
    assert_eq!(h.join().unwrap(), 204);

    // Delete (the SDK's delete_snapshot: DELETE /templates/{id}); again: 404.
    assert_eq!(
        s.req("DELETE", &format!("/templates/{sid}"), None).status,
        204
    );
    s.req("DELETE", &format!("/templates/{sid}"), None)
        .assert_error(404);
    assert!(matches!(
        store.get(&sid),
        Err(stasis::snapshot::store::Error::NotFound(_))
    ));
    assert_eq!(s.get("/snapshots").json().as_array().unwrap().len(), 3);
    // The sandbox it came from is unaffected.
    assert_eq!(s.info(&id).json()["state"], "running");
    s.post(&format!("/sandboxes/{}/snapshots", "nosuch"), json!({}))
        .assert_error(404);

    // A damaged snapshot is a clear error naming what is wrong; nothing runs.
    let r = s.post(&format!("/sandboxes/{id}/snapshots"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    let bad = r.json()["snapshotID"].as_str().unwrap().to_string();
    let dir = store.path(&bad).unwrap();
    let mut m = std::fs::read(dir.join("manifest.bin")).unwrap();
    let n = m.len();
    m[n / 2] ^= 0x20;
    std::fs::write(dir.join("manifest.bin"), &m).unwrap();
    let r = s.post("/sandboxes", json!({"templateID": bad}));
    r.assert_error(500);
    assert!(
        r.body.contains("manifest") && r.body.contains("checksum mismatch"),
        "{}",
        r.body
    );
    // A truncated layer: the error names the layer file.
    let r = s.post(&format!("/sandboxes/{id}/snapshots"), json!({}));
    let bad = r.json()["snapshotID"].as_str().unwrap().to_string();
    std::fs::write(store.path(&bad).unwrap().join("fake-vm.json"), b"{").unwrap();
    let r = s.post("/sandboxes", json!({"templateID": bad}));
    r.assert_error(500);
    assert!(r.body.contains("layer file fake-vm.json"), "{}", r.body);
}

/// The SDK's snapshot and clone calls end to end (fake backend, host agent):
/// `tests/sdk/test_snapshots.py` through `tests/sdk/run.sh`.
#[test]
fn sdk_snapshots_create_from_snapshot_and_clone() {
    let agent = Path::new(BIN).with_file_name("stasis-envd");
    assert!(agent.is_file(), "{} is missing", agent.display());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("test_snapshots.py")
        .env("STASIS_BIN", BIN)
        .env("STASIS_BACKEND", "fake")
        .output()
        .expect("run tests/sdk/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK snapshot tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(" passed") && !stdout.contains(" skipped"),
        "{stdout}"
    );
}

/// The VM backend through the API: a running test-guest sandbox is
/// snapshotted (it keeps running), two sandboxes are created from the
/// snapshot and two cloned, concurrently resumed from the same files; each
/// starts at the snapshot's round and advances; a pause of one of them
/// (a lazily restored guest) and its resume work; deleting the snapshot
/// leaves them running.
#[test]
fn vm_snapshot_create_from_it_and_clone() {
    use api_support::{wait_until, Server};
    use serde_json::json;
    if !common::kvm_or_skip("vm_snapshot_create_from_it_and_clone") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start(&data, &["--backend", "vm"]);
    let t = std::time::Instant::now();
    let id = s.create(json!({"templateID": "base", "timeout": 300}));
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        wait_until(60, || s.round_opt(&id).is_some_and(|r| r > 3)),
        "no progress: {}",
        s.log()
    );
    let r = s.post(&format!("/sandboxes/{id}/snapshots"), json!({}));
    assert_eq!(r.status, 201, "{} / {}", r.body, s.log());
    let sid = r.json()["snapshotID"].as_str().unwrap().to_string();
    assert_eq!(s.info(&id).json()["state"], "running");
    let snap = SnapshotStore::open(data.join("snapshots"))
        .unwrap()
        .get(&sid)
        .unwrap();
    let saved = api_support::round_in_snapshot(&snap.dir).expect("round in the snapshot");
    let before = digest(&snap.dir);

    let mut kids = Vec::new();
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let r = s.post("/sandboxes", json!({"templateID": sid, "timeout": 120}));
        eprintln!(
            "create -> running at the API: cold boot {cold_ms:.1} ms, from the snapshot {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(r.status, 201, "{} / {}", r.body, s.log());
        kids.push(r.json()["sandboxID"].as_str().unwrap().to_string());
    }
    let r = s.post(
        &format!("/sandboxes/{id}/clone"),
        json!({"count": 2, "timeout": 120}),
    );
    assert_eq!(r.status, 201, "{} / {}", r.body, s.log());
    let c = r.json();
    assert!(c["snapshotTemplateId"].as_str().is_some(), "{c}");
    for sb in c["sandboxes"].as_array().unwrap() {
        for k in ["sandboxID", "envdVersion"] {
            assert!(sb[k].as_str().is_some(), "{k} missing: {c}");
        }
        kids.push(sb["sandboxID"].as_str().unwrap().to_string());
    }
    assert_eq!(kids.len(), 4);
    for k in &kids {
        let first = s.round(k);
        assert!(first >= saved, "{k} started at round {first} < {saved}");
        assert!(
            wait_until(60, || s.round(k) > first + 2),
            "{k} made no progress: {}",
            s.log()
        );
    }
    // Bad input.
    s.post(&format!("/sandboxes/{id}/clone"), json!({"count": 0}))
        .assert_error(400);
    s.post(&format!("/sandboxes/{id}/clone"), json!({"count": 17}))
        .assert_error(400);
    // A sandbox from the snapshot pauses and resumes like any other.
    let k0 = &kids[0];
    assert_eq!(
        s.post(&format!("/sandboxes/{k0}/pause"), json!({})).status,
        204
    );
    let r = s.post(&format!("/sandboxes/{k0}/connect"), json!({"timeout": 60}));
    assert_eq!(r.status, 201, "{} / {}", r.body, s.log());
    // The snapshot is unchanged by four resumes and their pause.
    assert_eq!(digest(&snap.dir), before);
    // Deleting it leaves them running (they hold its files open or copied).
    assert_eq!(
        s.req("DELETE", &format!("/templates/{sid}"), None).status,
        204
    );
    for k in &kids {
        let r = s.round(k);
        assert!(
            wait_until(60, || s.round(k) > r),
            "{k} stopped after the delete"
        );
    }
    for k in kids.iter().chain([&id]) {
        assert_eq!(
            s.req("DELETE", &format!("/sandboxes/{k}"), None).status,
            204
        );
    }
}
