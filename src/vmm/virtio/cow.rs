//! The copy-on-write disk behind virtio-blk: a read-only base image (a
//! template's root filesystem) and a per-sandbox overlay.
//!
//! The overlay is a sparse file of the base's size plus an allocation map
//! (one bit per 4 KiB block, its own small file `<overlay>.map`). A block
//! whose bit is set is read from the overlay, any other from the base.
//! Writes always go to the overlay; a partial write to a block not yet
//! allocated first copies the rest of that block from the base. Creating a
//! disk is a `set_len` on an empty file (milliseconds, whatever the base's
//! size), and its space grows only with the blocks written.
//!
//! The map is persisted (written to a temporary file, fsynced, renamed over
//! the old one) on every guest flush that follows a write to a new block,
//! on [`CowDisk::flush`] and when the disk is dropped. A map is a checksummed
//! little-endian file: magic `STASISCW`, version, block size, disk size,
//! word count, the bitmap words, CRC-64/XZ; anything else is a clear error.
//!
//! Snapshots: [`CowDisk::save_into`] puts the overlay into a snapshot
//! directory as a reflink (independent copy) where the filesystem can, else
//! as a hard link (the snapshot and the running disk then share the
//! overlay's data: the snapshot is the disk's state as long as the VM does
//! not run on, which is how pause works: the worker exits after it), else a
//! sparse copy (across filesystems). The map is always written fresh.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::snapshot::PageBitmap;

