//! The agent (`stasis-envd`) on the host, driven by the real
//! `novita-sandbox` Python SDK (tests/envd, pytest): commands, files,
//! filesystem, pty, watches. Also the Unix-socket CONNECT handshake and
//! the TCP forwarder of host mode. No KVM needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
    line: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent with `args`; waits for its "listening on" line.
fn agent(args: &[&str]) -> Agent {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stasis-envd"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start stasis-envd");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)
        .expect("read the agent's first line");
    assert!(
        line.starts_with("stasis-envd: listening on "),
        "unexpected first line: {line:?}"
    );
    let line = line
        .trim()
        .trim_start_matches("stasis-envd: listening on ")
        .to_string();
    Agent { child, line }
}

fn scratch(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn sdk_commands_and_files_work_against_the_agent() {
    let root = scratch("envd-sdk");
    let a = agent(&["--tcp", "127.0.0.1:0", "--root", root.to_str().unwrap()]);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/envd");
    let out = Command::new("bash")
        .arg(format!("{dir}/run.sh"))
        .env("ENVD_URL", &a.line)
        .env("ENVD_ROOT", &root)
        .env("ENVD_VERSION", stasis::envd::VERSION)
        .output()
        .expect("run tests/envd/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "SDK agent tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(" passed"), "pytest ran no tests:\n{stdout}");
    assert!(
        !stdout.contains(" skipped"),
        "some tests were skipped:\n{stdout}"
    );
}

fn connect(path: &str, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect to the agent's socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut ok = [0u8; 9];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, format!("OK {port}\n").as_bytes());
    s
}

#[test]
fn unix_socket_handshake_serves_envd_and_the_forwarder() {
    let root = scratch("envd-uds");
    let sock = root.join("agent.sock");
    let a = agent(&[
        "--uds",
        sock.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ]);
    let path = a.line.trim_start_matches("unix:").to_string();

    // The envd API on 49983.
    let mut s = connect(&path, 49983);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");

    // The forwarder on 49982 reaches a TCP port.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut c, _) = target.accept().unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        c.write_all(&b).unwrap();
    });
    let mut s = connect(&path, 49982);
    write!(s, "{port}\nhello").unwrap();
    let mut b = [0u8; 8];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"OK\nhello");
    echo.join().unwrap();

    // A closed TCP port is refused with a reason.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cport = closed.local_addr().unwrap().port();
    drop(closed);
    let mut s = connect(&path, 49982);
    writeln!(s, "{cport}").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("ERR "), "{r}");

    // Other ports: closed without an answer.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let start = Instant::now();
    let mut r = Vec::new();
    s.read_to_end(&mut r).unwrap();
    assert!(r.is_empty() && start.elapsed() < Duration::from_secs(20));
}
