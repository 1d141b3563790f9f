//! Processes the agent starts (`process.Process`): spawning as a user in a
//! cwd with an environment, on pipes or a pty; streaming their output to
//! every connected client with backpressure (a slow client slows the
//! process down, memory stays bounded); stdin, signals, pty resize; the
//! end event with the exit status. Each process leads its own session and
//! process group, so signals reach the whole command (`bash -c 'a | b'`).
//!
//! A process outlives the request that started it: clients come and go
//! (Connect); only the Start request's deadline (`connect-timeout-ms`)
//! kills it, as envd does.

use crate::envd::connect::{Code, RpcError};
use crate::envd::fdio::{self, FdIo};
use crate::envd::proto::process::{
    process_event::{data_event::Output, DataEvent, EndEvent, Event, StartEvent},
    process_input, process_selector, ProcessConfig, ProcessInfo, ProcessInput, ProcessSelector,
    StartRequest,
};
use crate::envd::users::User;
use bytes::Bytes;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

/// How many output chunks a client may have queued before the process
/// waits for it.
const SUB_QUEUE: usize = 16;
/// Size of one output read.
const CHUNK: usize = 32 * 1024;
/// The PATH a process gets when the agent's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors of the process manager (turned into [`RpcError`]s).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No process matches the selector.
    #[error("process {0} not found")]
    NotFound(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
}

impl From<Error> for RpcError {
    fn from(e: Error) -> RpcError {
        let code = match &e {
            Error::NotFound(_) => Code::NotFound,
            Error::Sys { .. } => Code::Internal,
        };
        RpcError::new(code, e.to_string())
    }
}

/// Who is subscribed to a process's events, and its end once it ended.
#[derive(Default)]
struct Subs {
    list: Vec<mpsc::Sender<Event>>,
    ended: Option<EndEvent>,
}

/// A running process.
pub struct Proc {
    pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    stdin: tokio::sync::Mutex<Option<FdIo>>,
    pty: Option<Arc<FdIo>>,
    subs: Mutex<Subs>,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A new subscription: the start event, then every event from now on
    /// (just the end if the process already ended).
    pub fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(SUB_QUEUE);
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.try_send(Event::Start(StartEvent { pid: self.pid }));
        match &subs.ended {
            Some(end) => {
                let _ = tx.try_send(Event::End(end.clone()));
            }
            None => subs.list.push(tx),
        }
        rx
    }

    async fn broadcast(&self, ev: Event) {
        let senders: Vec<_> = self
            .subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .clone();
        for s in &senders {
            let _ = s.send(ev.clone()).await;
        }
        if senders.iter().any(|s| s.is_closed()) {
            self.subs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .list
                .retain(|s| !s.is_closed());
        }
    }

    async fn finish(&self, end: EndEvent) {
        let senders = {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            subs.ended = Some(end.clone());
            std::mem::take(&mut subs.list)
        };
        for s in senders {
            let _ = s.send(Event::End(end.clone())).await;
        }
    }

    /// Sends `sig` to the process's group (falling back to the process).
    /// A process that is already gone is not an error.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        let pid = self.pid as libc::pid_t;
        // SAFETY: kill has no memory effects; a negative pid names the group.
        if unsafe { libc::kill(-pid, sig) } == 0 {
            return Ok(());
        }
        // SAFETY: as above.
        if unsafe { libc::kill(pid, sig) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        Err(e)
    }

    fn info(&self) -> ProcessInfo {
        ProcessInfo {
            config: Some(self.config.clone()),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }
}

/// The EndEvent for an exit status, worded like envd (Go's ProcessState).
pub fn end_event(status: std::io::Result<std::process::ExitStatus>) -> EndEvent {
    match status {
        Ok(st) => {
            if let Some(code) = st.code() {
                let status = format!("exit status {code}");
                EndEvent {
                    exit_code: code,
                    exited: true,
                    error: (code != 0).then(|| status.clone()),
                    status,
                }
            } else {
                let sig = st.signal().unwrap_or(0);
                let status = format!("signal: {}", signal_name(sig));
                EndEvent {
                    exit_code: -1,
                    exited: false,
                    error: Some(status.clone()),
                    status,
                }
            }
        }
        Err(e) => EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some(format!("waiting for the process failed: {e}")),
        },
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGHUP => "hangup".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGQUIT => "quit".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGKILL => "killed".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGTERM => "terminated".into(),
        n => format!("signal {n}"),
    }
}