/// Granularity of the allocation map.
pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"STASISCW";
const MAP_VERSION: u32 = 1;
const MAP_HEADER: usize = 32;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors of the copy-on-write disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The allocation map is not valid.
    #[error("disk allocation map {path} is invalid: {why}")]
    BadMap {
        /// The map file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An overlay exists but its map does not (or the reverse).
    #[error("overlay {overlay} has no allocation map {map}: it cannot be used (delete it to start a fresh overlay)")]
    MissingMap {
        /// The overlay.
        overlay: PathBuf,
        /// The map it needs.
        map: PathBuf,
    },
    /// The overlay is not the base's size.
    #[error("overlay {path} is {found} bytes, but its base image is {expected}")]
    SizeMismatch {
        /// The overlay.
        path: PathBuf,
        /// The base's size.
        expected: u64,
        /// The overlay's.
        found: u64,
    },
    /// An access past the end of the disk.
    #[error("disk access at {offset} of {len} bytes is past the end of the {size}-byte disk")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The map file that goes with an overlay.
pub fn map_path(overlay: &Path) -> PathBuf {
    let mut s = overlay.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
}

/// A base image with its overlay.
#[derive(Debug)]
pub struct CowDisk {
    base: File,
    base_path: PathBuf,
    overlay: File,
    overlay_path: PathBuf,
    size: u64,
    map: PageBitmap,
    /// The map changed since it was last persisted.
    map_dirty: bool,
    /// Data was written since the last fdatasync.
    data_dirty: bool,
}

impl CowDisk {
    /// Opens `base` read-only and the overlay at `overlay`: an existing one
    /// with its map, or a new empty one (with a new map) if neither exists.
    pub fn open(base: &Path, overlay: &Path) -> Result<CowDisk, Error> {
        Self::open_inner(base, overlay, true)
    }

    /// Like [`CowDisk::open`], but the overlay must exist (a snapshot's).
    pub fn open_existing(base: &Path, overlay: &Path) -> Result<CowDisk, Error> {
        Self::open_inner(base, overlay, false)
    }

    fn open_inner(base: &Path, overlay: &Path, create: bool) -> Result<CowDisk, Error> {
        let base_file = File::open(base).map_err(io_err("opening base image", base))?;
        let size = base_file
            .metadata()
            .map_err(io_err("reading size of", base))?
            .len();
        let map_file = map_path(overlay);
        let exists = overlay.exists();
        if !exists && !create {
            return Err(Error::Io {
                op: "opening overlay",
                path: overlay.to_owned(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let (overlay_file, map) = if exists {
            if !map_file.exists() {
                return Err(Error::MissingMap {
                    overlay: overlay.to_owned(),
                    map: map_file,
                });
            }
            let f = File::options()
                .read(true)
                .write(true)
                .open(overlay)
                .map_err(io_err("opening overlay", overlay))?;
            let found = f
                .metadata()
                .map_err(io_err("reading size of", overlay))?
                .len();
            if found != size {
                return Err(Error::SizeMismatch {
                    path: overlay.to_owned(),
                    expected: size,
                    found,
                });
            }
            let map = read_map(&map_file, size)?;
            (f, map)
        } else {
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(overlay)
                .map_err(io_err("creating overlay", overlay))?;
            f.set_len(size).map_err(io_err("sizing overlay", overlay))?;
            (f, PageBitmap::new(blocks(size)))
        };
        let disk = CowDisk {
            base: base_file,
            base_path: base.to_owned(),
            overlay: overlay_file,
            overlay_path: overlay.to_owned(),
            size,
            map,
            map_dirty: false,
            data_dirty: false,
        };
        if !exists {
            disk.write_map_to(&map_file)?;
        }
        Ok(disk)
    }

    /// Size in bytes (the base image's).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The base image.
    pub fn base_path(&self) -> &Path {
        &self.base_path
    }

    /// The overlay file.
    pub fn overlay_path(&self) -> &Path {
        &self.overlay_path
    }

    /// Blocks written so far.
    pub fn allocated_blocks(&self) -> usize {
        self.map.count_ones()
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), Error> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = (pos / BLOCK) as usize;
            let allocated = self.map.get(block);
            // Extend the run while blocks have the same source.
            let mut end_block = block + 1;
            let last_block = ((offset + buf.len() as u64 - 1) / BLOCK) as usize;
            while end_block <= last_block && self.map.get(end_block) == allocated {
                end_block += 1;
            }
            let run_end = (end_block as u64 * BLOCK).min(offset + buf.len() as u64);
            let n = (run_end - pos) as usize;
            let chunk = &mut buf[done..done + n];
            if allocated {
                self.overlay
                    .read_exact_at(chunk, pos)
                    .map_err(io_err("reading overlay", &self.overlay_path))?;
            } else {
                self.base
                    .read_exact_at(chunk, pos)
                    .map_err(io_err("reading base image", &self.base_path))?;
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the overlay.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.check(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        // Partial blocks at either end that are not allocated yet: fill the
        // overlay's copy from the base first.
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        for b in [first, last] {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.size));
            let partial = offset > bs || end < be;
            if partial && !self.map.get(b as usize) {
                let mut tmp = vec![0u8; (be - bs) as usize];
                self.base
                    .read_exact_at(&mut tmp, bs)
                    .map_err(io_err("reading base image", &self.base_path))?;
                self.overlay
                    .write_all_at(&tmp, bs)
                    .map_err(io_err("writing overlay", &self.overlay_path))?;
                self.map.set(b as usize);
                self.map_dirty = true;
            }
        }
        self.overlay
            .write_all_at(buf, offset)
            .map_err(io_err("writing overlay", &self.overlay_path))?;
        for b in first..=last {
            if !self.map.get(b as usize) {
                self.map.set(b as usize);
                self.map_dirty = true;
            }
        }
        self.data_dirty = true;
        Ok(())
    }

    /// Makes everything written so far durable: the overlay's data
    /// (fdatasync) and, if it changed, the map.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.data_dirty {
            self.overlay
                .sync_data()
                .map_err(io_err("syncing overlay", &self.overlay_path))?;
            self.data_dirty = false;
        }
        if self.map_dirty {
            self.write_map_to(&map_path(&self.overlay_path))?;
            self.map_dirty = false;
        }
        Ok(())
    }

    fn map_bytes(&self) -> Vec<u8> {
        let words = self.map.words();
        let mut out = Vec::with_capacity(MAP_HEADER + words.len() * 8 + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MAP_VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(words.len() as u64).to_le_bytes());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let crc = CRC64.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Writes the map to `path` atomically (temporary file, fsync, rename).
    fn write_map_to(&self, path: &Path) -> Result<(), Error> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(&self.map_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming map to", path))?;
        Ok(())
    }

    /// Puts this disk's current state into `dir` as `<name>` (overlay) and
    /// `<name>.map`: flushes, then reflinks, hard-links or sparse-copies
    /// the overlay (see the module doc). Returns how it was stored.
    pub fn save_into(&mut self, dir: &Path, name: &str) -> Result<&'static str, Error> {
        self.flush()?;
        let dst = dir.join(name);
        let how = if reflink(&self.overlay, &dst).is_ok() {
            "reflink"
        } else if fs::hard_link(&self.overlay_path, &dst).is_ok() {
            "hard link"
        } else {
            sparse_copy(&self.overlay, &self.overlay_path, &dst, self.size)?;
            "copy"
        };
        self.write_map_to(&map_path(&dst))?;
        Ok(how)
    }
}

impl Drop for CowDisk {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!("copy-on-write disk: {e}");
        }
    }
}

