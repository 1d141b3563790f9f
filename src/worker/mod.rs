//! Sandbox worker processes: one per running sandbox, each owning one VM.
//!
//! This module owns both sides of the server↔worker link:
//! - [`run_worker`]: the worker process's main loop (`stasis worker --socket
//!   PATH`). It connects to the server's socket, serves [`protocol`] requests
//!   one at a time and makes every VM call through [`vm`]. It never outlives
//!   the server: `PR_SET_PDEATHSIG(SIGKILL)` at start, and exit on socket EOF.
//! - [`client::WorkerClient`]: the server's async handle on a worker it
//!   spawned: request/reply with ids, death detection, kill.
//!
//! KVM work never happens in the server process: only here, in the worker,
//! on plain threads.

pub(crate) mod agent_box;
pub mod client;
pub mod protocol;
pub(crate) mod vm;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::{Reply, ReplyFrame, Request, RequestFrame, MAX_FRAME};
use vm::VmBackend;

/// Environment variable through which the server tells the worker its pid, so
/// the worker can detect that the server died before `PR_SET_PDEATHSIG` was in
/// place.
pub const PARENT_PID_ENV: &str = "STASIS_WORKER_PARENT_PID";

/// Exit code of a worker whose guest stopped on its own.
pub const EXIT_GUEST_STOPPED: i32 = 3;

/// Fault injection for the tests, read only here, in the worker process:
/// `STASIS_FAULT=abort-after-resume` makes the worker abort (SIGABRT) right
/// after it answered a successful restore, as a stasis bug would. Used by
/// the nested tests to show that such a failure is never retried as a fault
/// of the emulated machine (tests/nested/support.rs). Unset in production.
pub const FAULT_ENV: &str = "STASIS_FAULT";

fn fault_abort_after_resume() -> bool {
    std::env::var(FAULT_ENV).is_ok_and(|v| v == "abort-after-resume")
}

/// `STASIS_FAULT=hold-pause-write:NAME` holds an asynchronous pause's
/// background write (before it starts) until the file NAME exists, so the
/// tests can act while a snapshot is not yet durable. A relative NAME is in
/// the sandbox's directory (the snapshot directory's parent): the one host
/// directory a jailed worker sees. Unset in production.
const FAULT_HOLD_PAUSE_WRITE: &str = "hold-pause-write:";

fn fault_hold_pause_write(cancel: &AtomicBool, snapshot_dir: &Path) {
    let Some(name) = std::env::var(FAULT_ENV)
        .ok()
        .and_then(|v| v.strip_prefix(FAULT_HOLD_PAUSE_WRITE).map(PathBuf::from))
    else {
        return;
    };
    let path = match snapshot_dir.parent() {
        Some(sandbox) if name.is_relative() => sandbox.join(name),
        _ => name,
    };
    eprintln!(
        "stasis worker: {FAULT_ENV}: holding the snapshot write until {} exists",
        path.display()
    );
    // Bounded: an injected fault must never hang a worker for ever.
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while !path.exists() && !cancel.load(Ordering::Acquire) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `STASIS_FAULT=fail-pause-write:NAME` makes a snapshot write fail (as
/// a full disk would: stopped after it started, nothing committed) while
/// the file NAME exists; a relative NAME is in the sandbox's directory, as
/// for `hold-pause-write`. Unset in production.
const FAULT_FAIL_PAUSE_WRITE: &str = "fail-pause-write:";

/// The cancel flag, already set, that makes the write into `snapshot_dir`
/// fail, if [`FAULT_FAIL_PAUSE_WRITE`] says so.
pub(crate) fn fault_fail_pause_write(snapshot_dir: &Path) -> Option<Arc<AtomicBool>> {
    let name = std::env::var(FAULT_ENV)
        .ok()
        .and_then(|v| v.strip_prefix(FAULT_FAIL_PAUSE_WRITE).map(PathBuf::from))?;
    let path = match snapshot_dir.parent() {
        Some(sandbox) if name.is_relative() => sandbox.join(name),
        _ => name,
    };
    if !path.exists() {
        return None;
    }
    eprintln!(
        "stasis worker: {FAULT_ENV}: failing the snapshot write into {} (injected fault)",
        snapshot_dir.display()
    );
    Some(Arc::new(AtomicBool::new(true)))
}

/// A background write's outcome once it ended (bytes on disk, or why
/// not), and the condition variable that announces it.
type WriteDone = (Mutex<Option<Result<u64, String>>>, std::sync::Condvar);

/// An asynchronous pause's background snapshot write.
struct BgWrite {
    /// Set to abandon the write (resume from memory).
    cancel: Arc<AtomicBool>,
    /// Its outcome once it ended: bytes on disk, or why not.
    done: Arc<WriteDone>,
}

impl BgWrite {
    /// Waits for the write to end; its outcome.
    fn wait(done: &WriteDone) -> Result<u64, String> {
        let (m, cv) = done;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Errors of the worker and of the server's worker client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("worker protocol error: {0}")]
    Protocol(String),
    #[error("vm: {0}")]
    Vm(String),
    #[error("worker is gone: {0}")]
    WorkerGone(String),
    #[error("worker did not answer {0} in time")]
    Timeout(&'static str),
    #[error("worker failed: {0}")]
    Remote(String),
    #[error("the server process is gone")]
    ParentGone,
}

fn set_parent_death_signal() -> Result<(), Error> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no
    // memory of ours.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(Error::Io(
            "prctl(PR_SET_PDEATHSIG)".into(),
            std::io::Error::last_os_error(),
        ));
    }
    if let Some(expected) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
    {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != expected {
            return Err(Error::ParentGone);
        }
    }
    Ok(())
}