/// Where a pump's bytes go.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
    Pty,
}

fn data(which: Stream, b: &[u8]) -> Event {
    let b = Bytes::copy_from_slice(b);
    Event::Data(DataEvent {
        output: Some(match which {
            Stream::Stdout => Output::Stdout(b),
            Stream::Stderr => Output::Stderr(b),
            Stream::Pty => Output::Pty(b),
        }),
    })
}

async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|e| *e).await;
}

/// Copies one output of `proc` to its subscribers until end of file, or
/// until the process exited and what it left in the pipe is read (a
/// background grandchild holding the pipe open doesn't keep the command
/// from ending).
async fn pump(proc: Arc<Proc>, fd: Arc<FdIo>, which: Stream, mut exited: watch::Receiver<bool>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            r = fd.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => proc.broadcast(data(which, &buf[..n])).await,
            },
            _ = until_true(&mut exited) => break,
        }
    }
    while let Ok(n @ 1..) = fd.read_now(&mut buf) {
        proc.broadcast(data(which, &buf[..n])).await;
    }
}

/// What a process needs besides its request.
pub struct Spawn<'a> {
    /// Run as this user (switched to only when the agent is root).
    pub user: &'a User,
    /// Environment variables set for every process (POST /init).
    pub envs: HashMap<String, String>,
}

/// All processes the agent started that haven't ended.
#[derive(Default)]
pub struct Manager {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl Manager {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running processes.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut v: Vec<_> = self.lock().values().map(|p| p.info()).collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// The process a selector names.
    pub fn find(&self, sel: Option<&ProcessSelector>) -> Result<Arc<Proc>, RpcError> {
        let sel = sel.and_then(|s| s.selector.as_ref()).ok_or_else(|| {
            RpcError::new(
                Code::InvalidArgument,
                "a process selector (pid or tag) is required",
            )
        })?;
        let procs = self.lock();
        let found = match sel {
            process_selector::Selector::Pid(pid) => procs.get(pid).cloned(),
            process_selector::Selector::Tag(tag) => procs
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        };
        found.ok_or_else(|| {
            let what = match sel {
                process_selector::Selector::Pid(pid) => format!("with pid {pid}"),
                process_selector::Selector::Tag(tag) => format!("with tag '{tag}'"),
            };
            Error::NotFound(what).into()
        })
    }

    /// Starts a process; returns it and a subscription that begins with
    /// its start event.
    pub fn start(
        self: &Arc<Self>,
        req: StartRequest,
        how: Spawn<'_>,
    ) -> Result<(Arc<Proc>, mpsc::Receiver<Event>), RpcError> {
        let config = req
            .process
            .ok_or_else(|| RpcError::new(Code::InvalidArgument, "process config is required"))?;
        if config.cmd.is_empty() {
            return Err(RpcError::new(Code::InvalidArgument, "cmd is empty"));
        }
        let user = how.user;
        let cwd = match config.cwd.as_deref() {
            Some(c) if !c.is_empty() => crate::envd::users::resolve(c, &user.home)
                .map_err(|e| RpcError::new(Code::InvalidArgument, e.to_string()))?,
            _ => user.home.clone(),
        };
        if !cwd.is_dir() {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!(
                    "cwd '{}' does not exist or is not a directory",
                    cwd.display()
                ),
            ));
        }
        // The SDK runs commands with /bin/bash; a minimal (busybox) guest
        // has only /bin/sh, which takes the same `-l -c CMD`.
        let program = if config.cmd == "/bin/bash" && !Path::new("/bin/bash").exists() {
            "/bin/sh".to_string()
        } else {
            config.cmd.clone()
        };

