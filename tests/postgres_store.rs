//! Metadata in PostgreSQL (`stasis serve --database postgres://…`) against a
//! real PostgreSQL server (Debian's `postgresql` package, started per test
//! by `common/postgres.rs` as an unprivileged user on a Unix socket):
//! the store round-trips rows; the conditional update lets exactly one of
//! several racing hosts claim a paused sandbox (many seeded rounds);
//! heartbeats and the live-host TTL; `stasis serve` (fake backend) serves
//! the lifecycle on PostgreSQL and a restart finds its sandboxes; with
//! PostgreSQL stopped the API answers 503 and nothing changes, and a server
//! cannot start without it.
//!
//! Without PostgreSQL installed these tests fail loudly (or print a
//! "SKIPPED (not passed)" banner with STASIS_ALLOW_SKIP=1).

mod api_support;
mod common;
#[path = "common/postgres.rs"]
mod pg;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use api_support::{wait_until, Server};
use pg::Postgres;
use rand::{Rng, SeedableRng};
use serde_json::json;
use stasis::api::store::{Claim, DatabaseSpec, Error, HostInfo, Row, RowState, Store};

/// The seed of a randomized test: $STASIS_TEST_SEED, else the clock;
/// printed either way so that a failure can be replayed.
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
    eprintln!("{test}: seed {s} (STASIS_TEST_SEED={s} replays it)");
    s
}

fn store(pg: &Postgres, host: &str) -> Store {
    Store::open_spec(&DatabaseSpec::Postgres(pg.url.clone()), host).unwrap()
}

fn row(id: &str, seq: i64, state: RowState) -> Row {
    Row {
        id: id.into(),
        seq,
        template_id: "base".into(),
        alias: Some("base".into()),
        state,
        created_ms: 1_000 + seq,
        started_ms: 2_000,
        end_ms: 3_000,
        on_timeout_pause: true,
        auto_resume: false,
        metadata: BTreeMap::from([("k".to_string(), format!("v{seq}"))]),
        cpu_count: 2,
        memory_mb: 64,
        disk_mb: 5,
        allow_internet: true,
        snapshot_gen: 3,
        guest_round: Some(99),
        worker_pid: Some(1234),
        agent: true,
        envd_token: Some("tok".into()),
        generation: 0,
        owner: None,
    }
}

