//! The fake backend's host agent, confined: the command line that runs
//! `stasis-envd` inside a `bwrap` sandbox (Debian's bubblewrap).
//!
//! The fake backend stands in for a VM, so what its agent and the commands
//! it runs can reach should look like a VM and harm nothing:
//! - **user namespace**: the agent runs as `user` (uid/gid 1000, home
//!   `/home/user`) as the SDK expects, with no capabilities. Run by root
//!   (as stasis is), uid 1000 maps to an unprivileged host uid of its own
//!   ([`FAKE_UID_BASE`] + a hash of the sandbox directory): the user
//!   namespace is made and mapped by the worker (`0 → 0` for bwrap's own
//!   setup, `1000 → that uid`), bwrap enters it, and `setpriv` drops to
//!   1000 with an empty bounding set before the agent starts (bwrap sets
//!   `no_new_privs`, so no setuid binary brings root back). Run by anyone
//!   else, bwrap maps 1000 to the caller's own uid.
//! - **mount namespace**: a fresh root holding `/usr` (and the merged-/usr
//!   links), read-only; a private `/proc` (its own pid namespace), a
//!   minimal `/dev`, a private `/tmp`; its own `/etc/passwd` and
//!   `/etc/group` (root and `user`) and a few read-only files from the
//!   host's `/etc` (resolver, hosts, TLS roots, `ld.so.cache`); the agent
//!   binary and the interpreter's virtualenv and base installation
//!   read-only; and, read-write,
//!   only the sandbox's home (`<sandbox>/root` → `/home/user`) and the
//!   directory its socket lives in (`<sandbox>/agent-run` →
//!   `/run/stasis`). Nothing else of the host: no `/etc/shadow`, no data
//!   directory, no other sandbox.
//! - **pid, ipc, uts and cgroup namespaces**: it sees only its own
//!   processes; bwrap's inner init reaps orphans, so every process the
//!   agent starts stays in the tree that pause stops and kill kills.
//! - **network**: shared with the host (documented): the fake backend's
//!   user ports and tests reach processes on the host's loopback, as the
//!   proxy's forwarder does. A VM sandbox has its own network.
//!
//! The socket the proxy connects to stays `<sandbox>/vsock`: a symbolic
//! link to `agent-run/vsock`, where the confined agent listens. The host
//! path is also passed as `STASIS_HOST_VSOCK` so that [`super::vm`] can
//! recognise the agent's process from its command line.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable (inside the box) naming the host-side socket path;
/// it also marks the bwrap command line as this sandbox's agent.
pub const HOST_VSOCK_ENV: &str = "STASIS_HOST_VSOCK";
/// Where the socket directory is mounted inside the box.
const RUN_DIR: &str = "/run/stasis";
/// The agent's home inside the box.
const HOME: &str = "/home/user";
/// Overrides where the worker finds bwrap.
pub const BWRAP_ENV: &str = "STASIS_BWRAP";
/// First host uid of fake agents (below the jail's default range).
pub const FAKE_UID_BASE: u32 = 800_000;
const FAKE_UID_COUNT: u32 = 65_536;
const SETPRIV: &str = "/usr/bin/setpriv";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
user:x:1000:1000:user:/home/user:/bin/bash\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nsudo:x:27:user\nuser:x:1000:\nnogroup:x:65534:\n";

/// Host files shown read-only inside the box when they exist.
const ETC_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/python3",
    "/etc/python3.11",
];

/// Errors preparing the box.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// bwrap is not installed.
    #[error(
        "the fake backend runs its agent confined with bwrap, which was not found \
         (Debian: apt-get install bubblewrap; or set {BWRAP_ENV})"
    )]
    NoBwrap,
    /// A file of the box could not be made.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// bwrap's path: `$STASIS_BWRAP`, else the first `bwrap` on `PATH`.
fn bwrap() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(BWRAP_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("bwrap"))
                .find(|p| p.is_file())
        })
        .ok_or(Error::NoBwrap)
}

/// A command ready to spawn, with the user namespace it enters (held open
/// until the spawn: bwrap receives it as an inherited descriptor).
pub struct Boxed {
    /// bwrap's command line.
    pub cmd: Command,
    /// The user namespace (root only).
    pub userns: Option<std::os::fd::OwnedFd>,
}

/// What the box runs.
pub struct Spec<'a> {
    /// The stasis-envd binary.
    pub agent_exe: &'a Path,
    /// The host-side socket path (`<sandbox>/vsock`).
    pub vsock: &'a Path,
    /// The sandbox's home on the host (`<sandbox>/root`).
    pub home: &'a Path,
    /// The code interpreter's python, if any.
    pub interpreter: Option<&'a str>,
}

