//! The snapshot store in S3-compatible object storage, against a real S3
//! server on loopback (moto's server, from the venv that tests/s3/setup.sh
//! makes in target/s3-venv; started by each test on a free port, killed
//! after):
//!
//! - a paused test guest's snapshot pushed to the bucket, pulled in a fresh
//!   process and resumed there ends with the workload's exact checksum; a
//!   second pull is served by the chunk cache alone;
//! - dedup: a second upload of the same content puts no chunk, one with a
//!   changed 2 MiB piece puts one; two guests of one workload (the ratio
//!   is printed);
//! - a corrupt or missing chunk fails the download naming the chunk;
//! - the commit is a conditional put: of two commits of one id, one wins;
//! - `stasis serve --snapshot-store`: a pause uploads in the background and
//!   `GET /sandboxes/{id}` shows it; with the server down the pause works,
//!   the backlog and error show, and the upload completes once the server
//!   is back (also across a restart of serve); `--durable-pause` answers
//!   once the snapshot is in the bucket; an unreachable bucket at start is
//!   a clear startup error.
//!
//! Needs python3-venv and PyPI the first time (the venv is cached).

mod api_support;
mod common;
#[path = "common/s3.rs"]
mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stasis::guest::{self, Workload};
use stasis::snapshot::remote::{self, RemoteConfig, RemoteStore, UploadProgress};

