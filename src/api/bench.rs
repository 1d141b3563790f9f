//! `stasis bench --api`: latency of the lifecycle HTTP API against real KVM
//! guests.
//!
//! [`run_api_bench`] starts the API server in this process (its own tokio
//! runtime on its own thread, `127.0.0.1:0`, a temporary data dir under the
//! scratch dir, workers running the stasis binary), writes a template for a
//! 256 MiB built-in test guest on an endless workload that touches 64 MiB,
//! and drives the server with a small blocking HTTP/1.1 client, one fresh
//! loopback connection per call:
//!
//! 1. **sequential**: `count` cycles of create → wait until the guest made
//!    progress → pause → connect (resume) → wait until the guest made
//!    progress past the pause → asynchronous pause (`{"sync": false}`) →
//!    wait until `GET` reports the snapshot durable → kill;
//! 2. **concurrent**: `concurrency` clients each running `count` such cycles
//!    at once, so each pause (a snapshot to disk) overlaps the other
//!    clients' calls; their latencies, and those of the progress polls
//!    (`get`), show whether a pause holds anyone else up;
//! 3. **templates** (warm templates): create → running of the built-in
//!    test-guest template, booted cold (`create_cold`) vs resumed from its
//!    template snapshot (`create_warm`), `count` of each, alternating.
//!    The cycles' own template is marked `"warm": false`, so `create` in
//!    phases 1 and 2 stays a cold boot.
//!
//! Each call is timed end to end: connect, request, whole response. The
//! report gives p50 / p99 / max per operation (nearest-rank percentiles).
//! The data dir is removed afterwards, also on failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::{BackendKind, ServeOptions};
use crate::guest::Workload;

/// How long the server may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket read/write limit of one call (a pause writes the guest to disk).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Pause between progress polls.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Sandbox timeout asked for on create and connect, in seconds.
const SANDBOX_TIMEOUT_S: u64 = 300;

/// Errors of an API benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option is out of range.
    #[error("invalid benchmark option: {0}")]
    Config(String),
    /// Local file or thread setup failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The server failed to start or to run.
    #[error("the API server failed")]
    Server(#[from] super::Error),
    /// The server did not report its address in time.
    #[error("the API server did not start listening within {0:?}")]
    NotListening(Duration),
    /// The server thread panicked.
    #[error("the API server thread panicked")]
    ServerPanicked,
    /// A call could not be made or its response not read.
    #[error("{call}")]
    Transport {
        /// `METHOD /path`.
        call: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A call got an unexpected or malformed response.
    #[error("{call}: {detail}")]
    Http {
        /// `METHOD /path`.
        call: String,
        /// What was wrong.
        detail: String,
    },
    /// A guest did not make progress in time.
    #[error("sandbox {id}: {detail}")]
    Guest {
        /// Sandbox id.
        id: String,
        /// What happened.
        detail: String,
    },
    /// A client thread panicked.
    #[error("benchmark client {0} panicked")]
    ClientPanicked(usize),
    /// Writing the report failed.
    #[error("writing the report")]
    Output(#[source] std::io::Error),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct ApiBenchOpts {
    /// Cycles in the sequential phase, and per client in the concurrent one.
    pub count: usize,
    /// Clients in the concurrent phase.
    pub concurrency: usize,
    /// Scratch directory; the server's data dir is made (and removed) under it.
    pub dir: PathBuf,
    /// Guest memory, MiB.
    pub memory_mb: u64,
    /// MiB the guest workload fills and keeps mutating.
    pub touched_mib: u64,
    /// Binary the server runs as `<exe> worker`; default: this one.
    pub worker_exe: Option<PathBuf>,
    /// Longest wait for a guest to make progress after create or connect.
    pub progress_timeout: Duration,
    /// Run the workers without the jail (`serve --no-jail`).
    pub no_jail: bool,
}

impl Default for ApiBenchOpts {
    fn default() -> Self {
        ApiBenchOpts {
            count: 20,
            concurrency: 4,
            dir: PathBuf::from("stasis-bench"),
            memory_mb: 256,
            touched_mib: 64,
            worker_exe: None,
            progress_timeout: Duration::from_secs(60),
            no_jail: false,
        }
    }
}

/// Latency of one operation in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct OpStats {
    /// `create`, `pause` (synchronous: answered once the snapshot is
    /// durable), `connect`, `kill`, `get` (progress polls), `pause_async`
    /// (`{"sync": false}`: answered once the VM is stopped and captured) or
    /// `durable` (from sending that pause until `GET` reports the snapshot
    /// durable, polled every 5 ms).
    pub op: &'static str,
    /// Calls measured.
    pub samples: usize,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// Slowest call (ms).
    pub max_ms: f64,
    /// Mean latency (ms).
    pub mean_ms: f64,
}

/// One phase of the run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// `sequential` or `concurrent`.
    pub phase: &'static str,
    /// Clients running cycles at once.
    pub clients: usize,
    /// Cycles completed, all clients together.
    pub cycles: usize,
    /// Wall time of the phase (s).
    pub wall_s: f64,
    /// Per operation.
    pub ops: Vec<OpStats>,
}