/// Prepares the box's files in the sandbox directory (socket directory and
/// link, passwd and group, the home owned by the box's uid) and returns
/// the command that runs the agent in it. The caller adds stdio and its
/// pre-exec steps and keeps [`Boxed::userns`] open until it spawned.
pub fn command(spec: &Spec) -> Result<Boxed, Error> {
    let bwrap = bwrap()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Boxed {
            cmd: command_with(bwrap, spec, None)?,
            userns: None,
        });
    }
    if !Path::new(SETPRIV).is_file() {
        return Err(Error::Io(
            format!("{SETPRIV} (util-linux) is needed to drop to the box's user"),
            enoent(),
        ));
    }
    let dir = spec.vsock.parent().unwrap_or(Path::new("/"));
    let uid = box_uid(dir);
    for (path, deep) in [(spec.home, true), (&dir.join("agent-run"), false)] {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Io(format!("create {}", path.display()), e))?;
        let owned = if deep {
            crate::jail::chown_tree(path, uid, uid)
                .map_err(|e| Error::Io(crate::error_chain(&e), std::io::Error::other("chown")))
        } else {
            std::os::unix::fs::lchown(path, Some(uid), Some(uid))
                .map_err(|e| Error::Io(format!("chown {}", path.display()), e))
        };
        owned?;
    }
    let userns = mapped_userns(uid)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&userns);
    let mut cmd = command_with(bwrap, spec, Some(fd))?;
    // SAFETY: fcntl on a descriptor this process owns (inherited by the
    // fork); async-signal-safe, touches no memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(Boxed {
        cmd,
        userns: Some(userns),
    })
}

/// The host uid of the box of the sandbox in `dir` (stable for the dir).
fn box_uid(dir: &Path) -> u32 {
    let h = dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    FAKE_UID_BASE + u32::try_from(h % u64::from(FAKE_UID_COUNT)).unwrap_or(0)
}

/// A new user namespace mapping 0 → 0 and 1000 → `uid` (uid and gid),
/// made by a short-lived `sleep` that unshares it; its descriptor keeps
/// it alive after that process is gone.
fn mapped_userns(uid: u32) -> Result<std::os::fd::OwnedFd, Error> {
    use std::os::unix::process::CommandExt;
    let mut holder = Command::new("sleep");
    holder
        .arg("60")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: unshare is async-signal-safe and touches no memory; it runs
    // in the forked child before exec.
    unsafe {
        holder.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = holder
        .spawn()
        .map_err(|e| Error::Io("making the box's user namespace".into(), e))?;
    let proc = PathBuf::from(format!("/proc/{}", child.id()));
    let map = format!("0 0 1\n1000 {uid} 1\n");
    let made = ["uid_map", "gid_map"]
        .iter()
        .try_for_each(|f| {
            // One write: the kernel takes a map in a single write only.
            std::fs::write(proc.join(f), &map)
                .map_err(|e| Error::Io(format!("write {}/{f}", proc.display()), e))
        })
        .and_then(|()| {
            std::fs::File::open(proc.join("ns/user"))
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| Error::Io(format!("open {}/ns/user", proc.display()), e))
        });
    let _ = child.kill();
    let _ = child.wait();
    made
}

fn command_with(bwrap: PathBuf, spec: &Spec, userns: Option<i32>) -> Result<Command, Error> {
    let dir = spec.vsock.parent().ok_or_else(|| {
        Error::Io(
            format!("{} has no directory", spec.vsock.display()),
            enoent(),
        )
    })?;
    let run = dir.join("agent-run");
    let etc = dir.join("agent-etc");
    for d in [&run, &etc] {
        std::fs::create_dir_all(d).map_err(|e| Error::Io(format!("create {}", d.display()), e))?;
    }
    write(&etc.join("passwd"), PASSWD)?;
    write(&etc.join("group"), GROUP)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755));
    }
    let _ = std::fs::remove_file(run.join("vsock"));
    let _ = std::fs::remove_file(spec.vsock);
    std::os::unix::fs::symlink("agent-run/vsock", spec.vsock)
        .map_err(|e| Error::Io(format!("link {}", spec.vsock.display()), e))?;

    let mut cmd = Command::new(bwrap);
    match userns {
        Some(fd) => {
            cmd.arg("--userns").arg(fd.to_string());
        }
        None => {
            cmd.args(["--unshare-user", "--uid", "1000", "--gid", "1000"]);
            cmd.args(["--cap-drop", "ALL"]);
        }
    }
    cmd.args([
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "sandbox",
    ]);
    // (option, source, destination) of every mount, made after the
    // directories above them exist with mode 0755: bwrap would make
    // missing parents 0700, owned by its root, closed to `user`.
    let mut mounts: Vec<(&str, PathBuf, PathBuf)> = Vec::new();
    let same = |p: &Path| (p.to_path_buf(), p.to_path_buf());
    let (src, dst) = same(Path::new("/usr"));
    mounts.push(("--ro-bind", src, dst));
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(top);
        match std::fs::read_link(&host) {
            Ok(target) => mounts.push(("--symlink", target, host)),
            Err(_) if host.is_dir() => mounts.push(("--ro-bind", host.clone(), host)),
            Err(_) => {}
        }
    }
    for f in ETC_FILES {
        let (src, dst) = same(Path::new(f));
        mounts.push(("--ro-bind-try", src, dst));
    }
    mounts.push(("--ro-bind", etc.join("passwd"), "/etc/passwd".into()));
    mounts.push(("--ro-bind", etc.join("group"), "/etc/group".into()));
    mounts.push(("--bind", spec.home.to_path_buf(), HOME.into()));
    mounts.push(("--bind", run.clone(), RUN_DIR.into()));
    let (src, dst) = same(spec.agent_exe);
    mounts.push(("--ro-bind", src, dst));
    if let Some(python) = spec.interpreter {
        for prefix in python_prefixes(Path::new(python)) {
            mounts.push(("--ro-bind", prefix.clone(), prefix));
        }
    }
    let mut parents: Vec<&Path> = mounts
        .iter()
        .flat_map(|(_, _, dst)| dst.ancestors().skip(1))
        .filter(|p| *p != Path::new("/"))
        .collect();
    parents.sort();
    parents.dedup();
    cmd.args(["--proc", "/proc", "--dev", "/dev"]);
    cmd.args(["--perms", "1777", "--tmpfs", "/tmp"]);
    for p in parents {
        cmd.args(["--perms", "0755", "--dir"]).arg(p);
    }
    for (opt, src, dst) in &mounts {
        cmd.arg(opt).arg(src).arg(dst);
    }
    cmd.arg("--setenv").arg(HOST_VSOCK_ENV).arg(spec.vsock);
    cmd.args(["--setenv", "HOME", HOME, "--setenv", "USER", "user"]);
    cmd.args(["--setenv", "LOGNAME", "user", "--chdir", HOME, "--"]);
    if userns.is_some() {
        // In the mapped namespace bwrap's child is its root: drop to user.
        cmd.args([
            SETPRIV,
            "--reuid",
            "1000",
            "--regid",
            "1000",
            "--clear-groups",
        ]);
        cmd.args(["--bounding-set", "-all", "--inh-caps", "-all", "--"]);
    }
    cmd.arg(spec.agent_exe)
        .arg("--uds")
        .arg(format!("{RUN_DIR}/vsock"))
        .arg("--root")
        .arg(HOME);
    if let Some(python) = spec.interpreter {
        cmd.arg("--interpreter").arg(python);
    }
    Ok(cmd)
}

