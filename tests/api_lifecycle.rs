//! Lifecycle behaviour over time and under load: timeout expiry (kill and
//! auto-pause), retention, restart safety (kill -9), graceful drain,
//! concurrency.
//!
//! The time-based and restart scenarios run on both backends: the fake one
//! (no KVM) and the VM backend with the built-in test guest (`base`: an
//! endless workload whose round the guest publishes in its memory and the
//! API reports as `stasis.guestRound`). The `vm_*` tests need /dev/kvm and
//! fail loudly without it (or print a "SKIPPED (not passed)" banner with
//! STASIS_ALLOW_SKIP=1).

mod api_support;
mod common;

use std::sync::Arc;
use std::thread;

use api_support::{check_paused, list_all, process_dead, wait_until, Server};
use serde_json::json;

fn data(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    tmp.path().join("data")
}

/// Which backend a scenario runs on.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Fake,
    Vm,
}

impl Backend {
    /// Whether the scenario can run here: the VM backend needs KVM (a loud
    /// failure without it, unless STASIS_ALLOW_SKIP=1).
    fn available(self, test: &str) -> bool {
        match self {
            Backend::Fake => true,
            Backend::Vm => common::kvm_or_skip(test),
        }
    }

    /// Starts a server on `tmp`'s data dir with this backend and `extra`.
    fn start(self, tmp: &tempfile::TempDir, extra: &[&str]) -> Server {
        let mut args: Vec<&str> = match self {
            Backend::Fake => vec![],
            Backend::Vm => vec!["--backend", "vm"],
        };
        args.extend_from_slice(extra);
        Server::start(&data(tmp), &args)
    }

    /// A sandbox timeout (s) long enough for the guest to publish a round
    /// before it fires.
    fn short_timeout(self) -> u64 {
        match self {
            Backend::Fake => 1,
            Backend::Vm => 3,
        }
    }

    /// Retention (s) for the retention scenario: long enough to create and
    /// pause two sandboxes before it ends.
    fn retention(self) -> u64 {
        match self {
            Backend::Fake => 3,
            Backend::Vm => 10,
        }
    }

    /// Bound (s) on waiting for guest progress: real guests share two busy
    /// cores with everything else.
    fn patience(self) -> u64 {
        match self {
            Backend::Fake => 20,
            Backend::Vm => 90,
        }
    }
}

/// Waits until the guest has published round `min` or more; returns it.
/// Connects to a paused sandbox and checks that its guest goes on from
/// `at_pause`: its round at resume is at least that, then it advances.
fn resume_and_check(s: &Server, id: &str, at_pause: u64, b: Backend) {
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 120}));
    assert_eq!(r.status, 201, "{id}: {} / log:\n{}", r.body, s.log());
    let first = s.round(id);
    assert!(
        first >= at_pause,
        "{id} resumed at round {first}, paused at {at_pause}"
    );
    s.wait_round(id, at_pause + 3, b.patience());
}

fn timeout_expiry_kills(b: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = b.start(&tmp, &[]);
    let id = s.create(json!({"templateID": "base", "timeout": b.short_timeout()}));
    let pid = s.worker_pid(&id).unwrap();
    assert!(
        wait_until(b.patience(), || s.info(&id).status == 404),
        "not killed at timeout; log:\n{}",
        s.log()
    );
    let r = s.info(&id);
    assert!(
        r.json()["message"].as_str().unwrap().contains("timeout"),
        "{}",
        r.body
    );
    assert!(
        wait_until(20, || process_dead(pid)),
        "worker {pid} outlived the kill"
    );
    let dir = s.data_dir.join("sandboxes").join(&id);
    assert!(wait_until(20, || !dir.exists()));
    s.post(&format!("/sandboxes/{id}/connect"), json!({}))
        .assert_error(404);
}

#[test]
fn timeout_expiry_kills_fake() {
    timeout_expiry_kills(Backend::Fake);
}

#[test]
fn vm_timeout_expiry_kills() {
    if Backend::Vm.available("vm_timeout_expiry_kills") {
        timeout_expiry_kills(Backend::Vm);
    }
}