#[test]
fn store_round_trips_rows_and_keeps_hosts_apart() {
    let Some(pg) = Postgres::start_or_skip("store_round_trips_rows_and_keeps_hosts_apart") else {
        return;
    };
    let a = store(&pg, "host-a");
    a.put(&row("sb-1", 1, RowState::Running)).unwrap();
    a.put(&row("sb-2", 2, RowState::Paused)).unwrap();
    let mut r2 = row("sb-2", 2, RowState::Running);
    r2.metadata.insert("x".into(), "ünïcode \"quoted\"".into());
    a.put(&r2).unwrap();
    let spec = stasis::net::spec::NetSpec {
        allow_out: vec!["10.0.0.0/8".into()],
        ..Default::default()
    };
    a.put_network("sb-2", &spec).unwrap();

    let got = a.get("sb-2").unwrap().expect("sb-2 stored");
    assert_eq!(got.state, RowState::Running);
    assert_eq!(got.generation, 2, "two writes: generation 2");
    assert_eq!(got.owner.as_deref(), Some("host-a"));
    let mut want = r2.clone();
    want.generation = 2;
    want.owner = Some("host-a".into());
    assert_eq!(got, want, "every column round-trips");
    assert_eq!(a.max_seq().unwrap(), 2);
    assert_eq!(a.load_networks().unwrap(), vec![("sb-2".to_string(), spec)]);

    // A second connection (a restart) finds the schema in place and the rows.
    drop(a);
    let a = store(&pg, "host-a");
    let ids: Vec<String> = a.load_all().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["sb-1", "sb-2"]);
    let mut c = pg.client();
    let versions: Vec<i32> = c
        .query("SELECT version FROM stasis_schema ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2], "the schema is migrated once per version");

    // Another host sees the row but does not recover it, and cannot
    // overwrite or delete what host-a owns.
    let b = store(&pg, "host-b");
    assert!(b.load_all().unwrap().is_empty());
    assert_eq!(b.max_seq().unwrap(), 0);
    assert!(b.get("sb-1").unwrap().is_some());
    assert!(matches!(
        b.put(&row("sb-1", 9, RowState::Paused)),
        Err(Error::Conflict { .. })
    ));
    assert!(matches!(b.delete("sb-1"), Err(Error::Conflict { .. })));
    assert_eq!(a.get("sb-1").unwrap().unwrap().seq, 1, "unchanged");

    // Delete takes the network settings with it; absent is fine.
    a.delete("sb-2").unwrap();
    a.delete("sb-2").unwrap();
    assert!(a.get("sb-2").unwrap().is_none());
    assert!(a.load_networks().unwrap().is_empty());
    let n: i64 = c
        .query_one("SELECT count(*) FROM sandbox_network", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // A row that does not decode (written behind stasis's back) is
    // quarantined at load, not fatal.
    c.execute("UPDATE sandboxes SET memory_mb = -5 WHERE id = 'sb-1'", &[])
        .unwrap();
    let (rows, bad) = a.load_all_quarantining().unwrap();
    assert!(rows.is_empty());
    assert_eq!(bad.len(), 1);
    assert!(bad[0].why.contains("memory_mb"), "{}", bad[0].why);
    let q: i64 = c
        .query_one("SELECT count(*) FROM quarantine WHERE id = 'sb-1'", &[])
        .unwrap()
        .get(0);
    assert_eq!(q, 1);
}

#[test]
fn racing_hosts_claim_a_paused_sandbox_exactly_once() {
    let Some(pg) = Postgres::start_or_skip("racing_hosts_claim_a_paused_sandbox_exactly_once")
    else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("racing_hosts"));
    const HOSTS: usize = 4;
    let origin = store(&pg, "origin");
    // One connection per host, as in a pool.
    let hosts: Vec<Store> = (0..HOSTS)
        .map(|i| store(&pg, &format!("host-{i}")))
        .collect();
    let rounds = 150;
    let mut wins = [0usize; HOSTS];
    let mut claim_us: Vec<u128> = Vec::new();
    for round in 0..rounds {
        let id = format!("race-{round}");
        origin.put(&row(&id, round, RowState::Paused)).unwrap();
        let racers = rng.random_range(2..=HOSTS);
        let spins: Vec<u32> = (0..racers).map(|_| rng.random_range(0..20_000)).collect();
        let barrier = Arc::new(Barrier::new(racers));
        let threads: Vec<_> = (0..racers)
            .map(|h| {
                let s = hosts[h].clone();
                let b = barrier.clone();
                let id = id.clone();
                let spin = spins[h];
                std::thread::spawn(move || {
                    b.wait();
                    for _ in 0..spin {
                        std::hint::spin_loop();
                    }
                    let t = std::time::Instant::now();
                    let c = s.claim(&id, RowState::Paused, RowState::Running).unwrap();
                    (c, t.elapsed().as_micros())
                })
            })
            .collect();
        let results: Vec<Claim> = threads
            .into_iter()
            .map(|t| {
                let (c, us) = t.join().unwrap();
                claim_us.push(us);
                c
            })
            .collect();
        let winners: Vec<usize> = (0..racers).filter(|h| results[*h] == Claim::Won).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one of {racers} hosts may claim it: {results:?}"
        );
        let w = winners[0];
        wins[w] += 1;
        for (h, r) in results.iter().enumerate() {
            if h != w {
                assert_eq!(
                    *r,
                    Claim::Lost {
                        state: Some(RowState::Running),
                        owner: Some(format!("host-{w}"))
                    },
                    "round {round}: host {h} lost to host {w}"
                );
            }
        }
        let now = origin.get(&id).unwrap().unwrap();
        assert_eq!(now.state, RowState::Running);
        assert_eq!(now.owner, Some(format!("host-{w}")));
        assert_eq!(now.generation, 2, "one write, one claim");
        // The origin host can no longer write the row (it lost ownership).
        assert!(matches!(
            origin.put(&row(&id, round, RowState::Paused)),
            Err(Error::Conflict { .. })
        ));
        // A stale generation never wins, even with the right state.
        assert!(!hosts[w]
            .transition(&id, RowState::Running, 1, RowState::Paused)
            .unwrap());
        assert!(hosts[w]
            .transition(&id, RowState::Running, 2, RowState::Paused)
            .unwrap());
    }
    eprintln!("wins per host over {rounds} rounds: {wins:?}");
    claim_us.sort_unstable();
    // Measured, not asserted: a claim is a read plus a conditional update.
    eprintln!(
        "claim latency over {} racing claims: median {} us, p99 {} us",
        claim_us.len(),
        claim_us[claim_us.len() / 2],
        claim_us[claim_us.len() * 99 / 100]
    );
    assert!(
        wins.iter().filter(|w| **w > 0).count() >= 2,
        "the race is real: more than one host won some round ({wins:?})"
    );
}