fn blocks(size: u64) -> usize {
    size.div_ceil(BLOCK) as usize
}

/// Reads and checks a map file for a disk of `size` bytes.
pub fn read_map(path: &Path, size: u64) -> Result<PageBitmap, Error> {
    let bytes = fs::read(path).map_err(io_err("reading", path))?;
    let bad = |why: String| Error::BadMap {
        path: path.to_owned(),
        why,
    };
    if bytes.len() < MAP_HEADER + 8 {
        return Err(bad(format!("truncated: {} bytes", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(bad("wrong magic (not a stasis disk map)".into()));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b)
    };
    if u32_at(8) != MAP_VERSION {
        return Err(bad(format!("unsupported version {}", u32_at(8))));
    }
    if u64::from(u32_at(12)) != BLOCK {
        return Err(bad(format!("block size {} (expected {BLOCK})", u32_at(12))));
    }
    let words = u64_at(24);
    let expected_len = (words as u128) * 8 + MAP_HEADER as u128 + 8;
    if expected_len != bytes.len() as u128 {
        return Err(bad(format!(
            "truncated or padded: {} bytes for {words} words",
            bytes.len()
        )));
    }
    let crc_off = bytes.len() - 8;
    if CRC64.checksum(&bytes[..crc_off]) != u64_at(crc_off) {
        return Err(bad("checksum mismatch (corrupted)".into()));
    }
    if u64_at(16) != size {
        return Err(bad(format!(
            "it is for a {}-byte disk, but the base image is {size} bytes",
            u64_at(16)
        )));
    }
    let w: Vec<u64> = (0..words as usize)
        .map(|i| u64_at(MAP_HEADER + 8 * i))
        .collect();
    PageBitmap::from_words(blocks(size), w)
        .ok_or_else(|| bad("word count does not match the disk size".into()))
}

/// FICLONE: an independent copy sharing extents (btrfs, XFS).
fn reflink(src: &File, dst: &Path) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let out = File::options().write(true).create_new(true).open(dst)?;
    // SAFETY: FICLONE takes the source descriptor by value; both descriptors
    // are open files we own for the duration of the call.
    let rc = unsafe { libc::ioctl(out.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    drop(out);
    let _ = fs::remove_file(dst);
    Err(e)
}

/// Copies only the data extents of `src` (SEEK_DATA/SEEK_HOLE).
fn sparse_copy(src: &File, src_path: &Path, dst: &Path, size: u64) -> Result<(), Error> {
    let out = File::options()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err("creating", dst))?;
    out.set_len(size).map_err(io_err("sizing", dst))?;
    let fd = src.as_raw_fd();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size as i64 } else { hole };
        let mut off = data as u64;
        while off < hole as u64 {
            let n = ((hole as u64 - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)
                .map_err(io_err("reading overlay", src_path))?;
            out.write_all_at(&buf[..n], off)
                .map_err(io_err("writing", dst))?;
            off += n as u64;
        }
        pos = hole;
    }
    out.sync_all().map_err(io_err("syncing", dst))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path, size: usize) -> PathBuf {
        let p = dir.join("base.img");
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn reads_fall_through_and_writes_isolate() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path(), 64 * 1024 + 1000);
        let orig = fs::read(&b).unwrap();
        let mut disk = CowDisk::open(&b, &d.path().join("ov")).unwrap();
        assert_eq!(disk.size(), orig.len() as u64);
        let mut buf = vec![0u8; 10_000];
        disk.read_at(3000, &mut buf).unwrap();
        assert_eq!(buf, orig[3000..13_000]);
        // A partial write into two unallocated blocks, one full block and
        // a write into the partial last block.
        disk.write_at(4000, &[0xaa; 200]).unwrap();
        disk.write_at(8192, &[0xbb; 4096]).unwrap();
        disk.write_at(orig.len() as u64 - 10, &[0xcc; 10]).unwrap();
        let mut want = orig.clone();
        want[4000..4200].fill(0xaa);
        want[8192..12288].fill(0xbb);
        let n = want.len();
        want[n - 10..].fill(0xcc);
        let mut all = vec![0u8; n];
        disk.read_at(0, &mut all).unwrap();
        assert_eq!(all, want);
        assert_eq!(disk.allocated_blocks(), 4);
        // The base is untouched.
        assert_eq!(fs::read(&b).unwrap(), orig);
        // Out of range.
        assert!(matches!(
            disk.write_at(n as u64 - 1, &[0; 2]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(disk.read_at(u64::MAX, &mut [0; 1]).is_err());
    }

    #[test]
    fn overlay_is_sparse_and_reopens_with_its_map() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path(), 1 << 20);
        let ov = d.path().join("ov");
        {
            let mut disk = CowDisk::open(&b, &ov).unwrap();
            disk.write_at(512 * 1024, b"hello").unwrap();
            disk.flush().unwrap();
        }
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&ov).unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert!(
            m.blocks() * 512 <= 64 * 1024,
            "{} bytes allocated",
            m.blocks() * 512
        );
        let disk = CowDisk::open(&b, &ov).unwrap();
        assert_eq!(disk.allocated_blocks(), 1);
        let mut buf = [0u8; 5];
        disk.read_at(512 * 1024, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let mut buf = [0u8; 5];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn bad_maps_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path(), 64 * 1024);
        let ov = d.path().join("ov");
        drop(CowDisk::open(&b, &ov).unwrap());
        let mp = map_path(&ov);
        let good = fs::read(&mp).unwrap();
        // Truncated.
        fs::write(&mp, &good[..good.len() - 3]).unwrap();
        let e = CowDisk::open(&b, &ov).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        fs::write(&mp, &good[..10]).unwrap();
        let e = CowDisk::open(&b, &ov).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // Corrupted.
        let mut bad = good.clone();
        bad[MAP_HEADER] ^= 1;
        fs::write(&mp, &bad).unwrap();
        let e = CowDisk::open(&b, &ov).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // Missing.
        fs::remove_file(&mp).unwrap();
        let e = CowDisk::open(&b, &ov).unwrap_err().to_string();
        assert!(e.contains("no allocation map"), "{e}");
        // A base of another size.
        fs::write(&mp, &good).unwrap();
        let b2 = d.path().join("b2");
        fs::write(&b2, vec![0u8; 8192]).unwrap();
        let e = CowDisk::open(&b2, &ov).unwrap_err().to_string();
        assert!(e.contains("bytes"), "{e}");
        assert!(CowDisk::open(&b, &ov).is_ok());
    }

    #[test]
    fn save_into_keeps_the_state_at_save_time() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path(), 64 * 1024);
        let mut disk = CowDisk::open(&b, &d.path().join("ov")).unwrap();
        disk.write_at(0, b"one").unwrap();
        let snap = d.path().join("snap");
        fs::create_dir(&snap).unwrap();
        disk.save_into(&snap, "disk").unwrap();
        // A block first written after the save is not in the saved map.
        disk.write_at(8192, b"two").unwrap();
        disk.flush().unwrap();
        let saved = CowDisk::open(&b, &snap.join("disk")).unwrap();
        let mut buf = [0u8; 3];
        saved.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"one");
        saved.read_at(8192, &mut buf).unwrap();
        assert_eq!(buf, [8192 % 251, 8193 % 251, 8194 % 251].map(|x| x as u8));
        let mut sc = snap.clone();
        sc.set_file_name("copy");
        fs::create_dir(&sc).unwrap();
        sparse_copy(
            &saved.overlay,
            &snap.join("disk"),
            &sc.join("disk"),
            saved.size,
        )
        .unwrap();
        let mut a = vec![0u8; 64 * 1024];
        let mut c = vec![0u8; 64 * 1024];
        saved.overlay.read_exact_at(&mut a, 0).unwrap();
        File::open(sc.join("disk"))
            .unwrap()
            .read_exact_at(&mut c, 0)
            .unwrap();
        assert_eq!(a, c);
    }
}