/// The worker process's entry point: serve the server at `socket` until told
/// to stop, the server goes away, or the guest stops.
pub fn run_worker(socket: &Path) -> Result<(), Error> {
    set_parent_death_signal()?;
    let stream = UnixStream::connect(socket)
        .map_err(|e| Error::Io(format!("connect to {}", socket.display()), e))?;
    serve(stream)
}

/// The jailed worker's entry point (`stasis worker --socket PATH --jail
/// JSON`): connect to the server while still root, enter the jail
/// ([`crate::jail::enter`]), then serve as [`run_worker`] does. The process
/// the server started stays outside as the keeper and exits as the jailed
/// worker does. If the jail cannot be entered, the first request is
/// answered with the reason and the worker exits.
pub fn run_worker_jailed(socket: &Path, spec: &str) -> Result<(), Error> {
    set_parent_death_signal()?;
    let spec: crate::jail::JailSpec =
        serde_json::from_str(spec).map_err(|e| Error::Protocol(format!("bad --jail spec: {e}")))?;
    let stream = UnixStream::connect(socket)
        .map_err(|e| Error::Io(format!("connect to {}", socket.display()), e))?;
    match crate::jail::enter(&spec) {
        Ok(crate::jail::Entered::Keeper(child)) => {
            drop(stream);
            crate::jail::keep(child)
        }
        Ok(crate::jail::Entered::Jailed) => serve(stream),
        Err(e) => {
            let msg = format!("entering the jail failed: {}", crate::error_chain(&e));
            eprintln!("stasis worker: {msg}");
            refuse(stream, &msg);
            Err(Error::Vm(msg))
        }
    }
}

/// Answers the first request with `message` (a worker that cannot serve).
fn refuse(stream: UnixStream, message: &str) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut line = Vec::new();
    if BufReader::new(stream)
        .take(MAX_FRAME)
        .read_until(b'\n', &mut line)
        .is_err()
    {
        return;
    }
    if let Ok(frame) = serde_json::from_slice::<RequestFrame>(&line) {
        let reply = ReplyFrame {
            id: frame.id,
            reply: Reply::Error {
                message: message.to_string(),
            },
        };
        if let Ok(out) = protocol::encode(&reply) {
            let _ = writer.write_all(&out);
        }
    }
}

/// Jail tests: runs one probe from inside the worker, if the worker was
/// started with `STASIS_FAULT=jail-probe`. Ops: `read:PATH` (read a file),
/// `write:PATH` (create a file), `exec:PATH` (execve: seccomp kills the
/// jailed worker), `ioctl-kvm` (an allowed ioctl on /dev/kvm),
/// `ioctl-tty` (`TIOCSTI`: not on the allowlist, kills the jailed worker),
/// `alloc:MIB` (allocate and touch memory), `env` (the environment),
/// `id` (uid, gid, pid, effective capabilities, hostname).
fn probe(op: &str) -> Reply {
    if std::env::var(FAULT_ENV).ok().as_deref() != Some("jail-probe") {
        return Reply::Error {
            message: "probes are disabled".into(),
        };
    }
    let outcome = run_probe(op);
    Reply::Probe { outcome }
}

