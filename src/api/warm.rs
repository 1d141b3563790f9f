//! Warm templates: sandboxes of a template are created by resuming a
//! **template snapshot** (a VM of the template booted once, saved when
//! ready) instead of booting it.
//!
//! - **Key.** A template snapshot lives in the snapshot store
//!   (`<data>/snapshots/warm-<hash>/`, kind [`SnapshotKind::Template`], not
//!   listed by `GET /snapshots`) under an id that is a SHA-256 of its
//!   **inputs** ([`inputs`]): the backend, this binary's version, the
//!   kernel (the built-in test guest's image bytes, or a kernel file's
//!   path, length, inode and modification time), the initrd and root
//!   filesystem image (the same file identity), the command line (for the
//!   built-in test guest without its per-create `stasis.seed=`), memory,
//!   vCPUs, memory backing, agent and interpreter. Any change gives another
//!   id: the next create misses, boots cold, and a new template snapshot is
//!   built; once it is in the store the template's older ones are deleted.
//! - **Build.** A create that misses boots cold as ever; once it succeeded,
//!   a background task boots a separate builder VM of the same template
//!   (so no user's env vars, token or files are in the snapshot), waits
//!   until it is ready (the agent answers `GET /health`, and the code
//!   interpreter for interpreter templates; for agentless guests such as
//!   the built-in test guest: the VM runs), pauses it into its own
//!   directory and imports that into the store (manifest written, then one
//!   rename: no half-written template snapshot is ever visible under its
//!   id). One build at a time in this server (creates meanwhile boot
//!   cold; a create of a template whose build was skipped starts it
//!   later), no build of an id already in the store, and the store refuses
//!   a second import of an id. A build is not admitted like a sandbox (it
//!   takes no running slot and no share of the memory budget, so it never
//!   makes a user's create fail); it is skipped while the memory budget
//!   lacks the template's memory. A failed build is logged and retried no
//!   sooner than [`RETRY_AFTER`] later.
//! - **Use.** A create that hits resumes lazily from the template snapshot
//!   exactly as a create from a user snapshot does (fresh entropy, own
//!   env vars and envd token through the agent's `/init`, the host's wall
//!   clock, its own id); `GET /sandboxes/{id}` shows the snapshot as
//!   `stasis.warmSnapshot`.
//! - **Refusal.** A template snapshot whose manifest records another host
//!   CPU/KVM fingerprint than this host's, or that is damaged, is not
//!   resumed: the create boots cold, one warning is logged per snapshot,
//!   and a rebuild replaces it.
//! - **Off.** `stasis serve --no-warm-templates`, a template file with
//!   `"warm": false`, sandboxes that get a network device (a resumed guest
//!   keeps its builder's address: the clone limit of README "Snapshots and
//!   clones"), and the fake backend's code-interpreter templates (its host
//!   agent's interpreter is not carried by a snapshot) always boot cold.
//! - **Delete.** `DELETE /templates/{name}` deletes the template's
//!   template snapshots (the store's in-use rule applies: 409 while a
//!   snapshot names one as its parent); sandboxes resumed from them keep
//!   running (README "Snapshots and clones"). A build already running
//!   when they are deleted still imports its snapshot (its inputs are
//!   current); the next create after that resumes from it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{
    internal, models, ApiError, BackendKind, ConsoleSpec, DiskSpec, KernelSpec, Manager, Reply,
    Request, Template, BOOT_TIMEOUT, DISK_OVERLAY, PAUSE_TIMEOUT, SHUTDOWN_GRACE, VSOCK_SOCKET,
};
use crate::snapshot::manifest::{HostFingerprint, SnapshotKind};
use crate::snapshot::store::{ImportOpts, StoredSnapshot};

/// Ids of template snapshots start with this.
pub const WARM_PREFIX: &str = "warm-";
/// Manifest label: the template's name.
pub const LABEL_TEMPLATE: &str = "template";
/// Manifest label: the inputs the id hashes (for `stasis snapshot info`).
pub const LABEL_INPUTS: &str = "inputs";
/// Bumped when what a template snapshot holds changes meaning.
const WARM_FORMAT: u32 = 1;
/// Builder VMs' directories, under the data dir.
const BUILD_DIR: &str = "warmbuild";
/// After a failed build, the next attempt waits this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Errors of a template snapshot build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The builder VM failed (start, boot, agent, pause).
    #[error("builder VM: {0}")]
    Builder(String),
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The snapshot store refused the snapshot.
    #[error(transparent)]
    Store(#[from] crate::snapshot::store::Error),
}

