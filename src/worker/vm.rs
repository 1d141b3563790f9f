//! Every call the worker makes into a VM lives here, behind [`VmBackend`].
//!
//! Two implementations:
//! - [`FakeVm`]: a thread that counts "rounds" like the built-in test guest's
//!   endless workload; pause writes the counter into the snapshot directory
//!   (atomically: a temporary directory renamed into place) and restore reads
//!   it back and continues. It lets the server, the worker and the SDK path be
//!   tested without KVM.
//! - `RealVm`: calls `stasis::vmm::Vm`; its VM runs on this worker's own
//!   vCPU threads, never on the server's async runtime.
//!
//! The fake understands two extra kernel-command-line words, for tests:
//! `stasis.fake.pause_ms=N` (pause takes N ms) and `stasis.fake.fail=boot`
//! (boot fails).
//!
//! Agent templates (a `vsock` socket in the boot config) get a **host agent**
//! with the fake backend: `stasis-envd` (the binary next to this one, or
//! `$STASIS_ENVD_BIN`) confined by bwrap as `user` with `<dir>/root` as its
//! home ([`super::agent_box`]), in its own session, a
//! child subreaper (so every process it starts stays in its process tree,
//! whatever sessions or groups they make), its pid in `<dir>/agent.pid`
//! ([`AGENT_PID_FILE`]). Pause SIGSTOPs the whole tree (its processes keep
//! their memory) and hands it over to the snapshot; the worker exits but the
//! stopped tree lives on; restore SIGCONTs it; kill SIGKILLs it. Whoever
//! removes a paused sandbox calls [`kill_host_agent`].

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::protocol::{BackendKind, BootConfig, ConsoleSpec, GuestProgress, RestoreModeSpec};
use super::Error;

/// A running VM as the worker sees it.
pub(crate) trait VmBackend: Send {
    /// Stops the vCPUs and writes a snapshot to `dir` (which must not exist;
    /// it appears atomically). On error the VM is running again.
    fn pause_and_snapshot(&mut self, dir: &Path) -> Result<Option<GuestProgress>, Error>;
    /// `Some(reason)` once the guest stopped on its own.
    fn exited(&self) -> Option<String>;
    /// Test-guest progress, if the guest reports any.
    fn guest(&self) -> Option<GuestProgress>;
    /// Kills the VM.
    fn kill(self: Box<Self>);
    /// The guest memory backing in use (real VMs only).
    fn memory_backing(&self) -> Option<crate::vmm::memory::MemoryBacking> {
        None
    }
    /// Whether [`Self::pause_vcpus`], [`Self::write_paused`] and
    /// [`Self::resume_vcpus`] work (asynchronous pause); if not, the worker
    /// pauses synchronously.
    fn splits_pause(&self) -> bool {
        false
    }
    /// Stops the vCPUs (the VM state is then fixed); returns the guest's
    /// progress.
    fn pause_vcpus(&mut self) -> Result<Option<GuestProgress>, Error> {
        Err(Error::Vm("this backend pauses only with a snapshot".into()))
    }
    /// Writes the paused VM's snapshot to `dir` (which must not exist; it
    /// appears atomically), unless `cancel` is set before it is done (then
    /// an error, and nothing that loads as a snapshot). The VM stays paused.
    fn write_paused(&mut self, _dir: &Path, _cancel: Arc<AtomicBool>) -> Result<(), Error> {
        Err(Error::Vm("this backend pauses only with a snapshot".into()))
    }
    /// Continues the paused vCPUs.
    fn resume_vcpus(&mut self) -> Result<(), Error> {
        Err(Error::Vm("this backend pauses only with a snapshot".into()))
    }
    /// Whether the next snapshot may be an incremental layer (real VMs
    /// resumed with write tracking; others always write full snapshots).
    fn set_incremental(&mut self, _on: bool) {}
}

/// Boots a VM with the chosen backend.
pub(crate) fn boot(backend: BackendKind, cfg: &BootConfig) -> Result<Box<dyn VmBackend>, Error> {
    match backend {
        BackendKind::Fake => Ok(Box::new(FakeVm::boot(cfg)?)),
        BackendKind::Vm => real::boot(cfg),
    }
}

/// Host paths of a restore, from the request.
pub(crate) use crate::vmm::RestorePaths;

