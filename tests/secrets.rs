//! Secrets (issue 14, item 7): `stasis serve` keeps its data dir 0700 and
//! its database 0600, and takes its API key from `--api-key-file` (not
//! argv): a request without the key is refused, one with it served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stasis");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Status code of `GET /sandboxes` with `key` (if any), or None if the
/// server does not answer yet.
fn status(port: u16, key: Option<&str>) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let hdr = key
        .map(|k| format!("X-API-KEY: {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /sandboxes HTTP/1.1\r\nHost: localhost\r\n{hdr}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

#[test]
fn serve_data_dir_modes_and_api_key_file() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    let key = "k3y-for-the-secrets-test-0123456789";
    std::fs::write(&key_file, format!("  {key}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let data = dir.join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server(
        Command::new(BIN)
            .args(["serve", "--backend", "fake", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--api-key-file")
            .arg(&key_file)
            .env_remove("STASIS_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(60);
    let unauth = loop {
        if let Some(s) = status(port, None) {
            break s;
        }
        assert!(
            Instant::now() < end,
            "the server did not answer within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(unauth, 401, "a request without the key must be refused");
    assert_eq!(status(port, Some("wrong-key-0123456789")), Some(401));
    assert_eq!(
        status(port, Some(key)),
        Some(200),
        "the file's key (trimmed)"
    );
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&data.join("stasis.db")), 0o600, "database");
    assert_eq!(mode(&data.join("sandboxes")), 0o700, "sandboxes dir");
    // The key is in no argv of the server.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.0.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(key));
    drop(server);
}
