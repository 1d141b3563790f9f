//! The manager's side of a pool of hosts (`stasis serve --pool-discovery
//! …` with `--database postgres://…` and `--snapshot-store s3://…`): the
//! rules of [`crate::pool`] wired to the shared metadata and the bucket.
//!
//! - **Which host serves a call** ([`Manager::pool_route`]): a sandbox this
//!   host holds is served here; otherwise its row in PostgreSQL names the
//!   owner, and [`placement::route`] decides: forward to the live owner
//!   ([`super::super::forward`] does the HTTP hop), report it lost (it
//!   was running on a host that is gone), or place it (paused on a host
//!   that is gone).
//! - **Placing a paused sandbox of a dead host**: its snapshot must be
//!   committed in the bucket (`<id>-<generation>`, the manifest carries
//!   the fingerprint of the host that paused it); [`placement::place_resume`]
//!   picks the least loaded of a sample of live hosts whose CPU/KVM
//!   fingerprint matches. The chosen host **adopts** the sandbox: the
//!   conditional update (state paused, generation) → (paused, this host)
//!   makes it the owner — of two hosts adopting at once exactly one wins —
//!   and the sandbox becomes an ordinary paused sandbox of this host whose
//!   snapshot directory is still in the bucket. Its first resume
//!   ([`Manager::fetch_remote_snapshot`]) downloads that snapshot through
//!   the per-host chunk cache, then resumes as usual (lazily from the
//!   local copy). Adoption does not download: a `GET` or a kill of an
//!   adopted sandbox costs nothing.
//! - **Drain**: SIGTERM marks this host draining in its heartbeat
//!   (placement skips it), the shutdown pauses every running sandbox and
//!   waits for the uploads, then deletes this host's heartbeat so the
//!   others count it as gone at once ([`Manager::pool_leave`]): its
//!   sandboxes resume elsewhere on their next call — a migration.
//! - **Listing**: `GET /sandboxes` lists the pool's sandboxes, not only
//!   this host's ([`Manager::pool_rows`]): those of live hosts and the
//!   paused ones of hosts that are gone (they can resume anywhere); the
//!   lost ones are not listed.
//!
//! Host discovery is [`crate::pool::discovery`]: PostgreSQL heartbeats, or
//! a static list, Nomad or Kubernetes completed with the heartbeats (which
//! alone know fingerprints, load and draining).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::super::error::ApiError;
use super::super::models;
use super::super::store::{self, LiveHost, Row, RowState, Store};
use super::{paused_entry, Config, Manager};
use crate::pool::discovery::{self, Discovery, HeartbeatStore, HostLoad, HostRecord};
use crate::pool::placement::{self, ResumeRequest, Route};
use crate::snapshot::manifest::HostFingerprint;
use crate::snapshot::remote::{self, ChunkCache};

/// The label of an uploaded sandbox snapshot that holds the pausing host's
/// fingerprint (JSON of [`HostFingerprint`]).
pub const FINGERPRINT_LABEL: &str = "fingerprint";

/// This host's fingerprint as JSON (computed once).
pub fn fingerprint_json() -> &'static str {
    static FP: OnceLock<String> = OnceLock::new();
    FP.get_or_init(|| {
        serde_json::to_string(&HostFingerprint::current()).unwrap_or_else(|_| "{}".into())
    })
}

/// Where a call for a sandbox this host does not hold goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve it here (this host holds it now, or nobody has it).
    Local,
    /// Forward it to this host.
    Forward {
        /// The host's id.
        host_id: String,
        /// Its API address.
        address: String,
    },
}

/// Pool membership of one host.
pub struct Pool {
    discovery: Discovery,
    /// The heartbeats, to complete a scheduler's list (None: the discovery
    /// is the heartbeats themselves).
    heartbeats: Option<Arc<dyn HeartbeatStore>>,
    sample: usize,
    ttl: Duration,
    draining: AtomicBool,
    cache: Option<ChunkCache>,
    rng: StdMutex<StdRng>,
    adopting: tokio::sync::Mutex<()>,
}

/// The metadata store as a discovery source.
struct StoreHeartbeats(Store);