/// The manager's warm-template bookkeeping.
#[derive(Default)]
pub(super) struct WarmState {
    /// Template snapshot ids being built now.
    building: std::sync::Mutex<HashSet<String>>,
    /// When a build of an id last failed.
    failed: std::sync::Mutex<HashMap<String, Instant>>,
    /// Ids whose refusal was logged already.
    refused: std::sync::Mutex<HashSet<String>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a create resumes from.
pub(super) enum Lookup {
    /// Boot cold; build nothing.
    Off,
    /// Resume from this template snapshot.
    Hit(Box<StoredSnapshot>),
    /// Boot cold, then build template snapshot `id` (replacing `stale`, a
    /// refused snapshot under that id).
    Miss {
        id: String,
        inputs: String,
        stale: bool,
    },
}

/// The identity of an input file: path, length, inode, modification time
/// (a changed image is a new file or a new mtime; its bytes are not read).
fn file_identity(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => format!(
            "{}:{}:{}:{}.{}",
            p.display(),
            m.len(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(e) => format!("{}:unreadable:{}", p.display(), e.kind()),
    }
}

/// The inputs of template `name` resolved to `t`, one `key=value` a line,
/// and the template snapshot id that hashes them.
pub(super) fn inputs(name: &str, t: &Template, backend: BackendKind) -> (String, String) {
    let kernel = match &t.boot.kernel {
        KernelSpec::TestGuest => format!(
            "testguest:{:016x}",
            crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(crate::guest::IMAGE)
        ),
        KernelSpec::Path(p) => file_identity(p),
    };
    // The built-in test guest draws a seed per create: not an input.
    let cmdline: Vec<&str> = t
        .boot
        .cmdline
        .split_whitespace()
        .filter(|w| !(t.builtin && w.starts_with("stasis.seed=")))
        .collect();
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        s.push_str(k);
        s.push('=');
        s.push_str(&v);
        s.push('\n');
    };
    line("format", WARM_FORMAT.to_string());
    line("stasis", env!("CARGO_PKG_VERSION").to_string());
    line("backend", format!("{backend:?}"));
    line("template", name.to_string());
    line("kernel", kernel);
    line(
        "initrd",
        t.boot
            .initrd
            .as_deref()
            .map(file_identity)
            .unwrap_or_default(),
    );
    line(
        "rootfs",
        t.rootfs.as_deref().map(file_identity).unwrap_or_default(),
    );
    line("cmdline", cmdline.join(" "));
    line("memory", t.boot.mem_bytes.to_string());
    line("vcpus", t.boot.vcpus.to_string());
    line("backing", t.boot.memory_backing.to_string());
    line("agent", t.agent.to_string());
    line("interpreter", t.interpreter.to_string());
    let hash = Sha256::digest(s.as_bytes());
    let hex: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
    (format!("{WARM_PREFIX}{hex}"), s)
}

impl Manager {
    /// Where builder VM `bid` works: `<data>/warmbuild/<bid>` (as long a
    /// path as a sandbox's, for the socket path limit; not a sandbox).
    fn warm_build_dir(&self, bid: &str) -> PathBuf {
        self.cfg.data_dir.join(BUILD_DIR).join(bid)
    }

