//! The `filesystem.Filesystem` service: entry information (Stat, ListDir
//! with depth), MakeDir, Move, Remove, and directory watches over inotify
//! (the WatchDir stream, and the CreateWatcher / GetWatcherEvents /
//! RemoveWatcher polling API the sync SDK uses), recursive on request.

use crate::envd::connect::{Code, RpcError};
use crate::envd::fdio::FdIo;
use crate::envd::proto::filesystem::{EntryInfo, EventType, FileType, FilesystemEvent};
use crate::envd::users::{self, User};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Events a polling watcher keeps before dropping the oldest.
const MAX_PENDING_EVENTS: usize = 65536;

/// Errors of watches (turned into [`RpcError`]s).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// inotify failed.
    #[error("inotify {what} {path}: {source}")]
    Inotify {
        /// The call.
        what: &'static str,
        /// The path it was about.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
}

impl From<Error> for RpcError {
    fn from(e: Error) -> RpcError {
        let code = match &e {
            Error::Inotify { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Code::ResourceExhausted
            }
            Error::Inotify { .. } => Code::Internal,
        };
        RpcError::new(code, e.to_string())
    }
}

fn not_found(path: &Path) -> RpcError {
    RpcError::new(
        Code::NotFound,
        format!("path '{}' does not exist", path.display()),
    )
}

fn io_err(path: &Path, e: &std::io::Error) -> RpcError {
    if e.kind() == std::io::ErrorKind::NotFound {
        return not_found(path);
    }
    RpcError::io(format!("'{}'", path.display()), e)
}

/// The mode string Go's `FileMode.String()` gives for a Unix `st_mode`
/// (what envd reports as `permissions`): one letter per type/special bit
/// that is set, in Go's order (`d` directory, `L` symlink, `D` device, `p`
/// pipe, `S` socket, `u` setuid, `g` setgid, `c` char device, `t` sticky),
/// `-` if none, then `rwxrwxrwx`.
pub fn go_mode_string(st_mode: u32) -> String {
    let fmt = st_mode & libc::S_IFMT;
    let mut s = String::with_capacity(12);
    if fmt == libc::S_IFDIR {
        s.push('d');
    }
    if fmt == libc::S_IFLNK {
        s.push('L');
    }
    if fmt == libc::S_IFBLK || fmt == libc::S_IFCHR {
        s.push('D');
    }
    if fmt == libc::S_IFIFO {
        s.push('p');
    }
    if fmt == libc::S_IFSOCK {
        s.push('S');
    }
    if st_mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if st_mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if fmt == libc::S_IFCHR {
        s.push('c');
    }
    if st_mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, c) in RWX.iter().enumerate() {
        s.push(if st_mode & (1 << (8 - i)) != 0 {
            *c as char
        } else {
            '-'
        });
    }
    s
}

/// Information about the entry at `path`, as E2B's envd reports it: not
/// following a final symlink, except that a symlink's `type` and `mode`
/// are its target's (mode 0 and type unspecified when the target is
/// missing) and `symlink_target` is its full resolution (the link's own
/// path when it cannot be resolved). `mode` holds only the permission bits
/// (`0o755`, never Go's type bits); `permissions` is Go's mode string of
/// the entry itself (`drwxr-xr-x`, `Lrwxrwxrwx`, `-rw-r--r--`).
pub fn entry_info(path: &Path) -> Result<EntryInfo, RpcError> {
    let lmeta = std::fs::symlink_metadata(path).map_err(|e| io_err(path, &e))?;
    let is_link = lmeta.file_type().is_symlink();
    let (ty_meta, symlink_target) = if is_link {
        let target = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .to_string_lossy()
            .into_owned();
        (std::fs::metadata(path).ok(), Some(target))
    } else {
        (Some(lmeta.clone()), None)
    };
    let ty = match &ty_meta {
        Some(m) if m.is_dir() => FileType::Directory,
        Some(m) if m.is_file() => FileType::File,
        _ => FileType::Unspecified,
    };
    let mode = ty_meta.as_ref().map(|m| m.mode() & 0o777).unwrap_or(0);
    let (owner, group) = users::owner_names(lmeta.uid(), lmeta.gid());
    let modified_time =
        (lmeta.mtime() != 0 || lmeta.mtime_nsec() != 0).then(|| pbjson_types::Timestamp {
            seconds: lmeta.mtime(),
            nanos: lmeta.mtime_nsec() as i32,
        });
    Ok(EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        r#type: ty as i32,
        path: path.to_string_lossy().into_owned(),
        size: lmeta.len() as i64,
        mode,
        permissions: go_mode_string(lmeta.mode()),
        owner,
        group,
        modified_time,
        symlink_target,
    })
}