impl HeartbeatStore for StoreHeartbeats {
    fn live_hosts(&self, ttl: Duration) -> Result<Vec<HostRecord>, String> {
        Store::live_hosts(&self.0, ttl)
            .map(|hosts| hosts.into_iter().map(host_record).collect())
            .map_err(|e| e.to_string())
    }
}

/// A heartbeat row as discovery's record (a fingerprint that does not
/// parse is unknown: such a host is never chosen for a resume).
fn host_record(h: LiveHost) -> HostRecord {
    HostRecord {
        fingerprint: serde_json::from_str(&h.info.fingerprint).ok(),
        load: HostLoad {
            running: u32::try_from(h.info.load).unwrap_or(u32::MAX),
            memory_used: 0,
            memory_free: h.info.memory_free,
        },
        last_heartbeat: SystemTime::now().checked_sub(Duration::from_millis(h.age_ms)),
        draining: h.info.draining,
        id: h.id,
        address: h.info.address,
    }
}

impl Pool {
    /// The pool of `cfg.pool` (None: not in a pool). A pool needs the
    /// shared database: a clear error otherwise.
    pub fn new(cfg: &Config, store: &Store) -> Result<Option<Pool>, crate::api::Error> {
        let Some(args) = &cfg.pool else {
            return Ok(None);
        };
        let conf = |m: String| crate::api::Error::Config(m);
        if !store.is_shared() {
            return Err(conf(
                "a pool of hosts (--pool-discovery) needs the shared PostgreSQL metadata store (--database postgres://...)".into(),
            ));
        }
        let hb: Arc<dyn HeartbeatStore> = Arc::new(StoreHeartbeats(store.clone()));
        let Some(discovery) = args
            .discovery(Some(hb.clone()))
            .map_err(|e| conf(e.to_string()))?
        else {
            return Ok(None);
        };
        let heartbeats = (!matches!(discovery, Discovery::Heartbeats { .. })).then_some(hb);
        let cache = match &cfg.chunk_cache {
            Some((dir, bytes)) => Some(ChunkCache::open(dir, *bytes).map_err(|e| {
                conf(format!(
                    "the chunk cache {}: {}",
                    dir.display(),
                    crate::error_chain(&e)
                ))
            })?),
            None => None,
        };
        if cfg.snapshot_upload.is_none() {
            tracing::warn!("pool without --snapshot-store: calls are forwarded to their sandbox's host, but a paused sandbox of a host that is gone cannot resume elsewhere");
        }
        tracing::info!(
            discovery = discovery.name(),
            sample = args.pool_sample,
            "member of a pool of hosts"
        );
        Ok(Some(Pool {
            discovery,
            heartbeats,
            sample: args.pool_sample,
            ttl: Duration::from_secs(args.pool_heartbeat_ttl_secs),
            draining: AtomicBool::new(false),
            cache,
            rng: StdMutex::new(StdRng::from_os_rng()),
            adopting: tokio::sync::Mutex::new(()),
        }))
    }

    /// The live hosts, with fingerprints and load where heartbeats know
    /// them.
    async fn live(&self) -> Result<Vec<HostRecord>, ApiError> {
        let unavailable = |what: String| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the pool's host list is unavailable ({what}); retry later"),
            )
        };
        let found = self
            .discovery
            .live_hosts()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let Some(hb) = &self.heartbeats else {
            return Ok(found);
        };
        let (hb, ttl) = (hb.clone(), self.ttl);
        let beats = tokio::task::spawn_blocking(move || hb.live_hosts(ttl))
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .map_err(unavailable)?;
        Ok(discovery::merge(found, &beats))
    }
}

impl Manager {
    /// Whether this host is in a pool.
    pub fn in_pool(&self) -> bool {
        self.pool.is_some()
    }

    /// A paused row whose snapshot directory is missing here may still be
    /// resumable: adopted from a host that is gone, its snapshot is in the
    /// bucket (checked at its resume).
    pub(super) fn remote_copy_expected(&self, row: &Row) -> bool {
        self.pool.is_some() && self.cfg.snapshot_upload.is_some() && row.state == RowState::Paused
    }