fn timeout_expiry_auto_pauses(b: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = b.start(&tmp, &[]);
    let t = b.short_timeout();
    let a = s.create(json!({"templateID": "base", "timeout": t, "autoPause": true}));
    let c = s.create(json!({"templateID": "base", "timeout": t, "lifecycle": {"onTimeout": "pause", "autoResume": false}}));
    let pids = [s.worker_pid(&a).unwrap(), s.worker_pid(&c).unwrap()];
    for (id, pid) in [&a, &c].into_iter().zip(pids) {
        assert!(
            wait_until(b.patience(), || s.info(id).json()["state"] == "paused"),
            "{id} not auto-paused; log:\n{}",
            s.log()
        );
        let d = s.info(id).json();
        assert_eq!(d["lifecycle"]["onTimeout"], "pause");
        let at_pause = check_paused(&s, id, Some(pid));
        resume_and_check(&s, id, at_pause, b);
    }
}

#[test]
fn timeout_expiry_auto_pauses_and_resumes_where_it_was() {
    timeout_expiry_auto_pauses(Backend::Fake);
}

#[test]
fn vm_timeout_expiry_auto_pauses_and_resumes_where_it_was() {
    if Backend::Vm.available("vm_timeout_expiry_auto_pauses_and_resumes_where_it_was") {
        timeout_expiry_auto_pauses(Backend::Vm);
    }
}

fn retention_deletes_paused_sandboxes(b: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let retention = b.retention();
    let retention_arg = retention.to_string();
    let mut s = b.start(&tmp, &["--retention-secs", &retention_arg]);
    let a = s.create(json!({"templateID": "base"}));
    let c = s.create(json!({"templateID": "base"}));
    for id in [&a, &c] {
        let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
        assert_eq!(r.status, 204, "{} / log:\n{}", r.body, s.log());
    }
    let d = s.info(&a).json();
    assert_eq!(d["state"], "paused");
    // endAt of a paused sandbox = retention end = creation + retention.
    let created = d["stasis"]["createdAt"].as_str().unwrap();
    let end = d["endAt"].as_str().unwrap();
    assert_ne!(created, end);
    assert_eq!(list_all(&s, "state=paused", 10).0.len(), 2);

    // While the server runs: deleted with its files, then 404 for every call.
    assert!(
        wait_until(retention + 30, || s.info(&a).status == 404),
        "retention did not expire"
    );
    s.post(&format!("/sandboxes/{a}/connect"), json!({}))
        .assert_error(404);
    s.post(&format!("/sandboxes/{a}/resume"), json!({}))
        .assert_error(404);
    s.req("DELETE", &format!("/sandboxes/{a}"), None)
        .assert_error(404);
    let dir = s.data_dir.join("sandboxes").join(&a);
    assert!(wait_until(20, || !dir.exists()));
    // `c` was created just after `a`: its retention may end a moment later.
    assert!(
        wait_until(30, || list_all(&s, "", 10).0.is_empty()),
        "retention did not expire the second sandbox"
    );

    // Expired while the server was down: gone at startup too.
    let c = s.create(json!({"templateID": "base"}));
    assert_eq!(
        s.post(&format!("/sandboxes/{c}/pause"), json!({})).status,
        204
    );
    s.kill9();
    let cdir = s.data_dir.join("sandboxes").join(&c);
    let created = std::fs::metadata(&cdir).unwrap().modified().unwrap();
    assert!(wait_until(retention + 30, || created
        .elapsed()
        .is_ok_and(|e| e.as_secs() > retention)));
    let s2 = b.start(&tmp, &["--retention-secs", &retention_arg]);
    s2.info(&c).assert_error(404);
    s2.post(&format!("/sandboxes/{c}/connect"), json!({}))
        .assert_error(404);
    assert!(!cdir.exists());
    drop(s);
}

#[test]
fn retention_deletes_paused_sandboxes_fake() {
    retention_deletes_paused_sandboxes(Backend::Fake);
}

#[test]
fn vm_retention_deletes_paused_sandboxes() {
    if Backend::Vm.available("vm_retention_deletes_paused_sandboxes") {
        retention_deletes_paused_sandboxes(Backend::Vm);
    }
}

