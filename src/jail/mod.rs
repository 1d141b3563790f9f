//! The jailer: every VM worker runs confined, to Firecracker's standard, so
//! that a guest that escapes into its VMM process gets no further.
//!
//! Layers, in the order a worker goes through them ([`enter`]):
//! 1. **Cleared environment** (the server spawns it with only the variables
//!    the worker reads; no `STASIS_API_KEY`, no tokens).
//! 2. **cgroup** (`cgroup.rs`): the worker joins `stasis/<name>` with
//!    `memory.max` = guest memory + [`MEMORY_OVERHEAD`], CPU quota = vCPUs + 1,
//!    `pids.max`; it is still root and in the host's namespaces here, so it
//!    can. Everything it starts later is inside.
//! 3. **Namespaces**: new mount, pid, ipc, uts and network namespaces (or an
//!    existing network namespace joined by path, [`Netns::Join`], for
//!    sandboxes with a network). The worker forks once: the child is pid 1 of
//!    the new pid namespace and goes on as the worker; the parent ("keeper")
//!    only waits for it and exits the same way, so the server sees the
//!    worker's fate.
//! 4. **Filesystem**: a private tmpfs root holding only this sandbox's
//!    directory (read-write, at the same absolute path as on the host, so
//!    request paths stay valid), the template's kernel, initrd and base disk
//!    (read-only), `/dev/kvm` and `/dev/userfaultfd` (nodes made with
//!    `mknod`, owned by the sandbox's uid), and a `/proc` of its own pid
//!    namespace; then `pivot_root` into it and the host's tree is detached.
//!    The root itself is remounted read-only.
//! 5. **rlimits**: no core dumps, a bounded number of descriptors.
//! 6. **Credentials**: every capability dropped from the bounding set,
//!    supplementary groups cleared, then the sandbox's own unprivileged
//!    uid/gid ([`UidPool`], `base + slot`), `PR_SET_NO_NEW_PRIVS`, and
//!    `PR_SET_PDEATHSIG` again (a uid change clears it).
//! 7. **seccomp** (`seccomp.rs`): the control thread's allowlist, then one
//!    per thread kind as the VMM starts its threads.
//!
//! The server side ([`Jailer`]) allocates the uid, creates the cgroup, makes
//! the sandbox directory the uid's, and cleans up after the worker exits
//! ([`Prepared::cleanup`]: cgroup emptied and removed, uid returned).
//!
//! Only VM workers are jailed; `serve --no-jail` turns it off for
//! debugging. `Jailer::detect` says why a host cannot jail (not root, no
//! usable cgroup hierarchy, no user namespaces needed).

pub mod cgroup;
pub mod seccomp;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Errors of the jailer, on either side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the jail needs root (running as uid {0}); use --no-jail to run workers unconfined")]
    NotRoot(u32),
    #[error("the jail needs cgroups; use --no-jail to run workers unconfined")]
    Cgroup(#[from] cgroup::Error),
    #[error("all {0} jail uids are in use")]
    NoUid(u32),
    #[error("{0}")]
    Sys(String, #[source] std::io::Error),
    #[error("{0}")]
    Seccomp(#[from] seccomp::Error),
    #[error("jail path {0} is not absolute or not valid")]
    BadPath(PathBuf),
    #[error("bad jail spec: {0}")]
    Spec(String),
}

fn sys(what: impl Into<String>) -> Error {
    Error::Sys(what.into(), std::io::Error::last_os_error())
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), Error> {
    if rc < 0 {
        Err(sys(what()))
    } else {
        Ok(())
    }
}

/// Memory a worker needs besides its guest's memory: the binary, thread
/// stacks, device buffers, snapshot I/O (page cache counts against the
/// group), measured with `memory.peak` over boot, pause and lazy resume
/// (README "Isolation").
pub const MEMORY_OVERHEAD: u64 = 192 << 20;

/// Default first uid/gid of jailed workers (`base + slot`).
pub const DEFAULT_UID_BASE: u32 = 900_000;
/// Default number of jail uids (and so of jailed workers at once).
pub const DEFAULT_UID_COUNT: u32 = 65_536;

/// Which network namespace the worker gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Netns {
    /// A new, empty one (loopback only, down): the default.
    #[default]
    New,
    /// Join this one (e.g. `/run/netns/<name>`, prepared with a tap).
    Join(PathBuf),
}

/// Everything a worker needs to jail itself; passed on its command line
/// (`stasis worker --jail JSON`), so it holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// Unprivileged uid and gid the worker runs as.
    pub uid: u32,
    pub gid: u32,
    /// Empty host directory the jail's tmpfs root is mounted on (inside the
    /// worker's own mount namespace only).
    pub root: PathBuf,
    /// Bind-mounted read-write at the same path (the sandbox directory).
    pub rw: Vec<PathBuf>,
    /// Bind-mounted read-only at the same path (kernel, initrd, base disk).
    pub ro: Vec<PathBuf>,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    pub netns: Netns,
}