/// Restores a VM from `dir` with the chosen backend on `auto` memory.
#[cfg(test)]
pub(crate) fn restore(
    backend: BackendKind,
    dir: &Path,
    mode: RestoreModeSpec,
    console: &ConsoleSpec,
    paths: RestorePaths<'_>,
) -> Result<Box<dyn VmBackend>, Error> {
    restore_backed(
        backend,
        dir,
        mode,
        console,
        paths,
        crate::vmm::memory::MemoryBacking::Auto,
        false,
    )
}

/// Restores a VM from `dir` with the chosen backend, onto guest memory of
/// the given backing (the fake backend ignores it); with
/// `paths.own_overlay`, from a reusable snapshot that is left untouched;
/// with `paths.netns`, a saved network device's tap is opened there (real
/// VMM only); with `track_writes`, the guest's writes are tracked for an
/// incremental pause (real VMM only).
pub(crate) fn restore_backed(
    backend: BackendKind,
    dir: &Path,
    mode: RestoreModeSpec,
    console: &ConsoleSpec,
    paths: RestorePaths<'_>,
    backing: crate::vmm::memory::MemoryBacking,
    track_writes: bool,
) -> Result<Box<dyn VmBackend>, Error> {
    match (backend, paths.own_overlay) {
        (BackendKind::Fake, None) => Ok(Box::new(FakeVm::restore(dir, paths.vsock)?)),
        (BackendKind::Fake, Some(_)) => {
            Ok(Box::new(FakeVm::restore_fork(dir, paths.vsock, console)?))
        }
        (BackendKind::Vm, _) => real::restore(dir, mode, console, paths, backing, track_writes),
    }
}

/// What a snapshot directory's regular files take, counted two ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirUsage {
    /// Bytes the filesystem allocated to them (`st_blocks` × 512): what
    /// the snapshot costs on disk. A sparse memory file's holes (pages that
    /// were zero or never touched) cost nothing.
    pub allocated: u64,
    /// The sum of their lengths (`st_size`): a sparse memory file counts
    /// as the guest's whole RAM.
    pub apparent: u64,
}

impl std::ops::Add for DirUsage {
    type Output = DirUsage;
    fn add(self, o: DirUsage) -> DirUsage {
        DirUsage {
            allocated: self.allocated.saturating_add(o.allocated),
            apparent: self.apparent.saturating_add(o.apparent),
        }
    }
}

/// [`DirUsage`] of the regular files under `dir` (recursively; symbolic
/// links are not followed). A missing directory uses nothing.
pub fn dir_usage(dir: &Path) -> DirUsage {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = fs::read_dir(dir) else {
        return DirUsage::default();
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_usage(&e.path()),
            Ok(t) if t.is_file() => e
                .metadata()
                .map(|m| DirUsage {
                    allocated: m.blocks().saturating_mul(512),
                    apparent: m.len(),
                })
                .unwrap_or_default(),
            _ => DirUsage::default(),
        })
        .fold(DirUsage::default(), |a, b| a + b)
}

/// The guest's progress as its snapshot in `dir` holds it: the test
/// guest's status page read from the snapshot's memory file (the memory the
/// guest resumes with), or the fake guest's saved counter. `None` when the
/// snapshot has none (a guest that publishes no status page, such as
/// Linux) or cannot be read. This is how a paused sandbox's round is known
/// without trusting a value stored at pause time.
pub fn snapshot_guest(backend: BackendKind, dir: &Path) -> Option<GuestProgress> {
    match backend {
        BackendKind::Fake => {
            let bytes = fs::read(dir.join(FAKE_STATE_FILE)).ok()?;
            let st: FakeState = serde_json::from_slice(&bytes).ok()?;
            Some(GuestProgress {
                round: st.round,
                acc: st.acc,
            })
        }
        BackendKind::Vm => real::snapshot_guest(dir),
    }
}

const FAKE_STATE_FILE: &str = "fake-vm.json";
/// How long the fake guest takes for one round.
const FAKE_ROUND: Duration = Duration::from_millis(2);

#[derive(Serialize, Deserialize)]
struct FakeState {
    round: u64,
    acc: u64,
    cmdline: String,
    /// The stopped host agent (root of its process tree), for agent templates.
    #[serde(default)]
    agent: Option<AgentState>,
}