    /// At start: builds a crash interrupted are removed (their snapshots
    /// were never imported).
    pub(super) fn warm_recover(&self) {
        let d = self.cfg.data_dir.join(BUILD_DIR);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                crate::worker::vm::kill_host_agent(&e.path().join(VSOCK_SOCKET));
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// For a create of template `name` resolved to `t` (before any
    /// per-sandbox change): resume from its template snapshot, or boot cold
    /// (and build one), or boot cold only. `net` says the sandbox gets a
    /// network device.
    pub(super) async fn warm_lookup(&self, name: &str, t: &Template, net: bool) -> Lookup {
        if !self.cfg.warm_templates
            || !t.warm
            || net
            || (t.interpreter && self.cfg.backend == BackendKind::Fake)
        {
            return Lookup::Off;
        }
        let (id, inputs) = inputs(name, t, self.cfg.backend);
        let Ok(store) = self.snapshot_store() else {
            return Lookup::Off;
        };
        let id2 = id.clone();
        let got = tokio::task::spawn_blocking(move || store.get(&id2)).await;
        let why = match got {
            Ok(Ok(s)) => {
                let host = HostFingerprint::current();
                match s.manifest.fingerprint.mismatch(&host) {
                    None if s.manifest.kind == SnapshotKind::Template => {
                        return Lookup::Hit(Box::new(s));
                    }
                    None => "it is not a template snapshot".to_string(),
                    Some(d) => format!("it was taken on a different host ({d})"),
                }
            }
            Ok(Err(crate::snapshot::store::Error::NotFound(_))) => {
                return Lookup::Miss {
                    id,
                    inputs,
                    stale: false,
                }
            }
            Ok(Err(e)) => crate::error_chain(&e),
            Err(e) => e.to_string(),
        };
        if lock(&self.warm.refused).insert(id.clone()) {
            tracing::warn!(template = %name, snapshot = %id,
                "template snapshot refused, booting cold (it will be rebuilt): {why}");
        }
        Lookup::Miss {
            id,
            inputs,
            stale: true,
        }
    }

    /// Starts building template snapshot `id` of template `name` in the
    /// background, unless it is being built or failed recently.
    pub(super) fn warm_build_spawn(
        self: &Arc<Self>,
        name: String,
        t: Template,
        id: String,
        inputs: String,
        stale: bool,
    ) {
        if let Some(at) = lock(&self.warm.failed).get(&id) {
            if at.elapsed() < RETRY_AFTER {
                return;
            }
        }
        {
            // One build at a time in this server (a later create of a
            // template whose build was skipped tries again).
            let mut b = lock(&self.warm.building);
            if !b.is_empty() {
                return;
            }
            b.insert(id.clone());
        }
        let mgr = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let res = mgr.warm_build(&name, t, &id, inputs, stale).await;
            lock(&mgr.warm.building).remove(&id);
            match res {
                Ok(true) => {
                    lock(&mgr.warm.failed).remove(&id);
                    lock(&mgr.warm.refused).remove(&id);
                    tracing::info!(template = %name, snapshot = %id,
                        ms = started.elapsed().as_millis() as u64, "template snapshot saved");
                }
                Ok(false) => {
                    tracing::debug!(template = %name, snapshot = %id,
                        "template snapshot not built now (it exists, or no capacity)");
                }
                Err(e) => {
                    lock(&mgr.warm.failed).insert(id.clone(), Instant::now());
                    tracing::warn!(template = %name, snapshot = %id,
                        "building the template snapshot failed (creates boot cold): {}",
                        crate::error_chain(&e));
                }
            }
        });
    }

    /// Boots a builder VM of `t`, waits until it is ready, pauses it and
    /// imports its snapshot as `id`. `Ok(false)`: no capacity now.
    async fn warm_build(
        &self,
        name: &str,
        mut t: Template,
        id: &str,
        inputs: String,
        stale: bool,
    ) -> Result<bool, Error> {
        // Built meanwhile (by the build another create started).
        if !stale
            && self
                .snapshot_store()
                .ok()
                .and_then(|s| s.path(id).ok())
                .is_some_and(|p| p.is_dir())
        {
            return Ok(false);
        }
        // Not admitted like a sandbox: a build must never make a user's
        // create fail (429). It is skipped when the memory budget lacks the
        // template's memory now, and only one runs at a time.
        if (self.memory.available_permits() as u64) < t.memory_mb.max(1) {
            return Ok(false);
        }
        let bid = models::new_id();
        let dir = self.warm_build_dir(&bid);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
        let vsock = dir.join(VSOCK_SOCKET);
        let res = self
            .warm_build_in(name, &mut t, id, inputs, stale, &bid, &dir, &vsock)
            .await;
        let (v, d) = (vsock.clone(), dir.clone());
        let _ = tokio::task::spawn_blocking(move || {
            crate::worker::vm::kill_host_agent(&v);
            std::fs::remove_dir_all(&d)
        })
        .await;
        res.map(|()| true)
    }