#[test]
fn heartbeats_and_live_hosts_ttl() {
    let Some(pg) = Postgres::start_or_skip("heartbeats_and_live_hosts_ttl") else {
        return;
    };
    let a = store(&pg, "host-a");
    let b = store(&pg, "host-b");
    let info = |addr: &str, load| HostInfo {
        address: addr.into(),
        fingerprint: "GenuineIntel/000806f8/kvm12".into(),
        load,
        draining: load > 5,
        memory_free: 1 << 30,
    };
    a.heartbeat(&info("10.0.0.1:3000", 1)).unwrap();
    b.heartbeat(&info("10.0.0.2:3000", 7)).unwrap();
    let ttl = Duration::from_secs(30);
    let live = a.live_hosts(ttl).unwrap();
    let ids: Vec<&str> = live.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["host-a", "host-b"]);
    assert_eq!(live[1].info, info("10.0.0.2:3000", 7));
    assert!(live.iter().all(|h| h.age_ms < 30_000));

    // host-b falls silent: its last heartbeat is moved an hour back (the
    // database's clock decides, so no test sleeps).
    let mut c = pg.client();
    c.execute(
        "UPDATE hosts SET last_heartbeat = now() - interval '1 hour' WHERE id = 'host-b'",
        &[],
    )
    .unwrap();
    let ids: Vec<String> = b
        .live_hosts(ttl)
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(ids, ["host-a"], "a host past the TTL is not live");
    assert_eq!(b.live_hosts(Duration::from_secs(7200)).unwrap().len(), 2);
    // It comes back with its next heartbeat, with the new load.
    b.heartbeat(&info("10.0.0.2:3000", 3)).unwrap();
    let live = a.live_hosts(ttl).unwrap();
    assert_eq!(live.len(), 2);
    assert_eq!(live[1].info.load, 3);
    assert_eq!(
        (live[1].info.draining, live[1].info.memory_free),
        (false, 1 << 30)
    );
    // A host that left the pool (after its drain) is gone at once.
    b.delete_host().unwrap();
    let ids: Vec<String> = a
        .live_hosts(ttl)
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(ids, ["host-a"], "a host that left is not live");
}

fn serve(data: &std::path::Path, pg: &Postgres, host: &str) -> Server {
    Server::start(
        data,
        &[
            "--database",
            &pg.url,
            "--host-id",
            host,
            "--shutdown-pause-secs",
            "30",
        ],
    )
}

