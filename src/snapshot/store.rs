//! Reusable snapshots: `<data>/snapshots/<id>/`, each a committed snapshot
//! directory plus its [`Manifest`](super::manifest::Manifest).
//!
//! A snapshot in the store is immutable: nothing a resume does writes to
//! it. Memory is read from `memory.bin` read-only (concurrent resumes share
//! its page cache); the disk layer is forked into each resumed VM's own
//! overlay ([`crate::vmm::virtio::cow::CowDisk::fork`]). So any number of
//! VMs resume from one snapshot, at once.
//!
//! Deletion rule: a snapshot that another snapshot names as its `parent`
//! is refused ([`Error::InUse`]: the API answers 409). A snapshot that
//! running VMs were resumed from can be deleted: a lazy resume holds its
//! memory file open (an unlinked file lives on until closed) and a forked
//! disk holds its own link or copy of the layer, so the VMs keep working;
//! a resume that starts after the delete fails cleanly ("not found").
//! Deletion first renames the directory away (atomically: no half-deleted
//! snapshot is ever visible under its id), then removes it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::manifest::{self, FileRef, HostFingerprint, Layer, Manifest, SnapshotKind};

/// Errors of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No snapshot with this id.
    #[error("snapshot {0} not found")]
    NotFound(String),
    /// The id is not a valid snapshot id.
    #[error("invalid snapshot id {0:?}")]
    InvalidId(String),
    /// Another snapshot needs it.
    #[error("snapshot {id} is in use: {by}")]
    InUse {
        /// The snapshot.
        id: String,
        /// What uses it.
        by: String,
    },
    /// The manifest is damaged.
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    /// A file the manifest names is missing or has the wrong length.
    #[error("snapshot {id}: layer file {file}: {why}")]
    BadFile {
        /// The snapshot.
        id: String,
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// The directory to import is not a snapshot.
    #[error("{0}: not a snapshot directory (no state.bin or fake-vm.json)")]
    NotASnapshot(PathBuf),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The fake backend's state file (its "memory").
pub const FAKE_STATE_FILE: &str = "fake-vm.json";

/// What [`SnapshotStore::import`] records besides the files.
#[derive(Debug, Clone)]
pub struct ImportOpts {
    /// What the snapshot is for.
    pub kind: SnapshotKind,
    /// The sandbox it was taken from.
    pub source_sandbox: Option<String>,
    /// Labels stored in the manifest.
    pub labels: BTreeMap<String, String>,
}

/// The store under one directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
}