    #[allow(clippy::too_many_arguments)]
    async fn warm_build_in(
        &self,
        name: &str,
        t: &mut Template,
        id: &str,
        inputs: String,
        stale: bool,
        bid: &str,
        dir: &Path,
        vsock: &Path,
    ) -> Result<(), Error> {
        t.boot.console = ConsoleSpec::File(dir.join("console.log"));
        if let Some(base) = &t.rootfs {
            t.boot.disk = Some(DiskSpec {
                base: base.clone(),
                overlay: dir.join(DISK_OVERLAY),
            });
        }
        if t.agent {
            t.boot.vsock = Some(vsock.to_owned());
        }
        t.boot.interpreter = None;
        t.boot.net = None;
        let ro: Vec<PathBuf> = match &t.boot.kernel {
            KernelSpec::Path(k) => vec![k.clone()],
            KernelSpec::TestGuest => vec![],
        }
        .into_iter()
        .chain(t.boot.initrd.clone())
        .chain(t.boot.disk.as_ref().map(|d| d.base.clone()))
        .collect();
        let worker = self
            .spawn_worker_in(
                bid,
                dir.to_owned(),
                ro,
                t.boot.mem_bytes,
                u32::from(t.boot.vcpus),
                None,
            )
            .await
            .map_err(|e| Error::Builder(format!("starting its worker: {e}")))?;
        let boot = Request::Boot {
            backend: self.cfg.backend,
            config: t.boot.clone(),
        };
        let ran = async {
            match worker.request(boot, BOOT_TIMEOUT).await {
                Ok(Reply::Running { .. }) => {}
                Ok(other) => return Err(format!("boot: unexpected reply {other:?}")),
                Err(e) => return Err(format!("boot: {e}")),
            }
            if t.agent {
                self.wait_for_agent(&worker, vsock, t.interpreter).await?;
            }
            let snap = dir.join("snapshot-1");
            match worker
                .request(
                    Request::Pause {
                        snapshot_dir: snap.clone(),
                        incremental: false,
                    },
                    PAUSE_TIMEOUT,
                )
                .await
            {
                Ok(Reply::Paused { .. }) => Ok(snap),
                Ok(other) => Err(format!("pause: unexpected reply {other:?}")),
                Err(e) => Err(format!("pause: {e}")),
            }
        }
        .await;
        let snap = match ran {
            Ok(s) => {
                if tokio::time::timeout(SHUTDOWN_GRACE, worker.wait_exit())
                    .await
                    .is_err()
                {
                    worker.kill();
                }
                s
            }
            Err(why) => {
                worker.shutdown(SHUTDOWN_GRACE).await;
                return Err(Error::Builder(why));
            }
        };
        let store = self
            .snapshot_store()
            .map_err(|e| Error::Builder(e.message))?;
        let (name, id, dir, vsock) = (
            name.to_owned(),
            id.to_owned(),
            dir.to_owned(),
            vsock.to_owned(),
        );
        let fake_agent = t.agent && self.cfg.backend == BackendKind::Fake;
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            if fake_agent {
                // The fake backend's guest files: its host agent's tree.
                crate::worker::vm::kill_host_agent(&vsock);
                let root = dir.join("root");
                if root.is_dir() {
                    std::fs::rename(&root, snap.join("root"))
                        .map_err(|e| Error::Io(format!("moving {}", root.display()), e))?;
                }
            }
            if stale {
                match store.delete(&id) {
                    Ok(()) | Err(crate::snapshot::store::Error::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let mut labels = BTreeMap::new();
            labels.insert(LABEL_TEMPLATE.to_string(), name.clone());
            labels.insert(LABEL_INPUTS.to_string(), inputs);
            match store.import(
                &snap,
                &id,
                ImportOpts {
                    kind: SnapshotKind::Template,
                    source_sandbox: None,
                    labels,
                },
            ) {
                Ok(_) => {}
                // Built meanwhile by another server on this data dir.
                Err(crate::snapshot::store::Error::InUse { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            // The template's older template snapshots (other inputs).
            for m in store.list() {
                if m.kind == SnapshotKind::Template
                    && m.id != id
                    && m.labels.get(LABEL_TEMPLATE) == Some(&name)
                {
                    match store.delete(&m.id) {
                        Ok(()) => {
                            tracing::info!(template = %name, snapshot = %m.id,
                                "deleted an outdated template snapshot")
                        }
                        Err(e) => tracing::warn!(template = %name, snapshot = %m.id,
                            "an outdated template snapshot stays: {}", crate::error_chain(&e)),
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Builder(format!("import panicked: {e}")))?
    }

    /// `DELETE /templates/{name}` for a template name: deletes its template
    /// snapshots. `None`: `name` is neither a template nor has any (the
    /// caller answers as for a snapshot id).
    pub(super) async fn warm_delete_template(&self, name: &str) -> Option<Result<(), ApiError>> {
        if !models::valid_name(name, true) {
            return None;
        }
        let store = self.snapshot_store().ok()?;
        let n = name.to_owned();
        let res = tokio::task::spawn_blocking(move || {
            let mine: Vec<String> = store
                .list()
                .into_iter()
                .filter(|m| {
                    m.kind == SnapshotKind::Template && m.labels.get(LABEL_TEMPLATE) == Some(&n)
                })
                .map(|m| m.id)
                .collect();
            let mut errs = Vec::new();
            for id in &mine {
                if let Err(e) = store.delete(id) {
                    errs.push(e);
                }
            }
            (mine.len(), errs)
        })
        .await;
        let (found, errs) = match res {
            Ok(r) => r,
            Err(e) => return Some(Err(internal("template snapshot delete", e))),
        };
        if let Some(e) = errs.into_iter().next() {
            use crate::snapshot::store::Error as E;
            return Some(Err(match e {
                E::InUse { .. } => ApiError::conflict(e.to_string()),
                other => ApiError::internal(crate::error_chain(&other)),
            }));
        }
        if found > 0 {
            tracing::info!(template = %name, count = found, "template snapshots deleted");
            return Some(Ok(()));
        }
        // A template without a template snapshot: nothing to delete.
        self.resolve_template(name).await.ok().map(|_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::protocol::BootConfig;

    fn template(cmdline: &str, builtin: bool) -> Template {
        Template {
            boot: BootConfig {
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
            },
            cpu_count: 1,
            memory_mb: 64,
            disk_mb: 0,
            rootfs: None,
            agent: false,
            interpreter: false,
            warm: true,
            builtin,
        }
    }

    #[test]
    fn the_id_follows_every_input_but_the_builtin_seed() {
        let b = BackendKind::Vm;
        let (a, text) = inputs("base", &template("stasis.mib=16 stasis.seed=1", true), b);
        assert!(a.starts_with(WARM_PREFIX) && crate::snapshot::manifest::valid_id(&a));
        assert!(text.contains("cmdline=stasis.mib=16\n"), "{text}");
        let same = inputs("base", &template("stasis.mib=16 stasis.seed=2", true), b).0;
        assert_eq!(a, same, "the built-in seed is not an input");
        // A template file's seed is.
        let f1 = inputs("t", &template("stasis.seed=1", false), b).0;
        let f2 = inputs("t", &template("stasis.seed=2", false), b).0;
        assert_ne!(f1, f2);
        let mut t = template("stasis.mib=16", true);
        let base = inputs("base", &t, b).0;
        t.boot.mem_bytes *= 2;
        assert_ne!(inputs("base", &t, b).0, base, "memory");
        let mut t = template("stasis.mib=16", true);
        t.boot.vcpus = 2;
        assert_ne!(inputs("base", &t, b).0, base, "vcpus");
        let t = template("stasis.mib=16", true);
        assert_ne!(inputs("other", &t, b).0, base, "name");
        assert_ne!(inputs("base", &t, BackendKind::Fake).0, base, "backend");
    }

    #[test]
    fn a_changed_file_changes_the_id() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("vmlinux");
        std::fs::write(&k, b"one").unwrap();
        let mut t = template("console=ttyS0", false);
        t.boot.kernel = KernelSpec::Path(k.clone());
        let a = inputs("t", &t, BackendKind::Vm).0;
        assert_eq!(inputs("t", &t, BackendKind::Vm).0, a);
        std::fs::write(&k, b"two!").unwrap();
        assert_ne!(inputs("t", &t, BackendKind::Vm).0, a);
    }
}