#[derive(Serialize, Deserialize)]
struct AgentState {
    pid: i32,
    vsock: PathBuf,
}

/// File in the sandbox directory (the vsock socket's directory) holding the
/// host agent's pid.
pub const AGENT_PID_FILE: &str = "agent.pid";
/// Overrides where the worker finds the host agent binary.
pub const AGENT_BIN_ENV: &str = "STASIS_ENVD_BIN";

/// The host agent run for a fake agent sandbox (the root of a process
/// tree: the agent and every process it started).
struct HostAgent {
    pid: i32,
    vsock: PathBuf,
    /// Set when this worker spawned it (so it can be reaped).
    child: Option<std::process::Child>,
}

fn signal(pid: i32, sig: libc::c_int) -> std::io::Result<()> {
    if pid <= 1 {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill(2) on a process of a host agent's tree (callers checked
    // the root's identity); touches no memory.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `(pid, ppid, state)` of every process, from `/proc/*/stat`.
fn all_processes() -> Vec<(i32, i32, char)> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
            let state = rest.next()?.chars().next()?;
            let ppid = rest.next()?.parse().ok()?;
            Some((pid, ppid, state))
        })
        .collect()
}

/// The processes below `root` (not `root` itself), with their states.
fn descendants(root: i32) -> Vec<(i32, char)> {
    let procs = all_processes();
    let mut out: Vec<(i32, char)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid, state) in &procs {
            if ppid == p && pid != root && !out.iter().any(|(q, _)| *q == pid) {
                out.push((pid, state));
                frontier.push(pid);
            }
        }
    }
    out
}

fn is_stopped_or_dead(state: Option<char>) -> bool {
    matches!(state, None | Some('T' | 't' | 'Z' | 'X'))
}

