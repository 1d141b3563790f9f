//! In-sandbox traffic through `stasis serve`: header and Host routing,
//! streaming both ways, user ports, errors, pause/resume/kill of the
//! sandbox's connections and host agent. Runs on the fake backend with a
//! stand-in agent (`tests/api_support/standin_envd.py`, started by the worker
//! exactly like `stasis-envd --uds`), so it needs python3 but no KVM.

mod api_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api_support::{http, process_dead, wait_until, Resp, Server};
use serde_json::json;

const KEY: &str = "proxy-test-key";
const ENVD: &str = "49983";

fn standin() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/api_support/standin_envd.py"
    );
    let ok = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "python3 is needed to run the stand-in agent {path} (install python3)"
    );
    path.to_string()
}

/// A server whose `agent` template runs the stand-in agent.
fn server(tmp: &tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("templates")).unwrap();
    std::fs::write(
        data.join("templates/agent.json"),
        r#"{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true}"#,
    )
    .unwrap();
    let bin = standin();
    let mut envs = vec![("STASIS_ENVD_BIN", bin.as_str())];
    envs.extend_from_slice(env);
    let mut args = vec!["--api-key", KEY];
    args.extend_from_slice(extra);
    Server::try_start_env(&data, &args, &envs).unwrap_or_else(|e| panic!("{e}"))
}

fn create_agent(s: &Server) -> String {
    s.create(json!({"templateID": "agent", "timeout": 300}))
}

/// A request routed by the SDK's headers (no API key, as the SDK sends it).
fn via_headers(s: &Server, id: &str, port: &str, method: &str, path: &str) -> Resp {
    http(
        s.addr,
        method,
        path,
        &[("Novita-Sandbox-Id", id), ("Novita-Sandbox-Port", port)],
        None,
    )
}

/// The host pid of the stand-in agent (it answers `/pid` with its pid in
/// its sandbox's pid namespace).
fn agent_pid(s: &Server, id: &str) -> i32 {
    let r = via_headers(s, id, ENVD, "GET", "/pid");
    assert_eq!(r.status, 200, "{}", r.body);
    host_pid(s, id, r.body.trim().parse().unwrap())
}

/// The host pid of the process that is `ns_pid` in the sandbox's pid
/// namespace: the process of the agent's tree (its root in `agent.pid`)
/// whose innermost `NSpid` is `ns_pid`.
fn host_pid(s: &Server, id: &str, ns_pid: i32) -> i32 {
    let root: i32 = std::fs::read_to_string(s.data_dir.join(format!("sandboxes/{id}/agent.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ppid_of = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let in_tree = |mut pid: i32| {
        while pid > 1 {
            if pid == root {
                return true;
            }
            match ppid_of(pid) {
                Some(p) => pid = p,
                None => return false,
            }
        }
        false
    };
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|p| p.parse::<i32>().ok());
        if inner == Some(ns_pid) && pid != ns_pid && in_tree(pid) {
            return pid;
        }
    }
    panic!(
        "no process of sandbox {id}'s agent tree (root {root}) is pid {ns_pid} in its namespace"
    );
}

fn counter(s: &Server, id: &str) -> u64 {
    let r = via_headers(s, id, ENVD, "GET", "/counter");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.trim().parse().unwrap()
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Opens `GET /stream` through the proxy; returns the reader positioned
/// after the response head.
fn open_stream(addr: SocketAddr, id: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /stream HTTP/1.1\r\nHost: {addr}\r\nNovita-Sandbox-Id: {id}\r\nNovita-Sandbox-Port: {ENVD}\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" {
            break;
        }
        assert!(!l.is_empty(), "head ended early");
    }
    r
}

/// Reads one chunk of a chunked body; `None` at its end or when the
/// connection ends without the terminating chunk.
fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    match r.read_line(&mut size) {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut data = vec![0u8; n + 2];
    r.read_exact(&mut data).ok()?;
    data.truncate(n);
    Some(data)
}

/// Every pid whose command line mentions `needle`.
fn pids_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_encoded_bytes().to_vec();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
        })
        .filter(|pid| !process_dead(*pid))
        .collect()
}