/// What the server knows about a sandbox when it starts its worker.
#[derive(Debug, Clone, Default)]
pub struct JailRequest {
    /// Name of the cgroup and jail directory (the sandbox id).
    pub name: String,
    /// The sandbox's directory: the only host directory it may write.
    pub sandbox_dir: PathBuf,
    /// Host files it may read (kernel, initrd, base disk image).
    pub ro: Vec<PathBuf>,
    /// Guest memory, for `memory.max`.
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub netns: Netns,
    /// Overrides `memory.max` (tests).
    pub memory_max: Option<u64>,
}

/// Free jail uids: `base + slot`, lowest free slot first; a slot comes back
/// when its worker's cleanup runs.
#[derive(Debug)]
pub struct UidPool {
    base: u32,
    count: u32,
    used: Mutex<BTreeSet<u32>>,
}

impl UidPool {
    pub fn new(base: u32, count: u32) -> UidPool {
        UidPool {
            base,
            count,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// Takes the lowest free uid.
    pub fn take(&self) -> Result<u32, Error> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (0..self.count)
            .find(|s| !used.contains(s))
            .ok_or(Error::NoUid(self.count))?;
        used.insert(slot);
        Ok(self.base + slot)
    }

    /// Returns `uid` to the pool.
    pub fn give(&self, uid: u32) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.remove(&uid.wrapping_sub(self.base));
    }

    /// Uids in use.
    pub fn in_use(&self) -> usize {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The server's jailer: host checks done once, uid pool, cgroup layout.
#[derive(Debug)]
pub struct Jailer {
    layout: cgroup::Layout,
    uids: UidPool,
    /// Where jail roots go (`<data-dir>/jail`).
    jail_dir: PathBuf,
}

/// A prepared jail: the spec to hand the worker, and what to undo after it.
#[derive(Debug)]
pub struct Prepared {
    pub spec: JailSpec,
    pub cgroup: cgroup::Cgroup,
    jailer: Arc<Jailer>,
}

impl Jailer {
    /// Checks that this host can jail workers (root, cgroups) and sets up
    /// the uid pool; `jail_dir` holds the (empty) jail mount points.
    pub fn detect(jail_dir: &Path, uid_base: u32, uid_count: u32) -> Result<Arc<Jailer>, Error> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(Error::NotRoot(euid));
        }
        let layout = cgroup::Layout::detect()?;
        let swept = layout.sweep_stale();
        if swept > 0 {
            tracing::info!("removed {swept} cgroups left by stopped stasis servers");
        }
        std::fs::create_dir_all(jail_dir)
            .map_err(|e| Error::Sys(format!("create {}", jail_dir.display()), e))?;
        Ok(Arc::new(Jailer {
            layout,
            uids: UidPool::new(uid_base, uid_count),
            jail_dir: jail_dir.to_path_buf(),
        }))
    }

    pub fn uids(&self) -> &UidPool {
        &self.uids
    }

    pub fn layout(&self) -> &cgroup::Layout {
        &self.layout
    }