/// Entries under `dir` down to `depth` levels (1: just its children), in
/// the order of a lexical depth-first walk. Symlinked directories are
/// listed, not entered.
pub fn list_dir(dir: &Path, depth: u32) -> Result<Vec<EntryInfo>, RpcError> {
    let meta = std::fs::metadata(dir).map_err(|e| io_err(dir, &e))?;
    if !meta.is_dir() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("path '{}' is not a directory", dir.display()),
        ));
    }
    let mut out = Vec::new();
    walk(dir, depth.max(1), &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, depth: u32, out: &mut Vec<EntryInfo>) -> Result<(), RpcError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, &e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for p in names {
        // An entry removed while we walk is skipped, not an error.
        let Ok(info) = entry_info(&p) else { continue };
        let is_real_dir = std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        out.push(info);
        if depth > 1 && is_real_dir {
            // Unreadable subdirectories are listed but not entered.
            let _ = walk(&p, depth - 1, out);
        }
    }
    Ok(())
}

/// Creates `dir` and missing ancestors, owned by `user`.
pub fn create_dirs(dir: &Path, user: &User) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(c) = cur {
        if c.exists() {
            break;
        }
        missing.push(c.to_path_buf());
        cur = c.parent();
    }
    std::fs::create_dir_all(dir)?;
    for d in missing {
        users::chown_to(&d, user)?;
    }
    Ok(())
}

/// MakeDir: `AlreadyExists` if it is a directory already.
pub fn make_dir(path: &Path, user: &User) -> Result<EntryInfo, RpcError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(RpcError::new(
                Code::AlreadyExists,
                format!("directory '{}' already exists", path.display()),
            ))
        }
        Ok(_) => {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!("path '{}' exists and is not a directory", path.display()),
            ))
        }
        Err(_) => {}
    }
    create_dirs(path, user).map_err(|e| io_err(path, &e))?;
    entry_info(path)
}

/// Move: renames `src` to `dst`, creating `dst`'s parent directories.
pub fn move_entry(src: &Path, dst: &Path, user: &User) -> Result<EntryInfo, RpcError> {
    std::fs::symlink_metadata(src).map_err(|e| io_err(src, &e))?;
    if let Some(parent) = dst.parent() {
        create_dirs(parent, user).map_err(|e| io_err(parent, &e))?;
    }
    std::fs::rename(src, dst).map_err(|e| {
        RpcError::io(
            format!("moving '{}' to '{}'", src.display(), dst.display()),
            &e,
        )
    })?;
    entry_info(dst)
}

/// Remove: a file, a symlink, or a directory with its contents. A path
/// that does not exist is removed already: success, as E2B's envd
/// (`os.RemoveAll`) answers.
pub fn remove(path: &Path) -> Result<(), RpcError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, &e)),
    };
    let r = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(|e| io_err(path, &e)),
    }
}

/// One raw inotify event: (watch descriptor, mask, name).
pub type RawEvent = (i32, u32, String);

/// Splits a buffer read from inotify into events; a truncated tail is
/// ignored.
pub fn parse_inotify(buf: &[u8]) -> Vec<RawEvent> {
    const HDR: usize = 16;
    let mut out = Vec::new();
    let mut off = 0;
    while let Some(h) = buf.get(off..off + HDR) {
        let wd = i32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
        let mask = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
        let len = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]) as usize;
        let Some(name) = buf.get(off + HDR..off + HDR + len) else {
            break;
        };
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        out.push((wd, mask, String::from_utf8_lossy(&name[..end]).into_owned()));
        off += HDR + len;
    }
    out
}

/// The SDK's event type for an inotify mask.
pub fn event_type(mask: u32) -> Option<EventType> {
    if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
        Some(EventType::Create)
    } else if mask & libc::IN_MODIFY != 0 {
        Some(EventType::Write)
    } else if mask & libc::IN_DELETE != 0 {
        Some(EventType::Remove)
    } else if mask & libc::IN_MOVED_FROM != 0 {
        Some(EventType::Rename)
    } else if mask & libc::IN_ATTRIB != 0 {
        Some(EventType::Chmod)
    } else {
        None
    }
}

const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB;

/// An inotify watch of a directory (and, if recursive, its subdirectories,
/// including ones created later). Event names are relative to the root.
pub struct Watch {
    fd: FdIo,
    root: PathBuf,
    recursive: bool,
    dirs: HashMap<i32, PathBuf>,
}