/// SIGSTOPs `root`, then its descendants until a scan finds none running
/// (a stopped process cannot fork, so this converges), and waits (bounded)
/// until all are stopped.
fn stop_tree(root: i32) -> Result<(), Error> {
    signal(root, libc::SIGSTOP).map_err(|e| Error::Io("stopping the host agent".into(), e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let running: Vec<i32> = descendants(root)
            .into_iter()
            .filter(|(_, st)| !is_stopped_or_dead(Some(*st)))
            .map(|(p, _)| p)
            .collect();
        for &p in &running {
            let _ = signal(p, libc::SIGSTOP);
        }
        let root_state = proc_state(root);
        if matches!(root_state, None | Some('Z' | 'X')) {
            return Err(Error::Vm("the host agent exited".into()));
        }
        if running.is_empty() && is_stopped_or_dead(root_state) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            cont_tree(root);
            return Err(Error::Vm("the host agent's processes did not stop".into()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGCONTs `root` and its descendants.
fn cont_tree(root: i32) {
    for (p, _) in descendants(root) {
        let _ = signal(p, libc::SIGCONT);
    }
    let _ = signal(root, libc::SIGCONT);
}

/// Freezes the tree (so nothing forks meanwhile), then SIGKILLs all of it.
fn kill_tree(root: i32) {
    let _ = stop_tree(root);
    for (p, _) in descendants(root) {
        let _ = signal(p, libc::SIGKILL);
    }
    let _ = signal(root, libc::SIGKILL);
}

/// Whether `pid` runs a host agent serving `vsock` (checked through its
/// command line, so a recycled pid is never signalled).
pub(crate) fn is_host_agent(pid: i32, vsock: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = vsock.as_os_str().as_encoded_bytes();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    super::agent_box::is_box_for(&args, vsock)
        || args
            .windows(2)
            .any(|w| w[0] == b"--uds".as_slice() && w[1] == want)
}

/// Kills the host agent of the sandbox whose vsock socket is `vsock`, if one
/// runs (paused or not). Used when a sandbox is removed without a worker.
pub(crate) fn kill_host_agent(vsock: &Path) {
    let Some(dir) = vsock.parent() else { return };
    let Ok(text) = fs::read_to_string(dir.join(AGENT_PID_FILE)) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    if is_host_agent(pid, vsock) {
        kill_tree(pid);
    }
}

/// The process state letter of `pid` (`R`, `S`, `T`, `Z`, ...).
fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn agent_exe() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(AGENT_BIN_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me =
        std::env::current_exe().map_err(|e| Error::Io("locating the stasis binary".into(), e))?;
    let exe = me.with_file_name("stasis-envd");
    if !exe.is_file() {
        return Err(Error::Vm(format!(
            "the agent binary {} does not exist (build it with `cargo build --release --bin stasis-envd`, or set {AGENT_BIN_ENV})",
            exe.display()
        )));
    }
    Ok(exe)
}

impl HostAgent {
    fn spawn(
        vsock: &Path,
        console: &ConsoleSpec,
        interpreter: Option<&str>,
    ) -> Result<Self, Error> {
        use std::os::unix::process::CommandExt;
        use std::process::Stdio;
        let dir = vsock
            .parent()
            .ok_or_else(|| Error::Vm(format!("vsock path {} has no directory", vsock.display())))?;
        let root = dir.join("root");
        fs::create_dir_all(&root)
            .map_err(|e| Error::Io(format!("create {}", root.display()), e))?;
        // The agent's stdout and stderr both go to the console.
        let open_log = || -> Result<Stdio, Error> {
            Ok(match console {
                ConsoleSpec::File(p) => fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map(Stdio::from)
                    .map_err(|e| Error::Io(format!("open {}", p.display()), e))?,
                ConsoleSpec::Stdout => Stdio::inherit(),
                ConsoleSpec::Sink => Stdio::null(),
            })
        };
        let (log, log2) = (open_log()?, open_log()?);
        let exe = agent_exe()?;
        let super::agent_box::Boxed { mut cmd, userns } =
            super::agent_box::command(&super::agent_box::Spec {
                agent_exe: &exe,
                vsock,
                home: &root,
                interpreter,
            })
            .map_err(|e| Error::Vm(crate::error_chain(&e)))?;
        // Its own session (and so process group): when this worker exits
        // after a pause, the stopped group must not count as orphaned within
        // our session, or the kernel would send it SIGHUP + SIGCONT. A child
        // subreaper (kept across exec): orphans of its commands stay in its
        // tree, where pause and kill find them.
        // The server's umask (077) is not the agent's: files its user makes
        // get ordinary modes, as in a VM.
        // SAFETY: setsid, prctl and umask are async-signal-safe and touch no
        // memory; they run in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o022);
                if libc::setsid() < 0
                    || libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| Error::Io(format!("start the host agent {}", exe.display()), e))?;
        // bwrap holds its own reference to the namespace now.
        drop(userns);
        let pid =
            i32::try_from(child.id()).map_err(|_| Error::Vm("agent pid out of range".into()))?;
        let agent = HostAgent {
            pid,
            vsock: vsock.to_path_buf(),
            child: Some(child),
        };
        let pid_file = dir.join(AGENT_PID_FILE);
        if let Err(e) = fs::write(&pid_file, format!("{pid}\n")) {
            agent.kill();
            return Err(Error::Io(format!("write {}", pid_file.display()), e));
        }
        Ok(agent)
    }

    /// Stops the agent and everything it started.
    fn stop(&self) -> Result<(), Error> {
        stop_tree(self.pid)
    }

    fn cont(&self) {
        cont_tree(self.pid);
    }

    fn kill(mut self) {
        kill_tree(self.pid);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

struct FakeShared {
    round: AtomicU64,
    acc: AtomicU64,
    stop: AtomicBool,
}

/// The fake VM: one thread advancing a counter (and, for agent templates,
/// a host agent).
pub(crate) struct FakeVm {
    shared: Arc<FakeShared>,
    thread: Option<JoinHandle<()>>,
    cmdline: String,
    pause_delay: Duration,
    agent: Option<HostAgent>,
}

fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl FakeVm {
    fn boot(cfg: &BootConfig) -> Result<Self, Error> {
        if cmdline_value(&cfg.cmdline, "stasis.fake.fail") == Some("boot") {
            return Err(Error::Vm("fake boot failure requested by cmdline".into()));
        }
        let seed = cmdline_value(&cfg.cmdline, "stasis.seed")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let agent = match &cfg.vsock {
            Some(v) => Some(HostAgent::spawn(
                v,
                &cfg.console,
                cfg.interpreter.as_deref(),
            )?),
            None => None,
        };
        let mut vm = Self::start(0, seed, cfg.cmdline.clone());
        vm.agent = agent;
        Ok(vm)
    }

    fn restore(dir: &Path, vsock: Option<&Path>) -> Result<Self, Error> {
        let path = dir.join(FAKE_STATE_FILE);
        let bytes =
            fs::read(&path).map_err(|e| Error::Io(format!("read {}", path.display()), e))?;
        let st: FakeState = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Vm(format!("corrupt fake snapshot {}: {e}", path.display())))?;
        let agent = match (st.agent, vsock) {
            (None, None) => None,
            (Some(a), Some(v)) if a.vsock == v => {
                if !is_host_agent(a.pid, &a.vsock) {
                    return Err(Error::Vm(format!(
                        "the sandbox's host agent (pid {}) is gone",
                        a.pid
                    )));
                }
                let agent = HostAgent {
                    pid: a.pid,
                    vsock: a.vsock,
                    child: None,
                };
                agent.cont();
                Some(agent)
            }
            (a, v) => {
                return Err(Error::Vm(format!(
                    "snapshot agent socket {:?} does not match the requested {:?}",
                    a.map(|a| a.vsock),
                    v
                )))
            }
        };
        let mut vm = Self::start(st.round, st.acc, st.cmdline);
        vm.agent = agent;
        Ok(vm)
    }

    /// A new sandbox from a reusable (fake) snapshot in `dir`, which is
    /// left untouched: the counter continues from the snapshot's; an agent
    /// snapshot gets a new host agent on `vsock` whose files start as a
    /// copy of the snapshot's (`dir/root`: the agent's directory tree at
    /// the snapshot; its processes are not carried over by the fake).
    fn restore_fork(
        dir: &Path,
        vsock: Option<&Path>,
        console: &ConsoleSpec,
    ) -> Result<Self, Error> {
        let path = dir.join(FAKE_STATE_FILE);
        let bytes =
            fs::read(&path).map_err(|e| Error::Io(format!("read {}", path.display()), e))?;
        let st: FakeState = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Vm(format!("corrupt fake snapshot {}: {e}", path.display())))?;
        let agent = match (st.agent.is_some(), vsock) {
            (false, _) => None,
            (true, None) => {
                return Err(Error::Vm(
                    "the snapshot has an agent: its socket path must be given".into(),
                ))
            }
            (true, Some(v)) => {
                let from = dir.join("root");
                let to = v
                    .parent()
                    .ok_or_else(|| {
                        Error::Vm(format!("vsock path {} has no directory", v.display()))
                    })?
                    .join("root");
                if from.is_dir() && !to.exists() {
                    crate::snapshot::store::copy_tree(&from, &to).map_err(|e| {
                        Error::Vm(format!(
                            "copying the snapshot's files: {}",
                            crate::error_chain(&e)
                        ))
                    })?;
                }
                Some(HostAgent::spawn(v, console, None)?)
            }
        };
        let mut vm = Self::start(st.round, st.acc, st.cmdline);
        vm.agent = agent;
        Ok(vm)
    }

    fn start(round: u64, acc: u64, cmdline: String) -> Self {
        let shared = Arc::new(FakeShared {
            round: AtomicU64::new(round),
            acc: AtomicU64::new(acc),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                let r = s.round.load(Ordering::Relaxed) + 1;
                let a = s
                    .acc
                    .load(Ordering::Relaxed)
                    .wrapping_mul(31)
                    .wrapping_add(r);
                s.acc.store(a, Ordering::Relaxed);
                s.round.store(r, Ordering::Release);
                // The fake guest's speed, not synchronisation.
                std::thread::sleep(FAKE_ROUND);
            }
        });
        let pause_delay = Duration::from_millis(
            cmdline_value(&cmdline, "stasis.fake.pause_ms")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        );
        FakeVm {
            shared,
            thread: Some(thread),
            cmdline,
            pause_delay,
            agent: None,
        }
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn write_snapshot(&self, dir: &Path) -> Result<(), Error> {
        let st = FakeState {
            round: self.shared.round.load(Ordering::Acquire),
            acc: self.shared.acc.load(Ordering::Acquire),
            cmdline: self.cmdline.clone(),
            agent: self.agent.as_ref().map(|a| AgentState {
                pid: a.pid,
                vsock: a.vsock.clone(),
            }),
        };
        let mut tmp = dir.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e| Error::Io(what, e)
        };
        if dir.exists() {
            return Err(Error::Vm(format!(
                "snapshot dir {} already exists",
                dir.display()
            )));
        }
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        let body = serde_json::to_vec(&st).map_err(|e| Error::Vm(e.to_string()))?;
        let file = tmp.join(FAKE_STATE_FILE);
        fs::write(&file, body).map_err(io("write", &file))?;
        fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", &file))?;
        fs::rename(&tmp, dir).map_err(io("rename", dir))?;
        if let Some(parent) = dir.parent() {
            let _ = fs::File::open(parent).and_then(|f| f.sync_all());
        }
        Ok(())
    }
}

impl VmBackend for FakeVm {
    fn pause_and_snapshot(&mut self, dir: &Path) -> Result<Option<GuestProgress>, Error> {
        self.stop_thread();
        if !self.pause_delay.is_zero() {
            // Simulates a slow snapshot, for concurrency tests.
            std::thread::sleep(self.pause_delay);
        }
        let guest = self.guest();
        let stopped = match &self.agent {
            Some(a) => a.stop(),
            None => Ok(()),
        };
        let written = stopped.and_then(|()| self.write_snapshot(dir));
        match written {
            Ok(()) => {
                // The stopped agent now belongs to the snapshot: dropping or
                // killing this VM must leave it alone.
                if let Some(mut a) = self.agent.take() {
                    // Reaped by init once it exits; never waited for here.
                    a.child = None;
                }
                Ok(guest)
            }
            Err(e) => {
                // Keep running, as the real VM resumes on a failed snapshot.
                let round = self.shared.round.load(Ordering::Acquire);
                let acc = self.shared.acc.load(Ordering::Acquire);
                let agent = self.agent.take();
                if let Some(a) = &agent {
                    a.cont();
                }
                let mut again = FakeVm::start(round, acc, self.cmdline.clone());
                again.agent = agent;
                *self = again;
                Err(e)
            }
        }
    }

    fn exited(&self) -> Option<String> {
        match &self.thread {
            Some(t) if t.is_finished() => Some("fake guest thread ended".into()),
            _ => None,
        }
    }

    fn guest(&self) -> Option<GuestProgress> {
        Some(GuestProgress {
            round: self.shared.round.load(Ordering::Acquire),
            acc: self.shared.acc.load(Ordering::Acquire),
        })
    }

    fn kill(mut self: Box<Self>) {
        self.stop_thread();
        if let Some(a) = self.agent.take() {
            a.kill();
        }
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop_thread();
        if let Some(a) = self.agent.take() {
            a.kill();
        }
    }
}

/// The real VMM.
mod real {
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::{Error, GuestProgress, VmBackend};
    use crate::vmm;
    use crate::worker::protocol::{BootConfig, ConsoleSpec, KernelSpec, RestoreModeSpec};

    struct RealVm {
        vm: vmm::Vm,
        /// The next snapshot may be a child layer ([`VmBackend::set_incremental`]).
        incremental: bool,
    }

    impl RealVm {
        fn opts(&self, cancel: Option<Arc<AtomicBool>>, dir: &Path) -> vmm::SnapshotOpts {
            vmm::SnapshotOpts {
                cancel: super::super::fault_fail_pause_write(dir).or(cancel),
                incremental: self.incremental,
            }
        }
    }

    fn console(c: &ConsoleSpec) -> vmm::Console {
        match c {
            ConsoleSpec::Sink => vmm::Console::Sink,
            ConsoleSpec::Stdout => vmm::Console::Stdout,
            ConsoleSpec::File(p) => vmm::Console::File(p.clone()),
        }
    }

    pub(super) fn boot(cfg: &BootConfig) -> Result<Box<dyn VmBackend>, Error> {
        let vm_cfg = vmm::VmConfig {
            kernel: match &cfg.kernel {
                KernelSpec::TestGuest => vmm::Kernel::TestGuest,
                KernelSpec::Path(p) => vmm::Kernel::Path(p.clone()),
            },
            initrd: cfg.initrd.clone(),
            cmdline: cfg.cmdline.clone(),
            mem_bytes: cfg.mem_bytes,
            vcpus: cfg.vcpus,
            console: console(&cfg.console),
            disk: cfg.disk.as_ref().map(|d| vmm::virtio::DiskConfig {
                base: d.base.clone(),
                overlay: Some(d.overlay.clone()),
            }),
            vsock: cfg.vsock.clone(),
            memory_backing: cfg.memory_backing,
        };
        let vm = vmm::Vm::boot_with_net(vm_cfg, cfg.net.as_ref())
            .map_err(|e| Error::Vm(e.to_string()))?;
        Ok(Box::new(RealVm {
            vm,
            incremental: false,
        }))
    }

    /// Reads the status page at [`crate::guest::STATUS_ADDR`] from the
    /// snapshot's memory, through the layout its `state.bin` records and
    /// its chain of layers (an incremental snapshot may hold the page in a
    /// parent layer), checked against the layer's page checksums.
    pub(super) fn snapshot_guest(dir: &Path) -> Option<GuestProgress> {
        use crate::snapshot::memfile::PAGE_SIZE;
        let snap = crate::snapshot::SnapshotDir::open(dir).ok()?;
        let st: vmm::VmState = snap.load_state().ok()?;
        let ranges = vmm::memory::ram_ranges(st.mem_bytes).ok()?;
        let addr = crate::guest::STATUS_ADDR;
        let mut page = [0u8; 40];
        let end = addr + page.len() as u64;
        // Regions lie back to back in the file, in guest-address order.
        let file_offset = ranges
            .iter()
            .zip(&st.memory.regions)
            .find(|(&(gpa, len), &(_, flen))| {
                addr >= gpa && end <= gpa.saturating_add(len.min(flen))
            })
            .map(|(&(gpa, _), &(off, _))| off + (addr - gpa))?;
        let file = snap.open_memory().ok()?;
        let (chain, _) = crate::snapshot::layers::open_chain(dir, file, st.memory.clone(), |d| {
            d.load_state::<vmm::VmState>()
                .map(|s| s.memory)
                .map_err(|e| crate::error_chain(&e))
        })
        .ok()?;
        let first = usize::try_from(file_offset).ok()? / PAGE_SIZE;
        let within = usize::try_from(file_offset).ok()? % PAGE_SIZE;
        // The 40 bytes may cross into the next page.
        let pages = (within + page.len()).div_ceil(PAGE_SIZE);
        let mut buf = vec![0u8; pages * PAGE_SIZE];
        chain.read_verified(first, &mut buf, &mut Vec::new()).ok()?;
        let n = page.len();
        page.copy_from_slice(&buf[within..within + n]);
        crate::guest::GuestStatus::parse(&page).map(|g| GuestProgress {
            round: g.round,
            acc: g.acc,
        })
    }

    pub(super) fn restore(
        dir: &Path,
        mode: RestoreModeSpec,
        c: &ConsoleSpec,
        paths: super::RestorePaths<'_>,
        backing: vmm::memory::MemoryBacking,
        track_writes: bool,
    ) -> Result<Box<dyn VmBackend>, Error> {
        // The snapshot carries its disk (`disk.overlay` in `dir`, used in
        // place, over the template's base image named by the request); the
        // vsock device listens on the sandbox's socket again.
        let mode = match mode {
            RestoreModeSpec::Eager => vmm::RestoreMode::Eager,
            RestoreModeSpec::Lazy => vmm::RestoreMode::Lazy,
        };
        let (vm, _) = vmm::Vm::restore_opts(
            dir,
            mode,
            console(c),
            None,
            paths,
            backing,
            vmm::RestoreOpts {
                track_writes,
                ..Default::default()
            },
        )
        .map_err(|e| Error::Vm(crate::error_chain(&e)))?;
        Ok(Box::new(RealVm {
            vm,
            incremental: false,
        }))
    }

    impl VmBackend for RealVm {
        fn pause_and_snapshot(&mut self, dir: &Path) -> Result<Option<GuestProgress>, Error> {
            self.vm
                .pause()
                .map_err(|e| Error::Vm(format!("pause: {e}")))?;
            let guest = self.guest();
            let opts = self.opts(None, dir);
            if let Err(e) = self.vm.snapshot_with(dir, opts) {
                let resumed = self.vm.resume();
                return Err(Error::Vm(match resumed {
                    Ok(()) => format!("snapshot: {e}"),
                    Err(r) => format!("snapshot: {e}; resume after it failed too: {r}"),
                }));
            }
            Ok(guest)
        }

        fn exited(&self) -> Option<String> {
            self.vm.exited().map(|r| r.to_string())
        }

        fn guest(&self) -> Option<GuestProgress> {
            self.vm.guest_status().map(|g| GuestProgress {
                round: g.round,
                acc: g.acc,
            })
        }

        fn kill(self: Box<Self>) {
            self.vm.kill();
        }

        fn memory_backing(&self) -> Option<vmm::memory::MemoryBacking> {
            Some(self.vm.config().memory_backing)
        }

        fn splits_pause(&self) -> bool {
            true
        }

        fn pause_vcpus(&mut self) -> Result<Option<GuestProgress>, Error> {
            self.vm
                .pause()
                .map_err(|e| Error::Vm(format!("pause: {e}")))?;
            Ok(self.guest())
        }

        fn write_paused(
            &mut self,
            dir: &Path,
            cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
        ) -> Result<(), Error> {
            let opts = self.opts(Some(cancel), dir);
            self.vm
                .snapshot_with(dir, opts)
                .map(|_| ())
                .map_err(|e| Error::Vm(format!("snapshot: {e}")))
        }

        fn set_incremental(&mut self, on: bool) {
            self.incremental = on;
        }

        fn resume_vcpus(&mut self) -> Result<(), Error> {
            self.vm
                .resume()
                .map_err(|e| Error::Vm(format!("resume: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::protocol::KernelSpec;
    use std::time::Instant;

    fn cfg(cmdline: &str) -> BootConfig {
        BootConfig {
            kernel: KernelSpec::TestGuest,
            initrd: None,
            cmdline: cmdline.into(),
            mem_bytes: 64 << 20,
            vcpus: 1,
            console: ConsoleSpec::Sink,
            disk: None,
            vsock: None,
            interpreter: None,
            memory_backing: Default::default(),
            net: None,
        }
    }

    fn wait_round_above(vm: &dyn VmBackend, min: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = vm.guest().unwrap().round;
            if r > min {
                return r;
            }
            assert!(Instant::now() < deadline, "fake guest stuck at {r}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn fake_pause_restore_continues() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        let mut vm = boot(BackendKind::Fake, &cfg("stasis.seed=5")).unwrap();
        wait_round_above(vm.as_ref(), 3);
        let at_pause = vm.pause_and_snapshot(&dir).unwrap().unwrap();
        vm.kill();
        assert!(dir.join(FAKE_STATE_FILE).exists());
        let usage = dir_usage(&dir);
        let len = fs::metadata(dir.join(FAKE_STATE_FILE)).unwrap().len();
        assert_eq!(usage.apparent, len);
        assert!(usage.allocated > 0);
        assert_eq!(
            snapshot_guest(BackendKind::Fake, &dir).map(|g| g.round),
            Some(at_pause.round),
            "the snapshot holds the round the pause reported"
        );
        let vm2 = restore(
            BackendKind::Fake,
            &dir,
            RestoreModeSpec::Lazy,
            &ConsoleSpec::Sink,
            RestorePaths::default(),
        )
        .unwrap();
        assert!(vm2.guest().unwrap().round >= at_pause.round);
        wait_round_above(vm2.as_ref(), at_pause.round);
        assert!(vm2.exited().is_none());
        vm2.kill();
    }

    #[test]
    fn fake_snapshot_into_existing_dir_fails_and_keeps_running() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = boot(BackendKind::Fake, &cfg("")).unwrap();
        let err = vm.pause_and_snapshot(tmp.path());
        assert!(err.is_err());
        let r = vm.guest().unwrap().round;
        wait_round_above(vm.as_ref(), r);
        vm.kill();
    }

    #[test]
    fn fake_boot_failure_and_missing_snapshot() {
        assert!(boot(BackendKind::Fake, &cfg("stasis.fake.fail=boot")).is_err());
        let tmp = tempfile::tempdir().unwrap();
        assert!(restore(
            BackendKind::Fake,
            &tmp.path().join("none"),
            RestoreModeSpec::Eager,
            &ConsoleSpec::Sink,
            RestorePaths::default(),
        )
        .is_err());
    }

    #[test]
    fn cmdline_values() {
        assert_eq!(
            cmdline_value("a=1 stasis.seed=9 b", "stasis.seed"),
            Some("9")
        );
        assert_eq!(cmdline_value("stasis.seedx=9", "stasis.seed"), None);
    }
}