fn run_probe(op: &str) -> String {
    let res = |r: std::io::Result<String>| match r {
        Ok(s) => format!("ok: {s}"),
        Err(e) => format!("error: {e}"),
    };
    if let Some(p) = op.strip_prefix("read:") {
        return res(std::fs::read(p).map(|b| format!("{} bytes", b.len())));
    }
    if let Some(p) = op.strip_prefix("write:") {
        return res(std::fs::write(p, b"probe").map(|()| "written".into()));
    }
    if let Some(p) = op.strip_prefix("exec:") {
        let Ok(path) = std::ffi::CString::new(p) else {
            return "error: bad path".into();
        };
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated path, null-terminated argv/envp arrays that
        // outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        return res(Err(std::io::Error::last_os_error()));
    }
    if op == "ioctl-kvm" {
        use std::os::fd::AsRawFd;
        return res(std::fs::File::open("/dev/kvm").and_then(|f| {
            // SAFETY: KVM_GET_API_VERSION takes no argument.
            let v = unsafe { libc::ioctl(f.as_raw_fd(), 0xAE00, 0) };
            if v < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(format!("KVM API {v}"))
            }
        }));
    }
    if op == "ioctl-tty" {
        let c: u8 = b'x';
        // SAFETY: TIOCSTI reads one byte from a valid pointer.
        let rc = unsafe { libc::ioctl(2, libc::TIOCSTI, &c as *const u8) };
        return if rc < 0 {
            res(Err(std::io::Error::last_os_error()))
        } else {
            "ok: TIOCSTI accepted".into()
        };
    }
    if let Some(m) = op.strip_prefix("alloc:") {
        let Ok(mib) = m.parse::<usize>() else {
            return "error: bad size".into();
        };
        let mut v = vec![0u8; mib << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        let touched = v.iter().step_by(4096).filter(|b| **b == 1).count();
        return format!("ok: touched {touched} pages");
    }
    if op == "env" {
        let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        return format!("ok: {}", vars.join(","));
    }
    if op == "id" {
        // SAFETY: none of these calls has preconditions.
        let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        return format!(
            "ok: uid={uid} gid={gid} pid={pid} capeff={:?} host={}",
            crate::jail::effective_caps(),
            host.trim()
        );
    }
    format!("error: unknown probe {op:?}")
}

type SharedVm = Arc<Mutex<Option<Box<dyn VmBackend>>>>;

fn lock(vm: &SharedVm) -> std::sync::MutexGuard<'_, Option<Box<dyn VmBackend>>> {
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves one connection: requests in, one reply each, in order.
fn serve(stream: UnixStream) -> Result<(), Error> {
    let writer = Arc::new(Mutex::new(
        stream
            .try_clone()
            .map_err(|e| Error::Io("clone socket".into(), e))?,
    ));
    let mut reader = BufReader::new(stream);
    let vm: SharedVm = Arc::new(Mutex::new(None));
    let stopping = Arc::new(AtomicBool::new(false));
    spawn_monitor(vm.clone(), stopping.clone());
    let mut bg: Option<BgWrite> = None;

    let result = loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_FRAME)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::Io("read request".into(), e));
        match n {
            Err(e) => break Err(e),
            Ok(0) => break Ok(()), // server closed the socket
            Ok(_) if line.last() != Some(&b'\n') => {
                break Err(Error::Protocol(
                    "request frame too long or truncated".into(),
                ))
            }
            Ok(_) => {}
        }
        let frame: RequestFrame = match serde_json::from_slice(&line) {
            Ok(f) => f,
            Err(e) => break Err(Error::Protocol(format!("bad request frame: {e}"))),
        };
        let restore = matches!(frame.request, Request::Restore { .. });
        if let (Request::AwaitDurable, Some(w)) = (&frame.request, bg.as_ref()) {
            // Answered when the write ends, from its own thread, so that a
            // resume from memory meanwhile is served at once (replies are
            // matched by id).
            let (done, writer, id) = (w.done.clone(), writer.clone(), frame.id);
            std::thread::spawn(move || {
                let reply = match BgWrite::wait(&done) {
                    Ok(snapshot_bytes) => Reply::Durable { snapshot_bytes },
                    Err(message) => Reply::Error { message },
                };
                if let Ok(out) = protocol::encode(&ReplyFrame { id, reply }) {
                    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = w.write_all(&out).and_then(|_| w.flush());
                }
            });
            continue;
        }
        let (reply, exit_after) = match frame.request {
            Request::PauseBackground { .. } | Request::AwaitDurable | Request::ResumeFromMemory => {
                handle_background(&vm, &stopping, &mut bg, frame.request)
            }
            other => handle(&vm, &stopping, other),
        };
        let inject_abort =
            restore && matches!(reply, Reply::Running { .. }) && fault_abort_after_resume();
        let out = protocol::encode(&ReplyFrame {
            id: frame.id,
            reply,
        })
        .map_err(|e| Error::Protocol(e.to_string()))?;
        let written = {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&out).and_then(|_| w.flush())
        };
        if let Err(e) = written {
            break Err(Error::Io("write reply".into(), e));
        }
        if inject_abort {
            eprintln!("stasis worker: {FAULT_ENV}=abort-after-resume: aborting (injected fault)");
            std::process::abort();
        }
        if exit_after {
            break Ok(());
        }
    };
    stopping.store(true, Ordering::Release);
    if let Some(v) = lock(&vm).take() {
        v.kill();
    }
    result
}

