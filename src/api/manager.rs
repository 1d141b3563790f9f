//! Sandbox lifecycle: the state machine, its timers, and restart recovery.
//!
//! Every sandbox is an [`Entry`] with two locks:
//! - `op`, an async mutex that serialises lifecycle operations on that
//!   sandbox (create is finished before the id is published; pause, resume,
//!   connect, timeout, kill and expiry each hold it). Operations on other
//!   sandboxes never wait on it.
//! - `rec`, a short-lived std mutex over the current record, so reads (get,
//!   list) never wait for a long pause. While an operation runs, `busy` says
//!   which (`pausing`, `resuming`, ...).
//!
//! A running sandbox owns one worker process (see [`crate::worker`]). When a
//! worker dies unexpectedly the sandbox is removed and remembered as gone,
//! with the reason, for the 404 message.
//!
//! Asynchronous pause (`{"sync": false}`, [`Manager::pause_with`]): the
//! sandbox is paused as soon as its worker stopped and captured the VM; the
//! worker writes the snapshot in the background and keeps the VM (and the
//! running slot) until it is durable. A `WriteJob` in `writes` stands for
//! that; a watcher task finishes it (stores the row, stops the worker) once
//! the write is durable. Until then the stored row still says running, so a
//! crash loses the sandbox like a running one. Resume during the write goes
//! on from the worker's memory and abandons the write; shutdown waits for
//! every write.
//! Admission: besides `max_running`, running sandboxes' memory is a budget
//! (a share of the host's RAM, one semaphore permit per MiB, held while
//! running); pausing is bounded by the paused-sandbox and snapshot-byte
//! quotas. All answer 429 with the numbers.
//!
//! Faults (`super::fault` injects them in tests): a pause whose record
//! fails to save stays paused and resumable, keeps the previous snapshot,
//! and the timer task saves the record again; a resume that fails after
//! the guest ran removes the sandbox with the reason (its disk may be newer
//! than its memory; a `resumed` marker in the snapshot tells a restart the
//! same); a failed auto-pause keeps the sandbox running and retries. Bad
//! stored rows are quarantined at start ([`Store::load_all_quarantining`]).
//!
//! Shared metadata (`--database postgres://…`, `manager_db.rs`): create,
//! pause and kill first check that the database answers (503 if not, before
//! anything changes); a resume claims the sandbox with a conditional update
//! on (state, generation) before its guest may run (409 if another host
//! changed it first), and gives the claim back if it fails before the guest
//! ran; a heartbeat task records the host in `hosts`.
//!
//! Timers: one task sleeps until the earliest deadline (a running sandbox's
//! timeout, a paused sandbox's retention end) or until a deadline changes,
//! then kills, auto-pauses or deletes what is due.
//!
//! Agent templates (Linux guests with the stasis agent, or the fake backend's
//! host agent): the sandbox dir holds the vsock socket (`vsock.sock`) and,
//! for Linux templates, the disk overlay (`disk.overlay`; the VMM keeps the
//! disk with each snapshot). Create answers only once the agent answers
//! `GET /health` (bounded by the agent timeout). In-sandbox traffic is
//! forwarded by [`super::proxy`]; each running incarnation has a
//! [`Gate`] that pause and kill close, aborting its open connections.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::Deserialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::models::{
    self, rfc3339, ConnectBody, DetailOut, LifecycleOut, ListedOut, NewSandbox, ResumeBody,
    SandboxOut, StasisOut, AGENT_ENVD_VERSION, CLIENT_ID, ENVD_VERSION,
};
use super::proxy::{self, Gate};
use super::store::{Row, RowState, Store};
use crate::worker::client::WorkerClient;
use crate::worker::protocol::{
    BackendKind, BootConfig, ConsoleSpec, DiskSpec, KernelSpec, Reply, Request, RestoreModeSpec,
};
use crate::worker::vm::{dir_usage, snapshot_guest, DirUsage};
use crate::worker::Error as WorkerError;

#[path = "manager_net.rs"]
mod net_ext;
#[path = "warm.rs"]
pub mod warm;

// Shared metadata: 503/409 mapping, the resume claim, the heartbeat.
#[path = "manager_db.rs"]
pub mod db_ext;

// A pool of hosts: forwarding decisions, adoption of paused sandboxes
// whose host is gone, resume from the bucket, the drain.
#[path = "manager_pool.rs"]
pub mod pool_ext;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
const PAUSE_TIMEOUT: Duration = Duration::from_secs(300);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const MAX_TOMBSTONES: usize = 10_000;
/// Longest the timer task sleeps without looking (guards against clock jumps).
const TIMER_MAX_SLEEP: Duration = Duration::from_secs(5);

/// Templates that exist without a file: the built-in test guest, or the
/// server's Linux template (`stasis serve --kernel K --rootfs R`).
pub const BUILTIN_TEMPLATES: [&str; 2] = ["base", "code-interpreter-v1"];
/// The code interpreter's port in a sandbox (the SDK's `JUPYTER_PORT`).
pub const JUPYTER_PORT: u16 = 49999;
/// How long `GET /sandboxes/{id}` waits for the agent's health answer.
const AGENT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Between two health probes while a new sandbox's agent starts.
const AGENT_POLL: Duration = Duration::from_millis(50);
/// Longest wait for a resumed sandbox's agent to answer before the resume
/// returns anyway (see `do_resume`).
const RESUME_AGENT_WAIT: Duration = Duration::from_secs(30);
/// The vsock socket in a sandbox's directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Written into a snapshot's directory before a guest is resumed from it:
/// from then on the snapshot's disk overlay may be newer than its memory.
pub const RESUMED_MARKER: &str = "resumed";
/// After a failed auto-pause, the next attempt comes this much later (the
/// sandbox keeps running meanwhile, until its retention ends).
const AUTO_PAUSE_RETRY: Duration = Duration::from_secs(3);
/// The copy-on-write disk overlay in a sandbox's directory.
pub const DISK_OVERLAY: &str = "disk.overlay";

/// The server's Linux template (`stasis serve --kernel K --rootfs R`): what
/// `base` and the SDK's default template names boot.
#[derive(Debug, Clone)]
pub struct LinuxTemplate {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// The code-interpreter image (`rootfs/build-image.sh
    /// --code-interpreter`) for `code-interpreter-v1`; default: `rootfs`.
    pub interpreter_rootfs: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mb: u64,
    pub vcpus: u8,
}

/// What the manager needs to know from the server's options.
#[derive(Debug, Clone)]
pub struct Config {
    /// Jails VM workers (`crate::jail`); `None`: unconfined (`--no-jail`,
    /// or the fake backend).
    pub jail: Option<Arc<crate::jail::Jailer>>,
    pub data_dir: PathBuf,
    pub backend: BackendKind,
    pub retention_ms: i64,
    pub default_timeout_s: i64,
    pub max_timeout_s: i64,
    pub max_running: usize,
    pub max_concurrent_spawns: usize,
    pub worker_exe: PathBuf,
    /// Replaces the built-in templates with a Linux guest with the agent.
    pub linux: Option<LinuxTemplate>,
    /// Longest wait for a new sandbox's agent to answer.
    pub agent_timeout: Duration,
    /// Returned as `domain` by create/connect/get: the SDK then addresses a
    /// sandbox's ports at `{port}-{id}.{domain}`.
    pub domain: Option<String>,
    /// Fake backend: the Python that runs the code-interpreter server of
    /// templates with `"interpreter": true` (needs jupyter-client, ipykernel).
    pub interpreter_python: String,
    /// Guest memory backing of sandboxes whose template names none.
    pub memory_backing: crate::vmm::memory::MemoryBacking,
    /// Admission limits (memory, paused sandboxes, snapshot bytes).
    pub limits: Limits,
    /// Sandbox networking (namespaces, taps, nftables); None: Linux
    /// sandboxes get no network device (`--no-network`).
    pub network: Option<Arc<crate::net::Network>>,
    /// `--snapshot-store`: paused sandboxes' snapshots are uploaded to
    /// the bucket in the background (see [`crate::snapshot::remote`]).
    pub snapshot_upload: Option<Arc<crate::snapshot::remote::Uploader>>,
    /// `--durable-pause`: a (synchronous) pause answers only once the
    /// snapshot is in the bucket.
    pub durable_pause: bool,
    /// Create sandboxes from template snapshots (see [`warm`]); off:
    /// `--no-warm-templates`.
    pub warm_templates: bool,
    /// Where metadata lives (`--database`); None: `<data-dir>/stasis.db`.
    pub database: Option<super::store::DatabaseSpec>,
    /// This host's id in a shared database (`--host-id`); None: the
    /// hostname.
    pub host_id: Option<String>,
    /// Member of a pool of hosts (`--pool-discovery`, see [`pool_ext`]).
    pub pool: Option<crate::pool::PoolArgs>,
    /// Per-host cache of chunks downloaded from the bucket: directory and
    /// most bytes (`--chunk-cache-dir`, default `<data-dir>/chunk-cache`).
    pub chunk_cache: Option<(PathBuf, u64)>,
}

/// Admission limits beyond `max_running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// MiB of guest memory (templates' `memoryMB`) running sandboxes may
    /// hold together; a create or resume beyond is answered 429.
    pub memory_budget_mb: u64,
    /// Most paused sandboxes at once (0: no limit).
    pub max_paused: usize,
    /// Most bytes of snapshots on disk, paused sandboxes together (0: no
    /// limit).
    pub max_snapshot_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_budget_mb: memory_budget_mb(super::DEFAULT_MAX_MEMORY_SHARE),
            max_paused: 0,
            max_snapshot_bytes: 0,
        }
    }
}

/// The host's RAM in MiB (`MemTotal` of /proc/meminfo); `None` if unknown.
pub fn host_memory_mb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// `share` of the host's RAM in MiB (at least 1; unlimited if the host's RAM
/// is unknown).
pub fn memory_budget_mb(share: f64) -> u64 {
    match host_memory_mb() {
        Some(mb) => ((mb as f64 * share.clamp(0.0, 1.0)) as u64).max(1),
        None => u64::MAX >> 4,
    }
}

/// Most permits one admission may take from the memory semaphore.
const MAX_MEMORY_PERMITS: u64 = u32::MAX as u64;

struct Rec {
    row: Row,
    busy: Option<&'static str>,
    worker: Option<Arc<WorkerClient>>,
    slot: Option<OwnedSemaphorePermit>,
    /// While running: this sandbox's share of the memory budget.
    mem: Option<OwnedSemaphorePermit>,
    /// The stored row lags behind `row` (saving it failed); the timer task
    /// retries until it is saved.
    unsaved: bool,
    gone: bool,
    expiry_queued: bool,
    /// While paused: what the current snapshot takes on disk.
    snapshot_usage: Option<DirUsage>,
    /// Open while running: proxied connections of this incarnation.
    gate: Option<Arc<Gate>>,
    /// Why the last proxied connection to the agent failed, until one works.
    agent_error: Option<String>,
    /// While running: the guest memory backing the worker reported.
    memory_backing: Option<crate::vmm::memory::MemoryBacking>,
    /// The template snapshot it was created from ([`warm`]; not kept
    /// across a server restart).
    warm_snapshot: Option<String>,
    /// The last pause's layer (VM backend): chain length and bytes.
    last_layer: Option<LayerFacts>,
}

/// What a pause's snapshot generation is made of (see
/// [`Manager::generation_facts`]).
#[derive(Debug, Clone, Copy, Default)]
struct LayerFacts {
    /// Memory layers: 1 (full) + parents.
    layers: usize,
    /// Its own directory's allocated bytes.
    bytes: u64,
    /// Page bytes its memory layer stores (VM backend).
    memory_bytes: Option<u64>,
}

/// An asynchronous pause's snapshot write (`{"sync": false}`): the sandbox
/// is paused, its worker still holds the stopped VM and writes the snapshot
/// in the background (see [`Manager::pause_with`]).
struct WriteJob {
    worker: Arc<WorkerClient>,
    /// The snapshot generation being written, and the one it replaces.
    gen: u64,
    old_gen: u64,
    started: std::time::Instant,
    /// `Some` once the write ended: bytes on disk, or why it failed.
    done: tokio::sync::watch::Sender<Option<Result<u64, String>>>,
}

struct Entry {
    id: String,
    op: tokio::sync::Mutex<()>,
    rec: StdMutex<Rec>,
}

impl Entry {
    fn rec(&self) -> MutexGuard<'_, Rec> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Owns every sandbox.
pub struct Manager {
    cfg: Config,
    store: Store,
    map: StdMutex<HashMap<String, Arc<Entry>>>,
    tombstones: StdMutex<HashMap<String, String>>,
    slots: Arc<Semaphore>,
    /// The memory budget, one permit per MiB.
    memory: Arc<Semaphore>,
    spawns: Semaphore,
    seq: AtomicI64,
    timer: Notify,
    /// Asynchronous pauses whose snapshot is not durable yet, by sandbox.
    writes: StdMutex<HashMap<String, Arc<WriteJob>>>,
    net_state: net_ext::NetState,
    /// Warm templates' builds and refusals (see [`warm`]).
    warm: warm::WarmState,
    /// Pool membership (see [`pool_ext`]); None: a single host.
    pool: Option<pool_ext::Pool>,
    /// The API address this host's heartbeat announces (set once serving).
    advertised: std::sync::OnceLock<String>,
}

/// A template resolved to a VM configuration.
#[derive(Clone)]
struct Template {
    boot: BootConfig,
    cpu_count: u32,
    memory_mb: u64,
    disk_mb: u64,
    /// The template's root filesystem image (read-only base of each
    /// sandbox's copy-on-write disk).
    rootfs: Option<PathBuf>,
    /// The guest runs the stasis agent (reached over vsock).
    agent: bool,
    /// The sandbox serves the code interpreter on port 49999 (in a Linux
    /// guest its image's init runs it; the fake backend's host agent runs it).
    interpreter: bool,
    /// Its sandboxes may be created from a template snapshot ([`warm`]).
    warm: bool,
    /// A built-in template (not a file).
    builtin: bool,
}

/// `<data-dir>/templates/<name>.json`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TemplateFile {
    /// A kernel image path, or `"testguest"` for the built-in test guest.
    kernel: String,
    initrd: Option<PathBuf>,
    #[serde(default)]
    cmdline: String,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    /// Checked to fit 1..=255 when loaded (wider here so that an
    /// out-of-range value is reported by name).
    vcpus: u64,
    #[serde(default, rename = "diskSizeMB")]
    disk_size_mb: u64,
    /// Root filesystem image (ext4), the read-only base of each sandbox's
    /// copy-on-write disk (`/dev/vda` in the guest).
    #[serde(default)]
    rootfs: Option<PathBuf>,
    /// Whether the guest runs the stasis agent (envd API over vsock).
    #[serde(default)]
    agent: bool,
    /// Whether the sandbox serves the code interpreter (port 49999).
    #[serde(default)]
    interpreter: bool,
    /// Guest memory backing (`auto`, `hugetlb`, `thp`, `4k`); default: the
    /// server's `--memory-backing`.
    #[serde(default)]
    memory_backing: Option<crate::vmm::memory::MemoryBacking>,
    /// Whether sandboxes may be created from a template snapshot (warm
    /// templates); default true.
    #[serde(default)]
    warm: Option<bool>,
}