        let sys = |what: &str| {
            let what = what.to_string();
            move |source| RpcError::from(Error::Sys { what, source })
        };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&config.args).current_dir(&cwd);
        cmd.env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", DEFAULT_PATH);
        }
        cmd.envs(&how.envs).envs(&config.envs);

        let pty_size = req.pty.as_ref().map(|p| {
            let s = p.size.unwrap_or_default();
            let clamp = |v: u32, d: u16| {
                if v == 0 {
                    d
                } else {
                    v.min(u16::MAX as u32) as u16
                }
            };
            (clamp(s.rows, 24), clamp(s.cols, 80))
        });
        let (out_r, err_r, stdin_w, master) = if let Some((rows, cols)) = pty_size {
            let (m, s) = fdio::openpty(rows, cols).map_err(sys("openpty"))?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(sys("dup pty"));
            cmd.stdin(Stdio::from(dup(&s)?))
                .stdout(Stdio::from(dup(&s)?))
                .stderr(Stdio::from(s));
            cmd.env("TERM", "xterm-256color");
            (None, None, None, Some(m))
        } else {
            let (or, ow) = fdio::pipe().map_err(sys("pipe"))?;
            let (er, ew) = fdio::pipe().map_err(sys("pipe"))?;
            cmd.stdout(Stdio::from(ow)).stderr(Stdio::from(ew));
            let stdin_w = if req.stdin.unwrap_or(true) {
                let (ir, iw) = fdio::pipe().map_err(sys("pipe"))?;
                cmd.stdin(Stdio::from(ir));
                Some(iw)
            } else {
                cmd.stdin(Stdio::null());
                None
            };
            (Some(or), Some(er), stdin_w, None)
        };

        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let switch = (euid == 0 && user.uid != 0).then_some((user.uid, user.gid));
        let is_pty = master.is_some();
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe system calls (setsid, ioctl,
        // setgroups, setgid, setuid) on plain integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if is_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((uid, gid)) = switch {
                    let groups = [gid];
                    if libc::setgroups(1, groups.as_ptr()) < 0
                        || libc::setgid(gid) < 0
                        || libc::setuid(uid) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            RpcError::new(
                Code::InvalidArgument,
                format!("failed to start process '{}': {e}", config.cmd),
            )
        })?;
        // The child's ends of the pipes live in `cmd`: close them here so
        // that our reads see end of file when the process is done.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        // One line per process on the agent's output: the sandbox's log
        // (GET /sandboxes/{id}/logs) shows what ran, as envd's does.
        tracing::info!(pid, cmd = %config.cmd, args = ?config.args, "process started");

        let reg = |fd: OwnedFd| FdIo::new(fd).map_err(sys("register fd"));
        let master = master.map(reg).transpose()?.map(Arc::new);
        let stdin = stdin_w.map(reg).transpose()?;
        let outputs: Vec<(Arc<FdIo>, Stream)> = match (&master, out_r, err_r) {
            (Some(m), _, _) => vec![(m.clone(), Stream::Pty)],
            (None, Some(o), Some(e)) => vec![
                (Arc::new(reg(o)?), Stream::Stdout),
                (Arc::new(reg(e)?), Stream::Stderr),
            ],
            _ => vec![],
        };
        let proc = Arc::new(Proc {
            pid,
            tag: req.tag,
            config,
            stdin: tokio::sync::Mutex::new(stdin),
            pty: master,
            subs: Mutex::default(),
        });
        let sub = proc.subscribe();
        self.lock().insert(pid, proc.clone());

        let manager = self.clone();
        let p = proc.clone();
        tokio::spawn(async move {
            let (exit_tx, exit_rx) = watch::channel(false);
            let pumps: Vec<_> = outputs
                .into_iter()
                .map(|(fd, which)| tokio::spawn(pump(p.clone(), fd, which, exit_rx.clone())))
                .collect();
            let status = child.wait().await;
            let _ = exit_tx.send(true);
            for h in pumps {
                let _ = h.await;
            }
            p.finish(end_event(status)).await;
            manager.lock().remove(&p.pid);
        });
        Ok((proc, sub))
    }

    /// Writes input to a process's stdin or pty.
    pub async fn send_input(
        &self,
        sel: Option<&ProcessSelector>,
        input: Option<ProcessInput>,
    ) -> Result<(), RpcError> {
        let proc = self.find(sel)?;
        match input.and_then(|i| i.input) {
            Some(process_input::Input::Stdin(b)) => {
                let stdin = proc.stdin.lock().await;
                let Some(w) = stdin.as_ref() else {
                    return Err(RpcError::new(
                        Code::FailedPrecondition,
                        format!(
                            "stdin of process {} is closed or was not requested (start it with stdin=True)",
                            proc.pid
                        ),
                    ));
                };
                w.write_all(&b).await.map_err(|e| {
                    RpcError::new(
                        Code::FailedPrecondition,
                        format!("writing stdin of process {}: {e}", proc.pid),
                    )
                })
            }
            Some(process_input::Input::Pty(b)) => {
                let Some(m) = proc.pty.as_ref() else {
                    return Err(RpcError::new(
                        Code::FailedPrecondition,
                        format!("process {} has no pty", proc.pid),
                    ));
                };
                m.write_all(&b).await.map_err(|e| {
                    RpcError::new(
                        Code::FailedPrecondition,
                        format!("writing pty of process {}: {e}", proc.pid),
                    )
                })
            }
            None => Err(RpcError::new(Code::InvalidArgument, "input is empty")),
        }
    }

    /// Closes a process's stdin (it reads end of file).
    pub async fn close_stdin(&self, sel: Option<&ProcessSelector>) -> Result<(), RpcError> {
        let proc = self.find(sel)?;
        if proc.pty.is_some() {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                format!(
                    "process {} runs on a pty; send ^D (0x04) as pty input instead",
                    proc.pid
                ),
            ));
        }
        proc.stdin.lock().await.take();
        Ok(())
    }

    /// Resizes a process's pty.
    pub fn resize(
        &self,
        sel: Option<&ProcessSelector>,
        rows: u32,
        cols: u32,
    ) -> Result<(), RpcError> {
        let proc = self.find(sel)?;
        let Some(m) = proc.pty.as_ref() else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                format!("process {} has no pty to resize", proc.pid),
            ));
        };
        if rows == 0 || cols == 0 || rows > u16::MAX as u32 || cols > u16::MAX as u32 {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!("invalid pty size {cols}x{rows}"),
            ));
        }
        fdio::set_winsize(m.raw(), rows as u16, cols as u16)
            .map_err(|e| RpcError::new(Code::Internal, format!("resizing pty: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envd::proto::process::Pty;

    fn me(home: &Path) -> User {
        let mut u = crate::envd::users::current();
        u.home = home.to_path_buf();
        u
    }

    fn req(cmd: &str, args: &[&str]) -> StartRequest {
        StartRequest {
            process: Some(ProcessConfig {
                cmd: cmd.into(),
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn collect(mut rx: mpsc::Receiver<Event>) -> (Vec<u8>, Vec<u8>, Vec<u8>, EndEvent) {
        let (mut out, mut err, mut pty) = (vec![], vec![], vec![]);
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Data(DataEvent { output: Some(o) }) => match o {
                    Output::Stdout(b) => out.extend_from_slice(&b),
                    Output::Stderr(b) => err.extend_from_slice(&b),
                    Output::Pty(b) => pty.extend_from_slice(&b),
                },
                Event::End(e) => return (out, err, pty, e),
                _ => {}
            }
        }
        panic!("stream ended without an end event");
    }

    #[tokio::test]
    async fn runs_streams_and_reports_exit() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Manager::default());
        let user = me(dir.path());
        let (p, mut rx) = m
            .start(
                req(
                    "/bin/sh",
                    &["-c", "pwd; echo err >&2; head -c 300000 /dev/zero; exit 3"],
                ),
                Spawn {
                    user: &user,
                    envs: HashMap::new(),
                },
            )
            .unwrap();
        assert!(
            matches!(rx.recv().await, Some(Event::Start(StartEvent { pid })) if pid == p.pid())
        );
        let (out, err, _, end) = collect(rx).await;
        let cwd = format!("{}\n", dir.path().display());
        assert_eq!(&out[..cwd.len()], cwd.as_bytes());
        assert_eq!(out.len(), cwd.len() + 300000);
        assert_eq!(err, b"err\n");
        assert_eq!((end.exit_code, end.exited), (3, true));
        assert_eq!(end.error.as_deref(), Some("exit status 3"));
        // Ended processes leave the table.
        crate::envd::tests::poll(|| m.list().is_empty()).await;
    }

    #[tokio::test]
    async fn stdin_signals_and_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Manager::default());
        let user = me(dir.path());
        let mut r = req("/bin/sh", &["-c", "read x; echo got $x; sleep 1000"]);
        r.tag = Some("t1".into());
        let (p, mut rx) = m
            .start(
                r,
                Spawn {
                    user: &user,
                    envs: HashMap::new(),
                },
            )
            .unwrap();
        let sel = ProcessSelector {
            selector: Some(process_selector::Selector::Tag("t1".into())),
        };
        m.send_input(
            Some(&sel),
            Some(ProcessInput {
                input: Some(process_input::Input::Stdin(Bytes::from_static(b"hi\n"))),
            }),
        )
        .await
        .unwrap();
        // Wait for the echo before killing.
        let mut out = Vec::new();
        while out != b"got hi\n" {
            match rx.recv().await {
                Some(Event::Data(DataEvent {
                    output: Some(Output::Stdout(b)),
                })) => out.extend_from_slice(&b),
                Some(Event::End(e)) => panic!("ended early: {e:?}"),
                Some(_) => {}
                None => panic!("stream closed"),
            }
        }
        let second = m.find(Some(&sel)).unwrap().subscribe();
        assert_eq!(m.list().len(), 1);
        p.signal(libc::SIGKILL).unwrap();
        let (rest, _, _, end) = collect(rx).await;
        assert!(rest.is_empty());
        assert_eq!((end.exit_code, end.exited), (-1, false));
        assert_eq!(end.status, "signal: killed");
        let (_, _, _, end2) = collect(second).await;
        assert_eq!(end2, end);
        let missing = ProcessSelector {
            selector: Some(process_selector::Selector::Pid(u32::MAX)),
        };
        assert_eq!(m.find(Some(&missing)).err().unwrap().code, Code::NotFound);
    }

    #[tokio::test]
    async fn background_child_does_not_hold_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Manager::default());
        let user = me(dir.path());
        let mut r = req("/bin/sh", &["-c", "sleep 1000 & echo started"]);
        r.stdin = Some(false);
        let (p, rx) = m
            .start(
                r,
                Spawn {
                    user: &user,
                    envs: HashMap::new(),
                },
            )
            .unwrap();
        let (out, _, _, end) = collect(rx).await;
        assert_eq!(out, b"started\n");
        assert_eq!(end.exit_code, 0);
        let _ = p.signal(libc::SIGKILL); // the group: the background sleep too
    }

    #[tokio::test]
    async fn pty_echoes_and_resizes() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Manager::default());
        let user = me(dir.path());
        let mut r = req("/bin/sh", &["-c", "stty size; read x; echo line:$x"]);
        r.pty = Some(Pty {
            size: Some(crate::envd::proto::process::pty::Size {
                cols: 100,
                rows: 30,
            }),
        });
        let (p, rx) = m
            .start(
                r,
                Spawn {
                    user: &user,
                    envs: HashMap::new(),
                },
            )
            .unwrap();
        let sel = ProcessSelector {
            selector: Some(process_selector::Selector::Pid(p.pid())),
        };
        m.resize(Some(&sel), 31, 101).unwrap();
        m.send_input(
            Some(&sel),
            Some(ProcessInput {
                input: Some(process_input::Input::Pty(Bytes::from_static(b"abc\n"))),
            }),
        )
        .await
        .unwrap();
        let (_, _, pty, end) = collect(rx).await;
        let text = String::from_utf8_lossy(&pty);
        assert!(text.contains("line:abc"), "pty output: {text:?}");
        assert_eq!(end.exit_code, 0);
    }

    #[tokio::test]
    async fn runs_as_the_requested_user_when_root() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Manager::default());
        let nobody = User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: dir.path().to_path_buf(),
        };
        let (_, rx) = m
            .start(
                req("/bin/sh", &["-c", "id -u; id -g; echo $USER $HOME"]),
                Spawn {
                    user: &nobody,
                    envs: HashMap::new(),
                },
            )
            .unwrap();
        let (out, _, _, end) = collect(rx).await;
        // SAFETY: geteuid/getegid have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        // Only root can switch users; others run commands as themselves.
        let (uid, gid) = if euid == 0 {
            (65534, 65534)
        } else {
            (euid, egid)
        };
        let want = format!("{uid}\n{gid}\nnobody {}\n", dir.path().display());
        assert_eq!(String::from_utf8_lossy(&out), want);
        assert_eq!(end.exit_code, 0);
    }

    #[test]
    fn end_events_read_like_envd() {
        let e = end_event(Ok(std::process::ExitStatus::from_raw(0)));
        assert_eq!((e.exit_code, e.exited, e.error), (0, true, None));
        assert_eq!(e.status, "exit status 0");
        let k = end_event(Ok(std::process::ExitStatus::from_raw(libc::SIGTERM)));
        assert_eq!(k.status, "signal: terminated");
        assert_eq!(k.exit_code, -1);
    }
}