fn handle(vm: &SharedVm, stopping: &AtomicBool, req: Request) -> (Reply, bool) {
    let err = |e: Error| Reply::Error {
        message: e.to_string(),
    };
    match req {
        Request::Boot { backend, config } => {
            let mut slot = lock(vm);
            if slot.is_some() {
                return (
                    err(Error::Protocol("a vm is already running".into())),
                    false,
                );
            }
            match vm::boot(backend, &config) {
                Ok(v) => {
                    let guest = v.guest();
                    let memory_backing = v.memory_backing();
                    *slot = Some(v);
                    (
                        Reply::Running {
                            guest,
                            memory_backing,
                        },
                        false,
                    )
                }
                Err(e) => (err(e), false),
            }
        }
        Request::Restore {
            backend,
            snapshot_dir,
            mode,
            console,
            vsock,
            disk_base,
            own_overlay,
            memory_backing,
            net,
            track_writes,
        } => {
            let mut slot = lock(vm);
            if slot.is_some() {
                return (
                    err(Error::Protocol("a vm is already running".into())),
                    false,
                );
            }
            let paths = vm::RestorePaths {
                vsock: vsock.as_deref(),
                disk_base: disk_base.as_deref(),
                own_overlay: own_overlay.as_deref(),
                netns: net.as_ref().map(|n| n.netns.as_path()),
            };
            match vm::restore_backed(
                backend,
                &snapshot_dir,
                mode,
                &console,
                paths,
                memory_backing,
                track_writes,
            ) {
                Ok(v) => {
                    let guest = v.guest();
                    let memory_backing = v.memory_backing();
                    *slot = Some(v);
                    (
                        Reply::Running {
                            guest,
                            memory_backing,
                        },
                        false,
                    )
                }
                Err(e) => (err(e), false),
            }
        }
        Request::Pause {
            snapshot_dir,
            incremental,
        } => {
            let mut slot = lock(vm);
            let Some(v) = slot.as_mut() else {
                return (err(Error::Protocol("no vm to pause".into())), false);
            };
            v.set_incremental(incremental);
            stopping.store(true, Ordering::Release);
            match v.pause_and_snapshot(&snapshot_dir) {
                Ok(guest) => {
                    if let Some(v) = slot.take() {
                        v.kill();
                    }
                    let snapshot_bytes = vm::dir_usage(&snapshot_dir).allocated;
                    (
                        Reply::Paused {
                            snapshot_bytes,
                            guest,
                        },
                        true,
                    )
                }
                Err(e) => {
                    stopping.store(false, Ordering::Release);
                    (err(e), false)
                }
            }
        }
        Request::Status => {
            let slot = lock(vm);
            match slot.as_ref() {
                Some(v) => {
                    let exit_reason = v.exited();
                    (
                        Reply::Status {
                            alive: exit_reason.is_none(),
                            exit_reason,
                            guest: v.guest(),
                        },
                        false,
                    )
                }
                None => (
                    Reply::Status {
                        alive: false,
                        exit_reason: Some("no vm".into()),
                        guest: None,
                    },
                    false,
                ),
            }
        }
        Request::PauseBackground { .. } | Request::AwaitDurable | Request::ResumeFromMemory => (
            err(Error::Protocol(
                "asynchronous pause request out of place".into(),
            )),
            false,
        ),
        Request::Probe { probe: op } => (probe(&op), false),
        Request::Shutdown => {
            stopping.store(true, Ordering::Release);
            if let Some(v) = lock(vm).take() {
                v.kill();
            }
            (Reply::ShuttingDown, true)
        }
    }
}

