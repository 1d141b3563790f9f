//! The server's side of the worker link: spawn a worker process, send it
//! requests, match replies by id, notice when it dies, kill it.
//!
//! Runs on tokio; it never touches KVM itself.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixListener;
use tokio::process::Command;
use tokio::sync::{oneshot, watch, Notify};

use super::protocol::{self, Reply, ReplyFrame, Request, RequestFrame, MAX_FRAME};
use super::{Error, FAULT_ENV, PARENT_PID_ENV};
use crate::jail::Prepared;

/// The only environment variables a jailed worker gets (besides
/// [`PARENT_PID_ENV`]): logging and the tests' fault switch. No secret.
pub const JAIL_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    FAULT_ENV,
    "STASIS_SECCOMP_LOG",
    crate::snapshot::dirty::WRITE_TRACKING_ENV,
];

type ReplyTx = oneshot::Sender<Result<Reply, Error>>;

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, ReplyTx>,
    /// Why the link is closed, once it is.
    closed: Option<String>,
}

impl Pending {
    fn close(&mut self, reason: &str) {
        if self.closed.is_none() {
            self.closed = Some(reason.to_string());
        }
        for (_, tx) in self.waiting.drain() {
            let _ = tx.send(Err(Error::WorkerGone(reason.to_string())));
        }
    }
}