    /// Allocates a uid, creates the cgroup and the jail mount point and
    /// hands the sandbox directory to the uid.
    pub fn prepare(self: &Arc<Self>, req: &JailRequest) -> Result<Prepared, Error> {
        if req.name.is_empty()
            || req.name.len() > 128
            || !req
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Spec(format!("bad jail name {:?}", req.name)));
        }
        for p in std::iter::once(&req.sandbox_dir).chain(&req.ro) {
            if !p.is_absolute() || p.as_os_str().as_bytes().contains(&0) {
                return Err(Error::BadPath(p.clone()));
            }
        }
        let uid = self.uids.take()?;
        let undo_uid = |e: Error| {
            self.uids.give(uid);
            e
        };
        let limits = cgroup::Limits {
            memory: req
                .memory_max
                .unwrap_or(req.mem_bytes.saturating_add(MEMORY_OVERHEAD)),
            cpus: req.vcpus.saturating_add(1),
            pids: req.vcpus.saturating_add(64),
        };
        // Named after this server's pid too, so a later server can tell
        // the groups of a crashed one (`Layout::sweep_stale`).
        let cg_name = format!("{}-{}", std::process::id(), req.name);
        let cg = self
            .layout
            .create(&cg_name, limits)
            .map_err(|e| undo_uid(e.into()))?;
        let root = self.jail_dir.join(&req.name);
        let made = std::fs::create_dir_all(&root)
            .map_err(|e| Error::Sys(format!("create {}", root.display()), e))
            .and_then(|()| chown_tree(&req.sandbox_dir, uid, uid))
            .and_then(|()| req.ro.iter().try_for_each(|p| readable_by_others(p)));
        if let Err(e) = made {
            let _ = cg.destroy();
            return Err(undo_uid(e));
        }
        Ok(Prepared {
            spec: JailSpec {
                uid,
                gid: uid,
                root,
                rw: vec![req.sandbox_dir.clone()],
                ro: req.ro.clone(),
                cgroup_procs: cg.procs_files(),
                netns: req.netns.clone(),
            },
            cgroup: cg,
            jailer: self.clone(),
        })
    }
}

impl Prepared {
    /// After the worker exited: kills anything left in its cgroup, removes
    /// the cgroup and the jail mount point, frees the uid.
    pub fn cleanup(&self) -> Result<(), Error> {
        let r = self.cgroup.destroy();
        let _ = std::fs::remove_dir(&self.spec.root);
        self.jailer.uids.give(self.spec.uid);
        r.map_err(Error::from)
    }
}

/// Makes a read-only input (a snapshot directory that many sandboxes
/// resume from, each as its own uid; a kernel or base image) readable by
/// every jailed uid: files `o+r`, directories `o+rx`, recursively, not
/// following links. Safe because permissions are not what confines it: on
/// the host the data directory is 0700 (no other user reaches inside), and
/// a jailed worker sees only the paths its own jail binds.
fn readable_by_others(p: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let md =
        std::fs::symlink_metadata(p).map_err(|e| Error::Sys(format!("stat {}", p.display()), e))?;
    if md.file_type().is_symlink() {
        return Ok(());
    }
    let want = if md.is_dir() { 0o005 } else { 0o004 };
    let mode = md.permissions().mode();
    if mode & want != want {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode((mode | want) & 0o7777))
            .map_err(|e| Error::Sys(format!("chmod {}", p.display()), e))?;
    }
    if md.is_dir() {
        let entries =
            std::fs::read_dir(p).map_err(|e| Error::Sys(format!("list {}", p.display()), e))?;
        for ent in entries {
            let ent = ent.map_err(|e| Error::Sys(format!("list {}", p.display()), e))?;
            readable_by_others(&ent.path())?;
        }
    }
    Ok(())
}

/// Gives `dir` and everything under it (not following links) to uid:gid.
pub(crate) fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::Sys(format!("stat {}", dir.display()), e))?;
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .map_err(|e| Error::Sys(format!("chown {}", dir.display()), e))?;
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(dir).map_err(|e| Error::Sys(format!("list {}", dir.display()), e))?;
        for ent in entries {
            let ent = ent.map_err(|e| Error::Sys(format!("list {}", dir.display()), e))?;
            chown_tree(&ent.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Which side of the fork [`enter`] returned on.
#[derive(Debug)]
pub enum Entered {
    /// The keeper (in the host's namespaces): must close everything shared
    /// with the worker and call [`keep`] with this pid.
    Keeper(libc::pid_t),
    /// Inside the jail, unprivileged, filtered: go on as the worker.
    Jailed,
}

fn cstr(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::BadPath(p.to_path_buf()))
}

/// Jails the calling process (see the module docs for the layers). Must be
/// called while the process is single-threaded. Returns twice, as
/// [`Entered::Keeper`] in the parent and [`Entered::Jailed`] in the child; an
/// error in the child is returned there (and the caller reports it).
pub fn enter(spec: &JailSpec) -> Result<Entered, Error> {
    // 2. cgroup, while still root in the host's namespaces.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for f in &spec.cgroup_procs {
        std::fs::write(f, pid.to_string())
            .map_err(|e| Error::Sys(format!("join cgroup {}", f.display()), e))?;
    }
    // 3. namespaces.
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    match &spec.netns {
        Netns::New => flags |= libc::CLONE_NEWNET,
        Netns::Join(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| Error::Sys(format!("open netns {}", path.display()), e))?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            check(rc, || format!("join netns {}", path.display()))?;
            // The sandbox's tap, while this process may still open it.
            crate::net::tap::preopen_here(crate::net::TAP_NAME);
        }
    }
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(flags) }, || {
        "unshare namespaces".into()
    })?;
    // SAFETY: the caller guarantees a single-threaded process, so the child
    // may go on running ordinary code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(sys("fork into the pid namespace"));
    }
    if child > 0 {
        return Ok(Entered::Keeper(child));
    }
    // The child: pid 1 of the new pid namespace.
    set_pdeathsig()?;
    setup_fs(spec)?;
    let host = b"stasis-sandbox";
    // SAFETY: the pointer and length describe `host`.
    let rc = unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) };
    check(rc, || "sethostname".into())?;
    // 5. rlimits.
    set_rlimit(libc::RLIMIT_CORE, 0)?;
    set_rlimit(libc::RLIMIT_NOFILE, 4096)?;
    // 6. credentials.
    drop_privileges(spec.uid, spec.gid)?;
    // 7. seccomp for this (the control) thread; others add their own.
    seccomp::enable();
    seccomp::install(seccomp::ThreadKind::Control)?;
    Ok(Entered::Jailed)
}

