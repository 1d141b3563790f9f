//! Every endpoint and every error of the lifecycle API, against `stasis
//! serve --backend fake` in a subprocess.

mod api_support;
mod common;

use api_support::{check_paused, http, list_all, process_dead, snapshot_dir, wait_until, Server};
use serde_json::{json, Value};

fn server() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), &[]);
    (tmp, s)
}

#[test]
fn create_get_pause_connect_kill() {
    let (_t, s) = server();
    let r = s.post(
        "/sandboxes",
        json!({"templateID": "base", "timeout": 120, "metadata": {"user": "ann"}, "envVars": {"A": "1"},
               "secure": true, "allow_internet_access": true, "autoPause": false}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let j = r.json();
    let id = j["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(j["templateID"], "base");
    assert_eq!(j["envdVersion"], "0.1.0");
    assert!(j["clientID"].is_string());
    assert!(j.get("domain").is_some());

    let d = s.info(&id).json();
    assert_eq!(d["state"], "running");
    assert_eq!(d["metadata"]["user"], "ann");
    assert_eq!(d["cpuCount"], 1);
    assert_eq!(d["memoryMB"], 64);
    for k in ["startedAt", "endAt"] {
        let t = d[k].as_str().unwrap();
        assert!(t.ends_with('Z') && t.len() == 24, "{k}: {t}");
    }
    assert_eq!(d["lifecycle"]["onTimeout"], "kill");
    let pid = d["stasis"]["workerPid"].as_i64().unwrap() as i32;
    assert!(!process_dead(pid));

    // The guest makes progress.
    let r0 = s.round(&id);
    assert!(wait_until(20, || s.round(&id) > r0));

    // Pause: 204, then 409; state paused, worker gone, endAt = retention end.
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);
    s.post(&format!("/sandboxes/{id}/pause"), json!({}))
        .assert_error(409);
    // Paused: no worker, the snapshot's sizes are its files', and the
    // guest's own state (read from the snapshot, by the server and by this
    // test) is the round the worker reported when it stopped it.
    let paused_round = check_paused(&s, &id, Some(pid));
    assert!(paused_round > r0);
    // The fake's snapshot is one small file: apparent size = its length.
    let d = s.info(&id).json();
    let state = std::fs::metadata(snapshot_dir(&s, &id).join("fake-vm.json")).unwrap();
    assert_eq!(
        d["stasis"]["snapshotApparentBytes"].as_u64(),
        Some(state.len())
    );
    // Timeout of a paused sandbox: 409.
    s.post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 10}))
        .assert_error(409);

    // Connect to paused: 201 and it continues from where it was.
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["sandboxID"], id.as_str());
    let d = s.info(&id).json();
    assert_eq!(d["state"], "running");
    assert!(d["stasis"]["guestRound"].as_u64().unwrap() >= paused_round);
    assert!(wait_until(20, || s.round(&id) > paused_round + 5));

    // Connect to running: 200.
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 30}));
    assert_eq!(r.status, 200, "{}", r.body);

    // Kill running: 204, its (new) worker is gone, then 404 everywhere.
    let pid = s.worker_pid(&id).expect("the resumed sandbox's worker");
    assert!(!process_dead(pid));
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    assert!(
        wait_until(20, || process_dead(pid)),
        "worker {pid} outlived the kill"
    );
    s.info(&id).assert_error(404);
    s.req("DELETE", &format!("/sandboxes/{id}"), None)
        .assert_error(404);
    s.post(&format!("/sandboxes/{id}/pause"), json!({}))
        .assert_error(404);
    s.post(&format!("/sandboxes/{id}/connect"), json!({}))
        .assert_error(404);
    s.post(&format!("/sandboxes/{id}/resume"), json!({}))
        .assert_error(404);
    s.post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 5}))
        .assert_error(404);
    assert!(!s.data_dir.join("sandboxes").join(&id).exists());
}