/// The result of [`run_api_bench`].
#[derive(Debug, Clone, Serialize)]
pub struct ApiBenchReport {
    /// Template the sandboxes were created from.
    pub template: String,
    /// Guest memory, MiB.
    pub memory_mb: u64,
    /// MiB the guest workload touches.
    pub touched_mib: u64,
    /// Cycles per client.
    pub count: usize,
    /// Clients in the concurrent phase.
    pub concurrency: usize,
    /// The sequential phase, then the concurrent one.
    pub phases: Vec<PhaseReport>,
}

impl ApiBenchReport {
    /// Writes the per-operation table.
    pub fn write_table(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<24} {:<11} {:>6} {:>10} {:>10} {:>10}",
            "phase", "op", "n", "p50 ms", "p99 ms", "max ms"
        )?;
        for ph in &self.phases {
            let label = format!(
                "{} ({} client{})",
                ph.phase,
                ph.clients,
                if ph.clients == 1 { "" } else { "s" }
            );
            for o in &ph.ops {
                writeln!(
                    out,
                    "{label:<24} {:<11} {:>6} {:>10.2} {:>10.2} {:>10.2}",
                    o.op, o.samples, o.p50_ms, o.p99_ms, o.max_ms
                )?;
            }
        }
        writeln!(out)?;
        for ph in &self.phases {
            writeln!(
                out,
                "{}: {} cycles in {:.1} s ({:.2} cycles/s)",
                ph.phase,
                ph.cycles,
                ph.wall_s,
                ph.cycles as f64 / ph.wall_s.max(1e-9)
            )?;
        }
        Ok(())
    }
}

/// Nearest-rank percentile of samples sorted ascending: the smallest sample
/// with at least `p` percent of all samples at or below it. `None` when
/// there are no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (p.clamp(0.0, 100.0) * n as f64 / 100.0).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Summarises latencies in milliseconds (in any order).
fn summarize(op: &'static str, ms: &[f64]) -> OpStats {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    let pct = |p| percentile(&v, p).unwrap_or(0.0);
    OpStats {
        op,
        samples: v.len(),
        p50_ms: pct(50.0),
        p99_ms: pct(99.0),
        max_ms: v.last().copied().unwrap_or(0.0),
        mean_ms: if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        },
    }
}

/// The timed operations, in report order.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Pause,
    Connect,
    Kill,
    Get,
    PauseAsync,
    Durable,
    /// Warm templates phase: create → running of the built-in test-guest
    /// template booted cold (a copy of it with `"warm": false`)...
    CreateCold,
    /// ...and resumed from its template snapshot.
    CreateWarm,
}

const OPS: [Op; 9] = [
    Op::Create,
    Op::Pause,
    Op::Connect,
    Op::Kill,
    Op::Get,
    Op::PauseAsync,
    Op::Durable,
    Op::CreateCold,
    Op::CreateWarm,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Pause => "pause",
            Op::Connect => "connect",
            Op::Kill => "kill",
            Op::Get => "get",
            Op::PauseAsync => "pause_async",
            Op::Durable => "durable",
            Op::CreateCold => "create_cold",
            Op::CreateWarm => "create_warm",
        }
    }
}

/// Latencies in milliseconds, per [`Op`].
#[derive(Debug, Default)]
struct Samples([Vec<f64>; OPS.len()]);

impl Samples {
    fn push(&mut self, op: Op, took: Duration) {
        self.0[op as usize].push(took.as_secs_f64() * 1e3);
    }