fn db_state(pg: &Postgres, id: &str) -> Option<(String, String, i64)> {
    pg.client()
        .query_opt(
            "SELECT state, owner, generation FROM sandboxes WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

#[test]
fn serve_on_postgres_runs_the_lifecycle_and_a_restart_finds_its_sandboxes() {
    let Some(pg) = Postgres::start_or_skip("serve_on_postgres") else {
        return;
    };
    let tmp = common::scratch("pg-serve");
    let data = tmp.join("data");
    let mut s = serve(&data, &pg, "host-1");

    // The heartbeat registers the host with its address.
    assert!(
        wait_until(20, || {
            pg.client()
                .query_opt("SELECT address FROM hosts WHERE id = 'host-1'", &[])
                .unwrap()
                .is_some_and(|r| r.get::<_, String>(0) == s.addr.to_string())
        }),
        "no heartbeat from host-1"
    );

    let a = s.create(json!({"templateID": "base", "timeout": 300}));
    let b = s.create(json!({"templateID": "base", "timeout": 300, "metadata": {"who": "b"}}));
    assert_eq!(db_state(&pg, &a).unwrap().0, "running");
    assert_eq!(db_state(&pg, &a).unwrap().1, "host-1");

    let r = s.post(&format!("/sandboxes/{a}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);
    let (state, _, gen_paused) = db_state(&pg, &a).unwrap();
    assert_eq!(state, "paused");
    let r = s.post(&format!("/sandboxes/{a}/connect"), json!({"timeout": 300}));
    assert_eq!(r.status, 201, "resume: {}", r.body);
    let (state, owner, gen_resumed) = db_state(&pg, &a).unwrap();
    assert_eq!((state.as_str(), owner.as_str()), ("running", "host-1"));
    assert!(
        gen_resumed >= gen_paused + 2,
        "the resume is a claim plus a write"
    );
    let r = s.post(&format!("/sandboxes/{a}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);

    let r = s.req("DELETE", &format!("/sandboxes/{b}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        db_state(&pg, &b).is_none(),
        "a killed sandbox's row is gone"
    );
    let c = s.create(json!({"templateID": "base", "timeout": 300}));

    // Restart: the paused sandbox comes back from PostgreSQL (the running
    // one is paused by the graceful shutdown and comes back too).
    assert!(s.terminate().success());
    drop(s);
    let s = serve(&data, &pg, "host-1");
    for id in [&a, &c] {
        let r = s.info(id);
        assert_eq!(r.status, 200, "{id} after the restart: {}", r.body);
        assert_eq!(r.json()["state"], "paused", "{}", r.body);
    }
    let r = s.post(&format!("/sandboxes/{a}/connect"), json!({"timeout": 300}));
    assert_eq!(r.status, 201, "resume after the restart: {}", r.body);
    assert_eq!(db_state(&pg, &a).unwrap().0, "running");

    // A second host on the same database does not take host-1's sandboxes
    // at its start, and cannot resume one host-1 resumed.
    let data2 = tmp.join("data2");
    let s2 = serve(&data2, &pg, "host-2");
    let (list, _) = api_support::list_all(&s2, "", 100);
    assert!(list.is_empty(), "host-2 lists none of host-1's: {list:?}");
    assert_eq!(db_state(&pg, &c).unwrap().1, "host-1");
    drop(s2);
    drop(s);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn postgres_down_answers_503_and_changes_nothing() {
    let Some(mut pg) = Postgres::start_or_skip("postgres_down") else {
        return;
    };
    let tmp = common::scratch("pg-down");
    let data = tmp.join("data");
    let s = serve(&data, &pg, "host-1");
    let running = s.create(json!({"templateID": "base", "timeout": 300}));
    let paused = s.create(json!({"templateID": "base", "timeout": 300}));
    let r = s.post(&format!("/sandboxes/{paused}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);

    pg.stop();
    let check_503 = |what: &str, r: api_support::Resp| {
        r.assert_error(503);
        let m = r.json()["message"].as_str().unwrap().to_string();
        assert!(
            m.contains("metadata database is unavailable") && m.contains("nothing was changed"),
            "{what}: {m}"
        );
    };
    check_503(
        "create",
        s.post("/sandboxes", json!({"templateID": "base"})),
    );
    check_503(
        "pause",
        s.post(&format!("/sandboxes/{running}/pause"), json!({})),
    );
    check_503(
        "resume",
        s.post(
            &format!("/sandboxes/{paused}/connect"),
            json!({"timeout": 60}),
        ),
    );
    check_503(
        "kill",
        s.req("DELETE", &format!("/sandboxes/{running}"), None),
    );
    // Nothing changed: reads are served from memory.
    assert_eq!(s.info(&running).json()["state"], "running");
    assert_eq!(s.info(&paused).json()["state"], "paused");
    let (list, _) = api_support::list_all(&s, "", 100);
    assert_eq!(list.len(), 2, "no half-created sandbox: {list:?}");

    // PostgreSQL back: the same calls work (the store reconnects).
    // (First a frozen server: it accepts nothing and answers nothing; the
    // readiness check gives up on it, 503 rather than a hung call.)
    pg.restart();
    pg.freeze(true);
    check_503(
        "pause, database frozen",
        s.post(&format!("/sandboxes/{running}/pause"), json!({})),
    );
    assert_eq!(s.info(&running).json()["state"], "running");
    pg.freeze(false);
    pg.stop();
    pg.restart();
    let r = s.post(&format!("/sandboxes/{running}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);
    let r = s.post(
        &format!("/sandboxes/{paused}/connect"),
        json!({"timeout": 60}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(db_state(&pg, &running).unwrap().0, "paused");
    assert_eq!(db_state(&pg, &paused).unwrap().0, "running");
    drop(s);

    // A server cannot start without its database: a clear error, no serving.
    pg.stop();
    let err = match Server::try_start(&tmp.join("data3"), &["--database", &pg.url]) {
        Ok(_) => panic!("serve started without its database"),
        Err(e) => e,
    };
    assert!(
        err.contains("metadata database is unavailable"),
        "unclear start error: {err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn snapshots_are_recorded_and_a_lost_database_is_rebuilt_from_their_manifests() {
    let Some(pg) = Postgres::start_or_skip("snapshots_rebuild") else {
        return;
    };
    let tmp = common::scratch("pg-rebuild");
    let data = tmp.join("data");
    let s = serve(&data, &pg, "host-1");
    let id = s.create(json!({"templateID": "base", "timeout": 300}));
    let mut sids = Vec::new();
    for _ in 0..3 {
        let r = s.post(&format!("/sandboxes/{id}/snapshots"), json!({}));
        assert_eq!(r.status, 201, "{}", r.body);
        sids.push(r.json()["snapshotID"].as_str().unwrap().to_string());
    }
    let recorded = |pg: &Postgres| -> Vec<String> {
        pg.client()
            .query("SELECT id FROM snapshots ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let mut want = sids.clone();
    want.sort();
    assert_eq!(recorded(&pg), want, "each snapshot is recorded");
    let r = s.req("DELETE", &format!("/templates/{}", sids[0]), None);
    assert_eq!(r.status, 204, "{}", r.body);
    want.retain(|x| *x != sids[0]);
    assert_eq!(recorded(&pg), want, "a deleted snapshot is forgotten");
    drop(s);

    // The database is lost (every table gone).
    pg.client()
        .batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        .unwrap();
    let out = std::process::Command::new(api_support::BIN)
        .args(["db", "rebuild", "--database", &pg.url, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rebuild: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    printed.sort();
    assert_eq!(printed, want);
    assert_eq!(recorded(&pg), want, "rebuilt from the manifests");
    let st = store(&pg, "host-1");
    for m in st.snapshots().unwrap() {
        assert_eq!(m.source_sandbox.as_deref(), Some(id.as_str()));
        assert!(want.contains(&m.id));
    }
    // Rebuilding again changes nothing (idempotent).
    let again = std::process::Command::new(api_support::BIN)
        .args(["db", "rebuild", "--database", &pg.url, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(recorded(&pg), want);
    let _ = std::fs::remove_dir_all(&tmp);
}