    /// Where a call for sandbox `id` is served (see the module docs).
    /// `forwarded`: another host of the pool sent it. Errors: lost (404),
    /// ownership moved while forwarded (409), no host can take it (503).
    pub async fn pool_route(
        self: &Arc<Self>,
        id: &str,
        forwarded: bool,
    ) -> Result<Decision, ApiError> {
        let Some(pool) = &self.pool else {
            return Ok(Decision::Local);
        };
        if !models::valid_name(id, false) || self.map().contains_key(id) {
            return Ok(Decision::Local);
        }
        let id2 = id.to_string();
        let Some(row) = self.with_store(move |s| s.get(&id2)).await? else {
            return Ok(Decision::Local);
        };
        let me = self.host_id().to_string();
        if row.owner.as_deref() == Some(me.as_str()) {
            return Ok(Decision::Local);
        }
        let live = pool.live().await?;
        let running = row.state == RowState::Running;
        match placement::route(&me, row.owner.as_deref(), running, forwarded, &live) {
            Route::Local => {}
            Route::Forward { host_id, address } => {
                return Ok(Decision::Forward { host_id, address })
            }
            Route::Lost { host_id } => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("sandbox {id} not found: it was running on host {host_id}, which is no longer live, so it is lost (memory that lived only on that host is gone)"),
                ))
            }
            Route::Moved { host_id } => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is owned by host {host_id} by this host's view, but the call was already forwarded here: ownership moved meanwhile; retry"
                )))
            }
        }
        if row.state != RowState::Paused {
            return Ok(Decision::Local);
        }
        // Paused on a host that is gone: its snapshot must be in the bucket.
        let snapshot_id = format!("{id}-{}", row.snapshot_gen);
        let manifest = match &self.cfg.snapshot_upload {
            None => None,
            Some(u) => match u.store().manifest(&snapshot_id).await {
                Ok(m) => Some(m),
                Err(remote::Error::NotFound(_)) => None,
                Err(e) => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "sandbox {id}: reading its snapshot's manifest from the bucket failed: {}; retry later",
                            crate::error_chain(&e)
                        ),
                    ))
                }
            },
        };
        let fingerprint = manifest
            .as_ref()
            .and_then(|m| m.labels.get(FINGERPRINT_LABEL))
            .and_then(|j| serde_json::from_str::<HostFingerprint>(j).ok())
            .unwrap_or_else(HostFingerprint::current);
        let req = ResumeRequest {
            fingerprint: &fingerprint,
            paused_on: row.owner.as_deref(),
            paused_host_has_data: false,
            uploaded: manifest.is_some(),
            memory: row.memory_mb.saturating_mul(1 << 20),
        };
        // A forwarded call was placed here by another host: take it if the
        // rules allow this host at all (no second placement, no loop).
        let candidates: Vec<HostRecord> = if forwarded {
            live.into_iter().filter(|h| h.id == me).collect()
        } else {
            live
        };
        let choice = {
            let mut rng = pool.rng.lock().unwrap_or_else(|p| p.into_inner());
            placement::place_resume(&req, &candidates, pool.sample, &mut *rng)
        };
        let choice = choice.map_err(|why| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("sandbox {id} is paused but cannot resume now: {why}"),
            )
        })?;
        if choice.host_id != me {
            tracing::info!(sandbox = %id, to = %choice.host_id, reason = ?choice.reason, "placing a paused sandbox of a host that is gone");
            return Ok(Decision::Forward {
                host_id: choice.host_id,
                address: choice.address,
            });
        }
        // One adoption at a time on this host: a second call for the same
        // sandbox finds it held here instead of losing the conditional
        // update to this host's own first one.
        let _one = pool.adopting.lock().await;
        if !self.map().contains_key(id) {
            self.adopt(row).await?;
        }
        Ok(Decision::Local)
    }

    /// Makes this host the owner of `row`, a paused sandbox of a host that
    /// is gone (the conditional update; 409 if another host got there
    /// first), and holds it as a paused sandbox whose snapshot is in the
    /// bucket.
    async fn adopt(self: &Arc<Self>, mut row: Row) -> Result<(), ApiError> {
        let (id, generation, from) = (row.id.clone(), row.generation, row.owner.clone());
        let id2 = id.clone();
        let won = self
            .with_store(move |s| s.transition(&id2, RowState::Paused, generation, RowState::Paused))
            .await?;
        if !won {
            return Err(ApiError::conflict(format!(
                "sandbox {id} was taken over by another host meanwhile; retry"
            )));
        }
        row.generation += 1;
        row.owner = Some(self.host_id().to_string());
        let dir = self.sandbox_dir(&id);
        {
            use std::os::unix::fs::DirBuilderExt;
            if let Err(e) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
            {
                tracing::warn!(sandbox = %id, "creating {}: {e} (its resume will fail)", dir.display());
            }
        }
        let id3 = id.clone();
        match self.with_store(move |s| s.get_network(&id3)).await {
            Ok(Some(spec)) => self.net_adopt(&id, spec),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(sandbox = %id, "reading its network settings failed: {}", e.message)
            }
        }
        let entry = paused_entry(row, None, None);
        self.map().entry(id.clone()).or_insert(entry);
        tracing::info!(sandbox = %id, from = ?from, "adopted a paused sandbox of a host that is gone (its snapshot is in the bucket)");
        Ok(())
    }

    /// Before a resume: a snapshot that is not on this host's disk (an
    /// adopted sandbox) is downloaded from the bucket, through the chunk
    /// cache, into its snapshot directory.
    pub(super) async fn fetch_remote_snapshot(&self, id: &str, gen: u64) -> Result<(), String> {
        let dest = self.snapshot_dir(id, gen);
        if dest.is_dir() {
            return Ok(());
        }
        let Some(u) = &self.cfg.snapshot_upload else {
            return Err(format!("its snapshot {} is missing", dest.display()));
        };
        let snapshot_id = format!("{id}-{gen}");
        let started = std::time::Instant::now();
        let cache = self.pool.as_ref().and_then(|p| p.cache.as_ref());
        let stats = u
            .store()
            .download(&snapshot_id, &dest, cache)
            .await
            .map_err(|e| {
                format!(
                    "downloading its snapshot {snapshot_id} from the bucket: {}",
                    crate::error_chain(&e)
                )
            })?;
        tracing::info!(sandbox = %id, snapshot = %snapshot_id, ?stats, ms = started.elapsed().as_millis() as u64, "downloaded the snapshot from the bucket");
        Ok(())
    }

    /// The pool's other sandboxes for `GET /sandboxes`: those of live hosts
    /// and the paused ones of hosts that are gone. Empty outside a pool or
    /// when the database or discovery fails (logged: the list then shows
    /// this host's sandboxes only).
    pub async fn pool_rows(&self) -> Vec<Row> {
        let Some(pool) = &self.pool else {
            return Vec::new();
        };
        let rows = match self.with_store(|s| s.others()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("listing the pool's sandboxes: {}", e.message);
                return Vec::new();
            }
        };
        let live: std::collections::HashSet<String> = match pool.live().await {
            Ok(h) => h.into_iter().map(|h| h.id).collect(),
            Err(e) => {
                tracing::warn!("listing the pool's sandboxes: {}", e.message);
                return Vec::new();
            }
        };
        let held = self.map();
        rows.into_iter()
            .filter(|r| !held.contains_key(&r.id))
            .filter(|r| {
                r.state == RowState::Paused || r.owner.as_ref().is_some_and(|o| live.contains(o))
            })
            .collect()
    }

    /// What this host's heartbeat says besides its address.
    pub(super) fn pool_heartbeat_fields(&self) -> (bool, u64) {
        let draining = self
            .pool
            .as_ref()
            .is_some_and(|p| p.draining.load(Ordering::Relaxed));
        let free = (self.memory.available_permits() as u64).saturating_mul(1 << 20);
        (draining, free)
    }

    /// The drain begins (SIGTERM): placement skips this host from now on
    /// (a heartbeat says so at once).
    pub(super) async fn pool_drain_begin(self: &Arc<Self>) {
        let Some(pool) = &self.pool else { return };
        pool.draining.store(true, Ordering::Relaxed);
        if let Err(e) = self.beat_once().await {
            tracing::warn!("announcing the drain failed: {}", e.message);
        }
    }

    /// After the drain: this host's heartbeat is deleted, so the others
    /// count it as gone now rather than after the TTL.
    pub(super) async fn pool_leave(&self) {
        if self.pool.is_none() {
            return;
        }
        match self.with_store(|s: &store::Store| s.delete_host()).await {
            Ok(()) => tracing::info!("left the pool"),
            Err(e) => tracing::warn!("leaving the pool: {}", e.message),
        }
    }
}