    fn merge(&mut self, other: Samples) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            a.extend(b);
        }
    }

    fn stats(&self) -> Vec<OpStats> {
        OPS.iter()
            // The warm-template ops only where measured.
            .filter(|&&op| {
                !matches!(op, Op::CreateCold | Op::CreateWarm) || !self.0[op as usize].is_empty()
            })
            .map(|&op| summarize(op.name(), &self.0[op as usize]))
            .collect()
    }
}

// ---- the server ------------------------------------------------------------

/// The API server running on its own runtime and thread.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), super::Error>>>,
}

impl Server {
    fn start(mut opts: ServeOptions) -> Result<Server, Error> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        opts.on_listen = Some(addr_tx);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("stasis-bench-api")
            .build()
            .map_err(|source| Error::Io {
                what: "starting the tokio runtime".into(),
                source,
            })?;
        let thread = std::thread::Builder::new()
            .name("stasis-bench-server".into())
            .spawn(move || {
                rt.block_on(super::serve(opts, async move {
                    let _ = stop_rx.await;
                }))
            })
            .map_err(|source| Error::Io {
                what: "starting the server thread".into(),
                source,
            })?;
        let mut server = Server {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match addr_rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            // When serve returned before listening, stop() has the reason.
            Err(_) => {
                server.stop()?;
                Err(Error::NotListening(LISTEN_TIMEOUT))
            }
        }
    }

    /// Shuts the server down (stopping every worker) and waits for it.
    fn stop(&mut self) -> Result<(), Error> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r.map_err(Error::Server),
            Some(Err(_)) => Err(Error::ServerPanicked),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Removes the server's data dir when dropped (after the server stopped).
struct DataDir(PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the client ------------------------------------------------------------

/// A response.
struct Resp {
    status: u16,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        let t = String::from_utf8_lossy(&self.body);
        t.chars().take(500).collect()
    }
}

/// A blocking HTTP/1.1 client: one fresh connection per call.
#[derive(Debug, Clone, Copy)]
struct Client {
    addr: SocketAddr,
}

impl Client {
    /// Makes one call; returns the response and how long it took, from
    /// before connecting to the end of the response.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(Resp, Duration), Error> {
        let call = || format!("{method} {path}");
        let transport = |source| Error::Transport {
            call: call(),
            source,
        };
        let body = body.unwrap_or("");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        req.push_str(body);

        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&self.addr, CALL_TIMEOUT).map_err(transport)?;
        s.set_nodelay(true).map_err(transport)?;
        s.set_read_timeout(Some(CALL_TIMEOUT)).map_err(transport)?;
        s.set_write_timeout(Some(CALL_TIMEOUT)).map_err(transport)?;
        s.write_all(req.as_bytes()).map_err(transport)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(transport)?;
        let took = t.elapsed();
        let resp = parse_response(&raw).map_err(|detail| Error::Http {
            call: call(),
            detail,
        })?;
        Ok((resp, took))
    }

    /// Makes a call that must answer `want`, recording its latency as `op`.
    fn expect(
        &self,
        op: Op,
        method: &str,
        path: &str,
        body: Option<&str>,
        want: u16,
        samples: &mut Samples,
    ) -> Result<Resp, Error> {
        let (r, took) = self.call(method, path, body)?;
        if r.status != want {
            return Err(Error::Http {
                call: format!("{method} {path}"),
                detail: format!("expected {want}, got {}: {}", r.status, r.text()),
            });
        }
        samples.push(op, took);
        Ok(r)
    }
}

/// Parses a whole HTTP/1.1 response (Content-Length, chunked, or up to EOF).
fn parse_response(raw: &[u8]) -> Result<Resp, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("incomplete response ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {v:?}"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("body shorter than its Content-Length {n}"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Resp { status, body })
}

/// Decodes a chunked body.
fn dechunk(mut s: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = s
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size = String::from_utf8_lossy(&s[..eol]);
        let size = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
        s = &s[eol + 2..];
        if n == 0 {
            return Ok(out);
        }
        let chunk = s.get(..n).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        s = s.get(n + 2..).ok_or("truncated chunk")?;
    }
}

fn json(call: &str, r: &Resp) -> Result<Value, Error> {
    serde_json::from_slice(&r.body).map_err(|e| Error::Http {
        call: call.into(),
        detail: format!("response is not JSON ({e}): {}", r.text()),
    })
}