/// kill -9 of the server with `n_paused` paused and `n_running` running
/// sandboxes, then a restart: the paused ones come back and resume with
/// their guest going on from its round at pause; the running ones are
/// reported gone ("running when the server stopped") with their files
/// removed; no worker outlives the server.
fn restart_after_kill9(b: Backend, n_paused: usize, n_running: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = b.start(&tmp, &[]);
    let paused: Vec<String> = (0..n_paused)
        .map(|_| s.create(json!({"templateID": "base", "metadata": {"k": "v"}})))
        .collect();
    let running: Vec<String> = (0..n_running)
        .map(|_| s.create(json!({"templateID": "base"})))
        .collect();
    let mut rounds = Vec::new();
    for id in &paused {
        s.wait_round(id, 3, b.patience());
        let pid = s.worker_pid(id);
        let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
        assert_eq!(r.status, 204, "{} / log:\n{}", r.body, s.log());
        rounds.push(check_paused(&s, id, pid));
    }
    for id in &running {
        s.wait_round(id, 1, b.patience());
    }
    let pids: Vec<i32> = running.iter().map(|id| s.worker_pid(id).unwrap()).collect();

    s.kill9();
    // No orphans: the workers die with the server.
    for pid in &pids {
        assert!(
            wait_until(20, || process_dead(*pid)),
            "worker {pid} outlived the server"
        );
    }

    let s2 = b.start(&tmp, &[]);
    let (listed, _) = list_all(&s2, "", 2);
    let mut ids: Vec<String> = listed
        .iter()
        .map(|x| x["sandboxID"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want = paused.clone();
    want.sort();
    assert_eq!(ids, want, "exactly the paused sandboxes survive");
    assert!(listed
        .iter()
        .all(|x| x["state"] == "paused" && x["metadata"]["k"] == "v"));
    for id in &running {
        let r = s2.info(id);
        r.assert_error(404);
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .contains("running when the server stopped"));
        assert!(!s2.data_dir.join("sandboxes").join(id).exists());
    }
    // Each paused one is still at its round (in its snapshot) and resumes
    // from there.
    for (id, at_pause) in paused.iter().zip(&rounds) {
        assert_eq!(check_paused(&s2, id, None), *at_pause);
        resume_and_check(&s2, id, *at_pause, b);
    }
    // And can be paused again (a new snapshot generation) and killed.
    let id = &paused[0];
    let pid = s2.worker_pid(id);
    assert_eq!(
        s2.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    assert!(check_paused(&s2, id, pid) > rounds[0]);
    let snaps: Vec<_> = std::fs::read_dir(s2.data_dir.join("sandboxes").join(id))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
        .collect();
    // Exactly the new generation's chain (itself, and on the VM backend
    // the generation it was resumed from, its incremental parent).
    assert_eq!(
        snaps.len(),
        api_support::snapshot_chain(&s2, id).len(),
        "old snapshots are cleaned up"
    );
    assert_eq!(
        s2.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
}

#[test]
fn restart_after_kill9_keeps_paused_drops_running_and_leaves_no_orphans() {
    restart_after_kill9(Backend::Fake, 3, 2);
}

#[test]
fn vm_restart_after_kill9_keeps_paused_drops_running_and_leaves_no_orphans() {
    if Backend::Vm
        .available("vm_restart_after_kill9_keeps_paused_drops_running_and_leaves_no_orphans")
    {
        restart_after_kill9(Backend::Vm, 2, 1);
    }
}

/// SIGTERM drains: every running sandbox is paused (the already paused one
/// stays as it was), the server exits cleanly, no worker outlives it; the
/// restarted server lists them all as paused and each resumes with its
/// guest going on.
fn graceful_drain(b: Backend, n_running: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = b.start(&tmp, &[]);
    let was_paused = s.create(json!({"templateID": "base"}));
    s.wait_round(&was_paused, 3, b.patience());
    let pid = s.worker_pid(&was_paused);
    assert_eq!(
        s.post(&format!("/sandboxes/{was_paused}/pause"), json!({}))
            .status,
        204
    );
    let paused_round = check_paused(&s, &was_paused, pid);
    let ids: Vec<String> = (0..n_running)
        .map(|_| s.create(json!({"templateID": "base"})))
        .collect();
    for id in &ids {
        s.wait_round(id, 3, b.patience());
    }
    let pids: Vec<i32> = ids.iter().map(|id| s.worker_pid(id).unwrap()).collect();
    let before: Vec<u64> = ids.iter().map(|id| s.round(id)).collect();
    let st = s.terminate();
    assert!(st.success(), "{st:?}\n{}", s.log());
    for pid in &pids {
        assert!(
            wait_until(20, || process_dead(*pid)),
            "worker {pid} outlived the server"
        );
    }

    let s2 = b.start(&tmp, &[]);
    assert_eq!(list_all(&s2, "state=paused", 100).0.len(), n_running + 1);
    assert_eq!(check_paused(&s2, &was_paused, None), paused_round);
    resume_and_check(&s2, &was_paused, paused_round, b);
    for (id, at_least) in ids.iter().zip(&before) {
        let at_pause = check_paused(&s2, id, None);
        assert!(
            at_pause >= *at_least,
            "{id}: round went back: {at_least} -> {at_pause}"
        );
        resume_and_check(&s2, id, at_pause, b);
    }
}

#[test]
fn graceful_shutdown_pauses_running_sandboxes_and_they_resume_after_restart() {
    graceful_drain(Backend::Fake, 2);
}

#[test]
fn vm_graceful_shutdown_pauses_running_sandboxes_and_they_resume_after_restart() {
    if Backend::Vm
        .available("vm_graceful_shutdown_pauses_running_sandboxes_and_they_resume_after_restart")
    {
        graceful_drain(Backend::Vm, 2);
    }
}

#[test]
fn graceful_shutdown_stops_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start(&data(&tmp), &[]);
    let id = s.create(json!({"templateID": "base"}));
    let pid = s.worker_pid(&id).unwrap();
    let st = s.terminate();
    assert!(st.success(), "{st:?}\n{}", s.log());
    assert!(wait_until(20, || process_dead(pid)));
}

#[test]
fn fifty_sandboxes_created_paused_resumed_concurrently() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Arc::new(Server::start(&data(&tmp), &[]));
    let par = |f: Arc<dyn Fn(usize) -> String + Send + Sync>| -> Vec<String> {
        let hs: Vec<_> = (0..50)
            .map(|i| {
                let f = f.clone();
                thread::spawn(move || f(i))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let s1 = s.clone();
    let ids = par(Arc::new(move |i| {
        s1.create(json!({"templateID": "base", "metadata": {"i": i.to_string()}}))
    }));
    assert_eq!(list_all(&s, "state=running", 7).0.len(), 50);

    let s2 = s.clone();
    let ids2 = Arc::new(ids.clone());
    par(Arc::new(move |i| {
        let r = s2.post(&format!("/sandboxes/{}/pause", ids2[i]), json!({}));
        assert_eq!(r.status, 204, "{}", r.body);
        String::new()
    }));
    let (paused, _) = list_all(&s, "state=paused", 7);
    assert_eq!(paused.len(), 50);
    let rounds: Vec<u64> = ids.iter().map(|id| s.round(id)).collect();

    let s3 = s.clone();
    let ids3 = Arc::new(ids.clone());
    par(Arc::new(move |i| {
        let r = s3.post(
            &format!("/sandboxes/{}/connect", ids3[i]),
            json!({"timeout": 600}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        String::new()
    }));
    assert_eq!(list_all(&s, "state=running", 100).0.len(), 50);
    for (id, at_pause) in ids.iter().zip(&rounds) {
        assert!(
            wait_until(30, || s.round(id) > *at_pause),
            "{id} did not continue"
        );
    }
    // Metadata survived for all of them.
    for i in 0..50 {
        let (one, _) = list_all(&s, &format!("metadata=i%3D{i}"), 10);
        assert_eq!(one.len(), 1);
    }
}

/// A template whose (fake) pause takes 3 s, so other requests can meet it.
fn slow_server(tmp: &tempfile::TempDir) -> Server {
    let d = data(tmp);
    std::fs::create_dir_all(d.join("templates")).unwrap();
    std::fs::write(
        d.join("templates/slow.json"),
        r#"{"kernel": "testguest", "cmdline": "stasis.work=counter stasis.fake.pause_ms=3000", "memoryMB": 64, "vcpus": 1}"#,
    )
    .unwrap();
    Server::start(&d, &[])
}

fn start_pause(s: &Arc<Server>, id: &str) -> thread::JoinHandle<u16> {
    let s2 = s.clone();
    let id2 = id.to_string();
    let h = thread::spawn(move || {
        s2.post(&format!("/sandboxes/{id2}/pause"), json!({}))
            .status
    });
    assert!(
        wait_until(20, || s.info(id).json()["stasis"]["busy"] == "pausing"),
        "pause did not start"
    );
    h
}

#[test]
fn operations_during_a_slow_pause() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Arc::new(slow_server(&tmp));

    // Connect during pause: waits, then resumes (201).
    let a = s.create(json!({"templateID": "slow"}));
    let other = s.create(json!({"templateID": "base"}));
    let h = start_pause(&s, &a);
    // Other sandboxes are not blocked by it: while `a` is still pausing, we
    // can create, get, pause and list others.
    let fresh = s.create(json!({"templateID": "base"}));
    assert_eq!(s.info(&other).status, 200);
    assert_eq!(
        s.post(&format!("/sandboxes/{other}/pause"), json!({}))
            .status,
        204
    );
    assert_eq!(list_all(&s, "", 100).0.len(), 3);
    assert_eq!(
        s.info(&a).json()["stasis"]["busy"],
        "pausing",
        "the pause should still be running"
    );
    let r = s.post(&format!("/sandboxes/{a}/connect"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(h.join().unwrap(), 204);
    assert_eq!(s.info(&a).json()["state"], "running");

    // Pause during pause: 409 once the first finishes.
    let h = start_pause(&s, &a);
    s.post(&format!("/sandboxes/{a}/pause"), json!({}))
        .assert_error(409);
    assert_eq!(h.join().unwrap(), 204);

    // Kill during pause: waits, then 204; gone afterwards.
    let r = s.post(&format!("/sandboxes/{a}/connect"), json!({}));
    assert_eq!(r.status, 201);
    let h = start_pause(&s, &a);
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{a}"), None).status,
        204
    );
    assert_eq!(h.join().unwrap(), 204);
    s.info(&a).assert_error(404);
    let _ = fresh;
}

#[test]
fn ten_thousand_concurrent_requests() {
    // SAFETY: raising our own open-file soft limit to the hard limit.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    // All 10,000 come from one address: the per-client connection cap
    // (tests/api_limits.rs) is lifted so this measures the server itself.
    let s = Server::start(
        &data(&tmp),
        &["--max-running", "20", "--max-conns-per-ip", "0"],
    );
    let id = s.create(json!({"templateID": "base"}));
    let addr = s.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses: Vec<u16> = rt.block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..10_000usize {
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let (method, path, body) = match i % 6 {
                    0 => ("GET", "/v2/sandboxes?state=running".to_string(), ""),
                    1 => ("GET", format!("/sandboxes/{id}"), ""),
                    2 => ("GET", "/sandboxes/nonexistent0".to_string(), ""),
                    3 => (
                        "POST",
                        format!("/sandboxes/{id}/connect"),
                        "{\"timeout\": 300}",
                    ),
                    4 => ("GET", "/health".to_string(), ""),
                    _ if i % 60 == 5 => (
                        "POST",
                        "/sandboxes".to_string(),
                        "{\"templateID\": \"base\"}",
                    ),
                    _ => (
                        "POST",
                        format!("/sandboxes/{id}/timeout"),
                        "{\"timeout\": -1}",
                    ),
                };
                raw_request(addr, method, &path, body).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert_eq!(statuses.len(), 10_000);
    for (i, st) in statuses.iter().enumerate() {
        let ok: &[u16] = match i % 6 {
            2 => &[404],
            _ if i % 6 == 5 && i % 60 == 5 => &[201, 429],
            5 => &[400],
            _ => &[200],
        };
        assert!(ok.contains(st), "request {i}: status {st}");
    }
    // Still healthy and consistent.
    assert_eq!(s.get("/health").status, 200);
    let running = list_all(&s, "state=running", 100).0.len();
    assert!((1..=20).contains(&running), "{running}");
}

/// One request over a fresh connection; retries connection-level failures
/// (listen backlog overflow under a storm), never HTTP errors.
async fn raw_request(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut last = String::new();
    for _ in 0..20 {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        match tokio::time::timeout(std::time::Duration::from_secs(120), attempt).await {
            Ok(Ok(buf)) if !buf.is_empty() => return api_support::parse_response(&buf).status,
            Ok(Ok(_)) => last = "empty response".into(),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    panic!("request {method} {path} failed: {last}");
}

#[test]
fn shutdown_pause_secs_zero_drops_running_sandboxes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start(&data(&tmp), &["--shutdown-pause-secs", "0"]);
    let id = s.create(json!({"templateID": "base"}));
    assert!(s.terminate().success(), "{}", s.log());
    let s2 = Server::start(&data(&tmp), &[]);
    s2.info(&id).assert_error(404);
}