#[test]
fn connect_timeout_only_extends_resume_resets() {
    let (_t, s) = server();
    let id = s.create(json!({"templateID": "base", "timeout": 600}));
    let end = |s: &Server| s.info(&id).json()["endAt"].as_str().unwrap().to_string();
    let e600 = end(&s);
    // Shorter timeout on a running sandbox: unchanged.
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 10}))
            .status,
        200
    );
    assert_eq!(end(&s), e600);
    // Longer: extended.
    assert_eq!(
        s.post(
            &format!("/sandboxes/{id}/connect"),
            json!({"timeout": 3000})
        )
        .status,
        200
    );
    let e3000 = end(&s);
    assert!(e3000 > e600, "{e3000} vs {e600}");
    // set_timeout can shorten.
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 100}))
            .status,
        204
    );
    assert!(end(&s) < e600);

    // Resume after pause: timeout reset to the default (300 s) when none given.
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);
    let r = s.req("POST", &format!("/sandboxes/{id}/connect"), None);
    assert_eq!(r.status, 201, "{}", r.body);
    let d = s.info(&id).json();
    let started = d["startedAt"].as_str().unwrap();
    let end_at = d["endAt"].as_str().unwrap();
    assert_eq!(secs_between(started, end_at), 300);

    // Deprecated resume: 409 while running; 201 after pause, with its timeout.
    s.post(&format!("/sandboxes/{id}/resume"), json!({"timeout": 50}))
        .assert_error(409);
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);
    let r = s.post(
        &format!("/sandboxes/{id}/resume"),
        json!({"timeout": 50, "autoPause": true}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let d = s.info(&id).json();
    assert_eq!(
        secs_between(
            d["startedAt"].as_str().unwrap(),
            d["endAt"].as_str().unwrap()
        ),
        50
    );
    assert_eq!(d["lifecycle"]["onTimeout"], "pause");

    // Kill a paused sandbox.
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    s.info(&id).assert_error(404);
}

/// Seconds between two of our RFC 3339 timestamps on the same day.
fn secs_between(a: &str, b: &str) -> i64 {
    let secs = |t: &str| -> i64 {
        let date = &t[..10];
        let days = if date == &a[..10] { 0 } else { 1 };
        let h: i64 = t[11..13].parse().unwrap();
        let m: i64 = t[14..16].parse().unwrap();
        let s: i64 = t[17..19].parse().unwrap();
        days * 86_400 + h * 3600 + m * 60 + s
    };
    secs(b) - secs(a)
}

#[test]
fn validation_errors() {
    let (_t, s) = server();
    // Unknown template → 400 with a clear message.
    let r = s.post("/sandboxes", json!({"templateID": "no-such-template"}));
    r.assert_error(400);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("no-such-template"));
    s.post("/sandboxes", json!({"templateID": "../etc/passwd"}))
        .assert_error(400);
    // Timeouts.
    s.post("/sandboxes", json!({"templateID": "base", "timeout": -1}))
        .assert_error(400);
    s.post(
        "/sandboxes",
        json!({"templateID": "base", "timeout": 86_401}),
    )
    .assert_error(400);
    s.post("/sandboxes", json!({"templateID": "base", "timeout": 1e30}))
        .assert_error(400);
    s.post(
        "/sandboxes",
        json!({"templateID": "base", "lifecycle": {"onTimeout": "explode"}}),
    )
    .assert_error(400);
    s.post(
        "/sandboxes",
        json!({"templateID": "base", "metadata": {"k": 1}}),
    )
    .assert_error(400);
    s.post(
        "/sandboxes",
        json!({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]}),
    )
    .assert_error(400);
    // Malformed JSON, wrong content type.
    http(
        s.addr,
        "POST",
        "/sandboxes",
        &[("Content-Type", "application/json")],
        Some("{\"templateID\":"),
    )
    .assert_error(400);
    http(
        s.addr,
        "POST",
        "/sandboxes",
        &[("Content-Type", "text/plain")],
        Some("{}"),
    )
    .assert_error(415);
    // Unknown route / method.
    s.get("/nope").assert_error(404);
    s.get("/sandboxes/x/y/z").assert_error(404);
    s.req("PUT", "/sandboxes/abc", None).assert_error(405);
    s.req("DELETE", "/v2/sandboxes", None).assert_error(405);
    // Ids with path characters never reach the filesystem.
    s.get("/sandboxes/..%2F..%2Fetc").assert_error(400);
    s.get("/sandboxes/%2e%2e").assert_error(400);
    s.req("DELETE", "/sandboxes/a%00b", None).assert_error(400);
    s.get("/sandboxes/doesnotexist").assert_error(404);
    // Timeout body.
    let id = s.create(json!({"templateID": "base"}));
    s.post(&format!("/sandboxes/{id}/timeout"), json!({}))
        .assert_error(400);
    s.post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": -5}))
        .assert_error(400);
    s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": -5}))
        .assert_error(400);
    s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": "x"}))
        .assert_error(400);
    // List query errors.
    s.get("/v2/sandboxes?state=zombie").assert_error(400);
    s.get("/v2/sandboxes?limit=0").assert_error(400);
    s.get("/v2/sandboxes?nextToken=garbage").assert_error(400);
    // The server is still fine.
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn listing_filters_and_pagination() {
    let (_t, s) = server();
    let mut ids = Vec::new();
    for i in 0..7 {
        let team = if i % 2 == 0 { "red" } else { "blue green" };
        ids.push(
            s.create(json!({"templateID": "base", "metadata": {"team": team, "n": i.to_string()}})),
        );
    }
    for id in &ids[..3] {
        let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let ids_of = |v: &[Value]| {
        v.iter()
            .map(|x| x["sandboxID"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };

    // Default: both states, newest first.
    let (all, pages) = list_all(&s, "", 100);
    assert_eq!(pages, 1);
    let mut expect = ids.clone();
    expect.reverse();
    assert_eq!(ids_of(&all), expect);

    // Pagination with limit 2: 4 pages, nothing lost or repeated, same order.
    let (paged, pages) = list_all(&s, "", 2);
    assert_eq!(pages, 4);
    assert_eq!(ids_of(&paged), expect);

    // State filters, comma-separated and repeated.
    let (paused, _) = list_all(&s, "state=paused", 2);
    let mut p = ids[..3].to_vec();
    p.reverse();
    assert_eq!(ids_of(&paused), p);
    assert!(paused.iter().all(|x| x["state"] == "paused"));
    let (running, _) = list_all(&s, "state=running", 100);
    assert_eq!(running.len(), 4);
    assert_eq!(list_all(&s, "state=running%2Cpaused", 3).0.len(), 7);
    assert_eq!(list_all(&s, "state=running&state=paused", 3).0.len(), 7);

    // Metadata filter, encoded as the SDK does (each k/v quoted, then urlencoded).
    let (red, _) = list_all(&s, "metadata=team%3Dred", 100);
    assert_eq!(red.len(), 4);
    let (bg, _) = list_all(&s, "metadata=team%3Dblue%252520green", 100);
    assert_eq!(bg.len(), 3);
    let (one, _) = list_all(&s, "metadata=team%3Dred%26n%3D2&state=paused", 100);
    assert_eq!(ids_of(&one), vec![ids[2].clone()]);

    // v1 list: running only.
    let r = s.get("/sandboxes");
    assert_eq!(r.status, 200);
    let v1 = r.json();
    assert_eq!(v1.as_array().unwrap().len(), 4);
    assert!(v1
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["state"] == "running"));
}

#[test]
fn api_key_and_listen_safety() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), &["--api-key", "sekret"]);
    // Without / with a wrong key: 401 in our error shape.
    http(s.addr, "GET", "/v2/sandboxes", &[], None).assert_error(401);
    http(
        s.addr,
        "POST",
        "/sandboxes",
        &[("X-API-KEY", "wrong"), ("Content-Type", "application/json")],
        Some("{}"),
    )
    .assert_error(401);
    // Health and the OpenAPI document stay open.
    assert_eq!(http(s.addr, "GET", "/health", &[], None).status, 200);
    assert_eq!(http(s.addr, "GET", "/openapi.json", &[], None).status, 200);
    // With the key: works.
    let id = s.create(json!({"templateID": "base"}));
    assert_eq!(s.info(&id).status, 200);
    drop(s);

    // Beyond loopback without a key: refused at startup with a clear error.
    let err = Server::try_start(&tmp.path().join("d2"), &["--listen", "0.0.0.0:0"])
        .err()
        .unwrap();
    assert!(err.contains("without an API key"), "{err}");
}