/// A live worker process and the socket to it.
pub struct WorkerClient {
    /// The worker's jail, when it has one.
    jail: Option<Arc<Prepared>>,
    pid: u32,
    next_id: AtomicU64,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<Pending>>,
    kill: Arc<Notify>,
    exit: watch::Receiver<Option<String>>,
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl WorkerClient {
    /// Starts `exe worker --socket <socket>` and waits (up to
    /// `connect_timeout`) for it to connect back. The socket file is removed
    /// once connected.
    pub async fn spawn(
        exe: &Path,
        socket: &Path,
        connect_timeout: Duration,
    ) -> Result<Self, Error> {
        Self::spawn_jailed(exe, socket, connect_timeout, None).await
    }

    /// [`Self::spawn`], and with `jail` the worker confines itself
    /// (`worker --jail SPEC`, see [`crate::jail`]) with an environment
    /// cleared down to [`JAIL_ENV`]. The jail's cgroup and uid are released
    /// once the worker has exited, whatever happens.
    pub async fn spawn_jailed(
        exe: &Path,
        socket: &Path,
        connect_timeout: Duration,
        jail: Option<Prepared>,
    ) -> Result<Self, Error> {
        let jail = jail.map(Arc::new);
        let undo = |jail: &Option<Arc<Prepared>>| {
            if let Some(j) = jail.clone() {
                // The cgroup cleanup polls briefly; not on a runtime thread.
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = j.cleanup() {
                        tracing::warn!("jail cleanup: {}", crate::error_chain(&e));
                    }
                });
            }
        };
        let _ = std::fs::remove_file(socket);
        let listener = match UnixListener::bind(socket) {
            Ok(l) => l,
            Err(e) => {
                undo(&jail);
                return Err(Error::Io(format!("bind {}", socket.display()), e));
            }
        };
        let mut cmd = Command::new(exe);
        cmd.arg("worker").arg("--socket").arg(socket);
        if let Some(j) = &jail {
            let spec =
                serde_json::to_string(&j.spec).map_err(|e| Error::Protocol(e.to_string()))?;
            cmd.arg("--jail").arg(spec).env_clear();
            for k in JAIL_ENV {
                if let Some(v) = std::env::var_os(k) {
                    cmd.env(k, v);
                }
            }
        }
        let spawned = cmd
            .env(PARENT_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                undo(&jail);
                return Err(Error::Io(format!("spawn worker {}", exe.display()), e));
            }
        };
        let pid = child.id().unwrap_or(0);
        let accepted = tokio::select! {
            r = listener.accept() => r.map_err(|e| Error::Io("accept worker".into(), e)),
            s = child.wait() => Err(Error::WorkerGone(format!(
                "exited before connecting ({})",
                describe_exit(s)
            ))),
            _ = tokio::time::sleep(connect_timeout) => Err(Error::Timeout("the connection")),
        };
        drop(listener);
        let _ = std::fs::remove_file(socket);
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                undo(&jail);
                return Err(e);
            }
        };
        // Only our child may be on the other end.
        let peer = stream.peer_cred().ok().and_then(|c| c.pid());
        if peer != Some(pid as i32) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            undo(&jail);
            return Err(Error::Protocol(format!(
                "unexpected peer {peer:?} on the worker socket (expected pid {pid})"
            )));
        }
        let (read_half, write_half) = stream.into_split();

        let pending = Arc::new(Mutex::new(Pending::default()));
        let kill = Arc::new(Notify::new());
        let (exit_tx, exit_rx) = watch::channel(None);

        // Child reaper: waits for exit, or kills on request. (Only the reader
        // fails pending requests, on EOF, so a reply written just before the
        // worker exited is still delivered.)
        let kill2 = kill.clone();
        let jail2 = jail.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill2.notified() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let mut why = describe_exit(status);
            if let Some(j) = jail2 {
                if j.cgroup.oom_kills() > 0 {
                    why.push_str(" (out of memory: its cgroup reached its memory limit)");
                }
                let j2 = j.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = j2.cleanup() {
                        tracing::warn!("jail cleanup: {}", crate::error_chain(&e));
                    }
                })
                .await;
            }
            let _ = exit_tx.send(Some(why));
        });

        // Reply reader.
        let pending3 = pending.clone();
        let kill3 = kill.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(read_half);
            let why = loop {
                let mut line = Vec::new();
                match (&mut reader)
                    .take(MAX_FRAME)
                    .read_until(b'\n', &mut line)
                    .await
                {
                    Err(e) => break format!("read failed: {e}"),
                    Ok(0) => break "worker closed the socket".to_string(),
                    Ok(_) if line.last() != Some(&b'\n') => {
                        break "reply frame too long".to_string()
                    }
                    Ok(_) => {}
                }
                let frame: ReplyFrame = match serde_json::from_slice(&line) {
                    Ok(f) => f,
                    Err(e) => break format!("bad reply frame: {e}"),
                };
                let tx = lock(&pending3).waiting.remove(&frame.id);
                match tx {
                    Some(tx) => {
                        let _ = tx.send(Ok(frame.reply));
                    }
                    // A late reply to a request we stopped waiting for.
                    None => tracing::warn!(pid, id = frame.id, "unexpected reply from worker"),
                }
            };
            lock(&pending3).close(&why);
            if why != "worker closed the socket" {
                tracing::warn!(pid, "worker link broken: {why}; killing the worker");
                kill3.notify_one();
            }
        });

        Ok(WorkerClient {
            jail,
            pid,
            next_id: AtomicU64::new(1),
            writer: tokio::sync::Mutex::new(write_half),
            pending,
            kill,
            exit: exit_rx,
        })
    }

    /// The worker's jail (uid, cgroup), when it has one.
    pub fn jail(&self) -> Option<&Prepared> {
        self.jail.as_deref()
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `req` and waits up to `timeout` for its reply. A
    /// [`Reply::Error`] comes back as [`Error::Remote`].
    pub async fn request(&self, req: Request, timeout: Duration) -> Result<Reply, Error> {
        let what = match &req {
            Request::Boot { .. } => "boot",
            Request::Restore { .. } => "restore",
            Request::Pause { .. } => "pause",
            Request::PauseBackground { .. } => "pause",
            Request::AwaitDurable => "the background snapshot write",
            Request::ResumeFromMemory => "resume from memory",
            Request::Status => "status",
            Request::Shutdown => "shutdown",
            Request::Probe { .. } => "probe",
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = protocol::encode(&RequestFrame { id, request: req })
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.pending);
            if let Some(reason) = &p.closed {
                return Err(Error::WorkerGone(reason.clone()));
            }
            p.waiting.insert(id, tx);
        }
        let written = {
            let mut w = self.writer.lock().await;
            w.write_all(&line).await
        };
        if let Err(e) = written {
            lock(&self.pending).waiting.remove(&id);
            return Err(Error::WorkerGone(format!("write failed: {e}")));
        }
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(Error::WorkerGone("reply channel dropped".into())),
            Err(_) => {
                lock(&self.pending).waiting.remove(&id);
                return Err(Error::Timeout(what));
            }
        };
        match reply {
            Reply::Error { message } => Err(Error::Remote(message)),
            other => Ok(other),
        }
    }

    /// Kills the worker (SIGKILL) if it still runs.
    pub fn kill(&self) {
        self.kill.notify_one();
    }

    /// The exit reason, once the worker process has exited.
    pub fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Waits until the worker process has exited; returns why.
    pub async fn wait_exit(&self) -> String {
        let mut rx = self.exit.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return "worker reaper ended".into();
            }
        }
    }

    /// Asks the worker to stop, then makes sure it is dead within `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        if self.exited().is_none() {
            let _ = self.request(Request::Shutdown, grace).await;
        }
        if tokio::time::timeout(grace, self.wait_exit()).await.is_err() {
            self.kill();
            self.wait_exit().await;
        }
    }
}

impl Drop for WorkerClient {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill.notify_one();
        }
    }
}

fn describe_exit(s: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match s {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => st.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}