/// Largest `memoryMB` a template may ask for (1 TiB).
const MAX_TEMPLATE_MEMORY_MB: u64 = 1 << 20;

/// Default kernel command line of Linux templates (the VMM appends its
/// `virtio_mmio.device=` words).
pub const LINUX_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd root=/dev/vda rw";

/// Why listing was asked for which sandboxes.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub running: bool,
    pub paused: bool,
    pub metadata: Vec<(String, String)>,
    pub limit: usize,
    /// Only sandboxes with a smaller `seq` (the page token).
    pub before_seq: Option<i64>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("{what}: {e}"))
}

impl Manager {
    /// Opens the data dir, recovers what survived the last run, and starts
    /// the timer task. Must run inside a tokio runtime.
    pub async fn start(mut cfg: Config) -> Result<Arc<Self>, super::Error> {
        let io = |what: String| move |e| super::Error::Io(what, e);
        // The data dir holds secrets (envd tokens, guest memory, disks):
        // the owner's alone.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            let dd = &cfg.data_dir;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dd)
                .map_err(io(format!("create {}", dd.display())))?;
            std::fs::set_permissions(dd, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("chmod 700 {}", dd.display())))?;
            for d in [dd.join("sandboxes"), dd.join("run")] {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&d)
                    .map_err(io(format!("create {}", d.display())))?;
            }
        }
        // Workers get absolute paths whatever their working directory.
        cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)
            .map_err(io(format!("resolve {}", cfg.data_dir.display())))?;
        // sockaddr_un holds 107 bytes of path.
        let longest_socket = cfg
            .data_dir
            .join("sandboxes")
            .join("x".repeat(20))
            .join(VSOCK_SOCKET);
        if longest_socket.as_os_str().len() > 107 {
            return Err(super::Error::Config(format!(
                "data dir {} is too long: worker and agent sockets under it would exceed the 107-byte limit of Unix socket paths",
                cfg.data_dir.display()
            )));
        }
        let run = cfg.data_dir.join("run");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("chmod {}", run.display())))?;
        }
        let db = cfg.data_dir.join("stasis.db");
        let host_id = cfg
            .host_id
            .clone()
            .unwrap_or_else(super::store::default_host_id);
        let spec = cfg
            .database
            .clone()
            .unwrap_or(super::store::DatabaseSpec::Sqlite(db));
        let store = Store::open_spec(&spec, &host_id)?;
        if let super::store::DatabaseSpec::Sqlite(db) = &spec {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(db, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("chmod 600 {}", db.display())))?;
        } else {
            tracing::info!(host = %host_id, "metadata in PostgreSQL (shared)");
        }
        let slots = Arc::new(Semaphore::new(cfg.max_running));
        let budget = cfg
            .limits
            .memory_budget_mb
            .min(Semaphore::MAX_PERMITS as u64) as usize;
        let memory = Arc::new(Semaphore::new(budget));
        let spawns = Semaphore::new(cfg.max_concurrent_spawns.max(1));
        let pool = pool_ext::Pool::new(&cfg, &store)?;
        let mgr = Arc::new(Manager {
            pool,
            advertised: std::sync::OnceLock::new(),
            seq: AtomicI64::new(store.max_seq()?),
            cfg,
            store,
            map: StdMutex::new(HashMap::new()),
            tombstones: StdMutex::new(HashMap::new()),
            slots,
            memory,
            spawns,
            timer: Notify::new(),
            writes: StdMutex::new(HashMap::new()),
            net_state: Default::default(),
            warm: Default::default(),
        });
        mgr.recover()?;
        mgr.net_recover()?;
        mgr.warm_recover();
        tokio::spawn(mgr.clone().timer_loop());
        Ok(mgr)
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    fn snapshot_dir(&self, id: &str, gen: u64) -> PathBuf {
        self.sandbox_dir(id).join(format!("snapshot-{gen}"))
    }

    /// Whether pauses of VM sandboxes resumed from their own snapshot write
    /// only the pages changed since (a child layer over the generation
    /// resumed from). Not with `--snapshot-store`: the bucket upload ships
    /// one generation as a whole, so every pause then writes a full layer.
    fn incremental_pauses(&self) -> bool {
        self.cfg.backend == BackendKind::Vm && self.cfg.snapshot_upload.is_none()
    }

    /// The directories of generation `gen`'s layer chain: its own, then its
    /// parents' (nearest first) as its `layers.bin` names them. Only
    /// sibling `snapshot-<n>` directories count (the file is written by a
    /// worker: untrusted); an unreadable chain file yields the generation
    /// alone (its resume then fails, naming the reason).
    fn chain_dirs(&self, id: &str, gen: u64) -> Vec<PathBuf> {
        chain_dirs_of(&self.snapshot_dir(id, gen))
    }

    /// Chain usage (what quotas count) and the facts of generation `gen`'s
    /// own layer. Blocking: reads the directory and `state.bin`.
    fn generation_facts(&self, id: &str, gen: u64) -> (DirUsage, LayerFacts) {
        facts_of(
            &self.chain_dirs(id, gen),
            self.cfg.backend == BackendKind::Vm,
        )
    }

    /// Deletes every snapshot generation of `id` except `gen`'s chain
    /// (replaced generations, half-written ones, parents no longer named).
    async fn prune_generations(&self, id: &str, gen: u64) {
        let keep = self.chain_dirs(id, gen);
        let dir = self.sandbox_dir(id);
        let _ = tokio::task::spawn_blocking(move || prune_snapshots(&dir, &keep)).await;
    }

    /// [`Self::generation_facts`] off the async runtime.
    async fn facts_blocking(&self, id: &str, gen: u64) -> (DirUsage, LayerFacts) {
        let (dirs, vm) = (
            self.chain_dirs(id, gen),
            self.cfg.backend == BackendKind::Vm,
        );
        tokio::task::spawn_blocking(move || facts_of(&dirs, vm))
            .await
            .unwrap_or_default()
    }

    fn vsock_path(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join(VSOCK_SOCKET)
    }

    fn console(&self, id: &str) -> ConsoleSpec {
        ConsoleSpec::File(self.sandbox_dir(id).join("console.log"))
    }

    fn retention_end(&self, row: &Row) -> i64 {
        row.created_ms.saturating_add(self.cfg.retention_ms)
    }

    /// Restart recovery: paused sandboxes come back; sandboxes that were
    /// running died with the old server (their workers had
    /// `PR_SET_PDEATHSIG`) and are removed with their files.
    fn recover(&self) -> Result<(), super::Error> {
        let run = self.cfg.data_dir.join("run");
        if let Ok(rd) = std::fs::read_dir(&run) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let now = now_ms();
        let mut kept = std::collections::HashSet::new();
        let (rows, quarantined) = self.store.load_all_quarantining()?;
        for q in quarantined {
            // Its files stay for inspection (not swept as orphans below).
            tracing::error!(
                sandbox = ?q.id,
                "quarantined a stored sandbox row (moved to the quarantine table of stasis.db): {}",
                q.why
            );
            kept.insert(q.id);
        }
        for row in rows {
            if !models::valid_name(&row.id, false) {
                tracing::warn!(id = ?row.id, "dropping a stored sandbox with an invalid id");
                self.store.delete(&row.id)?;
                continue;
            }
            let why_not = match row.state {
                RowState::Running => {
                    if let Some(pid) = row.worker_pid {
                        kill_stale_worker(pid, &row.id);
                    }
                    Some("it was running when the server stopped")
                }
                RowState::Paused if now >= self.retention_end(&row) => {
                    Some("its retention expired")
                }
                // A sandbox adopted from a host that is gone has its data
                // in the bucket until its first resume here.
                RowState::Paused
                    if !self.snapshot_dir(&row.id, row.snapshot_gen).is_dir()
                        && !self.remote_copy_expected(&row) =>
                {
                    Some("its snapshot is missing")
                }
                RowState::Paused
                    if self
                        .snapshot_dir(&row.id, row.snapshot_gen)
                        .join(RESUMED_MARKER)
                        .exists() =>
                {
                    Some("its snapshot was resumed before the server stopped, so its disk may be newer than its memory")
                }
                RowState::Paused => None,
            };
            if let Some(why) = why_not {
                tracing::info!(sandbox = %row.id, "removed at startup: {why}");
                crate::worker::vm::kill_host_agent(&self.vsock_path(&row.id));
                self.store.delete(&row.id)?;
                let _ = std::fs::remove_dir_all(self.sandbox_dir(&row.id));
                self.tombstone(&row.id, why);
                continue;
            }
            // Drop snapshot leftovers (older generations, half-written
            // ones): exactly the current generation's chain stays.
            prune_snapshots(
                &self.sandbox_dir(&row.id),
                &self.chain_dirs(&row.id, row.snapshot_gen),
            );
            // (Adopted in a pool, the snapshot may still be in the bucket.)
            let (snapshot_usage, last_layer) =
                if self.snapshot_dir(&row.id, row.snapshot_gen).is_dir() {
                    let (usage, facts) = self.generation_facts(&row.id, row.snapshot_gen);
                    (Some(usage), Some(facts))
                } else {
                    (None, None)
                };
            tracing::info!(sandbox = %row.id, "recovered paused sandbox");
            // A backlog survives a restart: every paused sandbox is queued
            // again (what the bucket holds costs a HEAD per chunk).
            if snapshot_usage.is_some() {
                self.queue_upload(&row.id, row.snapshot_gen);
            }
            kept.insert(row.id.clone());
            let entry = paused_entry(row, snapshot_usage, last_layer);
            self.map().insert(entry.id.clone(), entry);
        }
        // Directories no row refers to.
        if let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("sandboxes")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if models::valid_name(&name, false) && !kept.contains(&name) {
                    tracing::info!(sandbox = %name, "removing orphaned sandbox files");
                    crate::worker::vm::kill_host_agent(&e.path().join(VSOCK_SOCKET));
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    fn tombstone(&self, id: &str, why: &str) {
        let mut t = self.tombstones.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= MAX_TOMBSTONES {
            t.clear();
        }
        t.insert(id.to_string(), why.to_string());
    }

    fn not_found(&self, id: &str) -> ApiError {
        let t = self.tombstones.lock().unwrap_or_else(|e| e.into_inner());
        match t.get(id) {
            Some(why) => ApiError::new(
                StatusCode::NOT_FOUND,
                format!("sandbox {id} not found (it was removed: {why})"),
            ),
            None => ApiError::not_found(id),
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        if !models::valid_name(id, false) {
            return Err(ApiError::bad_request(format!("invalid sandbox id {id:?}")));
        }
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| self.not_found(id))
    }

    /// Under the op lock: 404 if the sandbox is gone or past retention.
    async fn check_live(&self, e: &Entry) -> Result<(), ApiError> {
        let expired = {
            let r = e.rec();
            if r.gone {
                return Err(self.not_found(&e.id));
            }
            r.row.state == RowState::Paused && now_ms() >= self.retention_end(&r.row)
        };
        if expired {
            self.remove(e, "its retention expired").await;
            return Err(self.not_found(&e.id));
        }
        Ok(())
    }

    async fn put_row(&self, row: Row) -> Result<(), ApiError> {
        self.with_store(move |s| s.put(&row)).await
    }

    async fn delete_row(&self, id: &str) {
        let store = self.store.clone();
        let id2 = id.to_string();
        match tokio::task::spawn_blocking(move || store.delete(&id2)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sandbox = %id, "deleting the stored row failed: {e}"),
            Err(e) => tracing::error!(sandbox = %id, "deleting the stored row failed: {e}"),
        }
    }

    /// Under the op lock: stops the worker (if any), forgets the sandbox and
    /// deletes its files.
    async fn remove(&self, e: &Entry, why: &str) {
        let worker = {
            let mut r = e.rec();
            if r.gone {
                return;
            }
            r.gone = true;
            r.slot = None;
            r.mem = None;
            r.busy = Some("removing");
            if let Some(g) = r.gate.take() {
                g.close();
            }
            r.worker.take()
        };
        // A snapshot still being written is abandoned with the sandbox.
        if let Some(job) = self.take_write(&e.id) {
            job.worker.kill();
            job.worker.wait_exit().await;
        }
        self.tombstone(&e.id, why);
        if let Some(w) = worker {
            w.shutdown(SHUTDOWN_GRACE).await;
        }
        self.net_release(&e.id, false, None).await;
        // A paused sandbox's host agent (fake backend) has no worker.
        let vsock = self.vsock_path(&e.id);
        let _ =
            tokio::task::spawn_blocking(move || crate::worker::vm::kill_host_agent(&vsock)).await;
        self.delete_row(&e.id).await;
        let dir = self.sandbox_dir(&e.id);
        if let Err(err) = tokio::fs::remove_dir_all(&dir).await {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(sandbox = %e.id, "removing {} failed: {err}", dir.display());
            }
        }
        self.map().remove(&e.id);
        tracing::info!(sandbox = %e.id, "sandbox removed: {why}");
    }

    fn timeout_secs(&self, t: Option<i64>, zero_is_default: bool) -> Result<i64, ApiError> {
        match t {
            None => Ok(self.cfg.default_timeout_s),
            Some(0) if zero_is_default => Ok(self.cfg.default_timeout_s),
            Some(t) if t < 0 => Err(ApiError::bad_request(format!(
                "timeout must not be negative (got {t})"
            ))),
            Some(t) if t > self.cfg.max_timeout_s => Err(ApiError::bad_request(format!(
                "timeout {t}s exceeds the maximum of {}s",
                self.cfg.max_timeout_s
            ))),
            Some(t) => Ok(t),
        }
    }

    fn take_slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the limit of {} running sandboxes is reached; pause or kill one first",
                    self.cfg.max_running
                ),
            )
        })
    }

    /// Reserves `memory_mb` of the memory budget for a sandbox about to
    /// run (429 with the numbers if it does not fit).
    fn take_memory(&self, memory_mb: u64) -> Result<OwnedSemaphorePermit, ApiError> {
        let budget = self.cfg.limits.memory_budget_mb;
        let refuse = || {
            let in_use = budget.saturating_sub(self.memory.available_permits() as u64);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "not enough memory: the sandbox needs {memory_mb} MiB, running sandboxes hold {in_use} MiB of the {budget} MiB allowed (--max-memory-share of the host's RAM); pause or kill one first"
                ),
            )
        };
        if memory_mb > budget.min(MAX_MEMORY_PERMITS) {
            return Err(refuse());
        }
        self.memory
            .clone()
            .try_acquire_many_owned(memory_mb.max(1) as u32)
            .map_err(|_| refuse())
    }

    /// The sandbox domain (`--domain`), if any.
    pub fn domain(&self) -> Option<&str> {
        self.cfg.domain.as_deref()
    }

    async fn resolve_template(&self, name: &str) -> Result<Template, ApiError> {
        if !models::valid_name(name, true) {
            return Err(ApiError::bad_request(format!(
                "invalid template name {name:?}"
            )));
        }
        let path = self
            .cfg
            .data_dir
            .join("templates")
            .join(format!("{name}.json"));
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let f: TemplateFile = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request(format!("template {name:?} is invalid: {e}"))
                })?;
                let invalid = |why: String| {
                    ApiError::bad_request(format!("template {name:?} is invalid: {why}"))
                };
                let Some(vcpus) = u8::try_from(f.vcpus).ok().filter(|v| *v > 0) else {
                    return Err(invalid(format!(
                        "vcpus must be within 1..=255 (got {})",
                        f.vcpus
                    )));
                };
                if !(1..=MAX_TEMPLATE_MEMORY_MB).contains(&f.memory_mb) {
                    return Err(invalid(format!(
                        "memoryMB must be within 1..={MAX_TEMPLATE_MEMORY_MB} (got {})",
                        f.memory_mb
                    )));
                }
                if i64::try_from(f.disk_size_mb).is_err() {
                    return Err(invalid(format!(
                        "diskSizeMB {} is too large",
                        f.disk_size_mb
                    )));
                }
                let kernel = if f.kernel == "testguest" {
                    KernelSpec::TestGuest
                } else {
                    let k = PathBuf::from(&f.kernel);
                    if !tokio::fs::metadata(&k).await.is_ok_and(|m| m.is_file()) {
                        return Err(invalid(format!(
                            "kernel {:?} is not a file (a kernel image path or \"testguest\")",
                            f.kernel
                        )));
                    }
                    KernelSpec::Path(k)
                };
                let disk_mb = match &f.rootfs {
                    Some(r) if f.disk_size_mb == 0 => file_mb(r).await,
                    _ => f.disk_size_mb,
                };
                return Ok(Template {
                    boot: BootConfig {
                        kernel,
                        initrd: f.initrd,
                        cmdline: f.cmdline,
                        mem_bytes: f.memory_mb.saturating_mul(1 << 20),
                        vcpus,
                        console: ConsoleSpec::Sink,
                        disk: None,
                        vsock: None,
                        interpreter: None,
                        memory_backing: f.memory_backing.unwrap_or(self.cfg.memory_backing),
                        net: None,
                    },
                    cpu_count: u32::from(vcpus),
                    memory_mb: f.memory_mb,
                    disk_mb,
                    rootfs: f.rootfs,
                    agent: f.agent,
                    interpreter: f.interpreter && f.agent,
                    warm: f.warm.unwrap_or(true),
                    builtin: false,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(&format!("reading template {name:?}"), e)),
        }
        if let (true, Some(l)) = (BUILTIN_TEMPLATES.contains(&name), &self.cfg.linux) {
            let rootfs = match (&l.interpreter_rootfs, name) {
                (Some(r), "code-interpreter-v1") => r,
                _ => &l.rootfs,
            };
            return Ok(Template {
                boot: BootConfig {
                    kernel: KernelSpec::Path(l.kernel.clone()),
                    initrd: None,
                    cmdline: l.cmdline.clone(),
                    mem_bytes: l.memory_mb.saturating_mul(1 << 20),
                    vcpus: l.vcpus,
                    console: ConsoleSpec::Sink,
                    disk: None,
                    vsock: None,
                    interpreter: None,
                    memory_backing: self.cfg.memory_backing,
                    net: None,
                },
                cpu_count: u32::from(l.vcpus),
                memory_mb: l.memory_mb,
                disk_mb: file_mb(rootfs).await,
                rootfs: Some(rootfs.clone()),
                agent: true,
                // Only the code-interpreter image runs the server; waiting
                // for it on any other image would fail every create.
                interpreter: name == "code-interpreter-v1" && l.interpreter_rootfs.is_some(),
                warm: true,
                builtin: true,
            });
        }
        if BUILTIN_TEMPLATES.contains(&name) {
            // The built-in test guest on an endless workload whose progress
            // (its round) is observable from outside.
            let workload = crate::guest::Workload {
                mib: 16,
                rounds: 0,
                seed: u64::from(rand::random::<u32>()),
                report: 0,
                base_mib: 16,
            };
            return Ok(Template {
                boot: BootConfig {
                    kernel: KernelSpec::TestGuest,
                    initrd: None,
                    cmdline: workload.cmdline(),
                    mem_bytes: 64 << 20,
                    vcpus: 1,
                    console: ConsoleSpec::Sink,
                    disk: None,
                    vsock: None,
                    interpreter: None,
                    memory_backing: self.cfg.memory_backing,
                    net: None,
                },
                cpu_count: 1,
                memory_mb: 64,
                disk_mb: 0,
                rootfs: None,
                agent: false,
                interpreter: false,
                warm: true,
                builtin: true,
            });
        }
        Err(ApiError::bad_request(format!(
            "template {name:?} not found (built-in templates: {}; others go in <data-dir>/templates/<name>.json)",
            BUILTIN_TEMPLATES.join(", ")
        )))
    }

    async fn spawn_worker(
        &self,
        id: &str,
        ro: Vec<PathBuf>,
        mem_bytes: u64,
        vcpus: u32,
        netns: Option<PathBuf>,
    ) -> Result<WorkerClient, WorkerError> {
        self.spawn_worker_in(id, self.sandbox_dir(id), ro, mem_bytes, vcpus, netns)
            .await
    }

    /// [`Self::spawn_worker`] whose writable directory is `dir`.
    async fn spawn_worker_in(
        &self,
        id: &str,
        dir: PathBuf,
        ro: Vec<PathBuf>,
        mem_bytes: u64,
        vcpus: u32,
        netns: Option<PathBuf>,
    ) -> Result<WorkerClient, WorkerError> {
        let _permit = self.spawns.acquire().await;
        let socket = self.cfg.data_dir.join("run").join(format!("{id}.sock"));
        let jail = match &self.cfg.jail {
            None => None,
            Some(j) => {
                let req = crate::jail::JailRequest {
                    name: id.to_string(),
                    sandbox_dir: dir,
                    ro,
                    mem_bytes,
                    vcpus,
                    netns: netns.map_or(crate::jail::Netns::New, crate::jail::Netns::Join),
                    ..Default::default()
                };
                let j = j.clone();
                let prepared = tokio::task::spawn_blocking(move || j.prepare(&req))
                    .await
                    .map_err(|e| WorkerError::Vm(format!("jail setup panicked: {e}")))?
                    .map_err(|e| WorkerError::Vm(format!("jail: {}", crate::error_chain(&e))))?;
                Some(prepared)
            }
        };
        WorkerClient::spawn_jailed(&self.cfg.worker_exe, &socket, CONNECT_TIMEOUT, jail).await
    }

    /// Removes the sandbox when its worker dies while it is its worker.
    fn watch_worker(self: &Arc<Self>, e: Arc<Entry>, w: Arc<WorkerClient>) {
        let mgr = self.clone();
        tokio::spawn(async move {
            let reason = w.wait_exit().await;
            let _g = e.op.lock().await;
            let current = {
                let r = e.rec();
                !r.gone && r.worker.as_ref().is_some_and(|x| Arc::ptr_eq(x, &w))
            };
            if current {
                tracing::warn!(sandbox = %e.id, pid = w.pid(), "worker died: {reason}");
                mgr.remove(&e, &format!("its worker died ({reason})")).await;
                mgr.timer.notify_one();
            }
        });
    }

    /// Polls the agent's `GET /health` until it answers, the worker dies, or
    /// the agent timeout passes.
    async fn wait_for_agent(
        &self,
        worker: &WorkerClient,
        socket: &std::path::Path,
        interpreter: bool,
    ) -> Result<(), String> {
        self.wait_for_agent_within(worker, socket, self.cfg.agent_timeout, interpreter)
            .await
    }

    /// [`Self::wait_for_agent`] bounded by `limit`; with `interpreter`, the
    /// code interpreter (port 49999) must answer too.
    async fn wait_for_agent_within(
        &self,
        worker: &WorkerClient,
        socket: &std::path::Path,
        limit: Duration,
        interpreter: bool,
    ) -> Result<(), String> {
        let deadline = std::time::Instant::now() + limit;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(why) = worker.exited() {
                return Err(format!("the VM stopped before its agent answered ({why})"));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no answer to GET /health within {}s (last: {last})",
                    limit.as_secs_f64()
                ));
            }
            // The agent first; then, for code-interpreter sandboxes, the
            // interpreter, so the first run_code finds it listening.
            let probe = async {
                let t = left.min(Duration::from_secs(5));
                proxy::probe_health(socket, crate::vsock::ENVD_PORT as u16, t)
                    .await
                    .map_err(|e| e.to_string())?;
                if interpreter {
                    proxy::probe_health(socket, JUPYTER_PORT, t)
                        .await
                        .map_err(|e| format!("the agent answers; the code interpreter: {e}"))?;
                }
                Ok::<(), String>(())
            };
            match probe.await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            tokio::time::sleep(AGENT_POLL.min(left)).await;
        }
    }

    /// Where traffic for `port` of sandbox `id` goes. Every refusal is a 502
    /// (what the SDK expects of a sandbox it cannot reach: `is_running()`
    /// is false on 502, while a 404 from envd means "no such file"), with a
    /// message saying why: not found, paused, busy, or no agent.
    pub fn proxy_target(
        &self,
        id: &str,
        port: u16,
        token: Option<&str>,
    ) -> Result<proxy::Target, ApiError> {
        let gateway = |msg: String| ApiError::new(StatusCode::BAD_GATEWAY, msg);
        let e = self.map().get(id).cloned();
        let Some(e) = e.filter(|e| !e.rec().gone) else {
            return Err(gateway(self.not_found(id).message));
        };
        let r = e.rec();
        if !envd_token_ok(&r.row, port, token) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "sandbox {id} is secured: envd requests need its access token in X-Access-Token"
                ),
            ));
        }
        if r.row.state == RowState::Paused && r.busy != Some("resuming") {
            return Err(gateway(format!(
                "sandbox {id} is paused: connect to it (Sandbox.connect) to resume it, then retry"
            )));
        }
        if let Some(b) = r.busy {
            return Err(gateway(format!(
                "sandbox {id} is {b}; port {port} is unreachable until that finishes"
            )));
        }
        if !r.row.agent {
            return Err(gateway(format!(
                "sandbox {id} has no agent (template {:?} runs the built-in test guest), so port {port} cannot be reached",
                r.row.template_id
            )));
        }
        let Some(gate) = r.gate.clone() else {
            return Err(gateway(format!("sandbox {id} is not running")));
        };
        Ok(proxy::Target {
            socket: self.vsock_path(id),
            gate,
        })
    }

    /// Traffic for a paused sandbox created with `autoResume` resumes it
    /// (as `connect` with the default timeout would), if the request may
    /// reach it at all (a secured sandbox's envd port needs its token).
    /// `Ok(true)`: it was resumed here.
    pub async fn auto_resume(
        self: &Arc<Self>,
        id: &str,
        port: u16,
        token: Option<&str>,
    ) -> Result<bool, ApiError> {
        let Some(e) = self.map().get(id).cloned() else {
            return Ok(false);
        };
        {
            let r = e.rec();
            if r.gone
                || r.row.state != RowState::Paused
                || !r.row.auto_resume
                || !envd_token_ok(&r.row, port, token)
            {
                return Ok(false);
            }
        }
        tracing::info!(sandbox = %id, port, "auto-resume on traffic");
        let (resumed, _) = self.connect(id, ConnectBody::default()).await?;
        Ok(resumed)
    }

    /// The live sandbox whose envd access token is `token`: the SDK's
    /// `Sandbox.connect(id)` sends envd requests with only that token when
    /// `NOVITA_SANDBOX_URL` is set. A linear scan; sandboxes per server are
    /// few.
    pub fn sandbox_by_envd_token(&self, token: &str) -> Option<String> {
        self.map().values().find_map(|e| {
            let r = e.rec();
            let hit = r
                .row
                .envd_token
                .as_deref()
                .is_some_and(|t| crate::ct_eq(t.as_bytes(), token.as_bytes()));
            (!r.gone && hit).then(|| e.id.clone())
        })
    }

    /// `(id, envd access token)` of every live secured sandbox: the proxy
    /// routes a signed file URL (which names no sandbox) to the sandbox
    /// whose token made its signature, and checks signatures for the rest.
    pub fn envd_tokens(&self) -> Vec<(String, String)> {
        self.map()
            .values()
            .filter_map(|e| {
                let r = e.rec();
                let t = r.row.envd_token.clone().filter(|_| !r.gone)?;
                Some((e.id.clone(), t))
            })
            .collect()
    }

    /// What metrics and logs need of every live sandbox (see
    /// [`super::metrics`]).
    pub fn sandbox_facts(&self) -> Vec<super::metrics::SandboxFacts> {
        self.map()
            .values()
            .filter_map(|e| {
                let r = e.rec();
                if r.gone {
                    return None;
                }
                let running = r.row.state == RowState::Running && r.busy.is_none();
                Some(super::metrics::SandboxFacts {
                    id: e.id.clone(),
                    running,
                    worker_pid: r.worker.as_ref().filter(|_| running).map(|w| w.pid()),
                    cpu_count: r.row.cpu_count,
                    memory_mb: r.row.memory_mb,
                    disk_mb: r.row.disk_mb,
                    dir: self.sandbox_dir(&e.id),
                })
            })
            .collect()
    }

    /// Records whether the agent of `id` could be reached (only envd-port
    /// outcomes: a user port that nothing listens on is not the agent's
    /// fault).
    pub fn agent_reachable(&self, id: &str, port: u16, error: Option<&str>) {
        if u32::from(port) != crate::vsock::ENVD_PORT {
            return;
        }
        let e = self.map().get(id).cloned();
        if let Some(e) = e {
            e.rec().agent_error = error.map(str::to_string);
        }
    }

    fn sandbox_out(&self, row: &Row) -> SandboxOut {
        SandboxOut {
            sandbox_id: row.id.clone(),
            template_id: row.template_id.clone(),
            client_id: CLIENT_ID,
            envd_version: envd_version(row),
            envd_access_token: row.envd_token.clone(),
            alias: row.alias.clone(),
            domain: self.cfg.domain.clone(),
            traffic_access_token: self.net_token(&row.id),
        }
    }

    fn listed_out(&self, row: &Row) -> ListedOut {
        let (state, end) = match row.state {
            RowState::Running => ("running", row.end_ms),
            RowState::Paused => ("paused", self.retention_end(row)),
        };
        ListedOut {
            sandbox_id: row.id.clone(),
            template_id: row.template_id.clone(),
            client_id: CLIENT_ID,
            alias: row.alias.clone(),
            started_at: rfc3339(row.started_ms),
            end_at: rfc3339(end),
            cpu_count: row.cpu_count,
            memory_mb: row.memory_mb,
            disk_size_mb: row.disk_mb,
            state,
            envd_version: envd_version(row),
            metadata: row.metadata.clone(),
        }
    }

    // ---- operations -------------------------------------------------------

    /// `POST /sandboxes`.
    pub async fn create(self: &Arc<Self>, req: NewSandbox) -> Result<SandboxOut, ApiError> {
        let template_name = req.template_id.clone().unwrap_or_else(|| "base".into());
        let timeout = self.timeout_secs(req.timeout, true)?;
        models::check_sizes(&req).map_err(ApiError::bad_request)?;
        if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::bad_request("volume mounts are not supported"));
        }
        if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
            return Err(ApiError::bad_request("MCP servers are not supported"));
        }
        self.db_ready().await?;
        let on_timeout_pause = match req.lifecycle.as_ref().and_then(|l| l.on_timeout.as_deref()) {
            Some("pause") => true,
            Some("kill") => false,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "lifecycle.onTimeout must be \"kill\" or \"pause\" (got {other:?})"
                )))
            }
            None => req.auto_pause.unwrap_or(false),
        };
        let auto_resume = req
            .lifecycle
            .as_ref()
            .and_then(|l| l.auto_resume)
            .or(req.auto_resume.as_ref().map(|a| a.enabled))
            .unwrap_or(false);
        // A snapshot id where a template id goes: the sandbox resumes from
        // the snapshot (left untouched) with the template it was taken from.
        let from_snapshot = self.snapshot_for_create(&template_name).await?;
        let template_for = from_snapshot
            .as_ref()
            .and_then(|s| s.manifest.labels.get("template").cloned())
            .unwrap_or_else(|| template_name.clone());
        let mut template = self.resolve_template(&template_for).await?;
        let slot = self.take_slot()?;
        let mem = self.take_memory(template.memory_mb)?;
        let pristine = template.clone();

        let id = models::new_id();
        let net_spec = self.net_prepare_create(&req, &mut template, &id).await?;
        // Warm templates: resume from the template's snapshot if there is
        // one (then exactly as from a user snapshot), else boot cold and
        // build it afterwards.
        let warm = match &from_snapshot {
            Some(_) => warm::Lookup::Off,
            None => {
                self.warm_lookup(&template_for, &pristine, template.boot.net.is_some())
                    .await
            }
        };
        let (from_snapshot, warm_snapshot, warm_build) = match warm {
            warm::Lookup::Hit(s) => {
                let sid = s.manifest.id.clone();
                (Some(*s), Some(sid), None)
            }
            warm::Lookup::Miss { id, inputs, stale } => (
                from_snapshot,
                None,
                Some((template_for.clone(), id, inputs, stale)),
            ),
            warm::Lookup::Off => (from_snapshot, None, None),
        };
        let net_slot = net_spec.slot;
        let dir = self.sandbox_dir(&id);
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            self.net_release(&id, false, net_slot).await;
            return Err(internal(&format!("create {}", dir.display()), e));
        }
        if super::fault("slow-create") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        template.boot.console = self.console(&id);
        if let Some(base) = &template.rootfs {
            template.boot.disk = Some(DiskSpec {
                base: base.clone(),
                overlay: dir.join(DISK_OVERLAY),
            });
        }
        let vsock = self.vsock_path(&id);
        if template.agent {
            template.boot.vsock = Some(vsock.clone());
        }
        if template.interpreter && self.cfg.backend == BackendKind::Fake {
            template.boot.interpreter = Some(self.cfg.interpreter_python.clone());
        }
        let fail = |msg: String| {
            let dir = dir.clone();
            let vsock = vsock.clone();
            let mgr = self.clone();
            let id = id.clone();
            async move {
                let _ =
                    tokio::task::spawn_blocking(move || crate::worker::vm::kill_host_agent(&vsock))
                        .await;
                mgr.net_release(&id, false, net_slot).await;
                let _ = tokio::fs::remove_dir_all(&dir).await;
                ApiError::internal(msg)
            }
        };
        let ro: Vec<PathBuf> = match &template.boot.kernel {
            KernelSpec::Path(k) => vec![k.clone()],
            KernelSpec::TestGuest => vec![],
        }
        .into_iter()
        .chain(template.boot.initrd.clone())
        .chain(template.boot.disk.as_ref().map(|d| d.base.clone()))
        // A sandbox made from a snapshot reads it (memory, state, disk
        // layer): visible, read-only, in its jail.
        .chain(from_snapshot.as_ref().map(|s| s.dir.clone()))
        .collect();
        let worker = match self
            .spawn_worker(
                &id,
                ro,
                template.boot.mem_bytes,
                u32::from(template.boot.vcpus),
                self.net_live_path(&id),
            )
            .await
        {
            Ok(w) => Arc::new(w),
            Err(e) => return Err(fail(format!("starting the sandbox worker failed: {e}")).await),
        };
        let req_boot = match &from_snapshot {
            None => Request::Boot {
                backend: self.cfg.backend,
                config: template.boot.clone(),
            },
            Some(s) => Request::Restore {
                backend: self.cfg.backend,
                snapshot_dir: s.dir.clone(),
                mode: RestoreModeSpec::Lazy,
                console: template.boot.console.clone(),
                vsock: template.agent.then(|| vsock.clone()),
                disk_base: template.rootfs.clone(),
                own_overlay: Some(dir.join(DISK_OVERLAY)),
                memory_backing: self.cfg.memory_backing,
                // A clone's guest keeps the address of the sandbox it was
                // snapshotted from, which belongs to that sandbox's slot:
                // snapshots of networked sandboxes are not cloned with a
                // network yet (README, Snapshots and clones).
                net: None,
                // Restored from a shared snapshot elsewhere: its first
                // pause writes a full layer.
                track_writes: false,
            },
        };
        let (guest_round, memory_backing) = match worker.request(req_boot, BOOT_TIMEOUT).await {
            Ok(Reply::Running {
                guest,
                memory_backing,
            }) => (guest.map(|g| g.round), memory_backing),
            Ok(other) => {
                worker.shutdown(SHUTDOWN_GRACE).await;
                return Err(fail(format!("boot: unexpected reply {other:?}")).await);
            }
            Err(e) => {
                worker.shutdown(SHUTDOWN_GRACE).await;
                let msg = format!("booting the sandbox failed: {e}");
                if msg.contains(crate::vmm::backing::NR_HUGEPAGES) {
                    // The hugetlb pool cannot hold this sandbox: like
                    // max_running, a capacity limit (others unaffected).
                    let _ = fail(msg.clone()).await;
                    return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, msg));
                }
                return Err(fail(msg).await);
            }
        };
        let envd_token = (template.agent && req.secure == Some(true)).then(new_envd_token);
        if template.agent {
            let waited = std::time::Instant::now();
            if let Err(why) = self
                .wait_for_agent(&worker, &vsock, template.interpreter)
                .await
            {
                let tail = console_tail(&dir.join("console.log"), 20);
                worker.shutdown(SHUTDOWN_GRACE).await;
                tracing::warn!(sandbox = %id, "agent never answered: {why}");
                let mut msg =
                    format!("the sandbox's agent never answered: {why}; the sandbox was removed");
                if !tail.is_empty() {
                    msg.push_str(&format!(". Last console lines:\n{tail}"));
                }
                return Err(fail(msg).await);
            }
            tracing::info!(sandbox = %id, ms = waited.elapsed().as_millis() as u64, "agent answered");
            let no_envs = Default::default();
            let envs = req.env_vars.as_ref().unwrap_or(&no_envs);
            if let Some(s) = &from_snapshot {
                // Clones must diverge: fresh entropy, own env vars and token,
                // before anyone can reach the sandbox.
                let entropy: [u8; 64] = rand::random();
                if let Err(why) = proxy::refresh_agent(
                    &vsock,
                    envs,
                    envd_token.as_deref(),
                    s.manifest.labels.get("envd_token").map(String::as_str),
                    &entropy,
                    proxy::HANDSHAKE_TIMEOUT,
                )
                .await
                {
                    worker.shutdown(SHUTDOWN_GRACE).await;
                    return Err(fail(format!(
                        "the sandbox's agent refused its fresh state: {why}; the sandbox was removed"
                    ))
                    .await);
                }
            } else if !envs.is_empty() || envd_token.is_some() {
                if let Err(why) = proxy::init_agent(
                    &vsock,
                    envs,
                    envd_token.as_deref(),
                    proxy::HANDSHAKE_TIMEOUT,
                )
                .await
                {
                    worker.shutdown(SHUTDOWN_GRACE).await;
                    return Err(fail(format!(
                        "the sandbox's agent refused its envVars: {why}; the sandbox was removed"
                    ))
                    .await);
                }
            }
        }
        let now = now_ms();
        let row = Row {
            id: id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            template_id: template_for,
            alias: Some(template_name),
            state: RowState::Running,
            created_ms: now,
            started_ms: now,
            end_ms: now + timeout * 1000,
            on_timeout_pause,
            auto_resume,
            metadata: req.metadata.unwrap_or_default(),
            cpu_count: template.cpu_count,
            memory_mb: template.memory_mb,
            disk_mb: template.disk_mb,
            allow_internet: req.allow_internet_access.unwrap_or(true),
            snapshot_gen: 0,
            guest_round,
            worker_pid: Some(worker.pid()),
            agent: template.agent,
            // Secured on request (the SDK asks by default): envd traffic must
            // carry this token, and can be routed by it alone.
            envd_token,
            generation: 0,
            owner: None,
        };
        if let Err(e) = self.put_row(row.clone()).await {
            worker.shutdown(SHUTDOWN_GRACE).await;
            return Err(fail(e.message).await);
        }
        if let Err(e) = self.net_commit(&id, net_spec).await {
            worker.shutdown(SHUTDOWN_GRACE).await;
            self.delete_row(&id).await;
            return Err(fail(e.message).await);
        }
        let out = self.sandbox_out(&row);
        let entry = Arc::new(Entry {
            id: id.clone(),
            op: tokio::sync::Mutex::new(()),
            rec: StdMutex::new(Rec {
                row,
                busy: None,
                worker: Some(worker.clone()),
                slot: Some(slot),
                mem: Some(mem),
                unsaved: false,
                gone: false,
                expiry_queued: false,
                snapshot_usage: None,
                gate: Some(Gate::new()),
                agent_error: None,
                memory_backing,
                warm_snapshot: warm_snapshot.clone(),
                last_layer: None,
            }),
        });
        self.map().insert(id.clone(), entry.clone());
        self.watch_worker(entry, worker.clone());
        self.timer.notify_one();
        tracing::info!(sandbox = %id, pid = worker.pid(), timeout_s = timeout,
            warm_snapshot = warm_snapshot.as_deref().unwrap_or("-"), "sandbox created (running)");
        if let Some((name, wid, inputs, stale)) = warm_build {
            self.warm_build_spawn(name, pristine, wid, inputs, stale);
        }
        Ok(out)
    }

    /// `GET /sandboxes/{id}`.
    pub async fn get(&self, id: &str) -> Result<DetailOut, ApiError> {
        let e = self.entry(id)?;
        let (row, busy, worker, snapshot_usage) = {
            let r = e.rec();
            if r.gone || (r.row.state == RowState::Paused && now_ms() >= self.retention_end(&r.row))
            {
                return Err(self.not_found(id));
            }
            (r.row.clone(), r.busy, r.worker.clone(), r.snapshot_usage)
        };
        let memory_backing = e.rec().memory_backing;
        let warm_snapshot = e.rec().warm_snapshot.clone();
        let last_layer = e.rec().last_layer;
        let mut guest_round = row.guest_round;
        let writing = self.write_job(id).is_some();
        if row.state == RowState::Paused && !writing {
            // The guest's own state: what its snapshot holds, not the round
            // stored when it was paused.
            // (Adopted from a host of the pool that is gone, its snapshot is
            // still in the bucket: the stored round.)
            let (backend, dir) = (self.cfg.backend, self.snapshot_dir(id, row.snapshot_gen));
            if dir.is_dir() {
                guest_round = tokio::task::spawn_blocking(move || snapshot_guest(backend, &dir))
                    .await
                    .ok()
                    .flatten()
                    .map(|g| g.round);
            }
        }
        if let (RowState::Running, None, Some(w)) = (row.state, busy, &worker) {
            if let Ok(Reply::Status { guest: Some(g), .. }) =
                w.request(Request::Status, STATUS_TIMEOUT).await
            {
                guest_round = Some(g.round);
                let mut r = e.rec();
                if r.worker.as_ref().is_some_and(|x| Arc::ptr_eq(x, w)) {
                    r.row.guest_round = Some(g.round);
                }
            }
        }
        let running = row.state == RowState::Running;
        let agent = match (row.agent, row.state, busy) {
            (false, _, _) => None,
            (true, RowState::Paused, _) => Some("paused".to_string()),
            (true, RowState::Running, Some(b)) => Some(b.to_string()),
            (true, RowState::Running, None) => {
                let probe = proxy::probe_health(
                    &self.vsock_path(id),
                    crate::vsock::ENVD_PORT as u16,
                    AGENT_PROBE_TIMEOUT,
                )
                .await;
                let mut r = e.rec();
                match probe {
                    Ok(()) => {
                        r.agent_error = None;
                        Some("ready".to_string())
                    }
                    Err(err) => {
                        let msg = format!("unreachable: {err}");
                        r.agent_error = Some(msg.clone());
                        Some(msg)
                    }
                }
            }
        };
        Ok(DetailOut {
            listed: self.listed_out(&row),
            domain: self.cfg.domain.clone(),
            allow_internet_access: row.allow_internet,
            network: self.net_out(&row.id),
            lifecycle: LifecycleOut {
                on_timeout: if row.on_timeout_pause {
                    "pause"
                } else {
                    "kill"
                },
                auto_resume: row.auto_resume,
            },
            stasis: StasisOut {
                guest_round,
                paused_at_round: if running { None } else { row.guest_round },
                worker_pid: if running {
                    worker.map(|w| w.pid())
                } else {
                    None
                },
                created_at: rfc3339(row.created_ms),
                snapshot_bytes: snapshot_usage.filter(|_| !running).map(|u| u.allocated),
                snapshot_apparent_bytes: snapshot_usage.filter(|_| !running).map(|u| u.apparent),
                busy,
                memory_backing: memory_backing.filter(|_| running),
                snapshot_durable: (!running).then_some(!writing),
                agent,
                snapshot_upload: self
                    .cfg
                    .snapshot_upload
                    .as_ref()
                    .and_then(|u| u.status(id))
                    .filter(|_| !running),
                warm_snapshot,
                host: self.in_pool().then(|| self.host_id().to_string()),
                snapshot_layers: last_layer.map(|l| l.layers),
                last_pause_bytes: last_layer.map(|l| l.bytes),
                last_pause_memory_bytes: last_layer.and_then(|l| l.memory_bytes),
            },
        })
    }

    /// `GET /v2/sandboxes` and `GET /sandboxes`: newest first; returns the
    /// page and the next page's token.
    pub fn list(&self, q: &ListQuery) -> (Vec<ListedOut>, Option<String>) {
        self.list_with(q, Vec::new())
    }

    /// [`Manager::list`] of this host's sandboxes and `others` (rows of the
    /// pool's other hosts, [`Manager::pool_rows`]).
    pub fn list_with(&self, q: &ListQuery, others: Vec<Row>) -> (Vec<ListedOut>, Option<String>) {
        let now = now_ms();
        let others = others.into_iter().filter(|r| {
            let keep = match r.state {
                RowState::Running => q.running,
                RowState::Paused => q.paused && now < self.retention_end(r),
            };
            keep && q.before_seq.is_none_or(|s| r.seq < s)
                && q.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v))
        });
        let mut rows: Vec<Row> = self
            .map()
            .values()
            .filter_map(|e| {
                let r = e.rec();
                let keep = !r.gone
                    && match r.row.state {
                        RowState::Running => q.running,
                        RowState::Paused => q.paused && now < self.retention_end(&r.row),
                    }
                    && q.before_seq.is_none_or(|s| r.row.seq < s)
                    && q.metadata
                        .iter()
                        .all(|(k, v)| r.row.metadata.get(k) == Some(v));
                keep.then(|| r.row.clone())
            })
            .chain(others)
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let more = rows.len() > q.limit;
        rows.truncate(q.limit);
        let next = if more {
            rows.last().map(|r| r.seq.to_string())
        } else {
            None
        };
        (rows.iter().map(|r| self.listed_out(r)).collect(), next)
    }

    /// `POST /sandboxes/{id}/pause`.
    pub async fn pause(&self, id: &str) -> Result<(), ApiError> {
        let e = self.entry(id)?;
        let _g = e.op.lock().await;
        self.check_live(&e).await?;
        self.db_ready().await?;
        if e.rec().row.state == RowState::Paused {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        self.do_pause(&e).await
    }

    /// The paused-sandbox quotas (`--max-paused`, `--max-snapshot-bytes`):
    /// 429 if pausing one more sandbox would exceed them. Sandboxes being
    /// paused count as paused.
    fn check_pause_quota(&self, id: &str) -> Result<(), ApiError> {
        let l = self.cfg.limits;
        if l.max_paused == 0 && l.max_snapshot_bytes == 0 {
            return Ok(());
        }
        let (mut paused, mut bytes) = (0usize, 0u64);
        for (other, e) in self.map().iter() {
            if other == id {
                continue;
            }
            let r = e.rec();
            if r.gone {
                continue;
            }
            if r.row.state == RowState::Paused || r.busy == Some("pausing") {
                paused += 1;
                bytes += r.snapshot_usage.map_or(0, |u| u.allocated);
            }
        }
        if l.max_paused != 0 && paused >= l.max_paused {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the limit of {} paused sandboxes is reached (--max-paused); kill a paused sandbox first (this one keeps running)",
                    l.max_paused
                ),
            ));
        }
        if l.max_snapshot_bytes != 0 && bytes >= l.max_snapshot_bytes {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "snapshots already take {bytes} bytes of the {} allowed (--max-snapshot-bytes); kill a paused sandbox first (this one keeps running)",
                    l.max_snapshot_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Under the op lock, state running: snapshot and stop the worker.
    async fn do_pause(&self, e: &Entry) -> Result<(), ApiError> {
        self.do_pause_mode(e, false, false).await.map(|_| ())
    }

    /// [`Self::do_pause`]; with `background`, the worker answers once the VM
    /// is stopped and captured and writes the snapshot in the background:
    /// the sandbox is then paused (not durable yet) and the write's job is
    /// returned (the fake backend writes at once: none). With `full`, the
    /// snapshot is a full layer even where pauses are incremental.
    async fn do_pause_mode(
        &self,
        e: &Entry,
        background: bool,
        full: bool,
    ) -> Result<Option<Arc<WriteJob>>, ApiError> {
        self.check_pause_quota(&e.id)?;
        let (worker, gen) = {
            let mut r = e.rec();
            r.busy = Some("pausing");
            // Open proxied connections end now; new ones are refused.
            if let Some(g) = r.gate.take() {
                g.close();
            }
            (r.worker.clone(), r.row.snapshot_gen + 1)
        };
        let Some(worker) = worker else {
            self.remove(e, "it had no worker").await;
            return Err(ApiError::internal("sandbox had no worker; removed"));
        };
        let dir = self.snapshot_dir(&e.id, gen);
        let started = std::time::Instant::now();
        let incremental = self.incremental_pauses() && !full;
        let req = if background {
            Request::PauseBackground {
                snapshot_dir: dir.clone(),
                incremental,
            }
        } else {
            Request::Pause {
                snapshot_dir: dir.clone(),
                incremental,
            }
        };
        let res = if super::fault("pause") {
            Err(WorkerError::Remote("injected fault: pause".into()))
        } else {
            worker.request(req, PAUSE_TIMEOUT).await
        };
        match res {
            Ok(Reply::PausedWriting { guest }) => {
                let (done, _) = tokio::sync::watch::channel(None);
                let job = Arc::new(WriteJob {
                    worker: worker.clone(),
                    gen,
                    old_gen: gen - 1,
                    started,
                    done,
                });
                {
                    let mut r = e.rec();
                    // The worker stays, holding the VM (and its slot), until
                    // the write is durable; its exit is expected then.
                    r.worker = None;
                    r.row.state = RowState::Paused;
                    r.row.snapshot_gen = gen;
                    if let Some(g) = guest {
                        r.row.guest_round = Some(g.round);
                    }
                    r.snapshot_usage = None;
                    r.busy = None;
                }
                self.writes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(e.id.clone(), job.clone());
                self.timer.notify_one();
                tracing::info!(
                    sandbox = %e.id,
                    ms = started.elapsed().as_millis() as u64,
                    "sandbox paused; its snapshot is being written"
                );
                Ok(Some(job))
            }
            Ok(Reply::Paused {
                snapshot_bytes,
                guest,
            }) => {
                let mut row = {
                    let mut r = e.rec();
                    r.worker = None; // its exit is expected now
                    r.slot = None;
                    r.mem = None;
                    r.row.clone()
                };
                if tokio::time::timeout(SHUTDOWN_GRACE, worker.wait_exit())
                    .await
                    .is_err()
                {
                    worker.kill();
                }
                // The namespace goes; the slot (the guest's address) stays.
                self.net_release(&e.id, true, None).await;
                let old = row.snapshot_gen;
                row.state = RowState::Paused;
                row.snapshot_gen = gen;
                row.worker_pid = None;
                if let Some(g) = guest {
                    row.guest_round = Some(g.round);
                }
                let saved = if super::fault("db-after-pause") {
                    Err(ApiError::internal("store: injected fault: db-after-pause"))
                } else {
                    self.put_row(row.clone()).await
                };
                let (usage, facts) = self.facts_blocking(&e.id, gen).await;
                // The previous snapshot goes only once the new one is on
                // record: if saving failed, the stored row still names it.
                // An incremental pause keeps it (and its parents): the new
                // generation's chain names them.
                if old > 0 && saved.is_ok() {
                    self.prune_generations(&e.id, gen).await;
                }
                if saved.is_err() {
                    e.rec().unsaved = true;
                }
                let saved = saved.map_err(|err| {
                    tracing::error!(sandbox = %e.id, "paused, but saving its record failed (retried in the background): {}", err.message);
                    ApiError::internal(format!(
                        "the sandbox is paused (and can be resumed) but saving its record failed: {}",
                        err.message
                    ))
                });
                {
                    let mut r = e.rec();
                    r.row = row;
                    r.busy = None;
                    r.snapshot_usage = Some(usage);
                    r.last_layer = Some(facts);
                }
                self.timer.notify_one();
                let uploaded = self.remote_upload(&e.id, gen).await;
                tracing::info!(
                    sandbox = %e.id,
                    snapshot_bytes,
                    apparent_bytes = usage.apparent,
                    layers = facts.layers,
                    layer_bytes = facts.bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "sandbox paused"
                );
                saved.and(uploaded).map(|()| None)
            }
            Err(WorkerError::Remote(msg)) => {
                // The worker kept the VM running.
                {
                    let mut r = e.rec();
                    r.busy = None;
                    r.gate = Some(Gate::new());
                }
                let _ = tokio::fs::remove_dir_all(&dir).await;
                tracing::warn!(sandbox = %e.id, "pause failed, still running: {msg}");
                Err(ApiError::internal(format!(
                    "pausing failed (the sandbox keeps running): {msg}"
                )))
            }
            Ok(other) => {
                self.remove(e, "its worker answered a pause wrongly").await;
                Err(ApiError::internal(format!(
                    "pause: unexpected reply {other:?}; sandbox removed"
                )))
            }
            Err(err) => {
                self.remove(e, &format!("its worker failed during pause ({err})"))
                    .await;
                Err(ApiError::internal(format!(
                    "pausing failed: {err}; sandbox removed"
                )))
            }
        }
    }

    fn write_job(&self, id: &str) -> Option<Arc<WriteJob>> {
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn take_write(&self, id: &str) -> Option<Arc<WriteJob>> {
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// `POST /sandboxes/{id}/pause` with `{"sync": sync}`.
    ///
    /// `sync: true` answers once the snapshot is durable. `sync: false`
    /// answers once the vCPUs are stopped and the VM captured; the worker
    /// writes the memory in the background and keeps the VM until the
    /// snapshot is durable, then exits (`stasis.snapshotDurable` turns true).
    /// A second pause meanwhile reuses the first: `sync: false` answers at
    /// once, `sync: true` once the write is durable.
    pub async fn pause_with(self: &Arc<Self>, id: &str, sync: bool) -> Result<(), ApiError> {
        let e = self.entry(id)?;
        let _g = e.op.lock().await;
        self.check_live(&e).await?;
        self.db_ready().await?;
        if let Some(job) = self.write_job(id) {
            return if sync {
                self.finish_write(&e, &job).await
            } else {
                Ok(())
            };
        }
        if e.rec().row.state == RowState::Paused {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        if let Some(job) = self.do_pause_mode(&e, !sync, false).await? {
            self.watch_write(e.clone(), job);
        }
        Ok(())
    }

    /// Waits for an asynchronous pause's write, then finishes it (under the
    /// op lock).
    fn watch_write(self: &Arc<Self>, e: Arc<Entry>, job: Arc<WriteJob>) {
        let mgr = self.clone();
        tokio::spawn(async move {
            let res = match job
                .worker
                .request(Request::AwaitDurable, PAUSE_TIMEOUT)
                .await
            {
                Ok(Reply::Durable { snapshot_bytes }) => Ok(snapshot_bytes),
                Ok(other) => Err(format!("unexpected reply {other:?}")),
                Err(err) => Err(err.to_string()),
            };
            job.done.send_replace(Some(res));
            let _g = e.op.lock().await;
            if let Err(err) = mgr.finish_write(&e, &job).await {
                tracing::warn!(sandbox = %e.id, "background snapshot write: {}", err.message);
            }
        });
    }

    /// Under the op lock: waits until `job`'s write ended, then (if the job
    /// is still the sandbox's) makes the sandbox an ordinary paused one (the
    /// snapshot stored, the worker stopped) or, if the write failed, running
    /// again from the memory its worker kept.
    async fn finish_write(
        self: &Arc<Self>,
        e: &Arc<Entry>,
        job: &Arc<WriteJob>,
    ) -> Result<(), ApiError> {
        let mut rx = job.done.subscribe();
        let res = loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                break r;
            }
            if rx.changed().await.is_err() {
                break Err("the write's watcher is gone".to_string());
            }
        };
        let current = self.write_job(&e.id).is_some_and(|j| Arc::ptr_eq(&j, job));
        if !current || e.rec().gone {
            return Ok(());
        }
        // The job leaves `writes` (GET then says durable) only once the
        // sandbox is an ordinary paused one.
        match res {
            Ok(snapshot_bytes) => {
                job.worker.shutdown(SHUTDOWN_GRACE).await;
                let row = {
                    let mut r = e.rec();
                    r.slot = None;
                    r.mem = None;
                    r.row.worker_pid = None;
                    r.row.clone()
                };
                // The namespace goes; the slot (the guest's address) stays.
                self.net_release(&e.id, true, None).await;
                let saved = if super::fault("db-after-pause") {
                    Err(ApiError::internal("store: injected fault: db-after-pause"))
                } else {
                    self.put_row(row).await
                };
                let (usage, facts) = self.facts_blocking(&e.id, job.gen).await;
                // As in a synchronous pause: the previous snapshot goes only
                // once the new one is on record (its chain stays).
                if job.old_gen > 0 && saved.is_ok() {
                    self.prune_generations(&e.id, job.gen).await;
                }
                if saved.is_err() {
                    e.rec().unsaved = true;
                }
                e.rec().snapshot_usage = Some(usage);
                e.rec().last_layer = Some(facts);
                self.take_write(&e.id);
                self.timer.notify_one();
                let _ = self.remote_upload(&e.id, job.gen).await;
                tracing::info!(
                    sandbox = %e.id,
                    snapshot_bytes,
                    ms = job.started.elapsed().as_millis() as u64,
                    "snapshot durable"
                );
                saved
            }
            Err(msg) => {
                tracing::warn!(sandbox = %e.id, "background snapshot write failed: {msg}; resuming from memory");
                let timeout_s = self.cfg.default_timeout_s;
                self.take_write(&e.id);
                self.resume_from_memory(e, job, timeout_s).await?;
                Err(ApiError::internal(format!(
                    "writing the snapshot failed (the sandbox runs again): {msg}"
                )))
            }
        }
    }

    /// Under the op lock, the job taken from `writes`: continue the VM its
    /// worker kept, at once: the write is abandoned (a write that already
    /// ended is kept as the new snapshot). No disk round trip: the memory
    /// never left the worker.
    async fn resume_from_memory(
        self: &Arc<Self>,
        e: &Arc<Entry>,
        job: &Arc<WriteJob>,
        timeout_s: i64,
    ) -> Result<Row, ApiError> {
        e.rec().busy = Some("resuming");
        let started = std::time::Instant::now();
        let (guest, memory_backing) = match job
            .worker
            .request(Request::ResumeFromMemory, PAUSE_TIMEOUT)
            .await
        {
            Ok(Reply::Running {
                guest,
                memory_backing,
            }) => (guest, memory_backing),
            other => {
                let why = match other {
                    Ok(r) => format!("unexpected reply {r:?}"),
                    Err(err) => err.to_string(),
                };
                self.remove(
                    e,
                    &format!("its worker failed to resume from memory ({why})"),
                )
                .await;
                return Err(ApiError::internal(format!(
                    "resuming from memory failed: {why}; sandbox removed"
                )));
            }
        };
        // A write that completed before it was abandoned is a snapshot of
        // the state the guest goes on from: it replaces the old one.
        let written = self.snapshot_dir(&e.id, job.gen).is_dir();
        let now = now_ms();
        let mut row = e.rec().row.clone();
        row.state = RowState::Running;
        row.started_ms = now;
        row.end_ms = now + timeout_s * 1000;
        row.worker_pid = Some(job.worker.pid());
        row.snapshot_gen = if written { job.gen } else { job.old_gen };
        if let Some(g) = guest {
            row.guest_round = Some(g.round);
        }
        if written && job.old_gen > 0 {
            self.prune_generations(&e.id, job.gen).await;
        }
        if let Err(err) = self.put_row(row.clone()).await {
            tracing::warn!(sandbox = %e.id, "storing the resumed sandbox failed: {}", err.message);
        }
        {
            let mut r = e.rec();
            r.row = row.clone();
            r.worker = Some(job.worker.clone());
            r.busy = None;
            r.snapshot_usage = None;
            r.gate = Some(Gate::new());
            r.agent_error = None;
            r.memory_backing = memory_backing;
        }
        self.watch_worker(e.clone(), job.worker.clone());
        self.timer.notify_one();
        tracing::info!(
            sandbox = %e.id,
            ms = started.elapsed().as_millis() as u64,
            "sandbox resumed from memory (its snapshot was still being written)"
        );
        Ok(row)
    }

    /// Under the op lock, state paused: start a worker from the snapshot.
    async fn do_resume(self: &Arc<Self>, e: &Arc<Entry>, timeout_s: i64) -> Result<Row, ApiError> {
        // Paused asynchronously, snapshot not durable yet: the worker still
        // holds the VM; it goes on from memory.
        if let Some(job) = self.take_write(&e.id) {
            return self.resume_from_memory(e, &job, timeout_s).await;
        }
        let slot = self.take_slot()?;
        let mem = self.take_memory(e.rec().row.memory_mb)?;
        let gen = {
            let mut r = e.rec();
            r.busy = Some("resuming");
            r.row.snapshot_gen
        };
        let started = std::time::Instant::now();
        let fail = |msg: String| {
            e.rec().busy = None;
            tracing::warn!(sandbox = %e.id, "resume failed: {msg}");
            ApiError::internal(format!("resuming failed (the sandbox stays paused): {msg}"))
        };
        // The disk's base image is the template's root filesystem, never a
        // path recorded in the snapshot (untrusted input). A template that
        // is gone leaves none: a snapshot with a disk then fails to restore.
        let template_id = e.rec().row.template_id.clone();
        let disk_base = match self.resolve_template(&template_id).await {
            Ok(t) => t.rootfs,
            Err(err) => {
                tracing::warn!(sandbox = %e.id, template = %template_id,
                    "resume: template unavailable ({}); restoring without a disk base", err.message);
                None
            }
        };
        let (mem_bytes, vcpus) = {
            let r = e.rec();
            (r.row.memory_mb.saturating_mul(1 << 20), r.row.cpu_count)
        };
        // Adopted from a host of the pool that is gone: the snapshot comes
        // from the bucket first.
        if let Err(msg) = self.fetch_remote_snapshot(&e.id, gen).await {
            return Err(fail(msg));
        }
        // The namespace first: a jailed worker joins it.
        let net = match self.net_for_resume(&e.id).await {
            Ok(n) => n,
            Err(err) => return Err(fail(err.message)),
        };
        // A jailed worker sees the parent layers of an incremental
        // snapshot read-only (they are siblings in its writable sandbox
        // directory; its own generation stays writable: its disk overlay
        // is used in place).
        let ro: Vec<PathBuf> = disk_base
            .iter()
            .cloned()
            .chain(self.chain_dirs(&e.id, gen).into_iter().skip(1))
            .collect();
        let worker = match self
            .spawn_worker(
                &e.id,
                ro,
                mem_bytes,
                vcpus,
                net.as_ref().map(|n| n.netns.clone()),
            )
            .await
        {
            Ok(w) => Arc::new(w),
            Err(err) => {
                self.net_release(&e.id, true, None).await;
                return Err(fail(err.to_string()));
            }
        };
        // From here on the guest may run and write to the snapshot's disk
        // overlay (used in place): the marker says so to a later recovery,
        // which then must not offer this snapshot as a paused sandbox.
        // Shared metadata: the conditional update paused -> running that
        // makes this host the sandbox's runner (a snapshot is never resumed
        // twice); lost or database down: the guest never runs.
        if let Err(err) = self.claim_for_resume(&e.id).await {
            worker.shutdown(SHUTDOWN_GRACE).await;
            self.net_release(&e.id, true, None).await;
            e.rec().busy = None;
            return Err(err);
        }
        let marker = self.snapshot_dir(&e.id, gen).join(RESUMED_MARKER);
        if let Err(err) = tokio::fs::write(&marker, b"").await {
            self.release_claim(e).await;
            worker.shutdown(SHUTDOWN_GRACE).await;
            self.net_release(&e.id, true, None).await;
            return Err(fail(format!("writing {}: {err}", marker.display())));
        }
        let req = Request::Restore {
            backend: self.cfg.backend,
            snapshot_dir: self.snapshot_dir(&e.id, gen),
            mode: RestoreModeSpec::Lazy,
            console: self.console(&e.id),
            vsock: e.rec().row.agent.then(|| self.vsock_path(&e.id)),
            disk_base,
            own_overlay: None,
            memory_backing: self.cfg.memory_backing,
            net,
            // The next pause writes only what changed since this resume.
            track_writes: self.incremental_pauses(),
        };
        let (guest, memory_backing) = match worker.request(req, RESTORE_TIMEOUT).await {
            Ok(Reply::Running {
                guest,
                memory_backing,
            }) => (guest, memory_backing),
            Ok(other) => {
                worker.shutdown(SHUTDOWN_GRACE).await;
                let _ = tokio::fs::remove_file(&marker).await;
                self.net_release(&e.id, true, None).await;
                self.release_claim(e).await;
                return Err(fail(format!("unexpected reply {other:?}")));
            }
            Err(err) => {
                // The worker answers Running only once the guest runs: it
                // has not run, the snapshot is intact.
                worker.shutdown(SHUTDOWN_GRACE).await;
                let _ = tokio::fs::remove_file(&marker).await;
                self.net_release(&e.id, true, None).await;
                self.release_claim(e).await;
                return Err(fail(err.to_string()));
            }
        };
        // The resumed guest's vsock driver handles the transport reset (all
        // connections gone) in a work item that may run after one for a
        // connection request that arrived meanwhile (Linux 6.1 queues both on
        // one unordered workqueue; virtio-mmio's interrupt handler queues RX
        // work first). Such a connection is accepted, then reset without a
        // word to the host, and the request on it fails: the SDK saw a 502
        // (its TimeoutException) on its first call after a resume. So the
        // sandbox is running only once its agent answered on a connection
        // made after the reset (a probe that hit the reset is retried). An
        // agent that does not answer in time leaves the old behaviour:
        // running, with the reason in `agent_error`.
        let mut agent_error = None;
        if e.rec().row.agent {
            let waited = std::time::Instant::now();
            match self
                .wait_for_agent_within(&worker, &self.vsock_path(&e.id), RESUME_AGENT_WAIT, false)
                .await
            {
                Ok(()) => tracing::info!(
                    sandbox = %e.id,
                    ms = waited.elapsed().as_millis() as u64,
                    "agent answered after the resume"
                ),
                Err(why) => {
                    tracing::warn!(sandbox = %e.id, "agent not answering after the resume: {why}");
                    agent_error = Some(why);
                }
            }
        }
        let now = now_ms();
        let mut row = e.rec().row.clone();
        row.state = RowState::Running;
        row.started_ms = now;
        row.end_ms = now + timeout_s * 1000;
        row.worker_pid = Some(worker.pid());
        if let Some(g) = guest {
            row.guest_round = Some(g.round);
        }
        let saved = if super::fault("db-after-resume") {
            Err(ApiError::internal("store: injected fault: db-after-resume"))
        } else {
            self.put_row(row.clone()).await
        };
        if let Err(err) = saved {
            // The guest ran: its disk (the snapshot's overlay, used in
            // place) may be newer than the snapshot's memory, so the
            // snapshot cannot be offered as "paused" again. The sandbox is
            // marked broken: removed, with the reason kept for its 404.
            worker.shutdown(SHUTDOWN_GRACE).await;
            e.rec().busy = None;
            let why = format!(
                "resuming failed after the guest ran ({}); its disk may be newer than its memory snapshot, so it cannot be resumed again",
                err.message
            );
            tracing::error!(sandbox = %e.id, "{why}");
            self.remove(e, &why).await;
            return Err(ApiError::internal(format!(
                "{why}; the sandbox was removed"
            )));
        }
        {
            let mut r = e.rec();
            r.row = row.clone();
            r.worker = Some(worker.clone());
            r.slot = Some(slot);
            r.mem = Some(mem);
            r.unsaved = false;
            r.busy = None;
            r.snapshot_usage = None;
            r.gate = Some(Gate::new());
            r.agent_error = agent_error;
            r.memory_backing = memory_backing;
        }
        self.watch_worker(e.clone(), worker.clone());
        self.timer.notify_one();
        tracing::info!(
            sandbox = %e.id,
            pid = worker.pid(),
            ms = started.elapsed().as_millis() as u64,
            timeout_s,
            "sandbox resumed"
        );
        Ok(row)
    }

    /// `POST /sandboxes/{id}/connect`: `Ok((resumed, sandbox))`.
    pub async fn connect(
        self: &Arc<Self>,
        id: &str,
        body: ConnectBody,
    ) -> Result<(bool, SandboxOut), ApiError> {
        let timeout = self.timeout_secs(body.timeout, true)?;
        let e = self.entry(id)?;
        let _g = e.op.lock().await;
        self.check_live(&e).await?;
        let row = e.rec().row.clone();
        match row.state {
            RowState::Running => {
                let want = now_ms() + timeout * 1000;
                if want > row.end_ms {
                    // Not persisted: a running sandbox does not survive a
                    // server restart anyway.
                    e.rec().row.end_ms = want;
                    self.timer.notify_one();
                    tracing::info!(sandbox = %id, timeout_s = timeout, "timeout extended by connect");
                }
                Ok((false, self.sandbox_out(&e.rec().row)))
            }
            RowState::Paused => {
                let row = self.do_resume(&e, timeout).await?;
                Ok((true, self.sandbox_out(&row)))
            }
        }
    }

    /// `POST /sandboxes/{id}/resume` (deprecated).
    pub async fn resume(
        self: &Arc<Self>,
        id: &str,
        body: ResumeBody,
    ) -> Result<SandboxOut, ApiError> {
        let timeout = self.timeout_secs(body.timeout, true)?;
        let e = self.entry(id)?;
        let _g = e.op.lock().await;
        self.check_live(&e).await?;
        if e.rec().row.state == RowState::Running {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is already running"
            )));
        }
        if let Some(p) = body.auto_pause {
            e.rec().row.on_timeout_pause = p;
        }
        let row = self.do_resume(&e, timeout).await?;
        Ok(self.sandbox_out(&row))
    }

    /// `POST /sandboxes/{id}/timeout`.
    pub async fn set_timeout(&self, id: &str, timeout: Option<i64>) -> Result<(), ApiError> {
        let Some(t) = timeout else {
            return Err(ApiError::bad_request("missing field `timeout`"));
        };
        let t = self.timeout_secs(Some(t), false)?;
        let e = self.entry(id)?;
        let _g = e.op.lock().await;
        self.check_live(&e).await?;
        let row = e.rec().row.clone();
        if row.state == RowState::Paused {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is paused; its timeout starts again when it is resumed (connect with a timeout)"
            )));
        }
        // Not persisted (see connect).
        e.rec().row.end_ms = now_ms() + t * 1000;
        self.timer.notify_one();
        tracing::info!(sandbox = %id, timeout_s = t, "timeout set");
        Ok(())
    }

    /// `DELETE /sandboxes/{id}`.
    pub async fn kill(&self, id: &str) -> Result<(), ApiError> {
        let e = self.entry(id)?;
        let _g = e.op.lock().await;
        self.check_live(&e).await?;
        self.db_ready().await?;
        self.remove(&e, "it was killed").await;
        Ok(())
    }

    /// Server shutdown: pauses every running sandbox, all at once, for at
    /// most `pause_within` (the next server lists them as paused and can
    /// resume them), then stops every worker left. Sandboxes not paused in
    /// time are reported gone by the next server, like after a crash.
    pub async fn shutdown(self: &Arc<Self>, pause_within: Duration) {
        // In a pool: placement skips this host from now on.
        self.pool_drain_begin().await;
        let entries: Vec<Arc<Entry>> = self.map().values().cloned().collect();
        if !pause_within.is_zero() {
            let deadline = tokio::time::Instant::now() + pause_within;
            let mut pauses = Vec::new();
            for e in entries.iter().cloned() {
                let running = {
                    let r = e.rec();
                    !r.gone && r.row.state == RowState::Running && r.worker.is_some()
                };
                if !running {
                    continue;
                }
                let mgr = self.clone();
                pauses.push(tokio::spawn(async move {
                    let paused = tokio::time::timeout_at(deadline, async {
                        let _g = e.op.lock().await;
                        let still_running = {
                            let r = e.rec();
                            !r.gone && r.row.state == RowState::Running && r.worker.is_some()
                        };
                        if still_running {
                            mgr.do_pause(&e).await
                        } else {
                            Ok(())
                        }
                    })
                    .await;
                    match paused {
                        Ok(Ok(())) => tracing::info!(sandbox = %e.id, "paused for shutdown"),
                        Ok(Err(err)) => {
                            tracing::warn!(sandbox = %e.id, "pause for shutdown failed: {}", err.message)
                        }
                        Err(_) => {
                            tracing::warn!(sandbox = %e.id, "not paused before the shutdown deadline")
                        }
                    }
                }));
            }
            for t in pauses {
                let _ = t.await;
            }
        }
        self.wait_for_writes().await;
        if let Some(u) = &self.cfg.snapshot_upload {
            // The drain: paused sandboxes' snapshots reach the bucket first.
            let left = u.wait_all(pause_within.max(Duration::from_secs(5))).await;
            if left > 0 {
                tracing::warn!(backlog = left, "snapshots not uploaded before shutdown (uploaded at the next start only if re-paused)");
            }
        }
        let mut tasks = Vec::new();
        for e in entries {
            let w = e.rec().worker.clone();
            if let Some(w) = w {
                tasks.push(tokio::spawn(async move {
                    w.shutdown(Duration::from_secs(2)).await
                }));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        self.net_shutdown().await;
        // In a pool: the others stop counting this host as live now, and
        // resume its uploaded sandboxes (a migration).
        self.pool_leave().await;
    }

    /// With `--snapshot-store`: queues the upload of `id`'s snapshot
    /// generation `gen` as `<id>-<gen>` (no wait).
    fn queue_upload(&self, id: &str, gen: u64) {
        if let Some(u) = &self.cfg.snapshot_upload {
            // The fingerprint lets another host of a pool decide whether
            // it can resume this snapshot ([`pool_ext`]).
            let labels = [
                ("sandbox".to_string(), id.to_string()),
                ("generation".to_string(), gen.to_string()),
                (
                    pool_ext::FINGERPRINT_LABEL.to_string(),
                    pool_ext::fingerprint_json().to_string(),
                ),
            ]
            .into_iter()
            .collect();
            u.submit(
                id,
                format!("{id}-{gen}"),
                self.snapshot_dir(id, gen),
                labels,
            );
        }
    }

    /// With `--snapshot-store`: queues the upload of `id`'s snapshot
    /// generation `gen` (bucket id `<id>-<gen>`); with `--durable-pause`
    /// waits for it and reports a failed upload (the sandbox stays paused
    /// locally and the upload is retried).
    async fn remote_upload(&self, id: &str, gen: u64) -> Result<(), ApiError> {
        let Some(u) = &self.cfg.snapshot_upload else {
            return Ok(());
        };
        self.queue_upload(id, gen);
        if self.cfg.durable_pause && !u.wait(id, PAUSE_TIMEOUT).await {
            let why = u
                .status(id)
                .and_then(|s| s.error)
                .unwrap_or_else(|| "not finished in time".into());
            return Err(ApiError::internal(format!(
                "the sandbox is paused (and can be resumed here) but its snapshot is not in the snapshot store yet (retried in the background): {why}"
            )));
        }
        Ok(())
    }

    /// Waits until every asynchronous pause's snapshot is durable (server
    /// shutdown and drain: a sandbox paused with `sync: false` survives).
    pub async fn wait_for_writes(self: &Arc<Self>) {
        let jobs: Vec<(String, Arc<WriteJob>)> = self
            .writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, j)| (id.clone(), j.clone()))
            .collect();
        let mut tasks = Vec::new();
        for (id, job) in jobs {
            let Some(e) = self.map().get(&id).cloned() else {
                continue;
            };
            let mgr = self.clone();
            tasks.push(tokio::spawn(async move {
                let _g = e.op.lock().await;
                match mgr.finish_write(&e, &job).await {
                    Ok(()) => tracing::info!(sandbox = %e.id, "snapshot durable before shutdown"),
                    Err(err) => tracing::warn!(sandbox = %e.id, "background snapshot write before shutdown: {}", err.message),
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    // ---- timers -----------------------------------------------------------

    async fn timer_loop(self: Arc<Self>) {
        loop {
            let notified = self.timer.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            let mut next = now + TIMER_MAX_SLEEP.as_millis() as i64;
            let mut due = Vec::new();
            for e in self.map().values() {
                let mut r = e.rec();
                if r.gone || r.busy.is_some() || r.expiry_queued {
                    continue;
                }
                let deadline = match r.row.state {
                    RowState::Running => r.row.end_ms,
                    RowState::Paused => self.retention_end(&r.row),
                };
                if deadline <= now {
                    r.expiry_queued = true;
                    due.push(e.clone());
                } else {
                    next = next.min(deadline);
                }
            }
            for e in due {
                let mgr = self.clone();
                tokio::spawn(async move { mgr.expire(e).await });
            }
            let unsaved: Vec<Arc<Entry>> = self
                .map()
                .values()
                .filter(|e| {
                    let r = e.rec();
                    r.unsaved && !r.gone && r.busy.is_none()
                })
                .cloned()
                .collect();
            for e in unsaved {
                let mgr = self.clone();
                tokio::spawn(async move { mgr.save_again(e).await });
            }
            let wait = Duration::from_millis((next - now).max(1) as u64);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut notified => {}
            }
        }
    }

    /// Retries saving a row whose save failed (see `Rec::unsaved`).
    async fn save_again(self: Arc<Self>, e: Arc<Entry>) {
        let Ok(_g) = e.op.try_lock() else { return };
        let row = {
            let r = e.rec();
            if !r.unsaved || r.gone {
                return;
            }
            r.row.clone()
        };
        match self.put_row(row).await {
            Ok(()) => {
                e.rec().unsaved = false;
                tracing::info!(sandbox = %e.id, "its record is saved now");
            }
            Err(err) => {
                tracing::warn!(sandbox = %e.id, "saving its record failed again: {}", err.message)
            }
        }
    }

    async fn expire(self: Arc<Self>, e: Arc<Entry>) {
        let _g = e.op.lock().await;
        let (state, due, pause) = {
            let mut r = e.rec();
            r.expiry_queued = false;
            if r.gone {
                return;
            }
            let now = now_ms();
            match r.row.state {
                RowState::Running => (
                    RowState::Running,
                    now >= r.row.end_ms,
                    r.row.on_timeout_pause,
                ),
                RowState::Paused => (RowState::Paused, now >= self.retention_end(&r.row), false),
            }
        };
        if due {
            match state {
                RowState::Running if pause => {
                    tracing::info!(sandbox = %e.id, "timeout reached: auto-pausing");
                    if let Err(err) = self.do_pause(&e).await {
                        let (live, retained) = {
                            let r = e.rec();
                            (
                                !r.gone && r.row.state == RowState::Running,
                                now_ms() + (AUTO_PAUSE_RETRY.as_millis() as i64)
                                    < self.retention_end(&r.row),
                            )
                        };
                        if live && retained && e.rec().worker.is_some() {
                            // Still running: try again later rather than
                            // lose the sandbox.
                            let mut r = e.rec();
                            r.row.end_ms = now_ms() + AUTO_PAUSE_RETRY.as_millis() as i64;
                            tracing::warn!(
                                sandbox = %e.id,
                                retry_ms = AUTO_PAUSE_RETRY.as_millis() as u64,
                                "auto-pause failed, the sandbox keeps running and is paused later: {}",
                                err.message
                            );
                        } else if live {
                            self.remove(
                                &e,
                                &format!(
                                    "its timeout expired and pausing failed ({})",
                                    err.message
                                ),
                            )
                            .await;
                        }
                    }
                }
                RowState::Running => self.remove(&e, "its timeout expired").await,
                RowState::Paused => self.remove(&e, "its retention expired").await,
            }
        }
        self.timer.notify_one();
    }
}

/// The chain of the snapshot generation in `dir`: `dir`, then its
/// parents' directories, nearest first, as its `layers.bin` names them;
/// only sibling `snapshot-<n>` directories (see [`Manager::chain_dirs`]).
fn chain_dirs_of(dir: &std::path::Path) -> Vec<PathBuf> {
    use crate::snapshot::layers::ChainFile;
    let mut out = vec![dir.to_owned()];
    if let Ok(Some(c)) = ChainFile::read(dir) {
        if let Ok(parents) = c.parent_dirs(dir) {
            out.extend(parents.into_iter().filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("snapshot-"))
                    .is_some_and(|g| g.parse::<u64>().is_ok())
            }));
        }
    }
    out
}

/// Chain usage and own-layer facts of the generation whose chain is `dirs`
/// (its own directory first). Blocking.
fn facts_of(dirs: &[PathBuf], vm: bool) -> (DirUsage, LayerFacts) {
    let own = dirs.first().map(|d| dir_usage(d)).unwrap_or_default();
    let usage = dirs.iter().skip(1).fold(own, |u, d| u + dir_usage(d));
    let memory_bytes = match dirs.first() {
        Some(d) if vm => crate::snapshot::SnapshotDir::open(d)
            .and_then(|d| d.load_state::<crate::vmm::VmState>())
            .ok()
            .map(|st| st.memory.bytes_stored),
        _ => None,
    };
    let facts = LayerFacts {
        layers: dirs.len(),
        bytes: own.allocated,
        memory_bytes,
    };
    (usage, facts)
}

/// Removes every `snapshot-*` entry of the sandbox directory `dir` that is
/// not in `keep`. Blocking.
fn prune_snapshots(dir: &std::path::Path, keep: &[PathBuf]) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("snapshot-") && !keep.iter().any(|k| k == &e.path()) {
            let _ = std::fs::remove_dir_all(e.path());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The entry of a paused sandbox that no worker holds (recovered at start,
/// or adopted from a host of the pool that is gone).
fn paused_entry(
    row: Row,
    snapshot_usage: Option<DirUsage>,
    last_layer: Option<LayerFacts>,
) -> Arc<Entry> {
    Arc::new(Entry {
        id: row.id.clone(),
        op: tokio::sync::Mutex::new(()),
        rec: StdMutex::new(Rec {
            row,
            busy: None,
            worker: None,
            slot: None,
            mem: None,
            unsaved: false,
            gone: false,
            expiry_queued: false,
            snapshot_usage,
            gate: None,
            agent_error: None,
            memory_backing: None,
            warm_snapshot: None,
            last_layer,
        }),
    })
}

/// Kills a worker left over from a previous server, if that pid still is
/// one of our workers for `id` (checked through its command line).
fn kill_stale_worker(pid: u32, id: &str) {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("worker") && cmdline.contains(&format!("{id}.sock")) {
        tracing::warn!(sandbox = %id, pid, "killing a worker left over from the previous server");
        let Ok(pid) = i32::try_from(pid) else { return };
        // SAFETY: kill(2) with a pid we verified belongs to one of our
        // workers; touches no memory.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// The envd version a sandbox reports: the agent's for agent templates; the
/// SDK's minimum for the built-in test guest, which has no agent.
/// Whether a request for `port` of this sandbox may pass: a secured
/// sandbox's envd port needs its token; other ports and unsecured sandboxes
/// need none.
fn envd_token_ok(row: &Row, port: u16, token: Option<&str>) -> bool {
    match &row.envd_token {
        Some(want) => {
            u32::from(port) != crate::vsock::ENVD_PORT
                || token.is_some_and(|t| crate::ct_eq(t.as_bytes(), want.as_bytes()))
        }
        None => true,
    }
}

/// A fresh envd access token: 128 random bits, hex.
fn new_envd_token() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

fn envd_version(row: &Row) -> &'static str {
    if row.agent {
        AGENT_ENVD_VERSION
    } else {
        ENVD_VERSION
    }
}

/// Size of `path` in MiB (rounded up), 0 if unreadable.
async fn file_mb(path: &std::path::Path) -> u64 {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len().div_ceil(1 << 20))
        .unwrap_or(0)
}

/// The last lines of a console log, for error messages.
fn console_tail(path: &std::path::Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(4096);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---- Reusable snapshots (issue 12): `POST /sandboxes/{id}/snapshots`,
// `GET /snapshots`, `DELETE /templates/{snapshot id}`. ----

/// What the SDK reads of a snapshot (`SnapshotInfo`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotOut {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

impl Manager {
    /// The store of reusable snapshots, `<data>/snapshots`.
    pub fn snapshot_store(&self) -> Result<crate::snapshot::store::SnapshotStore, ApiError> {
        crate::snapshot::store::SnapshotStore::open(self.cfg.data_dir.join("snapshots"))
            .map_err(|e| internal("snapshot store", crate::error_chain(&e)))
    }

    /// `POST /sandboxes/{id}/snapshots`: a running sandbox pauses briefly
    /// (its snapshot is taken as by a pause), is copied into the store and
    /// resumes with its id and end time unchanged; a paused one is copied
    /// as it is. A sandbox already busy (snapshotting, pausing, resuming)
    /// answers 409.
    pub async fn create_snapshot(self: &Arc<Self>, id: &str) -> Result<SnapshotOut, ApiError> {
        let e = self.entry(id)?;
        // Busy with a pause, resume or snapshot: 409 at once. (The op lock
        // is also taken briefly by reads, so it is waited for.)
        if let Some(b) = e.rec().busy {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is busy ({b}); try again"
            )));
        }
        let _g = e.op.lock().await;
        self.check_live(&e).await?;
        let (was_running, end_ms) = {
            let r = e.rec();
            (r.row.state == RowState::Running, r.row.end_ms)
        };
        let started = std::time::Instant::now();
        // The store takes whole snapshots: a running sandbox pauses into a
        // full layer; a paused one whose snapshot is an incremental layer
        // (its parents are siblings in its sandbox directory) is resumed
        // briefly and paused into a full one first.
        if was_running {
            self.do_pause_mode(&e, false, true).await?;
        } else if self.chain_dirs(id, e.rec().row.snapshot_gen).len() > 1 {
            self.do_resume(&e, self.cfg.default_timeout_s).await?;
            self.do_pause_mode(&e, false, true).await?;
        }
        let gen = {
            let mut r = e.rec();
            r.busy = Some("snapshotting");
            r.row.snapshot_gen
        };
        let store = match self.snapshot_store() {
            Ok(s) => s,
            Err(err) => {
                e.rec().busy = None;
                return Err(err);
            }
        };
        let sid = crate::snapshot::store::SnapshotStore::new_id();
        let src = self.snapshot_dir(id, gen);
        let incoming = store.root().join(format!(".incoming-{sid}"));
        let tree = self.sandbox_dir(id).join("root");
        let agent = e.rec().row.agent && self.cfg.backend == BackendKind::Fake;
        let source = id.to_owned();
        let sid2 = sid.clone();
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("template".to_string(), e.rec().row.template_id.clone());
        // The snapshot's agent was initialized with this token: a sandbox
        // made from it needs it for its agent's `/init` (the same secret
        // the store's database already holds for the sandbox).
        if let Some(t) = e.rec().row.envd_token.clone() {
            labels.insert("envd_token".to_string(), t);
        }
        let copied = tokio::task::spawn_blocking(move || {
            use crate::snapshot::store::{copy_snapshot_files, ImportOpts};
            let r = copy_snapshot_files(&src, &incoming, agent.then_some(tree.as_path())).and_then(
                |()| {
                    store.import(
                        &incoming,
                        &sid2,
                        ImportOpts {
                            kind: crate::snapshot::manifest::SnapshotKind::User,
                            source_sandbox: Some(source),
                            labels,
                        },
                    )
                },
            );
            if r.is_err() {
                let _ = std::fs::remove_dir_all(&incoming);
            }
            r
        })
        .await
        .map_err(|e| internal("snapshot", e))?;
        let pause_ms = started.elapsed().as_millis() as u64;
        e.rec().busy = None;
        // Running again whatever the copy did, with the same end time.
        if was_running {
            let left_s = ((end_ms - now_ms()) / 1000).max(1);
            self.do_resume(&e, left_s).await?;
            e.rec().row.end_ms = end_ms;
            self.timer.notify_one();
        }
        let stored = copied
            .map_err(|err| ApiError::internal(format!("snapshot: {}", crate::error_chain(&err))))?;
        self.record_snapshot(&stored.manifest).await;
        tracing::info!(sandbox = %id, snapshot = %sid, paused_ms = pause_ms,
            total_ms = started.elapsed().as_millis() as u64, "snapshot taken");
        Ok(SnapshotOut {
            snapshot_id: stored.manifest.id.clone(),
            names: vec![stored.manifest.id],
        })
    }

    /// `GET /snapshots?sandboxID=&limit=&nextToken=`: oldest first; the
    /// next page's token is the id of its first snapshot.
    pub fn list_snapshots(
        &self,
        sandbox: Option<&str>,
        limit: usize,
        next: Option<&str>,
    ) -> Result<(Vec<SnapshotOut>, Option<String>), ApiError> {
        let all: Vec<_> = self
            .snapshot_store()?
            .list()
            .into_iter()
            // Template snapshots (warm templates) are the server's own.
            .filter(|m| m.kind == crate::snapshot::manifest::SnapshotKind::User)
            .filter(|m| sandbox.is_none() || m.source_sandbox.as_deref() == sandbox)
            .collect();
        let start = match next {
            Some(t) => all
                .iter()
                .position(|m| m.id == t)
                .ok_or_else(|| ApiError::bad_request(format!("invalid nextToken {t:?}")))?,
            None => 0,
        };
        let page: Vec<SnapshotOut> = all
            .iter()
            .skip(start)
            .take(limit)
            .map(|m| SnapshotOut {
                snapshot_id: m.id.clone(),
                names: vec![m.id.clone()],
            })
            .collect();
        let token = all.get(start + limit).map(|m| m.id.clone());
        Ok((page, token))
    }

    /// `DELETE /templates/{id}` for a snapshot id (the SDK's
    /// `delete_snapshot`): 404 if there is none, 409 while another
    /// snapshot needs it (the store's rule).
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), ApiError> {
        // A template's name: its template snapshots (warm templates).
        if !id.starts_with("snap-") {
            if let Some(r) = self.warm_delete_template(id).await {
                return r;
            }
        }
        let store = self.snapshot_store()?;
        let id2 = id.to_owned();
        let deleted = tokio::task::spawn_blocking(move || store.delete(&id2))
            .await
            .map_err(|e| internal("snapshot delete", e))?
            .map_err(|e| {
                use crate::snapshot::store::Error as E;
                match e {
                    E::NotFound(_) | E::InvalidId(_) => {
                        ApiError::new(StatusCode::NOT_FOUND, e.to_string())
                    }
                    E::InUse { .. } => ApiError::conflict(e.to_string()),
                    other => ApiError::internal(crate::error_chain(&other)),
                }
            });
        if deleted.is_ok() {
            self.forget_snapshot(id).await;
        }
        deleted
    }
}

