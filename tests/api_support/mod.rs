//! Shared helpers for the API integration tests: start `stasis serve` (fake
//! backend unless `--backend` is given) as a subprocess on an ephemeral
//! port, a tiny HTTP/1.1 client, polling with a bounded deadline, and checks
//! of a paused sandbox against its snapshot files.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_stasis");

/// A running `stasis serve` subprocess.
pub struct Server {
    pub addr: SocketAddr,
    pub child: Child,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub api_key: Option<String>,
}

impl Server {
    /// Starts a server on `data_dir` with the fake backend and `extra` args.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::try_start(data_dir, extra).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Server, String> {
        Self::try_start_env(data_dir, extra, &[])
    }

    /// Like [`Server::try_start`], with extra environment variables (the
    /// server's workers and host agents inherit them).
    pub fn try_start_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        std::fs::create_dir_all(data_dir).unwrap();
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = data_dir.with_extension(format!("server-{n}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(BIN)
            .args(if extra.contains(&"--backend") {
                &["serve"][..]
            } else {
                &["serve", "--backend", "fake"][..]
            })
            .arg("--data-dir")
            .arg(data_dir)
            .args(if extra.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(|l| l.ok());
            let _ = tx.send(first);
            for _ in lines {} // keep draining
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
        let Some(addr) = line
            .as_deref()
            .and_then(|l| l.strip_prefix("stasis: listening on http://"))
        else {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(format!(
                "no listening line (status {status:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        };
        let api_key = extra
            .iter()
            .position(|a| *a == "--api-key")
            .and_then(|i| extra.get(i + 1))
            .map(|s| s.to_string());
        Ok(Server {
            addr: addr.parse().unwrap(),
            child,
            data_dir: data_dir.to_path_buf(),
            log,
            api_key,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9` the server and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    pub fn req(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let mut h: Vec<(&str, &str)> = Vec::new();
        if let Some(k) = &self.api_key {
            h.push(("X-API-KEY", k));
        }
        let body = body.map(|b| b.to_string());
        if body.is_some() {
            h.push(("Content-Type", "application/json"));
        }
        http(self.addr, method, path, &h, body.as_deref())
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> Resp {
        self.req("POST", path, Some(body))
    }

    /// Creates a sandbox; panics unless 201.
    pub fn create(&self, body: Value) -> String {
        let r = self.post("/sandboxes", body);
        assert_eq!(r.status, 201, "create: {}", r.body);
        r.json()["sandboxID"].as_str().unwrap().to_string()
    }

    pub fn info(&self, id: &str) -> Resp {
        self.get(&format!("/sandboxes/{id}"))
    }

    pub fn round(&self, id: &str) -> u64 {
        let r = self.info(id);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["stasis"]["guestRound"].as_u64().unwrap()
    }

    /// The guest's round, or None before the guest reported one.
    pub fn round_opt(&self, id: &str) -> Option<u64> {
        self.info(id).json()["stasis"]["guestRound"].as_u64()
    }

    /// Waits (at most `secs`) until the guest's round is at least `min`;
    /// returns the round seen. Fails with the server's log otherwise.
    pub fn wait_round(&self, id: &str, min: u64, secs: u64) -> u64 {
        let mut last = None;
        assert!(
            wait_until(secs, || {
                last = self.round_opt(id);
                last.is_some_and(|r| r >= min)
            }),
            "{id}: guest round {last:?}, waited for {min}; log:\n{}",
            self.log()
        );
        last.unwrap()
    }

    pub fn worker_pid(&self, id: &str) -> Option<i32> {
        self.info(id).json()["stasis"]["workerPid"]
            .as_i64()
            .map(|p| p as i32)
    }
}

impl Drop for Server {
    /// Stops the server gracefully (its workers stop their VMs and host
    /// agents), falling back to `kill -9` after a bounded wait.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill9();
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Asserts the error shape `{"code": status, "message": ...}`.
    pub fn assert_error(&self, status: u16) {
        assert_eq!(self.status, status, "{}", self.body);
        let j = self.json();
        assert_eq!(j["code"].as_u64(), Some(status as u64), "{}", self.body);
        assert!(
            j["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Polls `f` until it is true or `secs` pass; returns whether it became true.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
pub fn process_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Every listed sandbox id with `query`, following `x-next-token`.
pub fn list_all(s: &Server, query: &str, limit: usize) -> (Vec<Value>, usize) {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/v2/sandboxes?limit={limit}");
        if !query.is_empty() {
            path.push('&');
            path.push_str(query);
        }
        if let Some(t) = &token {
            path.push_str(&format!("&nextToken={t}"));
        }
        let r = s.get(&path);
        assert_eq!(r.status, 200, "{}", r.body);
        pages += 1;
        let items = r.json().as_array().unwrap().clone();
        assert!(items.len() <= limit);
        out.extend(items);
        match r.header("x-next-token") {
            Some(t) => token = Some(t.to_string()),
            None => return (out, pages),
        }
        assert!(pages < 10_000, "pagination does not end");
    }
}

/// The directory of a paused sandbox's current snapshot
/// (`<data>/sandboxes/<id>/snapshot-<gen>`). Exactly its chain exists while
/// paused: itself and, for an incremental pause (VM backend), the parent
/// generations its `layers.bin` names; checked here.
pub fn snapshot_dir(s: &Server, id: &str) -> PathBuf {
    let chain = snapshot_chain(s, id);
    chain.into_iter().next().unwrap()
}

/// A paused sandbox's snapshot chain, nearest first: the current
/// generation, then its parent layers (VM incremental pauses). Asserts
/// that the sandbox directory holds exactly these `snapshot-*` entries.
pub fn snapshot_chain(s: &Server, id: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(s.data_dir.join("sandboxes").join(id))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let gen = name["snapshot-".len()..]
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{id}: stray snapshot entry {name}"));
            (gen, e.path())
        })
        .collect();
    dirs.sort();
    let Some((_, current)) = dirs.last().cloned() else {
        panic!("{id}: no snapshot directory");
    };
    let mut chain = vec![current.clone()];
    if let Some(c) = stasis::snapshot::layers::ChainFile::read(&current).unwrap() {
        chain.extend(c.parent_dirs(&current).unwrap());
    }
    let mut want: Vec<&PathBuf> = chain.iter().collect();
    want.sort();
    let have: Vec<&PathBuf> = dirs.iter().map(|(_, p)| p).collect();
    assert_eq!(
        have, want,
        "snapshot dirs of {id} are not exactly the chain"
    );
    chain
}

/// `(allocated, apparent)` bytes of the regular files under `dir`, from the
/// filesystem: `st_blocks * 512` and `st_size`.
pub fn files_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            let (a, b) = files_usage(&e.path());
            total = (total.0 + a, total.1 + b);
        } else if m.is_file() {
            total = (total.0 + m.blocks() * 512, total.1 + m.len());
        }
    }
    total
}

/// The guest round a snapshot holds, read by the test itself: the fake
/// guest's state file, or the test guest's status page in `memory.bin` (the
/// guest's RAM regions back to back from guest address 0, so the page at
/// 0x5000 is at file offset 0x5000).
pub fn round_in_snapshot(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    if let Ok(bytes) = std::fs::read(dir.join("fake-vm.json")) {
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        return v["round"].as_u64();
    }
    // An incremental snapshot may hold the page in a parent layer: the
    // nearest layer that stores it.
    let page_no = (stasis::guest::STATUS_ADDR / 4096) as usize;
    let mut layers = vec![dir.to_owned()];
    if let Ok(Some(c)) = stasis::snapshot::layers::ChainFile::read(dir) {
        layers.extend(c.parent_dirs(dir).ok()?);
    }
    let layer = layers.into_iter().find(|d| {
        stasis::snapshot::SnapshotDir::open(d)
            .and_then(|s| s.load_state::<stasis::vmm::VmState>())
            .is_ok_and(|st| st.memory.present.get(page_no))
    })?;
    let f = std::fs::File::open(layer.join("memory.bin")).ok()?;
    let mut page = [0u8; 40];
    f.read_exact_at(&mut page, stasis::guest::STATUS_ADDR)
        .ok()?;
    stasis::guest::GuestStatus::parse(&page).map(|g| g.round)
}

/// Checks a paused sandbox against its files: `snapshotBytes` and
/// `snapshotApparentBytes` equal what the filesystem reports for the
/// snapshot's files; the worker is gone; `guestRound` (read by the server
/// from the snapshot) equals both the round the worker reported at pause
/// (`pausedAtRound`) and the round the test reads from the snapshot itself.
/// Returns that round.
pub fn check_paused(s: &Server, id: &str, worker_pid: Option<i32>) -> u64 {
    let d = s.info(id).json();
    assert_eq!(d["state"], "paused", "{d}");
    assert!(d["stasis"]["workerPid"].is_null(), "{d}");
    if let Some(pid) = worker_pid {
        assert!(
            wait_until(20, || process_dead(pid)),
            "worker {pid} outlived the pause"
        );
    }
    let chain = snapshot_chain(s, id);
    let dir = chain[0].clone();
    // The chain's files: what the sandbox's snapshot costs.
    let (allocated, apparent) = chain.iter().fold((0, 0), |(a, b), d| {
        let (x, y) = files_usage(d);
        (a + x, b + y)
    });
    assert_eq!(
        d["stasis"]["snapshotBytes"].as_u64(),
        Some(allocated),
        "{d}"
    );
    assert_eq!(
        d["stasis"]["snapshotApparentBytes"].as_u64(),
        Some(apparent),
        "{d}"
    );
    assert!(allocated > 0, "{d}");
    let round = d["stasis"]["guestRound"]
        .as_u64()
        .expect("guestRound while paused");
    assert_eq!(d["stasis"]["pausedAtRound"].as_u64(), Some(round), "{d}");
    assert_eq!(round_in_snapshot(&dir), Some(round), "{}", dir.display());
    round
}