#[test]
fn openapi_and_health() {
    let (_t, s) = server();
    let r = s.get("/health");
    assert_eq!(r.status, 200);
    let doc = s.get("/openapi.json").json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/sandboxes",
        "/v2/sandboxes",
        "/sandboxes/{id}",
        "/sandboxes/{id}/pause",
        "/sandboxes/{id}/connect",
        "/sandboxes/{id}/resume",
        "/sandboxes/{id}/timeout",
        "/health",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }
    assert!(doc["paths"]["/sandboxes/{id}/connect"]["post"]["responses"]["201"].is_object());
    assert!(doc["paths"]["/sandboxes/{id}/connect"]["post"]["responses"]["200"].is_object());
}

#[test]
fn templates_from_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("templates")).unwrap();
    std::fs::write(
        data.join("templates/big.json"),
        r#"{"kernel": "testguest", "cmdline": "stasis.work=counter", "memoryMB": 256, "vcpus": 2, "diskSizeMB": 10}"#,
    )
    .unwrap();
    std::fs::write(data.join("templates/broken.json"), r#"{"kernel": 5}"#).unwrap();
    std::fs::write(
        data.join("templates/failing.json"),
        r#"{"kernel": "testguest", "cmdline": "stasis.fake.fail=boot", "memoryMB": 64, "vcpus": 1}"#,
    )
    .unwrap();
    // Values out of range: 400 naming the field, never a stored -1.
    let bad = [
        (
            "huge-mem",
            r#"{"kernel": "testguest", "memoryMB": 18446744073709551615, "vcpus": 1}"#,
            "memoryMB",
        ),
        (
            "zero-mem",
            r#"{"kernel": "testguest", "memoryMB": 0, "vcpus": 1}"#,
            "memoryMB",
        ),
        (
            "zero-cpu",
            r#"{"kernel": "testguest", "memoryMB": 64, "vcpus": 0}"#,
            "vcpus",
        ),
        (
            "many-cpu",
            r#"{"kernel": "testguest", "memoryMB": 64, "vcpus": 256}"#,
            "vcpus",
        ),
        (
            "no-kernel",
            r#"{"kernel": "/nonexistent/vmlinux", "memoryMB": 64, "vcpus": 1}"#,
            "kernel",
        ),
    ];
    for (name, body, _) in &bad {
        std::fs::write(data.join(format!("templates/{name}.json")), body).unwrap();
    }
    let s = Server::start(&data, &[]);
    for (name, _, field) in &bad {
        let r = s.post("/sandboxes", json!({ "templateID": name }));
        r.assert_error(400);
        let msg = r.json()["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(field), "{name}: {msg}");
    }
    assert_eq!(list_all(&s, "", 100).0.len(), 0);
    let id = s.create(json!({"templateID": "big"}));
    let d = s.info(&id).json();
    assert_eq!(d["memoryMB"], 256);
    assert_eq!(d["cpuCount"], 2);
    assert_eq!(d["diskSizeMB"], 10);
    assert_eq!(d["templateID"], "big");
    // The code-interpreter SDK's default template exists too.
    s.create(json!({"templateID": "code-interpreter-v1"}));
    let r = s.post("/sandboxes", json!({"templateID": "broken"}));
    r.assert_error(400);
    // A VM that fails to boot: 500 with the reason, nothing left behind.
    let r = s.post("/sandboxes", json!({"templateID": "failing"}));
    r.assert_error(500);
    assert!(r.json()["message"].as_str().unwrap().contains("boot"));
    assert_eq!(list_all(&s, "", 100).0.len(), 2);
    let dirs = std::fs::read_dir(data.join("sandboxes")).unwrap().count();
    assert_eq!(dirs, 2);
}

#[test]
fn dead_worker_marks_sandbox_gone() {
    let (_t, s) = server();
    let id = s.create(json!({"templateID": "base"}));
    let pid = s.worker_pid(&id).unwrap();
    // SAFETY: killing the worker process the server spawned for this test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_until(20, || s.info(&id).status == 404),
        "sandbox still listed"
    );
    let r = s.info(&id);
    r.assert_error(404);
    assert!(
        r.json()["message"].as_str().unwrap().contains("worker"),
        "{}",
        r.body
    );
    assert!(list_all(&s, "", 100).0.is_empty());
    let dir = s.data_dir.join("sandboxes").join(&id);
    assert!(
        wait_until(20, || !dir.exists()),
        "files of a dead sandbox left behind"
    );
}