// ---- the cycle -------------------------------------------------------------

/// The guest's round as the server reports it (`stasis.guestRound`).
fn guest_round(c: &Client, id: &str, s: &mut Samples) -> Result<Option<u64>, Error> {
    let path = format!("/sandboxes/{id}");
    let r = c.expect(Op::Get, "GET", &path, None, 200, s)?;
    Ok(json(&format!("GET {path}"), &r)?["stasis"]["guestRound"].as_u64())
}

/// Polls until the guest's round exceeds `past`; returns the round.
fn wait_progress(
    c: &Client,
    id: &str,
    past: u64,
    limit: Duration,
    s: &mut Samples,
) -> Result<u64, Error> {
    let end = Instant::now() + limit;
    loop {
        if let Some(r) = guest_round(c, id, s)? {
            if r > past {
                return Ok(r);
            }
        }
        if Instant::now() >= end {
            return Err(Error::Guest {
                id: id.into(),
                detail: format!("no progress past round {past} within {limit:?}"),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls (unrecorded) until `GET` reports the paused sandbox's snapshot
/// durable.
fn wait_durable(c: &Client, id: &str, limit: Duration) -> Result<(), Error> {
    let path = format!("/sandboxes/{id}");
    let end = Instant::now() + limit;
    loop {
        let (r, _) = c.call("GET", &path, None)?;
        if r.status == 200 && json(&format!("GET {path}"), &r)?["stasis"]["snapshotDurable"] == true
        {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(Error::Guest {
                id: id.into(),
                detail: format!("snapshot not durable within {limit:?}: {}", r.text()),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// create → progress → pause → connect → progress → async pause → durable
/// → kill. On failure the
/// sandbox is killed (best effort) before the error is returned.
fn cycle(c: &Client, template: &str, opts: &ApiBenchOpts, s: &mut Samples) -> Result<(), Error> {
    let body =
        serde_json::json!({ "templateID": template, "timeout": SANDBOX_TIMEOUT_S }).to_string();
    let r = c.expect(Op::Create, "POST", "/sandboxes", Some(&body), 201, s)?;
    let id = json("POST /sandboxes", &r)?["sandboxID"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Http {
            call: "POST /sandboxes".into(),
            detail: format!("no sandboxID in {}", r.text()),
        })?;
    let path = format!("/sandboxes/{id}");
    let rest = (|| {
        wait_progress(c, &id, 0, opts.progress_timeout, s)?;
        c.expect(Op::Pause, "POST", &format!("{path}/pause"), None, 204, s)?;
        let paused_at = guest_round(c, &id, s)?.unwrap_or(0);
        let body = serde_json::json!({ "timeout": SANDBOX_TIMEOUT_S }).to_string();
        let connect = format!("{path}/connect");
        c.expect(Op::Connect, "POST", &connect, Some(&body), 201, s)?;
        let resumed_at = wait_progress(c, &id, paused_at, opts.progress_timeout, s)?;
        let sent = Instant::now();
        let pause_async = Some(r#"{"sync": false}"#);
        c.expect(
            Op::PauseAsync,
            "POST",
            &format!("{path}/pause"),
            pause_async,
            204,
            s,
        )?;
        wait_durable(c, &id, opts.progress_timeout)?;
        s.push(Op::Durable, sent.elapsed());
        let _ = resumed_at;
        c.expect(Op::Kill, "DELETE", &path, None, 204, s)?;
        Ok(())
    })();
    if rest.is_err() {
        let _ = c.call("DELETE", &path, None);
    }
    rest
}

/// Runs `clients` clients of `cycles` cycles each at once.
fn run_phase(
    phase: &'static str,
    c: &Client,
    clients: usize,
    cycles: usize,
    template: &str,
    opts: &ApiBenchOpts,
) -> Result<PhaseReport, Error> {
    let t = Instant::now();
    let results: Vec<Result<Samples, Error>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                sc.spawn(|| {
                    let mut s = Samples::default();
                    for _ in 0..cycles {
                        cycle(c, template, opts, &mut s)?;
                    }
                    Ok(s)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().unwrap_or(Err(Error::ClientPanicked(i))))
            .collect()
    });
    let wall = t.elapsed();
    let mut all = Samples::default();
    for r in results {
        all.merge(r?);
    }
    Ok(PhaseReport {
        phase,
        clients,
        cycles: clients * cycles,
        wall_s: wall.as_secs_f64(),
        ops: all.stats(),
    })
}

/// The built-in test-guest template (`base`: 64 MiB, 1 vCPU, a 16 MiB
/// endless workload) with warm templates off: a template file of the same
/// VM with `"warm": false`.
const COLD_BASE: &str = "testguest-cold";

/// create → running of the built-in test-guest template, cold vs warm, side
/// by side: one untimed create of `base` (cold; its template snapshot is
/// built after it), a bounded wait for that snapshot, then `count` times a
/// timed create of [`COLD_BASE`] (boots) and of `base` (resumes; `GET`
/// must name its `warmSnapshot`), each killed at once.
fn warm_phase(
    c: &Client,
    data: &std::path::Path,
    count: usize,
    opts: &ApiBenchOpts,
) -> Result<PhaseReport, Error> {
    let cold = serde_json::json!({
        "kernel": "testguest",
        "cmdline": Workload { mib: 16, rounds: 0, seed: 1, report: 0, base_mib: 16 }.cmdline(),
        "memoryMB": 64,
        "vcpus": 1,
        "warm": false,
    });
    let file = data.join("templates").join(format!("{COLD_BASE}.json"));
    std::fs::write(&file, cold.to_string()).map_err(|source| Error::Io {
        what: format!("writing {}", file.display()),
        source,
    })?;
    let mut s = Samples::default();
    let create = |template: &str, op: Op, s: &mut Samples| -> Result<String, Error> {
        let body =
            serde_json::json!({ "templateID": template, "timeout": SANDBOX_TIMEOUT_S }).to_string();
        let r = c.expect(op, "POST", "/sandboxes", Some(&body), 201, s)?;
        json("POST /sandboxes", &r)?["sandboxID"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Http {
                call: "POST /sandboxes".into(),
                detail: format!("no sandboxID in {}", r.text()),
            })
    };
    let kill = |id: &str| {
        c.call("DELETE", &format!("/sandboxes/{id}"), None)
            .map(|_| ())
    };
    let t = Instant::now();
    let mut scratch = Samples::default();
    let first = create("base", Op::Create, &mut scratch)?;
    kill(&first)?;
    let snapshots = data.join("snapshots");
    let end = Instant::now() + opts.progress_timeout;
    while !std::fs::read_dir(&snapshots)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("warm-"))
        })
        .unwrap_or(false)
    {
        if Instant::now() >= end {
            return Err(Error::Guest {
                id: first,
                detail: format!(
                    "no template snapshot of base within {:?}",
                    opts.progress_timeout
                ),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    for _ in 0..count {
        let id = create(COLD_BASE, Op::CreateCold, &mut s)?;
        kill(&id)?;
        let id = create("base", Op::CreateWarm, &mut s)?;
        let (r, _) = c.call("GET", &format!("/sandboxes/{id}"), None)?;
        let warm = json("GET /sandboxes/{id}", &r)?["stasis"]["warmSnapshot"].is_string();
        kill(&id)?;
        if !warm {
            return Err(Error::Guest {
                id,
                detail: "a create of base after its template snapshot was not warm".into(),
            });
        }
    }
    Ok(PhaseReport {
        phase: "templates",
        clients: 1,
        cycles: count,
        wall_s: t.elapsed().as_secs_f64(),
        ops: s.stats().into_iter().filter(|o| o.samples > 0).collect(),
    })
}

/// Runs the benchmark (see the module docs), writing progress and the table
/// to `out`.
pub fn run_api_bench(opts: ApiBenchOpts, out: &mut dyn Write) -> Result<ApiBenchReport, Error> {
    if opts.count == 0 || opts.concurrency == 0 {
        return Err(Error::Config(
            "count and concurrency must be positive".into(),
        ));
    }
    if opts.concurrency > ServeOptions::default().max_running {
        return Err(Error::Config(format!(
            "concurrency {} exceeds the server's {} running sandboxes",
            opts.concurrency,
            ServeOptions::default().max_running
        )));
    }
    let workload = Workload {
        mib: opts.touched_mib,
        rounds: 0,
        seed: 1,
        report: 0,
        base_mib: 16,
    };
    if opts.touched_mib == 0 || workload.min_mem_bytes() > opts.memory_mb << 20 {
        return Err(Error::Config(format!(
            "a {} MiB guest cannot hold a workload touching {} MiB",
            opts.memory_mb, opts.touched_mib
        )));
    }

    let data = DataDir(opts.dir.join(format!("api-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&data.0);
    let templates = data.0.join("templates");
    std::fs::create_dir_all(&templates).map_err(|source| Error::Io {
        what: format!("creating {}", templates.display()),
        source,
    })?;
    let template = format!("bench{}", opts.memory_mb);
    let file = templates.join(format!("{template}.json"));
    let spec = serde_json::json!({
        "kernel": "testguest",
        "cmdline": workload.cmdline(),
        "memoryMB": opts.memory_mb,
        "vcpus": 1,
        // The cycles measure a cold create (the warm one has its phase).
        "warm": false,
    });
    std::fs::write(&file, spec.to_string()).map_err(|source| Error::Io {
        what: format!("writing {}", file.display()),
        source,
    })?;

    let mut server = Server::start(ServeOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data.0.clone(),
        api_key: None,
        backend: BackendKind::Vm,
        worker_exe: opts.worker_exe.clone(),
        no_jail: opts.no_jail,
        ..ServeOptions::default()
    })?;
    let client = Client { addr: server.addr };

    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(Error::Output);
    w(
        out,
        format!(
            "stasis bench --api: server on http://{}, template {template}: {} MiB built-in test guest, 1 vCPU, endless workload touching {} MiB",
            server.addr, opts.memory_mb, opts.touched_mib
        ),
    )?;
    w(
        out,
        "cycle = create, wait for guest progress, pause, connect (resume), wait for progress past the pause, pause {\"sync\": false} (pause_async), wait until durable (durable), kill".into(),
    )?;
    w(
        out,
        "each call timed end to end on a fresh loopback connection; get = the progress polls (GET /sandboxes/{id})\n".into(),
    )?;
    let _ = out.flush();

    let mut phases = Vec::new();
    for (phase, clients) in [("sequential", 1), ("concurrent", opts.concurrency)] {
        let p = run_phase(phase, &client, clients, opts.count, &template, &opts)?;
        w(
            out,
            format!(
                "{phase}: {clients} client(s) x {} cycles done in {:.1} s",
                opts.count, p.wall_s
            ),
        )?;
        let _ = out.flush();
        phases.push(p);
    }
    let p = warm_phase(&client, &data.0, opts.count, &opts)?;
    w(
        out,
        format!(
            "{}: {} cold and {} warm creates of the built-in test-guest template done in {:.1} s",
            p.phase, opts.count, opts.count, p.wall_s
        ),
    )?;
    phases.push(p);
    server.stop()?;
    drop(data);

    let report = ApiBenchReport {
        template,
        memory_mb: opts.memory_mb,
        touched_mib: opts.touched_mib,
        count: opts.count,
        concurrency: opts.concurrency,
        phases,
    };
    w(out, String::new())?;
    report.write_table(out).map_err(Error::Output)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 0.0), Some(1.0));
        assert_eq!(percentile(&ten, 100.0), Some(10.0));
        assert_eq!(percentile(&ten, 10.0), Some(1.0));
        assert_eq!(percentile(&ten, 11.0), Some(2.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 50.0), Some(50.0));
        assert_eq!(percentile(&hundred, 99.0), Some(99.0));
        let thousand: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&thousand, 99.0), Some(990.0));
        assert_eq!(percentile(&thousand, 99.9), Some(999.0));
    }

    #[test]
    fn summary_sorts_and_averages() {
        let s = summarize("pause", &[30.0, 10.0, 20.0, 40.0]);
        assert_eq!(s.samples, 4);
        assert_eq!(s.p50_ms, 20.0);
        assert_eq!(s.p99_ms, 40.0);
        assert_eq!(s.max_ms, 40.0);
        assert_eq!(s.mean_ms, 25.0);
        let empty = summarize("get", &[]);
        assert_eq!((empty.samples, empty.p50_ms, empty.max_ms), (0, 0.0, 0.0));
    }

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\n{\"a\"}trailing")
            .expect("parses");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{\"a\"}"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").expect("parses");
        assert_eq!((r.status, r.body.len()), (204, 0));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