impl Watch {
    /// Watches `root`, which must be a directory.
    pub fn new(root: &Path, recursive: bool) -> Result<Watch, RpcError> {
        let meta = std::fs::metadata(root).map_err(|e| io_err(root, &e))?;
        if !meta.is_dir() {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!("path '{}' is not a directory", root.display()),
            ));
        }
        // SAFETY: inotify_init1 takes flags only.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(Error::Inotify {
                what: "init",
                path: root.display().to_string(),
                source: std::io::Error::last_os_error(),
            }
            .into());
        }
        // SAFETY: inotify_init1 returned a new descriptor that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let fd = FdIo::new(fd).map_err(|source| Error::Inotify {
            what: "register",
            path: root.display().to_string(),
            source,
        })?;
        let mut w = Watch {
            fd,
            root: root.to_path_buf(),
            recursive,
            dirs: HashMap::new(),
        };
        w.add(PathBuf::new())?;
        Ok(w)
    }

    /// Watches root/`rel` (and, when recursive, the directories below).
    fn add(&mut self, rel: PathBuf) -> Result<(), Error> {
        let abs = self.root.join(&rel);
        let c = CString::new(abs.as_os_str().as_bytes()).map_err(|_| Error::Inotify {
            what: "add_watch",
            path: abs.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: a valid C string and our inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(self.fd.raw(), c.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            return Err(Error::Inotify {
                what: "add_watch",
                path: abs.display().to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        self.dirs.insert(wd, rel.clone());
        if self.recursive {
            let Ok(rd) = std::fs::read_dir(&abs) else {
                return Ok(());
            };
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    // A subdirectory that vanished meanwhile is fine.
                    let _ = self.add(rel.join(e.file_name()));
                }
            }
        }
        Ok(())
    }

    /// Waits for the next events.
    pub async fn next(&mut self) -> std::io::Result<Vec<FilesystemEvent>> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.fd.read(&mut buf).await?;
        let mut out = Vec::new();
        for (wd, mask, name) in parse_inotify(&buf[..n]) {
            if mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&wd);
                continue;
            }
            let Some(dir) = self.dirs.get(&wd).cloned() else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let rel = dir.join(&name);
            if self.recursive
                && mask & libc::IN_ISDIR != 0
                && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
            {
                let _ = self.add(rel.clone());
            }
            if let Some(t) = event_type(mask) {
                out.push(FilesystemEvent {
                    name: rel.to_string_lossy().into_owned(),
                    r#type: t as i32,
                });
            }
        }
        Ok(out)
    }
}

struct Polled {
    events: Arc<Mutex<Vec<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Watchers of the polling API, by id.
#[derive(Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, Polled>>,
    next: std::sync::atomic::AtomicU64,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Polled>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts collecting events of `root`; returns the watcher id.
    pub fn create(&self, root: &Path, recursive: bool) -> Result<String, RpcError> {
        let mut watch = Watch::new(root, recursive)?;
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("w{n}-{}", rand::random::<u32>());
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let task = tokio::spawn(async move {
            while let Ok(batch) = watch.next().await {
                let mut q = ev.lock().unwrap_or_else(|p| p.into_inner());
                q.extend(batch);
                if q.len() > MAX_PENDING_EVENTS {
                    let excess = q.len() - MAX_PENDING_EVENTS;
                    q.drain(..excess);
                }
            }
        });
        self.lock().insert(id.clone(), Polled { events, task });
        Ok(id)
    }

    /// The events since the last call.
    pub fn take(&self, id: &str) -> Result<Vec<FilesystemEvent>, RpcError> {
        let map = self.lock();
        let w = map
            .get(id)
            .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher '{id}' not found")))?;
        let mut q = w.events.lock().unwrap_or_else(|p| p.into_inner());
        Ok(std::mem::take(&mut *q))
    }