/// Most sandboxes one `POST /sandboxes/{id}/clone` makes.
pub const MAX_CLONES: u32 = 16;

/// Body of `POST /sandboxes/{id}/clone` (what the SDK's `clone` sends).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneBody {
    pub count: Option<u32>,
    #[serde(default)]
    pub strict: bool,
    pub timeout: Option<i64>,
    #[serde(rename = "nodeID")]
    pub node_id: Option<String>,
}

impl Manager {
    /// The store's snapshot named by a create's `templateID`, if it names
    /// one (`snap-…`); a snapshot taken on a host with another CPU/KVM
    /// fingerprint is refused (400) on the VM backend.
    async fn snapshot_for_create(
        &self,
        name: &str,
    ) -> Result<Option<crate::snapshot::store::StoredSnapshot>, ApiError> {
        if !name.starts_with("snap-") || !crate::snapshot::manifest::valid_id(name) {
            return Ok(None);
        }
        let store = self.snapshot_store()?;
        let n = name.to_owned();
        let got = tokio::task::spawn_blocking(move || store.get(&n))
            .await
            .map_err(|e| internal("snapshot", e))?;
        let s = match got {
            Ok(s) => s,
            Err(crate::snapshot::store::Error::NotFound(_)) => return Ok(None),
            Err(e) => {
                return Err(ApiError::internal(format!(
                    "snapshot {name} cannot be used: {}",
                    crate::error_chain(&e)
                )))
            }
        };
        if self.cfg.backend == BackendKind::Vm {
            let host = crate::snapshot::manifest::HostFingerprint::current();
            if let Some(d) = s.manifest.fingerprint.mismatch(&host) {
                return Err(ApiError::bad_request(format!(
                    "snapshot {name} was taken on a different host ({d}); it cannot be resumed here"
                )));
            }
        }
        Ok(Some(s))
    }

