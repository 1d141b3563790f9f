//! Snapshot storage: the on-disk layout of a paused VM and the machinery to
//! write it and bring it back.
//!
//! A snapshot is a directory holding two files:
//!
//! - `state.bin` — the VMM's state in the checksummed container of
//!   [`format`];
//! - `memory.bin` — the guest memory image, a sparse file written and read
//!   by [`memfile`] (eagerly) or [`uffd`] (lazily, with userfaultfd).
//!
//! This module owns the directory: [`TmpDir`] builds a snapshot next to its
//! final path and [`TmpDir::commit`] makes it appear atomically and durably;
//! [`SnapshotDir::open`] checks that a directory is a snapshot.
//!
//! Reusable snapshots (any number of resumes, concurrently) live in a
//! [`store::SnapshotStore`], each with a [`manifest::Manifest`].
//!
//! A **child layer** (an incremental pause, [`layers`]) adds `layers.bin`,
//! naming its parent layers; its `memory.bin` holds only the pages the
//! guest wrote since it was resumed ([`dirty`] tracks them).

pub mod bitmap;
pub mod crc32c;
pub mod dirty;
pub mod format;
pub mod layers;
pub mod manifest;
pub mod memfile;
pub mod remote;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod uffd;
pub mod uffd_sys;

pub use bitmap::PageBitmap;

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// Name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors from creating, committing or opening a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory is missing a file or its state does not decode.
    #[error("{path}: not a stasis snapshot: {reason}")]
    NotASnapshot {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The destination of a new snapshot already exists.
    #[error("snapshot destination {0} already exists")]
    AlreadyExists(PathBuf),
    /// The destination has no parent directory or no file name.
    #[error("invalid snapshot destination {0}")]
    InvalidPath(PathBuf),
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done ("creating", "fsyncing", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Encoding or writing the state file failed.
    #[error("writing snapshot state")]
    State(#[from] format::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A committed snapshot directory that contains both files.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    path: PathBuf,
}

impl SnapshotDir {
    /// Checks that `path` is a directory containing `state.bin` and
    /// `memory.bin` and that `state.bin` is a valid container (magic,
    /// version, length, checksum). The body is decoded by [`Self::load_state`].
    pub fn open(path: impl AsRef<Path>) -> Result<SnapshotDir> {
        Self::open_with(path.as_ref(), |state| format::read_file(state).map(drop))
    }

    /// [`Self::open`] and [`Self::load_state`] with one read of
    /// `state.bin` (a resume reads it once).
    pub fn open_and_load<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<(SnapshotDir, T)> {
        let mut state = None;
        let dir = Self::open_with(path.as_ref(), |p| {
            state = Some(format::read_and_decode(p)?);
            Ok(())
        })?;
        let state = state.ok_or_else(|| Error::NotASnapshot {
            path: dir.path.clone(),
            reason: "state.bin was not read".into(),
        })?;
        Ok((dir, state))
    }

    /// The checks of [`Self::open`], with `read` taking `state.bin`.
    fn open_with(
        path: &Path,
        read: impl FnOnce(&Path) -> std::result::Result<(), format::Error>,
    ) -> Result<SnapshotDir> {
        let not = |reason: String| Error::NotASnapshot {
            path: path.to_owned(),
            reason,
        };
        if !path.is_dir() {
            return Err(not("not a directory".into()));
        }
        for name in [STATE_FILE, MEMORY_FILE] {
            if !path.join(name).is_file() {
                return Err(not(format!("missing {name}")));
            }
        }
        read(&path.join(STATE_FILE)).map_err(|e| not(crate::error_chain(&e)))?;
        Ok(SnapshotDir {
            path: path.to_owned(),
        })
    }

    /// Reads and decodes `state.bin` into the VMM's state type. Any failure
    /// is reported as "not a stasis snapshot: <reason>".
    pub fn load_state<T: DeserializeOwned>(&self) -> Result<T> {
        format::read_and_decode(&self.state_path()).map_err(|e| Error::NotASnapshot {
            path: self.path.clone(),
            reason: crate::error_chain(&e),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of `state.bin`.
    pub fn state_path(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// Path of `memory.bin`.
    pub fn memory_path(&self) -> PathBuf {
        self.path.join(MEMORY_FILE)
    }

    /// Opens `memory.bin` read-only.
    pub fn open_memory(&self) -> Result<File> {
        let p = self.memory_path();
        File::open(&p).map_err(io_err("opening", &p))
    }

    /// Starts a new snapshot that will appear at `final_path` on commit.
    /// Same as [`TmpDir::create`].
    pub fn create_tmp(final_path: impl AsRef<Path>) -> Result<TmpDir> {
        TmpDir::create(final_path)
    }
}

/// A snapshot being written: a directory `<final>.tmp-<pid>-<n>` next to the
/// final path. Dropping it without [`commit`](Self::commit) removes it, so a
/// failed pause (e.g. ENOSPC) leaves nothing behind.
#[derive(Debug)]
pub struct TmpDir {
    tmp: PathBuf,
    final_path: PathBuf,
    committed: bool,
}

impl TmpDir {
    /// Creates the temporary directory. Fails if `final_path` already exists
    /// (checked again atomically at commit) or its parent does not exist.
    pub fn create(final_path: impl AsRef<Path>) -> Result<TmpDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let final_path = final_path.as_ref().to_owned();
        let name = final_path
            .file_name()
            .ok_or_else(|| Error::InvalidPath(final_path.clone()))?;
        if final_path.symlink_metadata().is_ok() {
            return Err(Error::AlreadyExists(final_path));
        }
        let mut tmp_name = name.to_owned();
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = final_path.with_file_name(tmp_name);
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        Ok(TmpDir {
            tmp,
            final_path,
            committed: false,
        })
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Where the snapshot will appear on commit.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Path of `state.bin` inside the temporary directory.
    pub fn state_path(&self) -> PathBuf {
        self.tmp.join(STATE_FILE)
    }

    /// Path of `memory.bin` inside the temporary directory.
    pub fn memory_path(&self) -> PathBuf {
        self.tmp.join(MEMORY_FILE)
    }

    /// Encodes `state` and writes it as `state.bin`.
    pub fn write_state<T: Serialize>(&self, state: &T) -> Result<()> {
        let bytes = format::encode(state)?;
        format::write_file(&self.state_path(), &bytes)?;
        Ok(())
    }

    /// Creates `memory.bin` (read-write, empty) for
    /// [`memfile::write_memory`].
    pub fn create_memory_file(&self) -> Result<File> {
        let p = self.memory_path();
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(io_err("creating", &p))
    }

    /// Makes the snapshot durable and visible: fsyncs every file in the
    /// temporary directory, fsyncs the directory, renames it to the final
    /// path (failing if that exists, atomically via `RENAME_NOREPLACE`), and
    /// fsyncs the parent. Checks that both snapshot files are present.
    pub fn commit(mut self) -> Result<SnapshotDir> {
        for name in [STATE_FILE, MEMORY_FILE] {
            if !self.tmp.join(name).is_file() {
                return Err(Error::NotASnapshot {
                    path: self.tmp.clone(),
                    reason: format!("missing {name}"),
                });
            }
        }
        let entries = fs::read_dir(&self.tmp).map_err(io_err("listing", &self.tmp))?;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &self.tmp))?;
            let p = entry.path();
            if entry.file_type().map_err(io_err("stat", &p))?.is_file() {
                File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("fsyncing", &p))?;
            }
        }
        sync_dir(&self.tmp)?;
        rename_noreplace(&self.tmp, &self.final_path)?;
        self.committed = true;
        let parent = match self.final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        sync_dir(&parent)?;
        Ok(SnapshotDir {
            path: self.final_path.clone(),
        })
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.tmp) {
                tracing::warn!(path = %self.tmp.display(), error = %e,
                    "failed to remove uncommitted snapshot directory");
            }
        }
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsyncing directory", path))
}

fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::InvalidPath(p.to_owned()))
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // SAFETY: both arguments are valid NUL-terminated strings that outlive
    // the call; renameat2 does not retain them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Err(Error::AlreadyExists(to.to_owned())),
        // Filesystem without RENAME_NOREPLACE: check, then plain rename.
        Some(libc::EINVAL) => {
            if to.symlink_metadata().is_ok() {
                return Err(Error::AlreadyExists(to.to_owned()));
            }
            fs::rename(from, to).map_err(io_err("renaming into place", to))
        }
        _ => Err(Error::Io {
            op: "renaming into place",
            path: to.to_owned(),
            source: err,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_commit_and_open() {
        let root = tempfile::tempdir().unwrap();
        let fin = root.path().join("snap1");
        let tmp = SnapshotDir::create_tmp(&fin).unwrap();
        let tmp_path = tmp.path().to_owned();
        assert!(tmp_path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("snap1.tmp-"));
        assert_eq!(tmp_path.parent(), fin.parent());
        tmp.write_state(&(1u32, "hello".to_string())).unwrap();
        let f = tmp.create_memory_file().unwrap();
        f.set_len(8192).unwrap();
        let snap = tmp.commit().unwrap();
        assert!(!tmp_path.exists());
        assert_eq!(snap.path(), fin);

        let snap = SnapshotDir::open(&fin).unwrap();
        let st: (u32, String) = snap.load_state().unwrap();
        assert_eq!(st, (1, "hello".into()));
        assert_eq!(snap.open_memory().unwrap().metadata().unwrap().len(), 8192);

        // Destination exists: create and commit both refuse.
        assert!(matches!(TmpDir::create(&fin), Err(Error::AlreadyExists(_))));
        let fin2 = root.path().join("snap2");
        let tmp = TmpDir::create(&fin2).unwrap();
        tmp.write_state(&1u8).unwrap();
        tmp.create_memory_file().unwrap();
        fs::create_dir(&fin2).unwrap();
        fs::write(fin2.join("x"), b"x").unwrap();
        let tmp_path = tmp.path().to_owned();
        assert!(matches!(tmp.commit(), Err(Error::AlreadyExists(_))));
        assert!(!tmp_path.exists(), "failed commit must clean up");
    }

    #[test]
    fn drop_removes_uncommitted() {
        let root = tempfile::tempdir().unwrap();
        let tmp = TmpDir::create(root.path().join("s")).unwrap();
        tmp.write_state(&0u64).unwrap();
        let p = tmp.path().to_owned();
        assert!(p.exists());
        drop(tmp);
        assert!(!p.exists());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn not_a_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("d");
        fs::create_dir(&d).unwrap();
        let e = SnapshotDir::open(&d).unwrap_err();
        assert!(e
            .to_string()
            .contains("not a stasis snapshot: missing state.bin"));
        fs::write(d.join(STATE_FILE), b"garbage!garbage!garbage!garbage!").unwrap();
        let e = SnapshotDir::open(&d).unwrap_err();
        assert!(e.to_string().contains("missing memory.bin"), "{e}");
        fs::write(d.join(MEMORY_FILE), b"").unwrap();
        let e = SnapshotDir::open(&d).unwrap_err().to_string();
        assert!(
            e.contains("not a stasis snapshot") && e.contains("bad magic"),
            "{e}"
        );
        // Valid container, wrong body type.
        fs::write(d.join(STATE_FILE), format::encode(&1u8).unwrap()).unwrap();
        let snap = SnapshotDir::open(&d).unwrap();
        let e = snap.load_state::<(u64, String)>().unwrap_err().to_string();
        assert!(e.contains("not a stasis snapshot"), "{e}");
    }
}