/// A snapshot of the store, checked.
#[derive(Debug, Clone)]
pub struct StoredSnapshot {
    /// Its directory (what a restore is given).
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl SnapshotStore {
    /// The store at `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<SnapshotStore> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("creating", &root))?;
        Ok(SnapshotStore { root })
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A new snapshot id: the creation time in milliseconds (12 hex
    /// digits, so ids sort in creation order) and 32 random bits.
    pub fn new_id() -> String {
        use rand::Rng;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let n: u32 = rand::rng().random();
        format!("snap-{ms:012x}{n:08x}")
    }

    /// Where snapshot `id` lives (whether or not it exists).
    pub fn path(&self, id: &str) -> Result<PathBuf> {
        if !manifest::valid_id(id) {
            return Err(Error::InvalidId(id.to_owned()));
        }
        Ok(self.root.join(id))
    }

    /// Makes the committed snapshot directory `src` (written by a pause:
    /// `state.bin` + `memory.bin` [+ `disk.overlay` and its map], or the
    /// fake backend's `fake-vm.json` [+ its files]) the store's snapshot
    /// `id`: writes its manifest into it and renames it into place
    /// (`src` must be on the store's filesystem). On error `src` is left
    /// where it was.
    pub fn import(&self, src: &Path, id: &str, opts: ImportOpts) -> Result<StoredSnapshot> {
        let dst = self.path(id)?;
        let state_name = if src.join(super::STATE_FILE).is_file() {
            super::STATE_FILE
        } else if src.join(FAKE_STATE_FILE).is_file() {
            FAKE_STATE_FILE
        } else {
            return Err(Error::NotASnapshot(src.to_owned()));
        };
        let mem_name = if state_name == super::STATE_FILE {
            super::MEMORY_FILE
        } else {
            FAKE_STATE_FILE
        };
        let mut files = Vec::new();
        for e in fs::read_dir(src).map_err(io("listing", src))? {
            let e = e.map_err(io("listing", src))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == manifest::MANIFEST_FILE {
                continue;
            }
            let md = e.metadata().map_err(io("stat", &e.path()))?;
            if md.is_file() {
                files.push(FileRef {
                    name,
                    len: md.len(),
                    allocated: md.blocks() * 512,
                });
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let find = |n: &str| files.iter().find(|f| f.name == n).cloned();
        let state = find(state_name).ok_or_else(|| Error::NotASnapshot(src.to_owned()))?;
        let mem = find(mem_name).ok_or_else(|| Error::NotASnapshot(src.to_owned()))?;
        let disk_layer = find(crate::vmm::virtio::SNAPSHOT_OVERLAY).map(|f| f.name);
        let m = Manifest {
            id: id.to_owned(),
            kind: opts.kind,
            parent: None,
            source_sandbox: opts.source_sandbox,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            state,
            layers: vec![Layer {
                file: mem.name.clone(),
                parent: None,
                bytes_stored: mem.allocated,
                chunks: vec![],
            }],
            files,
            disk_layer,
            fingerprint: HostFingerprint::current(),
            chunk_size: 0,
            labels: opts.labels,
        };
        m.write_to(src)?;
        if let Ok(d) = fs::File::open(src) {
            let _ = d.sync_all();
        }
        if dst.symlink_metadata().is_ok() {
            let _ = fs::remove_file(src.join(manifest::MANIFEST_FILE));
            return Err(Error::InUse {
                id: id.to_owned(),
                by: "an existing snapshot with this id".into(),
            });
        }
        fs::rename(src, &dst).map_err(io("moving snapshot into", &dst))?;
        if let Ok(d) = fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        Ok(StoredSnapshot {
            dir: dst,
            manifest: m,
        })
    }

    /// Opens snapshot `id`: its manifest must be valid and every file it
    /// names present with its recorded length (a missing or truncated
    /// layer is an error naming it; page checksums are checked as pages are
    /// read).
    pub fn get(&self, id: &str) -> Result<StoredSnapshot> {
        let dir = self.path(id)?;
        if !dir.is_dir() {
            return Err(Error::NotFound(id.to_owned()));
        }
        let m = Manifest::read_from(&dir)?;
        if m.id != id {
            return Err(Error::BadFile {
                id: id.to_owned(),
                file: manifest::MANIFEST_FILE.into(),
                why: format!("names snapshot {}", m.id),
            });
        }
        for f in m.files.iter().chain([&m.state]) {
            let p = dir.join(&f.name);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.is_file() && md.len() == f.len => {}
                Ok(md) if md.is_file() => {
                    return Err(Error::BadFile {
                        id: id.to_owned(),
                        file: f.name.clone(),
                        why: format!("{} bytes, the manifest says {}", md.len(), f.len),
                    })
                }
                Ok(_) => {
                    return Err(Error::BadFile {
                        id: id.to_owned(),
                        file: f.name.clone(),
                        why: "not a regular file".into(),
                    })
                }
                Err(e) => {
                    return Err(Error::BadFile {
                        id: id.to_owned(),
                        file: f.name.clone(),
                        why: e.to_string(),
                    })
                }
            }
        }
        Ok(StoredSnapshot { dir, manifest: m })
    }

    /// Every valid snapshot, oldest first (damaged ones are logged and
    /// skipped; [`SnapshotStore::get`] names what is wrong).
    pub fn list(&self) -> Vec<Manifest> {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut out: Vec<Manifest> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if !manifest::valid_id(&name) {
                    return None;
                }
                match self.get(&name) {
                    Ok(s) => Some(s.manifest),
                    Err(err) => {
                        tracing::warn!(snapshot = %name, error = %crate::error_chain(&err),
                            "skipping damaged snapshot");
                        None
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        out
    }

    /// Deletes snapshot `id` under the rule of the module doc.
    pub fn delete(&self, id: &str) -> Result<()> {
        let dir = self.path(id)?;
        if !dir.is_dir() {
            return Err(Error::NotFound(id.to_owned()));
        }
        let children: Vec<String> = self
            .list()
            .into_iter()
            .filter(|m| m.parent.as_deref() == Some(id))
            .map(|m| m.id)
            .collect();
        if !children.is_empty() {
            return Err(Error::InUse {
                id: id.to_owned(),
                by: format!("parent of snapshot(s) {}", children.join(", ")),
            });
        }
        let gone = self.root.join(format!(
            ".deleting-{id}-{}-{}",
            std::process::id(),
            Self::new_id()
        ));
        fs::rename(&dir, &gone).map_err(io("renaming away", &dir))?;
        fs::remove_dir_all(&gone).map_err(io("removing", &gone))?;
        Ok(())
    }
}

/// Copies the files of a committed snapshot directory `src` (a sandbox's
/// current pause, which the sandbox will resume from in place) into a new
/// directory `dst` for [`SnapshotStore::import`], so that nothing the
/// sandbox does later reaches the copy: the files a resume only reads
/// (`state.bin`, `memory.bin`) are reflinked or hard-linked (free), the
/// disk layer the sandbox will write in place is copied extent by extent
/// (sparse: only written blocks cost), everything else is copied. With
/// `tree`, that directory (the fake backend's agent root) is copied
/// recursively to `dst/root`.
pub fn copy_snapshot_files(src: &Path, dst: &Path, tree: Option<&Path>) -> Result<()> {
    fs::create_dir(dst).map_err(io("creating", dst))?;
    for e in fs::read_dir(src).map_err(io("listing", src))? {
        let e = e.map_err(io("listing", src))?;
        let from = e.path();
        let to = dst.join(e.file_name());
        if !e.file_type().map_err(io("stat", &from))?.is_file() {
            continue;
        }
        let name = e.file_name();
        let read_only = name == super::STATE_FILE || name == super::MEMORY_FILE;
        if read_only && fs::hard_link(&from, &to).is_ok() {
            continue;
        }
        sparse_copy(&from, &to)?;
    }
    if let Some(t) = tree {
        if t.is_dir() {
            copy_tree(t, &dst.join("root"))?;
        }
    }
    Ok(())
}

/// Copies `from` to the new file `to`, keeping holes (SEEK_DATA/SEEK_HOLE
/// and `copy_file_range`).
pub fn sparse_copy(from: &Path, to: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let src = fs::File::open(from).map_err(io("opening", from))?;
    let out = fs::File::options()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(io("creating", to))?;
    let len = src.metadata().map_err(io("stat", from))?.len();
    out.set_len(len).map_err(io("sizing", to))?;
    let mut off: i64 = 0;
    while (off as u64) < len {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(src.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past `off`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let (mut a, mut b) = (data, data);
        while a < end {
            // SAFETY: both descriptors are open files we own; the offsets
            // point to our own locals, valid for the call.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut a,
                    out.as_raw_fd(),
                    &mut b,
                    (end - a) as usize,
                    0,
                )
            };
            if n <= 0 {
                let err = if n < 0 {
                    std::io::Error::last_os_error()
                } else {
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
                };
                return Err(Error::Io {
                    op: "copying into",
                    path: to.to_owned(),
                    source: err,
                });
            }
        }
        off = end;
    }
    out.sync_all().map_err(io("fsyncing", to))?;
    Ok(())
}

/// Copies the directory tree `from` to `to` (directories, regular files,
/// symbolic links as links).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).map_err(io("creating", to))?;
    for e in fs::read_dir(from).map_err(io("listing", from))? {
        let e = e.map_err(io("listing", from))?;
        let (f, t) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().map_err(io("stat", &f))?;
        if ft.is_dir() {
            copy_tree(&f, &t)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&f).map_err(io("reading link", &f))?;
            std::os::unix::fs::symlink(target, &t).map_err(io("creating link", &t))?;
        } else if ft.is_file() {
            fs::copy(&f, &t).map_err(io("copying to", &t))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_snapshot(dir: &Path) {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join(FAKE_STATE_FILE), br#"{"round":1}"#).unwrap();
    }

    #[test]
    fn import_get_list_delete() {
        let t = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(t.path().join("snapshots")).unwrap();
        let src = t.path().join("tmp1");
        fake_snapshot(&src);
        let opts = ImportOpts {
            kind: SnapshotKind::User,
            source_sandbox: Some("sbx1".into()),
            labels: Default::default(),
        };
        let s = store.import(&src, "snap-a", opts.clone()).unwrap();
        assert!(!src.exists());
        assert_eq!(s.manifest.layers[0].file, FAKE_STATE_FILE);
        let g = store.get("snap-a").unwrap();
        assert_eq!(g.manifest, s.manifest);
        assert_eq!(store.list().len(), 1);

        // Same id again: refused, the source stays.
        fake_snapshot(&src);
        assert!(matches!(
            store.import(&src, "snap-a", opts.clone()),
            Err(Error::InUse { .. })
        ));
        assert!(src.join(FAKE_STATE_FILE).exists());

        // A truncated layer is an error naming it.
        fs::write(g.dir.join(FAKE_STATE_FILE), b"{").unwrap();
        let e = store.get("snap-a").unwrap_err().to_string();
        assert!(
            e.contains("layer file fake-vm.json") && e.contains("manifest says"),
            "{e}"
        );
        assert!(store.list().is_empty());

        // Ids are checked before any path is built.
        assert!(matches!(store.get("../x"), Err(Error::InvalidId(_))));
        assert!(matches!(store.delete("nope"), Err(Error::NotFound(_))));

        store.delete("snap-a").unwrap();
        assert!(matches!(store.get("snap-a"), Err(Error::NotFound(_))));
        assert_eq!(fs::read_dir(store.root()).unwrap().count(), 0);
    }

    #[test]
    fn a_parent_is_not_deleted_under_its_child() {
        let t = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(t.path().join("snapshots")).unwrap();
        let opts = ImportOpts {
            kind: SnapshotKind::User,
            source_sandbox: None,
            labels: Default::default(),
        };
        for id in ["p", "c"] {
            let src = t.path().join(format!("tmp-{id}"));
            fake_snapshot(&src);
            store.import(&src, id, opts.clone()).unwrap();
        }
        // Make c a child of p (as an incremental pause will).
        let dir = store.path("c").unwrap();
        let mut m = Manifest::read_from(&dir).unwrap();
        m.parent = Some("p".into());
        m.write_to(&dir).unwrap();
        let e = store.delete("p").unwrap_err();
        assert!(matches!(e, Error::InUse { .. }), "{e}");
        assert!(e.to_string().contains("parent of snapshot(s) c"), "{e}");
        store.delete("c").unwrap();
        store.delete("p").unwrap();
    }
}