/// The asynchronous pause's requests (see [`Request::PauseBackground`]).
fn handle_background(
    vm: &SharedVm,
    stopping: &AtomicBool,
    bg: &mut Option<BgWrite>,
    req: Request,
) -> (Reply, bool) {
    let err = |message: String| Reply::Error { message };
    match req {
        Request::PauseBackground {
            snapshot_dir,
            incremental,
        } => {
            if bg.is_some() {
                return (err("a pause is already in progress".into()), false);
            }
            let guest = {
                let mut slot = lock(vm);
                let Some(v) = slot.as_mut() else {
                    return (err("no vm to pause".into()), false);
                };
                if !v.splits_pause() {
                    drop(slot);
                    return handle(
                        vm,
                        stopping,
                        Request::Pause {
                            snapshot_dir,
                            incremental,
                        },
                    );
                }
                v.set_incremental(incremental);
                stopping.store(true, Ordering::Release);
                match v.pause_vcpus() {
                    Ok(g) => g,
                    Err(e) => {
                        stopping.store(false, Ordering::Release);
                        return (err(e.to_string()), false);
                    }
                }
            };
            let writer_vm = vm.clone();
            let cancel = Arc::new(AtomicBool::new(false));
            let done = Arc::new((Mutex::new(None), std::sync::Condvar::new()));
            let (cancel2, done2) = (cancel.clone(), done.clone());
            let thread = std::thread::Builder::new()
                .name("snapshot-writer".into())
                .spawn(move || {
                    let write = || {
                        fault_hold_pause_write(&cancel2, &snapshot_dir);
                        if cancel2.load(Ordering::Acquire) {
                            return Err("the write was abandoned (resumed from memory)".to_string());
                        }
                        let mut slot = lock(&writer_vm);
                        let Some(v) = slot.as_mut() else {
                            return Err("the vm is gone".to_string());
                        };
                        v.write_paused(&snapshot_dir, cancel2.clone())
                            .map_err(|e| e.to_string())?;
                        Ok(vm::dir_usage(&snapshot_dir).allocated)
                    };
                    let res = write();
                    let (m, cv) = &*done2;
                    *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(res);
                    cv.notify_all();
                });
            match thread {
                Ok(_) => {
                    *bg = Some(BgWrite { cancel, done });
                    (Reply::PausedWriting { guest }, false)
                }
                Err(e) => {
                    let resumed = lock(vm).as_mut().map(|v| v.resume_vcpus());
                    stopping.store(false, Ordering::Release);
                    (
                        err(format!(
                            "starting the snapshot writer failed: {e} (resumed: {})",
                            matches!(resumed, Some(Ok(())))
                        )),
                        false,
                    )
                }
            }
        }
        Request::AwaitDurable => match bg.as_ref() {
            None => (err("no background snapshot write".into()), false),
            Some(w) => match BgWrite::wait(&w.done) {
                Ok(snapshot_bytes) => (Reply::Durable { snapshot_bytes }, false),
                Err(e) => (err(e), false),
            },
        },
        Request::ResumeFromMemory => {
            let Some(w) = bg.take() else {
                return (err("no paused vm to resume from memory".into()), false);
            };
            // The write is abandoned at its next chunk (a write that already
            // ended stays: a complete snapshot of the state resumed from).
            w.cancel.store(true, Ordering::Release);
            let _ = BgWrite::wait(&w.done);
            let mut slot = lock(vm);
            let Some(v) = slot.as_mut() else {
                return (err("the vm is gone".into()), false);
            };
            match v.resume_vcpus() {
                Ok(()) => {
                    stopping.store(false, Ordering::Release);
                    (
                        Reply::Running {
                            guest: v.guest(),
                            memory_backing: v.memory_backing(),
                        },
                        false,
                    )
                }
                Err(e) => (err(e.to_string()), false),
            }
        }
        other => handle(vm, stopping, other),
    }
}