#[test]
fn routes_by_sdk_headers_and_by_host_without_the_api_key() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);
    let id = create_agent(&s);
    let created = s.info(&id).json();
    assert_eq!(created["stasis"]["agent"], "ready", "{created}");
    assert_ne!(created["envdVersion"], "0.1.0");

    // The SDK's envd requests: headers, no API key.
    let r = via_headers(&s, &id, ENVD, "GET", "/health");
    assert_eq!(r.status, 204, "{}", r.body);
    // The lifecycle API still wants its key.
    http(s.addr, "GET", &format!("/sandboxes/{id}"), &[], None).assert_error(401);

    // The non-override form: {port}-{id}.{domain}; the Host reaches the agent.
    let host = format!("{ENVD}-{id}.sandbox.example.test");
    let r = http(s.addr, "GET", "/headers?x=1", &[("Host", &host)], None);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    assert_eq!(seen["host"], host.as_str());
    // Hop-by-hop headers are not forwarded.
    assert!(seen.get("connection").is_none(), "{seen}");

    // The SDK's connect call carries the routing headers on a lifecycle
    // route: it must reach the API.
    let r = http(
        s.addr,
        "POST",
        &format!("/sandboxes/{id}/connect"),
        &[
            ("X-API-KEY", KEY),
            ("Novita-Sandbox-Id", &id),
            ("Novita-Sandbox-Port", ENVD),
            ("Content-Type", "application/json"),
        ],
        Some(r#"{"timeout": 60}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sandboxID"], id.as_str());

    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
}

#[test]
fn streams_both_ways_incrementally() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);
    let id = create_agent(&s);

    // Server streaming: chunks arrive while the (endless) response goes on.
    let mut r = open_stream(s.addr, &id);
    for i in 0..3 {
        let c = read_chunk(&mut r).expect("a chunk of the stream");
        assert_eq!(String::from_utf8_lossy(&c), format!("tick {i}\n"));
    }
    drop(r);

    // Client streaming, full duplex: each request chunk is echoed before
    // the next one is sent, so nothing buffers the whole body.
    let mut sock = TcpStream::connect(s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        sock,
        "POST /echo HTTP/1.1\r\nHost: x\r\nNovita-Sandbox-Id: {id}\r\nNovita-Sandbox-Port: {ENVD}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(sock.try_clone().unwrap());
    let mut status = String::new();
    for part in ["first", "second", "third"] {
        write!(sock, "{:x}\r\n{part}\r\n", part.len()).unwrap();
        sock.flush().unwrap();
        if status.is_empty() {
            r.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            loop {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                if l == "\r\n" {
                    break;
                }
            }
        }
        let echoed = read_chunk(&mut r).expect("echo");
        assert_eq!(String::from_utf8_lossy(&echoed), part);
    }
    write!(sock, "0\r\n\r\n").unwrap();
    assert_eq!(read_chunk(&mut r), None);

    // A body with a length, bigger than any single buffer.
    let big = "x".repeat(3 << 20);
    let r = http(
        s.addr,
        "POST",
        "/echo",
        &[("Novita-Sandbox-Id", &id), ("Novita-Sandbox-Port", ENVD)],
        Some(&big),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
}

#[test]
fn reaches_user_ports_through_the_forwarder() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);
    let id = create_agent(&s);

    // A "user process" listening on a TCP port (here: on the host, which
    // the host agent's forwarder reaches as 127.0.0.1).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut host = String::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.strip_prefix("host: ").or(h.strip_prefix("Host: ")) {
                host = v.trim().to_string();
            }
        }
        let body = format!("user app saw {} host={host}", line.trim());
        write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    let host = format!("{port}-{id}.example.test");
    let r = http(s.addr, "GET", "/app?q=1", &[("Host", &host)], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        format!("user app saw GET /app?q=1 HTTP/1.1 host={host}")
    );
    t.join().unwrap();

    // Nothing listens there any more: 502 with the agent's reason.
    let r = via_headers(&s, &id, &port, "GET", "/");
    r.assert_error(502);
    assert!(
        r.json()["message"].as_str().unwrap().contains(&port),
        "{}",
        r.body
    );
}