    /// Stops a watcher.
    pub fn remove(&self, id: &str) -> Result<(), RpcError> {
        let w = self
            .lock()
            .remove(id)
            .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher '{id}' not found")))?;
        w.task.abort();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> User {
        users::current()
    }

    #[test]
    fn entries_lists_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        make_dir(&root.join("a/b"), &me()).unwrap();
        assert_eq!(
            make_dir(&root.join("a"), &me()).unwrap_err().code,
            Code::AlreadyExists
        );
        std::fs::write(root.join("a/f.txt"), b"hello").unwrap();
        std::fs::write(root.join("a/b/g"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("link")).unwrap();
        assert_eq!(
            make_dir(&root.join("a/f.txt"), &me()).unwrap_err().code,
            Code::InvalidArgument
        );

        let f = entry_info(&root.join("a/f.txt")).unwrap();
        assert_eq!(
            (f.name.as_str(), f.size, f.r#type),
            ("f.txt", 5, FileType::File as i32)
        );
        assert_eq!(f.symlink_target, None);
        let l = entry_info(&root.join("link")).unwrap();
        assert_eq!(l.r#type, FileType::Directory as i32);
        assert!(l.permissions.starts_with('L'));
        assert_eq!(
            l.symlink_target.as_deref(),
            Some(
                std::fs::canonicalize(root.join("a"))
                    .unwrap()
                    .to_str()
                    .unwrap()
            )
        );

        let names = |v: Vec<EntryInfo>| -> Vec<String> {
            v.into_iter()
                .map(|e| {
                    e.path
                        .trim_start_matches(root.to_str().unwrap())
                        .to_string()
                })
                .collect()
        };
        assert_eq!(names(list_dir(root, 1).unwrap()), ["/a", "/link"]);
        assert_eq!(
            names(list_dir(root, 3).unwrap()),
            ["/a", "/a/b", "/a/b/g", "/a/f.txt", "/link"]
        );
        assert_eq!(
            list_dir(&root.join("nope"), 1).unwrap_err().code,
            Code::NotFound
        );
        assert_eq!(
            list_dir(&root.join("a/f.txt"), 1).unwrap_err().code,
            Code::InvalidArgument
        );

        let moved = move_entry(&root.join("a/f.txt"), &root.join("new/dir/f2"), &me()).unwrap();
        assert_eq!(moved.name, "f2");
        assert_eq!(
            move_entry(&root.join("a/f.txt"), &root.join("x"), &me())
                .unwrap_err()
                .code,
            Code::NotFound
        );
        remove(&root.join("a")).unwrap();
        remove(&root.join("link")).unwrap();
        // Removing what is not there succeeds (E2B's remove-all semantics).
        remove(&root.join("a")).unwrap();
        remove(&root.join("no/such/dir")).unwrap();
        assert_eq!(
            entry_info(&root.join("a")).unwrap_err().code,
            Code::NotFound
        );
    }

    #[test]
    fn permissions_read_like_go() {
        assert_eq!(go_mode_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(go_mode_string(libc::S_IFREG | 0o640), "-rw-r-----");
        assert_eq!(go_mode_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(go_mode_string(libc::S_IFDIR | 0o1777), "dtrwxrwxrwx");
        assert_eq!(go_mode_string(libc::S_IFREG | 0o4755), "urwxr-xr-x");
        assert_eq!(go_mode_string(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
        assert_eq!(go_mode_string(libc::S_IFIFO | 0o600), "prw-------");
    }

    #[test]
    fn modes_are_permission_bits_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::set_permissions(root.join("d"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("f"), b"x").unwrap();
        std::fs::set_permissions(root.join("f"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink(root.join("f"), root.join("lf")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("broken")).unwrap();
        let dir = entry_info(&root.join("d")).unwrap();
        assert_eq!((dir.mode, dir.permissions.as_str()), (0o755, "drwxr-xr-x"));
        let f = entry_info(&root.join("f")).unwrap();
        assert_eq!((f.mode, f.permissions.as_str()), (0o640, "-rw-r-----"));
        assert!(f.modified_time.is_some());
        // A symlink: its target's type and mode, its own mode string.
        let lf = entry_info(&root.join("lf")).unwrap();
        assert_eq!(
            (lf.mode, lf.r#type, lf.permissions.as_str()),
            (0o640, FileType::File as i32, "Lrwxrwxrwx")
        );
        // A dangling one: unspecified type, mode 0, target = its own path.
        let b = entry_info(&root.join("broken")).unwrap();
        assert_eq!((b.mode, b.r#type), (0, FileType::Unspecified as i32));
        assert_eq!(
            b.symlink_target.as_deref(),
            Some(root.join("broken").to_str().unwrap())
        );
    }

    #[test]
    fn inotify_buffers_parse() {
        let mut b = Vec::new();
        for (wd, mask, name) in [
            (1i32, libc::IN_CREATE, &b"a.txt\0\0\0"[..]),
            (2, libc::IN_IGNORED, &b""[..]),
        ] {
            b.extend_from_slice(&wd.to_ne_bytes());
            b.extend_from_slice(&mask.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&(name.len() as u32).to_ne_bytes());
            b.extend_from_slice(name);
        }
        let ev = parse_inotify(&b);
        assert_eq!(
            ev,
            vec![
                (1, libc::IN_CREATE, "a.txt".into()),
                (2, libc::IN_IGNORED, String::new())
            ]
        );
        // Truncated input yields what is whole, never a panic.
        assert_eq!(parse_inotify(&b[..20]), vec![]);
        assert_eq!(event_type(libc::IN_MOVED_TO), Some(EventType::Create));
        assert_eq!(event_type(libc::IN_MODIFY), Some(EventType::Write));
    }

    #[tokio::test]
    async fn recursive_watch_sees_new_subdirectories() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Watch::new(d.path(), true).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let mut seen = Vec::new();
        while !seen.iter().any(|e: &FilesystemEvent| e.name == "sub") {
            seen.extend(w.next().await.unwrap());
        }
        std::fs::write(d.path().join("sub/f"), b"1").unwrap();
        while !seen.iter().any(|e: &FilesystemEvent| e.name == "sub/f") {
            seen.extend(w.next().await.unwrap());
        }
        assert_eq!(
            seen.iter().find(|e| e.name == "sub/f").unwrap().r#type,
            EventType::Create as i32
        );
    }
}