    /// `POST /sandboxes/{id}/clone`: snapshots the sandbox (running: a brief
    /// pause; paused: as it is) and creates `count` sandboxes from the
    /// snapshot. Without `strict`, the sandboxes that could be made are
    /// returned; with it, any failure removes them all and fails. 400 for a
    /// count of 0 or above [`MAX_CLONES`]; 409 while the parent is busy.
    pub async fn clone_sandbox(
        self: &Arc<Self>,
        id: &str,
        body: CloneBody,
    ) -> Result<serde_json::Value, ApiError> {
        let count = body.count.unwrap_or(1);
        if count == 0 || count > MAX_CLONES {
            return Err(ApiError::bad_request(format!(
                "count must be within 1..={MAX_CLONES} (got {count})"
            )));
        }
        let (secure, metadata, inherited) = {
            let e = self.entry(id)?;
            let r = e.rec();
            // Without a timeout (the SDK's doc): a running parent's
            // remaining time, 15 s for a paused one.
            let inherited = match r.row.state {
                RowState::Running => ((r.row.end_ms - now_ms()) / 1000).max(1),
                RowState::Paused => 15,
            };
            (
                r.row.envd_token.is_some(),
                r.row.metadata.clone(),
                inherited,
            )
        };
        let timeout = self.timeout_secs(Some(body.timeout.unwrap_or(inherited)), true)?;
        let snap = self.create_snapshot(id).await?;
        let mut made = Vec::new();
        let mut failed = Vec::new();
        for _ in 0..count {
            let req = NewSandbox {
                template_id: Some(snap.snapshot_id.clone()),
                timeout: Some(timeout),
                metadata: Some(metadata.clone()),
                secure: Some(secure),
                ..Default::default()
            };
            match self.create(req).await {
                Ok(out) => made.push(out),
                Err(e) => failed.push(e),
            }
        }
        if !failed.is_empty() && (body.strict || made.is_empty()) {
            for m in &made {
                let _ = self.kill(&m.sandbox_id).await;
            }
            // Capacity (429) or another client error shared by every
            // failure keeps its status: it is not a server error.
            let status = match failed[0].status {
                s if s.is_client_error() && failed.iter().all(|f| f.status == s) => s,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let msgs: Vec<&str> = failed.iter().map(|f| f.message.as_str()).collect();
            return Err(ApiError::new(
                status,
                format!(
                    "cloning failed for {} of {count}: {}",
                    failed.len(),
                    msgs.join("; ")
                ),
            ));
        }
        let sandboxes: Vec<serde_json::Value> = made
            .into_iter()
            .map(|o| {
                let mut v = serde_json::to_value(&o).unwrap_or_default();
                v["trafficAccessToken"] = serde_json::Value::Null;
                v
            })
            .collect();
        Ok(serde_json::json!({
            "sandboxes": sandboxes,
            "snapshotTemplateId": snap.snapshot_id,
            "failed": failed.iter().map(|f| f.message.as_str()).collect::<Vec<_>>(),
        }))
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::snapshot::layers::{ChainFile, ParentRef};

    fn parent(name: &str) -> ParentRef {
        ParentRef {
            name: name.into(),
            state_crc: 0,
            bytes_stored: 0,
        }
    }

    /// Exactly the current generation's chain survives a prune; a chain
    /// file naming something other than a sibling generation keeps nothing
    /// else.
    #[test]
    fn prune_keeps_exactly_the_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let sb = tmp.path();
        for d in [
            "snapshot-1",
            "snapshot-2",
            "snapshot-3",
            "snapshot-4.tmp-9-0",
        ] {
            std::fs::create_dir(sb.join(d)).unwrap();
        }
        std::fs::write(sb.join("vsock.sock"), b"").unwrap();
        ChainFile {
            parents: vec![parent("snapshot-2"), parent("snapshot-1")],
            ..ChainFile::default()
        }
        .write(&sb.join("snapshot-3"))
        .unwrap();
        let chain = chain_dirs_of(&sb.join("snapshot-3"));
        assert_eq!(
            chain,
            vec![
                sb.join("snapshot-3"),
                sb.join("snapshot-2"),
                sb.join("snapshot-1")
            ]
        );
        let (usage, facts) = facts_of(&chain, false);
        assert_eq!(facts.layers, 3);
        assert!(usage.allocated >= facts.bytes);
        prune_snapshots(sb, &chain);
        let mut left: Vec<String> = std::fs::read_dir(sb)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["snapshot-1", "snapshot-2", "snapshot-3", "vsock.sock"]
        );

        // A chain naming a non-generation sibling: only the generation.
        std::fs::remove_file(sb.join("snapshot-3").join("layers.bin")).unwrap();
        ChainFile {
            parents: vec![parent("vsock.sock")],
            ..ChainFile::default()
        }
        .write(&sb.join("snapshot-3"))
        .unwrap();
        assert_eq!(
            chain_dirs_of(&sb.join("snapshot-3")),
            vec![sb.join("snapshot-3")]
        );
        prune_snapshots(sb, &chain_dirs_of(&sb.join("snapshot-3")));
        assert!(!sb.join("snapshot-1").exists() && sb.join("vsock.sock").exists());
    }
}
