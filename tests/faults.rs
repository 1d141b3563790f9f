//! Nothing is lost under faults (issue 14, item 6). Each test arms one
//! fault point of the server with `STASIS_FAULT` (see `stasis::api::fault`)
//! or kills it, and checks what is left: the sandbox stays resumable, is
//! marked broken with a clear reason, keeps running, or is cleaned up.
//! Fake backend (plus the stand-in agent for `kill -9`): no KVM needed.

mod api_support;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;

use api_support::{process_dead, wait_until, Server};
use serde_json::json;

fn start(data: &Path, fault: &str) -> Server {
    Server::try_start_env(data, &[], &[("STASIS_FAULT", fault)]).unwrap_or_else(|e| panic!("{e}"))
}

/// Directory names under `<data>/sandboxes`.
fn sandbox_dirs(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("sandboxes"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn snapshot_gens(data: &Path, id: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("sandboxes").join(id))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot-"))
        .collect();
    v.sort();
    v
}

#[test]
fn failed_db_write_after_pause_keeps_the_snapshots_and_the_sandbox_resumable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // The second pause's record fails to save (once).
    let mut s = start(&data, "db-after-pause@2");
    let id = s.create(json!({}));
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    let r = s.post(&format!("/sandboxes/{id}/resume"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    let round = s.round(&id);
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    r.assert_error(500);
    assert!(r.body.contains("can be resumed"), "{}", r.body);
    // Paused, with the new snapshot; the one the stored row names is kept.
    assert_eq!(s.info(&id).json()["state"], "paused");
    assert_eq!(snapshot_gens(&data, &id), ["snapshot-1", "snapshot-2"]);
    // The record is saved again in the background, so a restart finds the
    // sandbox paused (not "running when the server stopped").
    assert!(
        wait_until(60, || s.log().contains("its record is saved now")),
        "the record was never saved again:\n{}",
        s.log()
    );
    assert!(s.terminate().success());
    let s = start(&data, "");
    assert_eq!(s.info(&id).json()["state"], "paused", "{}", s.log());
    assert_eq!(snapshot_gens(&data, &id), ["snapshot-2"]);
    // Resumable, where it was.
    let r = s.post(&format!("/sandboxes/{id}/resume"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(s.round(&id) >= round);
    // And the next pause is saved normally.
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    assert_eq!(s.info(&id).json()["state"], "paused");
}

#[test]
fn resume_failing_after_the_guest_ran_marks_the_sandbox_broken() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = start(&data, "db-after-resume");
    let id = s.create(json!({}));
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    let r = s.post(&format!("/sandboxes/{id}/resume"), json!({}));
    r.assert_error(500);
    assert!(r.body.contains("cannot be resumed again"), "{}", r.body);
    // Not "paused" with a disk newer than its memory: gone, with the reason.
    let r = s.info(&id);
    r.assert_error(404);
    assert!(r.body.contains("after the guest ran"), "{}", r.body);
    assert!(!sandbox_dirs(&data).contains(&id));
    drop(s);

    // The same after a crash between "the guest ran" and "running saved":
    // the snapshot's marker tells the next start.
    let data = tmp.path().join("data2");
    let mut s = start(&data, "");
    let id = s.create(json!({}));
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    let other = s.create(json!({}));
    assert_eq!(
        s.post(&format!("/sandboxes/{other}/pause"), json!({}))
            .status,
        204
    );
    s.kill9();
    let snap = data.join("sandboxes").join(&id).join("snapshot-1");
    assert!(snap.is_dir());
    std::fs::write(snap.join("resumed"), b"").unwrap();
    let s = start(&data, "");
    let r = s.info(&id);
    r.assert_error(404);
    assert!(r.body.contains("disk may be newer"), "{}", r.body);
    // The other paused sandbox is untouched.
    assert_eq!(s.info(&other).json()["state"], "paused");
    let r = s.post(&format!("/sandboxes/{other}/resume"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn failed_auto_pause_keeps_the_sandbox_and_pauses_it_later() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = start(&data, "pause");
    let id = s.create(json!({"timeout": 1, "autoPause": true}));
    assert!(
        wait_until(90, || s.info(&id).json()["state"] == "paused"),
        "the sandbox was not paused after its failed auto-pause: {}\n{}",
        s.info(&id).body,
        s.log()
    );
    assert!(s.log().contains("auto-pause failed"), "{}", s.log());
    let r = s.post(&format!("/sandboxes/{id}/resume"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn client_gone_mid_create_leaks_no_sandbox_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = start(&data, "slow-create");
    let body = json!({"metadata": {"who": "gone"}}).to_string();
    let mut c = TcpStream::connect(s.addr).unwrap();
    write!(
        c,
        "POST /sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Hang up once the server has started the create (its directory
    // exists), while it is still in progress.
    assert!(
        wait_until(30, || !sandbox_dirs(&data).is_empty()),
        "create never started"
    );
    c.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    // The create completes: the directory belongs to a listed sandbox,
    // which can be killed like any other (and then nothing is left).
    let listed = || -> Vec<String> {
        s.get("/v2/sandboxes")
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["sandboxID"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        wait_until(60, || listed().len() == 1),
        "the abandoned create did not finish: {:?}\n{}",
        sandbox_dirs(&data),
        s.log()
    );
    let ids = listed();
    assert_eq!(sandbox_dirs(&data), ids);
    assert_eq!(s.info(&ids[0]).json()["metadata"]["who"], "gone");
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{}", ids[0]), None)
            .status,
        204
    );
    assert!(sandbox_dirs(&data).is_empty());
}

#[test]
fn kill9_of_the_server_leaves_no_worker_and_the_next_start_cleans_up() {
    let standin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/api_support/standin_envd.py"
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("templates")).unwrap();
    std::fs::write(
        data.join("templates/agent.json"),
        r#"{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true}"#,
    )
    .unwrap();
    let env = [("STASIS_ENVD_BIN", standin)];
    let mut s = Server::try_start_env(&data, &[], &env).unwrap_or_else(|e| panic!("{e}"));
    let plain = s.create(json!({}));
    let agent = s.create(json!({"templateID": "agent"}));
    let paused = s.create(json!({}));
    assert_eq!(
        s.post(&format!("/sandboxes/{paused}/pause"), json!({}))
            .status,
        204
    );
    let workers: Vec<i32> = [&plain, &agent]
        .iter()
        .map(|id| s.worker_pid(id).expect("worker pid"))
        .collect();
    let agent_pid: i32 =
        std::fs::read_to_string(data.join("sandboxes").join(&agent).join("agent.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert!(!process_dead(agent_pid));
    s.kill9();
    // Workers die with the server (PR_SET_PDEATHSIG).
    for pid in &workers {
        assert!(
            wait_until(30, || process_dead(*pid)),
            "worker {pid} outlived the server"
        );
    }
    // The next start kills what a dead worker left (the host agent) and
    // removes the sandboxes that were running; the paused one survives.
    let s = Server::try_start_env(&data, &[], &env).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_until(30, || process_dead(agent_pid)),
        "the agent {agent_pid} of a sandbox that was running outlived the next start"
    );
    for id in [&plain, &agent] {
        let r = s.info(id);
        r.assert_error(404);
        assert!(
            r.body.contains("running when the server stopped"),
            "{}",
            r.body
        );
    }
    assert_eq!(sandbox_dirs(&data), vec![paused.clone()]);
    assert_eq!(s.info(&paused).json()["state"], "paused");
    let r = s.post(&format!("/sandboxes/{paused}/resume"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
}
