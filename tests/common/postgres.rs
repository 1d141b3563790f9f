//! A throwaway PostgreSQL server for tests: `initdb` + `postgres` from the
//! Debian package (`apt-get install postgresql`) in a fresh directory under
//! the target dir, listening only on a Unix socket in that directory, run
//! as the `postgres` user (or `nobody`) when the tests run as root —
//! PostgreSQL refuses to run as root. Dropping it stops the server and
//! removes the directory.
//!
//! Missing binaries fail the test loudly, or print a "SKIPPED (not
//! passed)" banner with STASIS_ALLOW_SKIP=1.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running test server.
pub struct Postgres {
    /// `<dir>/data` is the cluster, `<dir>` the socket directory.
    pub dir: PathBuf,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    child: Option<Child>,
    /// `postgres://postgres@<socket dir>/postgres`.
    pub url: String,
}

/// Where `initdb` and `postgres` are: $PATH, else Debian's
/// `/usr/lib/postgresql/<version>/bin` (the newest).
fn bindir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() && d.join("postgres").is_file() {
                return Some(d);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// The uid/gid to run as when we are root: `postgres`, else `nobody`.
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == name {
                if let (Ok(u), Ok(g)) = (f[2].parse(), f[3].parse()) {
                    return Some((u, g));
                }
            }
        }
    }
    panic!("running as root, but neither a postgres nor a nobody user exists to run PostgreSQL as");
}

fn chown_r(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_r(&e.path(), uid, gid);
        }
    }
}

impl Postgres {
    /// Starts a fresh server, or `None` after a SKIPPED banner when
    /// PostgreSQL is not installed and STASIS_ALLOW_SKIP=1 (else panics).
    pub fn start_or_skip(test: &str) -> Option<Postgres> {
        let Some(bin) = bindir() else {
            let msg = format!(
                "{test}: PostgreSQL is not installed (no initdb/postgres on $PATH or under /usr/lib/postgresql; apt-get install postgresql)"
            );
            if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
                eprintln!("\n*** SKIPPED (not passed): {msg} ***\n");
                return None;
            }
            panic!("{msg}; set STASIS_ALLOW_SKIP=1 to skip explicitly");
        };
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(root).unwrap();
        crate::common::sweep_stale(root, "pg");
        // Short: the socket path must fit in 107 bytes.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root
            .join(format!("pg-{}", std::process::id()))
            .join(n.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let user = unprivileged();
        if let Some((u, g)) = user {
            chown_r(&dir, u, g);
            // The parent must be traversable by that user.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                dir.parent().unwrap(),
                std::fs::Permissions::from_mode(0o755),
            );
        }
        let mut pg = Postgres {
            url: format!(
                "postgres://postgres@{}/postgres",
                dir.to_str().unwrap().replace('/', "%2F")
            ),
            dir,
            bin,
            user,
            child: None,
        };
        let out = pg
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.restart();
        Some(pg)
    }

    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        c.current_dir(&self.dir).env("LC_ALL", "C");
        if let Some((u, g)) = self.user {
            use std::os::unix::process::CommandExt;
            c.uid(u).gid(g);
        }
        c
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = self
            .command("postgres")
            .args(["-D", "data", "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=60",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match postgres::Client::connect(&self.url, postgres::NoTls) {
                Ok(_) => return,
                Err(e) => {
                    if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                        panic!("postgres exited ({st}): {}", self.log());
                    }
                    assert!(
                        Instant::now() < end,
                        "postgres did not accept connections within 60 s ({e}): {}",
                        self.log()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The server's processes: the postmaster and its children.
    fn pids(&self) -> Vec<i32> {
        let Some(main) = self.child.as_ref().map(|c| c.id() as i32) else {
            return vec![];
        };
        let mut out = vec![main];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|v| v.trim().parse::<i32>().ok());
            if ppid == Some(main) {
                out.push(pid);
            }
        }
        out
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) every process of the server:
    /// a database that accepts connections but never answers.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        for pid in self.pids() {
            // SAFETY: signalling processes of our own child server.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// A direct client (superuser).
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.freeze(false);
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The per-process parent, once its last server is gone.
        if let Some(p) = self.dir.parent() {
            let _ = std::fs::remove_dir(p);
        }
    }
}