use s3::{s3_env, S3Server, BUCKET};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");
fn store(s3: &S3Server) -> RemoteStore {
    for (k, v) in s3_env() {
        std::env::set_var(k, v);
    }
    RemoteStore::open(&RemoteConfig {
        url: format!("s3://{BUCKET}"),
        endpoint: Some(s3.endpoint()),
        max_retries: Some(1),
        retry_timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    })
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `stasis ARGS` with the S3 environment; (success, stdout, stderr).
fn stasis(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(s3_env())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_round(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("round ")?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn workload() -> Workload {
    Workload {
        mib: 24,
        rounds: 2500,
        seed: 16,
        report: 50,
        base_mib: 16,
    }
}

/// Boots the test guest on `w` in a process, pauses it (SIGUSR1) after
/// round `after` into `snap`.
fn paused_guest(w: &Workload, dir: &Path, name: &str, after: u64) -> PathBuf {
    let console = dir.join(format!("{name}.console"));
    let snap = dir.join(name);
    let mut child = Command::new(BIN)
        .args(["run", "--mem", "64M", "--cmdline", &w.cmdline()])
        .arg("--console")
        .arg(&console)
        .arg("--snapshot-on-signal")
        .arg(&snap)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(Duration::from_secs(120), "guest progress", || {
        last_round(&console) > after || child.try_wait().unwrap().is_some()
    });
    assert!(child.try_wait().unwrap().is_none(), "guest finished first");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    assert!(child.wait().unwrap().success());
    assert!(
        snap.join("state.bin").is_file(),
        "no snapshot in {}",
        snap.display()
    );
    snap
}

fn stats(out: &str) -> Value {
    let v: Value = serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    v["stats"].clone()
}

fn files_equal(a: &Path, b: &Path) {
    for e in std::fs::read_dir(a).unwrap() {
        let e = e.unwrap();
        let x = std::fs::read(e.path()).unwrap();
        let y = std::fs::read(b.join(e.file_name())).unwrap();
        assert!(x == y, "{:?} differs after the round trip", e.file_name());
    }
}

#[test]
fn a_paused_guest_round_trips_through_the_bucket_and_resumes_in_a_fresh_process() {
    if !common::kvm_or_skip("s3 round trip") {
        return;
    }
    let dir = common::scratch("s3-roundtrip");
    let s3 = S3Server::start(&dir);
    let w = workload();
    let snap = paused_guest(&w, &dir, "snap", 300);
    let a = s3::serve_args(&s3);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();

    let (ok, out, err) = stasis(
        &[
            &["snapshot", "push", snap.to_str().unwrap(), "--id", "rt-1"][..],
            &a,
        ]
        .concat(),
    );
    assert!(ok, "push: {err}");
    let up = stats(&out);
    eprintln!("push: {up}");
    assert!(up["chunksUploaded"].as_u64().unwrap() > 0);
    assert_eq!(up["chunksUploaded"], up["chunksTotal"]);

    // A fresh process downloads it (through an empty cache) and another
    // resumes it: the workload ends with the reference checksum.
    let cache = dir.join("cache");
    let pulled = dir.join("pulled");
    let cache_args = ["--chunk-cache-dir", cache.to_str().unwrap()];
    let (ok, out, err) = stasis(
        &[
            &["snapshot", "pull", "rt-1", pulled.to_str().unwrap()][..],
            &a,
            &cache_args,
        ]
        .concat(),
    );
    assert!(ok, "pull: {err}");
    let cold = stats(&out);
    eprintln!("pull (cold cache): {cold}");
    assert_eq!(cold["cached"], 0);
    assert_eq!(cold["fetched"], cold["chunks"]);
    files_equal(&snap, &pulled);
    let console = dir.join("resumed.console");
    let (ok, _, err) = stasis(&[
        "resume",
        pulled.to_str().unwrap(),
        "--console",
        console.to_str().unwrap(),
    ]);
    assert!(ok, "resume: {err}");
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(
        guest::parse_checksum(&text),
        Some(guest::reference(&w).checksum),
        "console after resuming the pulled snapshot:\n{text}"
    );

    // Warm cache: nothing from the bucket.
    let pulled2 = dir.join("pulled2");
    let (ok, out, err) = stasis(
        &[
            &["snapshot", "pull", "rt-1", pulled2.to_str().unwrap()][..],
            &a,
            &cache_args,
        ]
        .concat(),
    );
    assert!(ok, "pull: {err}");
    let warm = stats(&out);
    eprintln!("pull (warm cache): {warm}");
    assert_eq!(warm["fetched"], 0);
    assert_eq!(warm["cached"], cold["chunks"]);
    files_equal(&snap, &pulled2);
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn uploads_skip_chunks_the_bucket_holds() {
    if !common::kvm_or_skip("s3 dedup") {
        return;
    }
    let dir = common::scratch("s3-dedup");
    let s3 = S3Server::start(&dir);
    let st = store(&s3);
    let w = workload();
    let one = paused_guest(&w, &dir, "one", 200);
    let two = paused_guest(&w, &dir, "two", 600);
    let rt = rt();
    let p1 = UploadProgress::default();
    let s1 = rt
        .block_on(st.upload_dir(&one, "dd-1", Default::default(), &p1))
        .unwrap();
    assert!(s1.chunks_uploaded > 0);
    // The same content again, under another id: no chunk is put.
    let p = UploadProgress::default();
    let again = rt
        .block_on(st.upload_dir(&one, "dd-1b", Default::default(), &p))
        .unwrap();
    assert_eq!(again.chunks_uploaded, 0, "{again:?}");
    assert_eq!(again.bytes_uploaded, 0);
    assert_eq!(again.chunks_present, again.chunks_total);
    // The same snapshot with one 2 MiB piece of memory changed (what a
    // second pause of a sandbox that wrote little looks like): only that
    // chunk is put.
    let changed = dir.join("changed");
    std::fs::create_dir_all(&changed).unwrap();
    for e in std::fs::read_dir(&one).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), changed.join(e.file_name())).unwrap();
    }
    let m = remote::chunk_dir(&one, "x", Default::default()).unwrap();
    let mem = m.files.iter().find(|f| f.name == "memory.bin").unwrap();
    let i = mem.chunks.iter().rposition(|c| c.is_some()).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(changed.join("memory.bin"))
            .unwrap();
        f.write_all_at(b"changed", i as u64 * remote::CHUNK_SIZE + 100)
            .unwrap();
    }
    let p = UploadProgress::default();
    let c = rt
        .block_on(st.upload_dir(&changed, "dd-1c", Default::default(), &p))
        .unwrap();
    assert_eq!(c.chunks_uploaded, 1, "{c:?}");
    assert_eq!(c.chunks_present, c.chunks_total - 1, "{c:?}");
    // A second guest of the same workload, paused later: measured, not
    // asserted (the test guest's workload rewrites all its memory every
    // round, so two guests share little; Linux guests of one template share
    // their unchanged kernel and page-cache pages).
    let p2 = UploadProgress::default();
    let s2 = rt
        .block_on(st.upload_dir(&two, "dd-2", Default::default(), &p2))
        .unwrap();
    eprintln!(
        "dedup: second guest of one workload: {} of {} chunks already in the bucket ({:.0}%), {} bytes uploaded of {}; first guest: {s1:?}; one piece changed: {c:?}",
        s2.chunks_present,
        s2.chunks_total,
        s2.chunks_present as f64 * 100.0 / s2.chunks_total.max(1) as f64,
        s2.bytes_uploaded,
        s2.bytes_total
    );
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory of made-up snapshot files (no KVM needed).
fn fake_snapshot(dir: &Path, seed: u8) -> PathBuf {
    let d = dir.join(format!("fake-{seed}"));
    std::fs::create_dir_all(&d).unwrap();
    let mut mem = vec![0u8; (remote::CHUNK_SIZE * 4) as usize];
    for (i, b) in mem
        .iter_mut()
        .enumerate()
        .take((remote::CHUNK_SIZE * 2) as usize)
    {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    std::fs::write(d.join("memory.bin"), &mem).unwrap();
    std::fs::write(d.join("state.bin"), vec![seed; 5000]).unwrap();
    d
}

#[test]
fn a_corrupt_or_missing_chunk_fails_the_download_naming_the_chunk() {
    let dir = common::scratch("s3-corrupt");
    let s3 = S3Server::start(&dir);
    let st = store(&s3);
    let snap = fake_snapshot(&dir, 1);
    let rt = rt();
    rt.block_on(st.upload_dir(
        &snap,
        "bad-1",
        Default::default(),
        &UploadProgress::default(),
    ))
    .unwrap();
    let m = rt.block_on(st.manifest("bad-1")).unwrap();
    let mem = m.files.iter().find(|f| f.name == "memory.bin").unwrap();
    assert!(
        mem.chunks[2].is_none() && mem.chunks[3].is_none(),
        "zero chunks are not stored"
    );
    let first = mem.chunks[0].clone().unwrap();
    let second = mem.chunks[1].clone().unwrap();
    // Damage one chunk: the download fails naming it, and leaves nothing.
    let mut junk = vec![0u8; remote::CHUNK_SIZE as usize];
    junk[0] = 1;
    rt.block_on(st.put_chunk_raw(&first, junk.into())).unwrap();
    let dest = dir.join("dest");
    let e = rt
        .block_on(st.download("bad-1", &dest, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&first) && e.contains("corrupt") && e.contains("memory.bin"),
        "{e}"
    );
    assert!(!dest.exists());
    // Lose another: named too (through a cache: not cached either).
    rt.block_on(st.delete_chunk(&second)).unwrap();
    let cache = remote::ChunkCache::open(&dir.join("cache"), 1 << 30).unwrap();
    let e = rt
        .block_on(st.download("bad-1", &dest, Some(&cache)))
        .unwrap_err()
        .to_string();
    assert!(
        (e.contains(&second) && e.contains("missing"))
            || (e.contains(&first) && e.contains("corrupt")),
        "{e}"
    );
    assert!(!dest.exists());
    // The same in a fresh process, through the CLI.
    let a = s3::serve_args(&s3);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let (ok, _, err) = stasis(
        &[
            &["snapshot", "pull", "bad-1", dest.to_str().unwrap()][..],
            &a,
        ]
        .concat(),
    );
    assert!(
        !ok && (err.contains(&first) || err.contains(&second)),
        "{err}"
    );
    // An id that was never committed.
    let e = rt
        .block_on(st.download("nope", &dest, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the snapshot store"), "{e}");
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn of_two_commits_of_one_snapshot_id_exactly_one_wins() {
    let dir = common::scratch("s3-commit");
    let s3 = S3Server::start(&dir);
    let st = Arc::new(store(&s3));
    let rt = rt();
    let (a, b) = (fake_snapshot(&dir, 2), fake_snapshot(&dir, 3));
    let ma = remote::chunk_dir(&a, "race-1", Default::default()).unwrap();
    let mb = remote::chunk_dir(&b, "race-1", Default::default()).unwrap();
    let p = UploadProgress::default();
    rt.block_on(st.upload_chunks(&a, &ma, &p)).unwrap();
    rt.block_on(st.upload_chunks(&b, &mb, &p)).unwrap();
    let results = rt.block_on(async {
        let (s1, s2) = (st.clone(), st.clone());
        let (ma2, mb2) = (ma.clone(), mb.clone());
        let t1 = tokio::spawn(async move { s1.commit(&ma2).await });
        let t2 = tokio::spawn(async move { s2.commit(&mb2).await });
        [t1.await.unwrap(), t2.await.unwrap()]
    });
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    let lost = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .unwrap()
        .to_string();
    assert!(lost.contains("already committed"), "{lost}");
    // The bucket holds the winner's manifest, whole.
    let got = rt.block_on(st.manifest("race-1")).unwrap();
    assert!(got == ma || got == mb);
    // And a later commit of the id loses too.
    let e = rt
        .block_on(st.upload_dir(&a, "race-1", Default::default(), &p))
        .unwrap_err();
    assert!(e.to_string().contains("already committed"), "{e}");
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}

fn upload_state(s: &api_support::Server, id: &str) -> Value {
    let r = s.info(id);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["stasis"]["snapshotUpload"].clone()
}

#[test]
fn serve_uploads_paused_snapshots_in_the_background_and_catches_up_after_an_outage() {
    let dir = common::scratch("s3-serve");
    let mut s3 = S3Server::start(&dir);
    let port = s3.port;
    let a = s3::serve_args(&s3);
    let mut args: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    args.push("--shutdown-pause-secs");
    args.push("5");
    let env = s3_env();
    let mut srv = api_support::Server::try_start_env(&dir.join("data"), &args, &env).unwrap();
    let id = srv.create(json!({"templateID": "base"}));
    let r = srv.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert!(
        r.status == 204 || r.status == 200,
        "{} {}",
        r.status,
        r.body
    );
    assert!(
        api_support::wait_until(60, || upload_state(&srv, &id)["state"] == "uploaded"),
        "{}\n{}",
        upload_state(&srv, &id),
        srv.log()
    );
    let u = upload_state(&srv, &id);
    assert_eq!(u["snapshotId"], format!("{id}-1"));
    assert_eq!(u["backlog"], 0);
    // The bucket has it, with a manifest naming the sandbox.
    let st = store(&s3);
    let rt = rt();
    let m = rt.block_on(st.manifest(&format!("{id}-1"))).unwrap();
    assert_eq!(m.labels.get("sandbox"), Some(&id));

    // Outage: the bucket's server stops. A pause still works locally; the
    // upload fails, is retried, and the backlog shows.
    s3.stop();
    let id2 = srv.create(json!({"templateID": "base"}));
    let r = srv.post(&format!("/sandboxes/{id2}/pause"), json!({}));
    assert!(
        r.status == 204 || r.status == 200,
        "{} {}",
        r.status,
        r.body
    );
    assert_eq!(srv.info(&id2).json()["state"], "paused");
    assert!(
        api_support::wait_until(60, || upload_state(&srv, &id2)["state"] == "failed"),
        "{}",
        upload_state(&srv, &id2)
    );
    let u = upload_state(&srv, &id2);
    assert!(
        u["error"].as_str().unwrap_or("").contains("snapshot store"),
        "{u}"
    );
    assert!(u["backlog"].as_u64().unwrap() >= 1, "{u}");
    // A resume still works from the local snapshot.
    // The server comes back (empty: moto keeps nothing): the retry uploads.
    let s3b = S3Server::start_on(&dir, port);
    assert!(
        api_support::wait_until(90, || upload_state(&srv, &id2)["state"] == "uploaded"),
        "{}\n{}",
        upload_state(&srv, &id2),
        srv.log()
    );
    assert_eq!(upload_state(&srv, &id2)["backlog"], 0);
    let st = store(&s3b);
    rt.block_on(st.manifest(&format!("{id2}-1"))).unwrap();
    assert_eq!(srv.terminate().code(), Some(0), "{}", srv.log());

    // --durable-pause: the pause answers once the snapshot is in the bucket.
    let mut dargs = args.clone();
    dargs.push("--durable-pause");
    let srv = api_support::Server::try_start_env(&dir.join("data3"), &dargs, &env).unwrap();
    let id3 = srv.create(json!({"templateID": "base"}));
    let r = srv.post(&format!("/sandboxes/{id3}/pause"), json!({}));
    assert!(
        r.status == 204 || r.status == 200,
        "{} {}",
        r.status,
        r.body
    );
    assert_eq!(upload_state(&srv, &id3)["state"], "uploaded");
    rt.block_on(st.manifest(&format!("{id3}-1"))).unwrap();
    let mut srv = srv;
    assert_eq!(srv.terminate().code(), Some(0), "{}", srv.log());

    // A backlog survives a restart of serve: paused while the bucket is
    // down, the server stops; started again (bucket back), it uploads.
    let data4 = dir.join("data4");
    let mut srv = api_support::Server::try_start_env(&data4, &args, &env).unwrap();
    let id4 = srv.create(json!({"templateID": "base"}));
    let mut s3b = s3b;
    s3b.stop();
    let r = srv.post(&format!("/sandboxes/{id4}/pause"), json!({}));
    assert!(
        r.status == 204 || r.status == 200,
        "{} {}",
        r.status,
        r.body
    );
    assert!(
        api_support::wait_until(60, || upload_state(&srv, &id4)["state"] == "failed"),
        "{}",
        upload_state(&srv, &id4)
    );
    assert_eq!(srv.terminate().code(), Some(0), "{}", srv.log());
    let s3c = S3Server::start_on(&dir, port);
    let srv = api_support::Server::try_start_env(&data4, &args, &env).unwrap();
    assert!(
        api_support::wait_until(90, || upload_state(&srv, &id4)["state"] == "uploaded"),
        "{}\n{}",
        upload_state(&srv, &id4),
        srv.log()
    );
    let st = store(&s3c);
    rt.block_on(st.manifest(&format!("{id4}-1"))).unwrap();
    let mut srv = srv;
    assert_eq!(srv.terminate().code(), Some(0), "{}", srv.log());
    drop(s3c);

    // An unreachable bucket at start: a clear error, no server.
    let dead = format!("http://127.0.0.1:{}", s3::free_port());
    let e = api_support::Server::try_start_env(
        &dir.join("data2"),
        &["--snapshot-store", "s3://nowhere", "--s3-endpoint", &dead],
        &env,
    )
    .err()
    .expect("started with an unreachable snapshot store");
    assert!(e.contains("snapshot store is not usable"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Numbers (run by hand: `cargo test --release --test s3_store -- --ignored
/// --nocapture resume_from_the_bucket_numbers`): a 1 GiB test guest whose
/// workload touches 100 MiB or 960 MiB, paused, uploaded to the loopback
/// S3 server, then resumed from the bucket: download (cold and warm chunk
/// cache) then a lazy restore of the downloaded snapshot. Prints resume →
/// running and resume → memory resident, both counted from the start
/// of the download (a fresh snapshot records no working set, so "resident"
/// is all of its memory). `STASIS_S3_BENCH_WS=100,960` picks the sizes.
#[test]
#[ignore]
fn resume_from_the_bucket_numbers() {
    use stasis::vmm::{Console, Kernel, RestoreMode, Vm, VmConfig};
    if !common::kvm_or_skip("s3 numbers") {
        return;
    }
    let dir = common::scratch("s3-bench");
    let s3 = S3Server::start(&dir);
    let st = store(&s3);
    let rt = rt();
    let sets: Vec<u64> = std::env::var("STASIS_S3_BENCH_WS")
        .unwrap_or_else(|_| "100,960".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut rows = Vec::new();
    for ws in sets {
        let w = Workload {
            mib: ws,
            rounds: 0,
            seed: 5,
            report: 0,
            base_mib: 16,
        };
        let mut vm = Vm::boot(VmConfig {
            kernel: Kernel::TestGuest,
            cmdline: w.cmdline(),
            mem_bytes: 1 << 30,
            console: Console::Buffer(stasis::vmm::ConsoleBuffer::new()),
            ..VmConfig::default()
        })
        .unwrap();
        common::wait_for(Duration::from_secs(300), "guest progress", || {
            vm.guest_status().is_some_and(|s| s.round > 2)
        });
        vm.pause().unwrap();
        let snap = dir.join(format!("ws{ws}"));
        vm.snapshot(&snap).unwrap();
        drop(vm);
        let id = format!("bench-{ws}");
        let t = std::time::Instant::now();
        let up = rt
            .block_on(st.upload_dir(&snap, &id, Default::default(), &UploadProgress::default()))
            .unwrap();
        let upload_s = t.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&snap).unwrap();
        let cache_dir = dir.join(format!("cache{ws}"));
        let cache = remote::ChunkCache::open(&cache_dir, 4 << 30).unwrap();
        for pass in ["cold", "warm"] {
            let dest = dir.join(format!("pulled-{ws}-{pass}"));
            let t = std::time::Instant::now();
            let d = rt.block_on(st.download(&id, &dest, Some(&cache))).unwrap();
            let dl = t.elapsed();
            let (vm, stats) = Vm::restore_backed(
                &dest,
                RestoreMode::Lazy,
                Console::Buffer(stasis::vmm::ConsoleBuffer::new()),
                None,
                stasis::vmm::RestorePaths::default(),
                stasis::vmm::memory::MemoryBacking::Auto,
            )
            .unwrap();
            let running = dl + stats.to_running;
            // A fresh snapshot records no working set yet: all its memory
            // is what a resume needs resident.
            let resident = vm.wait_memory_complete().unwrap().map(|x| dl + x);
            drop(vm);
            let row = format!(
                "1 GiB guest, {ws} MiB touched, {pass} cache: download {:.0} ms ({} chunks, {} fetched, {} cached, {:.0} MiB), resume->running {:.0} ms, resume->memory resident {}",
                dl.as_secs_f64() * 1e3,
                d.chunks,
                d.fetched,
                d.cached,
                d.bytes as f64 / (1 << 20) as f64,
                running.as_secs_f64() * 1e3,
                resident.map_or("n/a".into(), |r| format!("{:.0} ms", r.as_secs_f64() * 1e3)),
            );
            eprintln!("{row}");
            rows.push(row);
            std::fs::remove_dir_all(&dest).unwrap();
        }
        eprintln!(
            "upload of {ws} MiB touched: {:.1} s, {} chunks ({} zero pieces skipped)",
            upload_s, up.chunks_uploaded, up.chunks_zero
        );
        let _ = std::fs::remove_dir_all(&cache_dir);
    }
    for r in rows {
        println!("{r}");
    }
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}