/// Exits the worker when the guest stops on its own, so the server sees EOF
/// and marks the sandbox gone.
fn spawn_monitor(vm: SharedVm, stopping: Arc<AtomicBool>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        if stopping.load(Ordering::Acquire) {
            continue;
        }
        let reason = lock(&vm).as_ref().and_then(|v| v.exited());
        if let Some(reason) = reason {
            if !stopping.load(Ordering::Acquire) {
                eprintln!("stasis worker: guest stopped: {reason}");
                std::process::exit(EXIT_GUEST_STOPPED);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::protocol::*;
    use super::*;

    fn roundtrip(
        w: &mut UnixStream,
        r: &mut BufReader<UnixStream>,
        id: u64,
        req: Request,
    ) -> ReplyFrame {
        w.write_all(&encode(&RequestFrame { id, request: req }).unwrap())
            .unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// A worker loop on one end of a socket pair: its thread, and the
    /// other end to write requests to and read replies from.
    fn start_worker_loop() -> (
        std::thread::JoinHandle<Result<(), Error>>,
        UnixStream,
        BufReader<UnixStream>,
    ) {
        let (server, worker) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve(worker));
        let w = server.try_clone().unwrap();
        (t, w, BufReader::new(server))
    }

    /// A 64 MiB test-guest boot, for the fake backend.
    fn fake_boot_config() -> BootConfig {
        BootConfig {
            kernel: KernelSpec::TestGuest,
            initrd: None,
            cmdline: String::new(),
            mem_bytes: 1 << 26,
            vcpus: 1,
            console: ConsoleSpec::Sink,
            disk: None,
            vsock: None,
            interpreter: None,
            memory_backing: Default::default(),
            net: None,
        }
    }

    #[test]
    fn worker_loop_boot_status_pause() {
        let (t, mut w, mut r) = start_worker_loop();
        let cfg = fake_boot_config();
        let rep = roundtrip(
            &mut w,
            &mut r,
            1,
            Request::Boot {
                backend: BackendKind::Fake,
                config: cfg.clone(),
            },
        );
        assert_eq!(rep.id, 1);
        assert!(matches!(rep.reply, Reply::Running { .. }));
        let rep = roundtrip(
            &mut w,
            &mut r,
            2,
            Request::Boot {
                backend: BackendKind::Fake,
                config: cfg,
            },
        );
        assert!(matches!(rep.reply, Reply::Error { .. }));
        let rep = roundtrip(&mut w, &mut r, 3, Request::Status);
        assert!(matches!(rep.reply, Reply::Status { alive: true, .. }));
        let tmp = tempfile::tempdir().unwrap();
        let rep = roundtrip(
            &mut w,
            &mut r,
            4,
            Request::Pause {
                snapshot_dir: tmp.path().join("s"),
                incremental: false,
            },
        );
        assert_eq!(rep.id, 4);
        assert!(matches!(rep.reply, Reply::Paused { snapshot_bytes, .. } if snapshot_bytes > 0));
        // The worker exits after a pause.
        assert!(t.join().unwrap().is_ok());
    }

    /// The fake backend cannot split a pause: `pause_background` writes the
    /// snapshot first and answers `paused`, then the worker exits; the
    /// asynchronous pause's follow-ups without one are errors.
    #[test]
    fn fake_background_pause_is_a_synchronous_one() {
        let (t, mut w, mut r) = start_worker_loop();
        let cfg = fake_boot_config();
        let boot = Request::Boot {
            backend: BackendKind::Fake,
            config: cfg,
        };
        assert!(matches!(
            roundtrip(&mut w, &mut r, 1, boot).reply,
            Reply::Running { .. }
        ));
        for (id, req) in [(2, Request::AwaitDurable), (3, Request::ResumeFromMemory)] {
            let rep = roundtrip(&mut w, &mut r, id, req);
            assert_eq!(rep.id, id);
            assert!(matches!(rep.reply, Reply::Error { .. }), "{rep:?}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let rep = roundtrip(
            &mut w,
            &mut r,
            4,
            Request::PauseBackground {
                snapshot_dir: dir.clone(),
                incremental: true,
            },
        );
        assert!(matches!(rep.reply, Reply::Paused { snapshot_bytes, .. } if snapshot_bytes > 0));
        assert!(dir.is_dir());
        assert!(t.join().unwrap().is_ok());
    }

    #[test]
    fn worker_exits_on_eof_and_rejects_garbage() {
        let (server, worker) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve(worker));
        drop(server);
        assert!(t.join().unwrap().is_ok());

        let (mut server, worker) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve(worker));
        server.write_all(b"{not json}\n").unwrap();
        assert!(matches!(t.join().unwrap(), Err(Error::Protocol(_))));
    }
}