fn set_pdeathsig() -> Result<(), Error> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    check(rc, || "prctl(PR_SET_PDEATHSIG)".into())
}

fn set_rlimit(res: libc::__rlimit_resource_t, v: u64) -> Result<(), Error> {
    let lim = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: `lim` is a valid rlimit for the call's duration.
    check(unsafe { libc::setrlimit(res, &lim) }, || {
        format!("setrlimit({res})")
    })
}

fn mount(
    src: Option<&CString>,
    dst: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
    data: Option<&CString>,
    what: &str,
) -> Result<(), Error> {
    let p = |c: Option<&CString>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives
    // the call.
    let rc = unsafe { libc::mount(p(src), dst.as_ptr(), p(fstype), flags, p(data).cast()) };
    check(rc, || format!("{what} ({})", dst.to_string_lossy()))
}

/// Layer 4: tmpfs root, binds, device nodes, proc, pivot_root.
fn setup_fs(spec: &JailSpec) -> Result<(), Error> {
    let root = cstr(&spec.root)?;
    let slash = CString::from(c"/");
    // The jail's own directories must be traversable by the sandbox's uid
    // whatever umask the server runs with; what the worker creates later
    // (in its sandbox dir) is private to it.
    // SAFETY: umask only swaps the process's file mode mask.
    unsafe { libc::umask(0o022) };
    let restore_umask = || {
        // SAFETY: as above.
        unsafe { libc::umask(0o077) };
    };
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        &slash,
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "make / private",
    )?;
    let tmpfs = CString::from(c"tmpfs");
    let opts = CString::new("size=1m,mode=0755").expect("no NUL");
    mount(
        Some(&tmpfs),
        &root,
        Some(&tmpfs),
        libc::MS_NOSUID,
        Some(&opts),
        "mount the jail's tmpfs",
    )?;
    let binds = spec
        .rw
        .iter()
        .map(|p| (p, false))
        .chain(spec.ro.iter().map(|p| (p, true)));
    for (src, ro) in binds {
        if !src.is_absolute() {
            return Err(Error::BadPath(src.clone()));
        }
        let dst = spec.root.join(
            src.strip_prefix("/")
                .map_err(|_| Error::BadPath(src.clone()))?,
        );
        let is_dir = std::fs::metadata(src)
            .map_err(|e| Error::Sys(format!("stat {}", src.display()), e))?
            .is_dir();
        let mk = if is_dir {
            std::fs::create_dir_all(&dst)
        } else {
            dst.parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::File::create(&dst).map(drop))
        };
        mk.map_err(|e| Error::Sys(format!("create {}", dst.display()), e))?;
        let (s, d) = (cstr(src)?, cstr(&dst)?);
        mount(
            Some(&s),
            &d,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
            "bind",
        )?;
        let mut fl =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if ro {
            fl |= libc::MS_RDONLY;
        }
        mount(None, &d, None, fl, None, "remount bind")?;
    }
    // Device nodes: made here (not bound), owned by the sandbox's uid.
    let dev = spec.root.join("dev");
    std::fs::create_dir_all(&dev).map_err(|e| Error::Sys("create /dev".into(), e))?;
    for name in ["kvm", "userfaultfd", "null"] {
        let host = Path::new("/dev").join(name);
        let Ok(meta) = std::fs::metadata(&host) else {
            continue;
        };
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if !meta.file_type().is_char_device() {
            continue;
        }
        let node = cstr(&dev.join(name))?;
        let mode = if name == "null" { 0o666 } else { 0o600 };
        // SAFETY: `node` is a NUL-terminated path; mode and dev are plain
        // integers copied from the host's node.
        let rc = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | mode, meta.rdev()) };
        check(rc, || format!("mknod /dev/{name}"))?;
        // SAFETY: as above.
        let rc = unsafe { libc::chown(node.as_ptr(), spec.uid, spec.gid) };
        check(rc, || format!("chown /dev/{name}"))?;
        // SAFETY: as above (mknod's mode is filtered by the umask).
        let rc = unsafe { libc::chmod(node.as_ptr(), mode) };
        check(rc, || format!("chmod /dev/{name}"))?;
    }
    // /proc of the new pid namespace (the VMM reads /proc/self).
    let proc_dir = spec.root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(|e| Error::Sys("create /proc".into(), e))?;
    let proc_c = CString::from(c"proc");
    mount(
        Some(&proc_c),
        &cstr(&proc_dir)?,
        Some(&proc_c),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        "mount /proc",
    )?;
    // The root itself becomes read-only; the binds keep their own flags.
    mount(
        None,
        &root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        Some(&opts),
        "remount the jail root read-only",
    )?;
    // pivot_root(".", "."): the old root ends up on top of the new one and
    // is detached at once.
    // SAFETY: `root` is a NUL-terminated path.
    check(unsafe { libc::chdir(root.as_ptr()) }, || {
        "chdir into the jail".into()
    })?;
    let dot = CString::from(c".");
    // SAFETY: two NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(rc as libc::c_int, || "pivot_root".into())?;
    // SAFETY: NUL-terminated path.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc, || "detach the host's root".into())?;
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::chdir(slash.as_ptr()) }, || "chdir /".into())?;
    restore_umask();
    Ok(())
}