/// The directories a Python interpreter outside `/usr` needs, read-only:
/// its virtualenv (bin/python's grandparent), the base installation the
/// virtualenv's `pyvenv.cfg` names (`home = <prefix>/bin`), and the prefix
/// of the executable its links lead to.
fn python_prefixes(python: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let grand = |p: &Path| p.parent().and_then(Path::parent).map(Path::to_path_buf);
    let venv = grand(python);
    if let Some(v) = &venv {
        out.push(v.clone());
        if let Ok(cfg) = std::fs::read_to_string(v.join("pyvenv.cfg")) {
            let home = cfg.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "home").then(|| PathBuf::from(v.trim()))
            });
            if let Some(prefix) = home.as_deref().and_then(Path::parent) {
                out.push(prefix.to_path_buf());
            }
        }
    }
    if let Some(prefix) = std::fs::canonicalize(python)
        .ok()
        .as_deref()
        .and_then(grand)
    {
        out.push(prefix);
    }
    out.retain(|p| p.is_absolute() && p.is_dir() && !p.starts_with("/usr") && p != Path::new("/"));
    out.sort();
    out.dedup();
    out
}

/// Writes a file the box reads (mode 0644 whatever the umask).
fn write(path: &Path, text: &str) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
        .map_err(|e| Error::Io(format!("write {}", path.display()), e))
}

fn enoent() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENOENT)
}

/// Whether a process's arguments (`/proc/PID/cmdline` split at NULs) are
/// those of the box serving `vsock`.
pub fn is_box_for(args: &[&[u8]], vsock: &Path) -> bool {
    let want = vsock.as_os_str().as_encoded_bytes();
    args.windows(3).any(|w| {
        w[0] == b"--setenv".as_slice() && w[1] == HOST_VSOCK_ENV.as_bytes() && w[2] == want
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_its_sandbox_and_binds_only_what_it_needs() {
        let tmp = tempfile::tempdir().unwrap();
        let vsock = tmp.path().join("vsock");
        let home = tmp.path().join("root");
        std::fs::create_dir_all(&home).unwrap();
        let cmd = command_with(
            PathBuf::from("/usr/bin/bwrap"),
            &Spec {
                agent_exe: Path::new("/opt/stasis-envd"),
                vsock: &vsock,
                home: &home,
                interpreter: None,
            },
            Some(7),
        )
        .unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        assert!(is_box_for(&bytes, &vsock));
        assert!(!is_box_for(&bytes, &tmp.path().join("other")));
        // No bind of the host's root, /etc wholesale, or the data dir.
        for w in args.windows(3) {
            if w[0].ends_with("bind") || w[0].ends_with("bind-try") {
                assert_ne!(w[1], "/", "{args:?}");
                assert_ne!(w[1], "/etc", "{args:?}");
                assert_ne!(w[1], tmp.path().to_string_lossy(), "{args:?}");
            }
        }
        assert_eq!(
            std::fs::read_link(&vsock).unwrap(),
            Path::new("agent-run/vsock")
        );
        assert!(std::fs::read_to_string(tmp.path().join("agent-etc/passwd"))
            .unwrap()
            .contains("user:x:1000:1000"));
    }
}