#[test]
fn errors_unknown_sandbox_no_agent_bad_headers_dead_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);

    // Unknown sandboxes: 502 (the SDK's `is_running()` is false on 502; a
    // 404 from envd would mean a missing file).
    let r = via_headers(&s, "doesnotexist", ENVD, "GET", "/health");
    r.assert_error(502);
    assert!(r.body.contains("not found"), "{}", r.body);
    let r = http(
        s.addr,
        "GET",
        "/health",
        &[("Host", "49983-doesnotexist.example.test")],
        None,
    );
    r.assert_error(502);
    let r = http(
        s.addr,
        "GET",
        "/",
        &[("Novita-Sandbox-Id", "x"), ("Novita-Sandbox-Port", "http")],
        None,
    );
    r.assert_error(400);

    // The built-in test guest has no agent.
    let plain = s.create(json!({"templateID": "base"}));
    let r = via_headers(&s, &plain, ENVD, "GET", "/health");
    r.assert_error(502);
    assert!(r.body.contains("no agent"), "{}", r.body);
    assert!(s.info(&plain).json()["stasis"].get("agent").is_none());

    // An agent that dies: requests get a prompt 502, GET reports it.
    let id = create_agent(&s);
    let pid = agent_pid(&s, &id);
    // SAFETY: signalling the stand-in agent this test's server started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(10, || process_dead(pid)));
    let started = Instant::now();
    let r = via_headers(&s, &id, ENVD, "GET", "/health");
    r.assert_error(502);
    assert!(started.elapsed() < Duration::from_secs(10));
    let d = s.info(&id).json();
    assert_eq!(d["state"], "running");
    let agent = d["stasis"]["agent"].as_str().unwrap();
    assert!(agent.starts_with("unreachable"), "{agent}");
}

#[test]
fn pause_closes_connections_stops_the_agent_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);
    let id = create_agent(&s);
    let pid = agent_pid(&s, &id);
    assert!(wait_until(10, || counter(&s, &id) > 5));

    let mut stream = open_stream(s.addr, &id);
    assert!(read_chunk(&mut stream).is_some());
    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "{}", r.body);

    // The open stream ends (without its terminating chunk).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "stream still open after pause");
        if read_chunk(&mut stream).is_none() {
            break;
        }
    }
    // The agent's processes are stopped, not gone.
    assert!(
        wait_until(10, || proc_state(pid) == Some('T')),
        "agent state {:?}",
        proc_state(pid)
    );
    let r = via_headers(&s, &id, ENVD, "GET", "/counter");
    r.assert_error(502);
    assert!(r.body.contains("paused"), "{}", r.body);
    assert_eq!(s.info(&id).json()["stasis"]["agent"], "paused");

    // Resume: same process, its memory (the counter) kept and advancing.
    let before = {
        let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}));
        assert_eq!(r.status, 201, "{}", r.body);
        counter(&s, &id)
    };
    assert_eq!(agent_pid(&s, &id), pid);
    assert!(wait_until(10, || counter(&s, &id) > before + 5));
    let mut stream = open_stream(s.addr, &id);
    assert!(read_chunk(&mut stream).is_some());

    // Pause, then kill while paused: the stopped agent goes too.
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    assert!(wait_until(10, || process_dead(pid)), "agent survived kill");
    let r = via_headers(&s, &id, ENVD, "GET", "/health");
    r.assert_error(502);
    assert!(r.body.contains("it was killed"), "{}", r.body);
}

#[test]
fn pause_and_kill_reach_every_process_the_agent_started() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);
    let id = create_agent(&s);
    let r = via_headers(&s, &id, ENVD, "GET", "/spawn");
    assert_eq!(r.status, 200, "{}", r.body);
    let pid_file = s.data_dir.join(format!("sandboxes/{id}/root/spawned.pid"));
    assert!(wait_until(10, || pid_file.exists()));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = host_pid(&s, &id, pid);
    // An orphan in its own session, still in the agent's tree.
    assert!(!process_dead(pid));

    let r = s.post(&format!("/sandboxes/{id}/pause"), json!({}));
    assert_eq!(r.status, 204, "{} / log:\n{}", r.body, s.log());
    assert_eq!(proc_state(pid), Some('T'), "not stopped by the pause");
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(
        wait_until(10, || !matches!(proc_state(pid), Some('T') | None)),
        "not continued by the resume: {:?}",
        proc_state(pid)
    );
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    assert!(
        wait_until(10, || process_dead(pid)),
        "a process the agent started survived kill"
    );
}

#[test]
fn kill_of_a_running_sandbox_closes_its_connections_and_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);
    let id = create_agent(&s);
    let pid = agent_pid(&s, &id);
    let mut stream = open_stream(s.addr, &id);
    assert!(read_chunk(&mut stream).is_some());
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_chunk(&mut stream).is_some() {
        assert!(Instant::now() < deadline, "stream still open after kill");
    }
    assert!(wait_until(10, || process_dead(pid)));
}

#[test]
fn paused_agent_survives_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = server(&tmp, &[], &[]);
    let id = create_agent(&s);
    let pid = agent_pid(&s, &id);
    assert!(wait_until(10, || counter(&s, &id) > 5));
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    let at_pause = {
        // Stopped: read its counter once resumed; here only the state.
        assert!(wait_until(10, || proc_state(pid) == Some('T')));
        s.kill9();
        pid
    };
    let s = server(&tmp, &[], &[]);
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(agent_pid(&s, &id), at_pause);
    let c = counter(&s, &id);
    assert!(wait_until(10, || counter(&s, &id) > c));
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    assert!(wait_until(10, || process_dead(pid)));
}