/// Layer 6: no capabilities left, unprivileged uid/gid, no new privileges.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(sys(format!("drop capability {cap} from the bounding set")));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(rc, || "clear ambient capabilities".into())?;
    // SAFETY: an empty group list (null pointer, length 0).
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, || {
        "setgroups".into()
    })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(gid, gid, gid) }, || {
        "setresgid".into()
    })?;
    // SAFETY: integer arguments only. With the uid no longer 0 (and no
    // SECBIT_KEEP_CAPS) the kernel clears the permitted and effective sets.
    check(unsafe { libc::setresuid(uid, uid, uid) }, || {
        "setresuid".into()
    })?;
    // A credential change resets the parent-death signal, and makes the
    // process non-dumpable, which leaves its /proc/self files owned by root
    // (the VMM reads /proc/self/pagemap). Core dumps stay off (RLIMIT_CORE
    // is 0) and nothing else runs as this uid in this pid namespace.
    set_pdeathsig()?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    check(rc, || "prctl(PR_SET_DUMPABLE)".into())?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, || "prctl(PR_SET_NO_NEW_PRIVS)".into())?;
    if effective_caps() != Some(0) {
        return Err(Error::Spec(
            "capabilities remain after the uid change".into(),
        ));
    }
    Ok(())
}

/// The `CapEff` mask of this process, from /proc.
pub fn effective_caps() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The keeper's life: wait for the jailed worker and exit as it did (same
/// code, or killed by the same signal), so the server sees the worker's
/// fate. Never returns.
pub fn keep(child: libc::pid_t) -> ! {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(1);
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: restoring the default action and raising a signal at
        // ourselves; nothing else runs in the keeper.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(libc::WEXITSTATUS(status));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_pool_reuses_freed_slots() {
        let p = UidPool::new(900_000, 3);
        assert_eq!(p.take().unwrap(), 900_000);
        assert_eq!(p.take().unwrap(), 900_001);
        assert_eq!(p.take().unwrap(), 900_002);
        assert!(matches!(p.take(), Err(Error::NoUid(3))));
        p.give(900_001);
        assert_eq!(p.in_use(), 2);
        assert_eq!(p.take().unwrap(), 900_001);
    }

    #[test]
    fn spec_roundtrips_as_json() {
        let s = JailSpec {
            uid: 900_001,
            gid: 900_001,
            root: "/d/jail/x".into(),
            rw: vec!["/d/sandboxes/x".into()],
            ro: vec!["/k/vmlinux".into()],
            cgroup_procs: vec!["/sys/fs/cgroup/stasis/x/cgroup.procs".into()],
            netns: Netns::Join("/run/netns/x".into()),
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<JailSpec>(&j).unwrap(), s);
    }
}
