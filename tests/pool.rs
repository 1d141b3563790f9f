//! A pool of three `stasis serve` hosts on this machine sharing one real
//! PostgreSQL (`common/postgres.rs`) and one real S3 server (moto,
//! `common/s3.rs`), running the built-in test guest on KVM:
//!
//! - any host answers any call: a `GET` and a pause sent to hosts that do
//!   not hold the sandbox are forwarded to the one that does; every host
//!   lists the pool's sandboxes;
//! - `kill -9` of a host: its running sandbox is reported lost by the
//!   others; its paused sandbox (uploaded by `--durable-pause`) resumes on
//!   another host, from the bucket, and its guest goes on from the round
//!   where it paused (memory came through, not a fresh boot);
//! - SIGTERM of that host (the drain): it pauses and uploads the sandbox
//!   and leaves the pool; the sandbox resumes on the last host — a
//!   migration — and goes on again; a kill there removes it everywhere.
//!
//! The hosts are separate processes with separate data directories and
//! jail uid ranges; they share nothing but the database and the bucket.
//! `--no-network`: the sandbox network's namespaces and nftables table are
//! per machine (one host per machine in a real pool) and the test guest
//! has no network device anyway.
//!
//! Needs /dev/kvm, PostgreSQL (Debian's `postgresql`) and python3-venv for
//! moto; without them the test fails loudly (or prints a "SKIPPED (not
//! passed)" banner with STASIS_ALLOW_SKIP=1).

mod api_support;
mod common;
#[path = "common/postgres.rs"]
mod pg;
#[path = "common/s3.rs"]
mod s3;

use std::path::Path;

use api_support::{wait_until, Server};
use pg::Postgres;
use s3::S3Server;
use serde_json::json;

/// Heartbeat TTL of the test's hosts (heartbeats every 2 s).
const TTL_SECS: &str = "4";
/// Longest wait for a VM operation or a state change.
const PATIENCE: u64 = 90;

fn host(data: &Path, pg: &Postgres, s3: &S3Server, id: &str, uid_base: &str) -> Server {
    let s3_args = s3::serve_args(s3);
    let mut args: Vec<&str> = vec![
        "--backend",
        "vm",
        "--no-network",
        "--database",
        &pg.url,
        "--host-id",
        id,
        "--pool-discovery",
        "postgres",
        "--pool-heartbeat-ttl-secs",
        TTL_SECS,
        "--durable-pause",
        "--shutdown-pause-secs",
        "60",
        "--jail-uid-base",
        uid_base,
    ];
    args.extend(s3_args.iter().map(String::as_str));
    Server::try_start_env(data, &args, &s3::s3_env())
        .unwrap_or_else(|e| panic!("host {id} did not start: {e}"))
}