#[test]
fn capacity_limit_gives_429() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), &["--max-running", "2"]);
    let a = s.create(json!({"templateID": "base"}));
    let _b = s.create(json!({"templateID": "base"}));
    s.post("/sandboxes", json!({"templateID": "base"}))
        .assert_error(429);
    // Pausing frees a slot; resuming needs one.
    assert_eq!(
        s.post(&format!("/sandboxes/{a}/pause"), json!({})).status,
        204
    );
    let c = s.create(json!({"templateID": "base"}));
    s.post(&format!("/sandboxes/{a}/connect"), json!({}))
        .assert_error(429);
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{c}"), None).status,
        204
    );
    assert_eq!(
        s.post(&format!("/sandboxes/{a}/connect"), json!({})).status,
        201
    );
}

/// The real VMM behind the API: a `base` sandbox (the built-in test guest
/// on an endless workload) paused to disk and resumed through the API goes
/// on from the round it was paused at. Needs /dev/kvm.
#[test]
fn vm_backend_pauses_and_resumes_a_real_guest() {
    if !common::kvm_or_skip("vm_backend_pauses_and_resumes_a_real_guest") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), &["--backend", "vm"]);
    let r = s.post("/sandboxes", json!({"templateID": "base", "timeout": 120}));
    assert_eq!(r.status, 201, "create: {} / log: {}", r.body, s.log());
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    assert!(
        wait_until(60, || s.round_opt(&id).is_some_and(|r| r > 3)),
        "guest made no progress: {}",
        s.log()
    );
    let pid = s.worker_pid(&id).unwrap();
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "pause: {} / log: {}", r.body, s.log());
    // Paused: its worker (and VM) gone; the round in its snapshot's memory
    // (read by the server and by this test) is the round the worker read
    // from the stopped guest; the sizes are the snapshot files'.
    let paused_at = check_paused(&s, &id, Some(pid));
    let d = s.info(&id).json();
    let (allocated, apparent) = (
        d["stasis"]["snapshotBytes"].as_u64().unwrap(),
        d["stasis"]["snapshotApparentBytes"].as_u64().unwrap(),
    );
    // The memory file is sparse: its length is the guest's 64 MiB, its
    // allocation only the pages the guest touched.
    assert!(apparent >= 64 << 20, "{d}");
    assert!(allocated < apparent, "{d}");
    eprintln!("snapshot of a 64 MiB test guest: {allocated} bytes allocated, {apparent} apparent");
    let (paused, _) = list_all(&s, "state=paused", 100);
    assert!(paused.iter().any(|x| x["sandboxID"] == id.as_str()));
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}));
    assert_eq!(r.status, 201, "{}", r.body);
    // Resumed from where it stopped, and advancing.
    let first = s.round(&id);
    assert!(
        first >= paused_at,
        "resumed at round {first}, paused at {paused_at}"
    );
    assert!(
        wait_until(60, || s.round(&id) > paused_at + 3),
        "no progress after resume: {}",
        s.log()
    );
    // Again, to pause a lazily restored guest.
    let pid = s.worker_pid(&id).unwrap();
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    let again = check_paused(&s, &id, Some(pid));
    assert!(again > paused_at);
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/connect"), json!({}))
            .status,
        201
    );
    assert!(wait_until(60, || s.round(&id) > again));
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    s.info(&id).assert_error(404);
}

#[test]
fn requests_without_bodies_use_defaults() {
    let (_t, s) = server();
    // Empty create body: template `base`, default timeout.
    let r = http(s.addr, "POST", "/sandboxes", &[], None);
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    let d = s.info(&id).json();
    assert_eq!(d["templateID"], "base");
    // Pause with no body and no content type (as the SDK sends it).
    assert_eq!(
        http(s.addr, "POST", &format!("/sandboxes/{id}/pause"), &[], None).status,
        204
    );
    assert_eq!(
        http(
            s.addr,
            "POST",
            &format!("/sandboxes/{id}/connect"),
            &[],
            None
        )
        .status,
        201
    );
    // Timeout needs its field.
    http(
        s.addr,
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        &[],
        None,
    )
    .assert_error(400);
}