#[test]
fn an_agent_that_never_answers_fails_create_and_leaks_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(
        &tmp,
        &["--agent-timeout", "2"],
        &[("STANDIN_MODE", "silent")],
    );
    let started = Instant::now();
    let r = s.post("/sandboxes", json!({"templateID": "agent"}));
    r.assert_error(500);
    let msg = r.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("agent never answered"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // No sandbox, no files, no processes.
    assert_eq!(s.get("/v2/sandboxes").json().as_array().unwrap().len(), 0);
    let sandboxes: PathBuf = s.data_dir.join("sandboxes");
    assert!(wait_until(10, || std::fs::read_dir(&sandboxes)
        .unwrap()
        .next()
        .is_none()));
    assert!(
        wait_until(10, || pids_mentioning(&sandboxes).is_empty()),
        "left running: {:?}",
        pids_mentioning(&sandboxes)
    );
}

#[test]
fn a_second_listener_serves_debug_mode_sdks() {
    // NOVITA_DEBUG=true sends envd requests to localhost:49983 (with the
    // routing headers); `--sandbox-listen` serves them.
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &["--sandbox-listen", "127.0.0.1:0"], &[]);
    let mut addr = None;
    assert!(wait_until(10, || {
        addr = strip_ansi(&s.log())
            .lines()
            .filter(|l| l.contains("also serving"))
            .find_map(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok());
        addr.is_some()
    }));
    let extra = addr.unwrap();
    let id = create_agent(&s);
    let r = http(
        extra,
        "GET",
        "/health",
        &[("Novita-Sandbox-Id", &id), ("Novita-Sandbox-Port", ENVD)],
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
}

/// The log without terminal colour sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn kernel_and_rootfs_make_the_builtin_templates_agent_templates() {
    let tmp = tempfile::tempdir().unwrap();
    // The fake backend never boots them, but the server checks they exist.
    let kernel = tmp.path().join("vmlinux");
    let rootfs = tmp.path().join("rootfs.ext4");
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let (k, r) = (kernel.to_str().unwrap(), rootfs.to_str().unwrap());
    let s = server(
        &tmp,
        &["--kernel", k, "--rootfs", r, "--memory-mb", "256"],
        &[],
    );
    for template in ["base", "code-interpreter-v1"] {
        let created = s.post("/sandboxes", json!({ "templateID": template }));
        assert_eq!(created.status, 201, "{}", created.body);
        assert_eq!(created.json()["envdVersion"], "0.5.7");
        let id = created.json()["sandboxID"].as_str().unwrap().to_string();
        let d = s.info(&id).json();
        assert_eq!(d["memoryMB"], 256);
        assert_eq!(d["diskSizeMB"], 3);
        assert_eq!(d["stasis"]["agent"], "ready");
        assert_eq!(via_headers(&s, &id, ENVD, "GET", "/health").status, 204);
    }

    // A missing image is a clear startup error.
    let bad = Server::try_start(
        &tmp.path().join("data2"),
        &["--kernel", k, "--rootfs", "/nonexistent/rootfs.ext4"],
    );
    let err = bad.err().expect("server started without its rootfs");
    assert!(err.contains("--rootfs /nonexistent/rootfs.ext4"), "{err}");
}

/// A request that leads back to the server itself (a user port that is the
/// server's own) is stopped: its routing headers are not passed on, and a
/// Host-routed loop ends at the hop limit with 508 instead of exhausting
/// descriptors.
#[test]
fn a_request_routed_back_to_the_server_does_not_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp, &[], &[]);
    let id = create_agent(&s);
    let own = s.addr.port().to_string();

    // Headers form: the forwarded request arrives without them, so the
    // server answers it itself (GET /health is open) instead of forwarding.
    let r = via_headers(&s, &id, &own, "GET", "/health");
    assert_eq!(r.status, 200, "{}", r.body);

    // Host form: the Host is passed on (user apps need it), so the request
    // comes back routed again; each pass adds `Via: 1.1 stasis`.
    let host = format!("{own}-{id}.example.test");
    let r = http(s.addr, "GET", "/loop", &[("Host", &host)], None);
    r.assert_error(508);
    assert!(r.body.contains("request loop"), "{}", r.body);

    // The server still answers.
    let r = http(s.addr, "GET", "/health", &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
}