/// Hosts whose heartbeat is recent, by the database's clock.
fn live_hosts(pg: &Postgres) -> Vec<String> {
    pg.client()
        .query(
            "SELECT id FROM hosts WHERE last_heartbeat > now() - make_interval(secs => $1::float8) ORDER BY id",
            &[&TTL_SECS.parse::<f64>().unwrap()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The sandbox's (state, owner) in the database.
fn owner(pg: &Postgres, id: &str) -> Option<(String, String)> {
    pg.client()
        .query_opt("SELECT state, owner FROM sandboxes WHERE id = $1", &[&id])
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

/// Waits until the guest's round (as `via` reports it) passes `past`.
fn wait_round_past(via: &Server, id: &str, past: u64, logs: &[&Server]) -> u64 {
    let mut last = None;
    let ok = wait_until(PATIENCE, || {
        last = via.round_opt(id);
        last.is_some_and(|r| r > past)
    });
    assert!(
        ok,
        "{id}: round {last:?}, not past {past}; logs:\n{}",
        logs.iter()
            .map(|s| s.log())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    );
    last.unwrap()
}

#[test]
fn three_hosts_forward_calls_survive_a_kill_and_migrate_on_drain() {
    let test = "three_hosts_forward_calls_survive_a_kill_and_migrate_on_drain";
    if !common::kvm_or_skip(test) {
        return;
    }
    let Some(pg) = Postgres::start_or_skip(test) else {
        return;
    };
    let dir = common::scratch("pool");
    let s3 = S3Server::start(&dir);
    let mut a = host(&dir.join("a"), &pg, &s3, "host-a", "1100000");
    let mut b = host(&dir.join("b"), &pg, &s3, "host-b", "1200000");
    let mut c = host(&dir.join("c"), &pg, &s3, "host-c", "1300000");
    let all = ["host-a", "host-b", "host-c"];
    assert!(
        wait_until(30, || live_hosts(&pg) == all),
        "hosts not live: {:?}",
        live_hosts(&pg)
    );

    // Two sandboxes on host A.
    let x = a.create(json!({"templateID": "base", "timeout": 600}));
    let y = a.create(json!({"templateID": "base", "timeout": 600}));
    wait_round_past(&a, &x, 1, &[&a]);

    // Any host answers: B's GET is forwarded to A; C lists both.
    let via_b = b.info(&x);
    assert_eq!(via_b.status, 200, "{}", via_b.body);
    assert_eq!(via_b.json()["sandboxID"], x.as_str());
    assert_eq!(via_b.json()["state"], "running");
    let listed = c.get("/v2/sandboxes");
    assert_eq!(listed.status, 200, "{}", listed.body);
    let ids: Vec<String> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&x) && ids.contains(&y), "C lists {ids:?}");

    // A pause sent to C runs on A; --durable-pause: the snapshot is in the
    // bucket when it answers.
    let r = c.post(&format!("/sandboxes/{x}/pause"), json!({}));
    assert_eq!(r.status, 204, "{} / A:\n{}", r.body, a.log());
    let d = b.info(&x).json();
    assert_eq!(d["state"], "paused", "{d}");
    let at_pause = d["stasis"]["guestRound"].as_u64().expect("guestRound");
    assert_eq!(d["stasis"]["snapshotUpload"]["state"], "uploaded", "{d}");
    assert_eq!(owner(&pg, &x), Some(("paused".into(), "host-a".into())));

    // kill -9 of A: once its heartbeat is past the TTL, its running
    // sandbox is lost and its paused one resumes elsewhere.
    a.kill9();
    assert!(
        wait_until(30, || !live_hosts(&pg).contains(&"host-a".to_string())),
        "host-a still live: {:?}",
        live_hosts(&pg)
    );
    let lost = b.info(&y);
    assert_eq!(lost.status, 404, "{}", lost.body);
    assert!(lost.body.contains("lost"), "{}", lost.body);
    // Sent to C: the placement (the least loaded, ties by id) may hand it
    // to B, which then takes it without placing it again.
    let r = c.post(&format!("/sandboxes/{x}/connect"), json!({"timeout": 600}));
    assert!(
        r.status == 200 || r.status == 201,
        "connect after the kill: {} {}\nB:\n{}\nC:\n{}",
        r.status,
        r.body,
        b.log(),
        c.log()
    );
    let (state, first) = owner(&pg, &x).unwrap();
    assert_eq!(state, "running");
    assert!(first == "host-b" || first == "host-c", "owner {first}");
    eprintln!("{test}: {x} resumed on {first} after host-a was killed");
    let round = wait_round_past(&c, &x, at_pause, &[&b, &c]);
    let first_round = round;
    assert!(
        first_round > at_pause,
        "the guest went on from round {at_pause}"
    );

    // The drain: SIGTERM of the owner pauses and uploads the sandbox and
    // leaves the pool; the sandbox migrates to the last host.
    let (owner_srv, last) = if first == "host-b" {
        (&mut b, &c)
    } else {
        (&mut c, &b)
    };
    let status = owner_srv.terminate();
    assert_eq!(status.code(), Some(0), "{}", owner_srv.log());
    let drained_log = owner_srv.log();
    let d = last.info(&x).json();
    assert_eq!(d["state"], "paused", "{d}\n{drained_log}");
    let at_drain = d["stasis"]["guestRound"].as_u64().expect("guestRound");
    assert!(at_drain >= first_round, "{d}");
    assert_eq!(live_hosts(&pg).len(), 1, "the drained host left at once");
    let r = last.post(&format!("/sandboxes/{x}/connect"), json!({"timeout": 600}));
    assert!(
        r.status == 200 || r.status == 201,
        "connect after the drain: {} {}\n{}",
        r.status,
        r.body,
        last.log()
    );
    let (state, second) = owner(&pg, &x).unwrap();
    assert_eq!(state, "running");
    assert_ne!(second, first, "migrated off the drained host");
    wait_round_past(last, &x, at_drain, &[last]);

    // A kill removes it from the pool.
    let r = last.req("DELETE", &format!("/sandboxes/{x}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(owner(&pg, &x), None);
    assert_eq!(last.info(&x).status, 404);
}

/// Two hosts on the fake backend (each sandbox's agent is the stand-in
/// envd): the sandbox's own traffic sent to the host that does not hold it
/// is forwarded — by the SDK's routing headers and by `{port}-{id}.{domain}`
/// Host, which reaches the agent unchanged — and the lifecycle API's key is
/// checked before anything is forwarded.
#[test]
fn traffic_and_calls_for_a_sandbox_on_another_host_are_forwarded() {
    let test = "traffic_and_calls_for_a_sandbox_on_another_host_are_forwarded";
    let Some(pg) = Postgres::start_or_skip(test) else {
        return;
    };
    const KEY: &str = "pool-test-key-0123456789";
    let dir = common::scratch("pool-fake");
    let standin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/api_support/standin_envd.py"
    );
    let start = |name: &str| {
        let data = dir.join(name);
        std::fs::create_dir_all(data.join("templates")).unwrap();
        std::fs::write(
            data.join("templates/agent.json"),
            r#"{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true}"#,
        )
        .unwrap();
        let args = [
            "--api-key",
            KEY,
            "--database",
            &pg.url,
            "--host-id",
            name,
            "--pool-discovery",
            "postgres",
            "--pool-heartbeat-ttl-secs",
            TTL_SECS,
        ];
        Server::try_start_env(&data, &args, &[("STASIS_ENVD_BIN", standin)])
            .unwrap_or_else(|e| panic!("host {name} did not start: {e}"))
    };
    let a = start("host-a");
    let b = start("host-b");
    assert!(
        wait_until(30, || live_hosts(&pg) == ["host-a", "host-b"]),
        "hosts not live: {:?}",
        live_hosts(&pg)
    );
    let id = a.create(json!({"templateID": "agent", "timeout": 300}));

    // The SDK's envd request, sent to B: forwarded to A, then to the agent.
    let r = api_support::http(
        b.addr,
        "GET",
        "/health",
        &[("Novita-Sandbox-Id", &id), ("Novita-Sandbox-Port", "49983")],
        None,
    );
    assert_eq!(r.status, 204, "{}\nB:\n{}", r.body, b.log());
    // By Host: the agent sees the Host the client sent.
    let host = format!("49983-{id}.sandbox.example.test");
    let r = api_support::http(b.addr, "GET", "/headers?x=1", &[("Host", &host)], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["host"], host.as_str(), "{}", r.body);
    // The lifecycle API: B refuses a call without the key itself (nothing
    // forwarded, nothing placed); with the key it answers for A's sandbox.
    let r = api_support::http(b.addr, "GET", &format!("/sandboxes/{id}"), &[], None);
    r.assert_error(401);
    let d = b.info(&id).json();
    assert_eq!(d["sandboxID"], id.as_str(), "{d}");
    assert_eq!(d["stasis"]["host"], "host-a", "{d}");
    assert_eq!(owner(&pg, &id), Some(("running".into(), "host-a".into())));
}
