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
//! Integrity: every written block has a CRC32C, kept in memory, updated on
//! every write and stored in the map. Every read of an overlay block checks
//! it; a mismatch is [`Error::Corrupt`], naming the overlay and the block's
//! offset (virtio-blk fails the request and stops the VM, see
//! [`super::block`]). [`CowDisk::scrub_step`] checks all written blocks
//! (the devices run it in the background after opening an existing
//! overlay, so a corrupted block is found even if the guest never reads
//! it).
//!
//! The map is persisted (written to a temporary file, fsynced, renamed over
//! the old one) on every guest flush that follows a write, on
//! [`CowDisk::flush`] and when the disk is dropped; the overlay's data is
//! fdatasynced first. A map is a checksummed little-endian file: magic
//! `STASISCW`, version 2, block size, disk size, word count, the bitmap
//! words, one CRC32C per set bit (in block order), CRC-64/XZ of all that;
//! anything else (version 1 too: it had no data checksums) is a clear
//! error. A crash between a data write and the next flush can leave blocks
//! whose data is newer than their stored checksum: they read as corrupted,
//! never as silently wrong data.
//!
//! Snapshots: [`CowDisk::save_into`] puts the overlay into a snapshot
//! directory as a reflink (independent copy) where the filesystem can, else
//! as a hard link, else (across filesystems) a copy of the written blocks.
//! The map is always written fresh. A snapshot is immutable whatever the VM
//! does next: after a hard link the live disk is marked shared, and before
//! its next data write it copies its written blocks into a new file
//! (`copy_file_range`, cost proportional to the blocks written, paid only
//! by a VM that writes after a snapshot) and renames it over the live
//! overlay's path; the snapshot keeps the old inode.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::snapshot::PageBitmap;

/// Granularity of the allocation map.
pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"STASISCW";
/// Version 2: the map carries a CRC32C per written block (version 1 did
/// not).
const MAP_VERSION: u32 = 2;
const MAP_HEADER: usize = 32;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
/// Largest disk an overlay may have (its map and checksums are held in
/// memory: about 4 bytes per block).
pub const MAX_DISK_BYTES: u64 = 1 << 40;
/// Largest read of one scrub step (a bounded time under the device lock).
const SCRUB_BYTES: usize = 1 << 20;

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
    /// An overlay block's data does not match its checksum.
    #[error(
        "disk overlay {path} is corrupted: the {len}-byte block at offset {offset} \
         does not match its checksum (stored {expected:#010x}, read {found:#010x})"
    )]
    Corrupt {
        /// The overlay.
        path: PathBuf,
        /// Byte offset of the block in the overlay (and on the disk).
        offset: u64,
        /// The block's length.
        len: usize,
        /// The checksum in the map.
        expected: u32,
        /// The checksum of what was read.
        found: u32,
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

/// CRC-32C (Castagnoli) of `data`, shared with the memory file's page
/// checksums.
pub fn crc32c(data: &[u8]) -> u32 {
    crate::snapshot::crc32c::checksum(data)
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
    /// CRC32C of each block's overlay data (0 for blocks not written).
    crcs: Vec<u32>,
    /// The map or the checksums changed since they were last persisted.
    map_dirty: bool,
    /// Data was written since the last fdatasync.
    data_dirty: bool,
    /// The overlay's inode is also a snapshot's (hard link): copy it away
    /// before the next data write.
    shared: bool,
}

/// A snapshot's overlay opened read-only, the source of [`CowDisk::fork`].
struct ReadOnlyLayer {
    base: File,
    overlay: File,
    size: u64,
    map: PageBitmap,
    crcs: Vec<u32>,
}

impl ReadOnlyLayer {
    fn copy_blocks_to(&self, out: &File, out_path: &Path) -> Result<(), Error> {
        out.set_len(self.size).map_err(io_err("sizing", out_path))?;
        for (s, e) in self.map.iter_runs() {
            let bs = s as u64 * BLOCK;
            let be = (e as u64 * BLOCK).min(self.size);
            copy_range(&self.overlay, out, bs, be - bs).map_err(|source| Error::Io {
                op: "copying snapshot layer blocks to",
                path: out_path.to_owned(),
                source,
            })?;
        }
        Ok(())
    }
}

/// What [`CowDisk::unshare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnshareStats {
    /// Blocks copied.
    pub blocks: usize,
    /// How long the copy (with its fdatasync and the rename) took.
    pub elapsed: std::time::Duration,
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
        let (overlay_file, map, crcs) = if exists {
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
            check_len(&f, overlay, size)?;
            let (map, crcs) = read_map(&map_file, size)?;
            (f, map, crcs)
        } else {
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(overlay)
                .map_err(io_err("creating overlay", overlay))?;
            f.set_len(size).map_err(io_err("sizing overlay", overlay))?;
            (f, PageBitmap::new(blocks(size)), vec![0; blocks(size)])
        };
        let disk = CowDisk {
            base: base_file,
            base_path: base.to_owned(),
            overlay: overlay_file,
            overlay_path: overlay.to_owned(),
            size,
            map,
            crcs,
            map_dirty: false,
            data_dirty: false,
            shared: false,
        };
        if !exists {
            disk.write_map_to(&map_file)?;
        }
        Ok(disk)
    }

    /// Opens a new writable overlay at `own` that starts as a copy of a
    /// snapshot's overlay `layer` (the middle of the chain template base ←
    /// snapshot layer ← this VM's overlay). The snapshot's files are never
    /// written: `own` is a reflink of `layer` where the filesystem can make
    /// one, else a hard link marked shared (copied away before this disk's
    /// first data write, see [`CowDisk::unshare`]), else a copy of the
    /// written blocks; its map is written fresh from the layer's (verified)
    /// map. Any number of disks can be forked from one layer at once.
    /// `own` and its map must not exist.
    pub fn fork(base: &Path, layer: &Path, own: &Path) -> Result<CowDisk, Error> {
        let src = Self::open_existing_readonly(base, layer)?;
        if own.symlink_metadata().is_ok() || map_path(own).symlink_metadata().is_ok() {
            return Err(Error::Io {
                op: "creating overlay",
                path: own.to_owned(),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        let mut shared = false;
        if reflink(&src.overlay, own).is_err() {
            if fs::hard_link(layer, own).is_ok() {
                shared = true;
            } else {
                let out = File::options()
                    .write(true)
                    .create_new(true)
                    .open(own)
                    .map_err(io_err("creating", own))?;
                src.copy_blocks_to(&out, own)?;
                out.sync_all().map_err(io_err("syncing", own))?;
            }
        }
        let overlay = File::options()
            .read(true)
            .write(true)
            .open(own)
            .map_err(io_err("opening overlay", own))?;
        let disk = CowDisk {
            base: src.base,
            base_path: base.to_owned(),
            overlay,
            overlay_path: own.to_owned(),
            size: src.size,
            map: src.map,
            crcs: src.crcs,
            map_dirty: false,
            data_dirty: false,
            shared,
        };
        disk.write_map_to(&map_path(own))?;
        Ok(disk)
    }

    /// Opens a snapshot layer for reading only (its overlay and map are
    /// checked like [`CowDisk::open_existing`]; nothing is ever written).
    fn open_existing_readonly(base: &Path, layer: &Path) -> Result<ReadOnlyLayer, Error> {
        let base_file = File::open(base).map_err(io_err("opening base image", base))?;
        let size = base_file
            .metadata()
            .map_err(io_err("reading size of", base))?
            .len();
        let f = File::open(layer).map_err(io_err("opening snapshot layer", layer))?;
        check_len(&f, layer, size)?;
        let map_file = map_path(layer);
        if !map_file.exists() {
            return Err(Error::MissingMap {
                overlay: layer.to_owned(),
                map: map_file,
            });
        }
        let (map, crcs) = read_map(&map_file, size)?;
        Ok(ReadOnlyLayer {
            base: base_file,
            overlay: f,
            size,
            map,
            crcs,
        })
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

    /// Whether the overlay's data is shared with a snapshot (hard link)
    /// and will be copied away before the next write.
    pub fn is_shared(&self) -> bool {
        self.shared
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

    /// Byte range of block `b` (the last block may be short).
    fn block_range(&self, b: u64) -> (u64, u64) {
        (b * BLOCK, ((b + 1) * BLOCK).min(self.size))
    }

    /// Reads `buf.len()` bytes at `offset`; overlay blocks are checked
    /// against their checksums ([`Error::Corrupt`]).
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
                self.read_verified(pos, chunk)?;
            } else {
                self.base
                    .read_exact_at(chunk, pos)
                    .map_err(io_err("reading base image", &self.base_path))?;
            }
            done += n;
        }
        Ok(())
    }

    /// Reads `buf` at `pos` from the overlay (all its blocks written),
    /// checking every block it touches (whole blocks are read to do so).
    fn read_verified(&self, pos: u64, buf: &mut [u8]) -> Result<(), Error> {
        let end = pos + buf.len() as u64;
        let first = pos / BLOCK;
        let (bs, be) = (first * BLOCK, (end.div_ceil(BLOCK) * BLOCK).min(self.size));
        if bs == pos && be == end {
            self.overlay
                .read_exact_at(buf, pos)
                .map_err(io_err("reading overlay", &self.overlay_path))?;
            return self.verify(first, buf);
        }
        let mut whole = vec![0u8; (be - bs) as usize];
        self.overlay
            .read_exact_at(&mut whole, bs)
            .map_err(io_err("reading overlay", &self.overlay_path))?;
        self.verify(first, &whole)?;
        let o = (pos - bs) as usize;
        buf.copy_from_slice(&whole[o..o + buf.len()]);
        Ok(())
    }

    /// Checks `data`, whole blocks starting at block `first`.
    fn verify(&self, first: u64, data: &[u8]) -> Result<(), Error> {
        for (i, blk) in data.chunks(BLOCK as usize).enumerate() {
            let b = first + i as u64;
            let expected = self.crcs[b as usize];
            let found = crc32c(blk);
            if found != expected {
                return Err(Error::Corrupt {
                    path: self.overlay_path.clone(),
                    offset: b * BLOCK,
                    len: blk.len(),
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }

    /// Checks up to about 1 MiB of written blocks from block `from` on;
    /// returns where to go on (`None`: all checked). Used to check a whole
    /// overlay in bounded steps.
    pub fn scrub_step(&self, from: usize) -> Result<Option<usize>, Error> {
        let Some(start) = self.map.next_one(from) else {
            return Ok(None);
        };
        let max_blocks = SCRUB_BYTES / BLOCK as usize;
        let end = self.map.next_zero(start).min(start + max_blocks);
        let (bs, _) = self.block_range(start as u64);
        let (_, be) = self.block_range(end as u64 - 1);
        let mut buf = vec![0u8; (be - bs) as usize];
        self.overlay
            .read_exact_at(&mut buf, bs)
            .map_err(io_err("reading overlay", &self.overlay_path))?;
        self.verify(start as u64, &buf)?;
        Ok(Some(end))
    }

    /// Checks every written block (see [`CowDisk::scrub_step`]); returns
    /// how many were checked.
    pub fn verify_all(&self) -> Result<usize, Error> {
        let mut pos = 0;
        while let Some(next) = self.scrub_step(pos)? {
            pos = next;
        }
        Ok(self.allocated_blocks())
    }

    /// Writes `buf` at `offset` into the overlay.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.check(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.unshare()?;
        let mut pos = offset;
        let mut src = buf;
        while !src.is_empty() {
            let b = pos / BLOCK;
            let (bs, be) = self.block_range(b);
            let end = pos + src.len() as u64;
            // Whole blocks from here: up to the last block boundary, or the
            // end of the disk.
            let whole_end = if end == self.size {
                end
            } else {
                end / BLOCK * BLOCK
            };
            if pos == bs && whole_end > pos {
                let n = (whole_end - pos) as usize;
                self.overlay
                    .write_all_at(&src[..n], pos)
                    .map_err(io_err("writing overlay", &self.overlay_path))?;
                for (i, blk) in src[..n].chunks(BLOCK as usize).enumerate() {
                    self.set_block(b as usize + i, crc32c(blk));
                }
                pos += n as u64;
                src = &src[n..];
                continue;
            }
            // A partial block: merge with its current content (checked, if
            // it is the overlay's) and write it whole.
            let mut whole = vec![0u8; (be - bs) as usize];
            self.read_at(bs, &mut whole)?;
            let o = (pos - bs) as usize;
            let n = (whole.len() - o).min(src.len());
            whole[o..o + n].copy_from_slice(&src[..n]);
            self.overlay
                .write_all_at(&whole, bs)
                .map_err(io_err("writing overlay", &self.overlay_path))?;
            self.set_block(b as usize, crc32c(&whole));
            pos += n as u64;
            src = &src[n..];
        }
        self.data_dirty = true;
        Ok(())
    }

    fn set_block(&mut self, b: usize, crc: u32) {
        self.map.set(b);
        self.crcs[b] = crc;
        self.map_dirty = true;
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
        let n = self.map.count_ones();
        let mut out = Vec::with_capacity(MAP_HEADER + words.len() * 8 + n * 4 + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MAP_VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(words.len() as u64).to_le_bytes());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for b in self.map.iter_ones() {
            out.extend_from_slice(&self.crcs[b].to_le_bytes());
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
    /// `<name>.map`: flushes, then reflinks, hard-links or copies the
    /// overlay (see the module doc). Returns how it was stored. After a
    /// hard link the disk copies its overlay away before its next write,
    /// so the snapshot never changes.
    pub fn save_into(&mut self, dir: &Path, name: &str) -> Result<&'static str, Error> {
        self.flush()?;
        let dst = dir.join(name);
        let how = if reflink(&self.overlay, &dst).is_ok() {
            "reflink"
        } else if fs::hard_link(&self.overlay_path, &dst).is_ok() {
            self.shared = true;
            "hard link"
        } else {
            let out = File::options()
                .write(true)
                .create_new(true)
                .open(&dst)
                .map_err(io_err("creating", &dst))?;
            self.copy_blocks_to(&out, &dst)?;
            out.sync_all().map_err(io_err("syncing", &dst))?;
            "copy"
        };
        self.write_map_to(&map_path(&dst))?;
        Ok(how)
    }

    /// Copies the written blocks into `out` (sized like the overlay,
    /// sparse elsewhere).
    fn copy_blocks_to(&self, out: &File, out_path: &Path) -> Result<(), Error> {
        out.set_len(self.size).map_err(io_err("sizing", out_path))?;
        for (s, e) in self.map.iter_runs() {
            let (bs, _) = self.block_range(s as u64);
            let (_, be) = self.block_range(e as u64 - 1);
            copy_range(&self.overlay, out, bs, be - bs).map_err(|source| Error::Io {
                op: "copying overlay blocks to",
                path: out_path.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// If the overlay's data is shared with a snapshot, copies the written
    /// blocks into a new file and renames it over the overlay's path, so
    /// that writes from now on leave the snapshot alone. Returns what it
    /// copied (`None`: nothing was shared).
    pub fn unshare(&mut self) -> Result<Option<UnshareStats>, Error> {
        if !self.shared {
            return Ok(None);
        }
        let t = Instant::now();
        let mut tmp = self.overlay_path.as_os_str().to_owned();
        tmp.push(format!(".unshare-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let out = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        let copied = self
            .copy_blocks_to(&out, &tmp)
            .and_then(|()| out.sync_data().map_err(io_err("syncing", &tmp)))
            .and_then(|()| {
                fs::rename(&tmp, &self.overlay_path)
                    .map_err(io_err("renaming the copied overlay to", &self.overlay_path))
            });
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(parent) = self.overlay_path.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        self.overlay = out;
        self.shared = false;
        let stats = UnshareStats {
            blocks: self.allocated_blocks(),
            elapsed: t.elapsed(),
        };
        tracing::info!(
            overlay = %self.overlay_path.display(),
            blocks = stats.blocks,
            ms = stats.elapsed.as_secs_f64() * 1e3,
            "disk overlay copied away from the snapshot sharing it before the first write after the snapshot"
        );
        Ok(Some(stats))
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

/// An overlay must be exactly as long as the disk.
fn check_len(f: &File, overlay: &Path, size: u64) -> Result<(), Error> {
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
    Ok(())
}

/// Checks a snapshot's overlay on its own, without opening any base
/// image: its length is `size`, its map is valid, and every written block
/// matches its checksum. Returns how many blocks are written.
pub fn verify_overlay(overlay: &Path, size: u64) -> Result<usize, Error> {
    let f = File::open(overlay).map_err(io_err("opening overlay", overlay))?;
    check_len(&f, overlay, size)?;
    let (map, crcs) = read_map(&map_path(overlay), size)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let (mut n, mut from) = (0, 0);
    while let Some(b) = map.next_one(from) {
        let start = b as u64 * BLOCK;
        let data = &mut buf[..((start + BLOCK).min(size) - start) as usize];
        f.read_exact_at(data, start)
            .map_err(io_err("reading overlay", overlay))?;
        let found = crc32c(data);
        if found != crcs[b] {
            return Err(Error::Corrupt {
                path: overlay.to_owned(),
                offset: start,
                len: data.len(),
                expected: crcs[b],
                found,
            });
        }
        n += 1;
        from = b + 1;
    }
    Ok(n)
}

/// Reads and checks a map file for a disk of `size` bytes: the allocation
/// bitmap and each block's CRC32C (0 for blocks not written).
pub fn read_map(path: &Path, size: u64) -> Result<(PageBitmap, Vec<u32>), Error> {
    let bad = |why: String| Error::BadMap {
        path: path.to_owned(),
        why,
    };
    // Untrusted input (a snapshot's): bound what is allocated before
    // reading, by the disk size and by the file's length.
    if size > MAX_DISK_BYTES {
        return Err(bad(format!(
            "it is for a {size}-byte disk, more than the {MAX_DISK_BYTES}-byte limit"
        )));
    }
    let n = blocks(size) as u64;
    let max_len = MAP_HEADER as u64 + n.div_ceil(64) * 8 + n * 4 + 8;
    let len = fs::metadata(path)
        .map_err(io_err("reading size of", path))?
        .len();
    if len > max_len {
        return Err(bad(format!(
            "{len} bytes, more than a map of a {size}-byte disk can hold ({max_len})"
        )));
    }
    let bytes = fs::read(path).map_err(io_err("reading", path))?;
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
    match u32_at(8) {
        MAP_VERSION => {}
        1 => {
            return Err(bad(format!(
                "version 1 (an older stasis, without data checksums); this stasis reads version \
                 {MAP_VERSION} only"
            )))
        }
        v => return Err(bad(format!("unsupported version {v}"))),
    }
    // The checksum is the file's last 8 bytes whatever its layout: check
    // it before trusting any count.
    let crc_off = bytes.len() - 8;
    if CRC64.checksum(&bytes[..crc_off]) != u64_at(crc_off) {
        return Err(bad("checksum mismatch (corrupted or truncated)".into()));
    }
    if u64::from(u32_at(12)) != BLOCK {
        return Err(bad(format!("block size {} (expected {BLOCK})", u32_at(12))));
    }
    let words = u64_at(24);
    let words_end = (words as u128) * 8 + MAP_HEADER as u128;
    if words_end + 8 > bytes.len() as u128 {
        return Err(bad(format!(
            "truncated: {} bytes for {words} words",
            bytes.len()
        )));
    }
    let words_end = words_end as usize;
    let ones: u128 = (0..words as usize)
        .map(|i| u128::from(u64_at(MAP_HEADER + 8 * i).count_ones()))
        .sum();
    if words_end as u128 + ones * 4 + 8 != bytes.len() as u128 {
        return Err(bad(format!(
            "truncated or padded: {} bytes for {words} words and {ones} block checksums",
            bytes.len()
        )));
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
    let map = PageBitmap::from_words(blocks(size), w)
        .ok_or_else(|| bad("word count does not match the disk size".into()))?;
    if map.count_ones() as u128 != ones {
        return Err(bad("blocks marked written past the end of the disk".into()));
    }
    let mut crcs = vec![0u32; blocks(size)];
    for (i, b) in map.iter_ones().enumerate() {
        crcs[b] = u32_at(words_end + 4 * i);
    }
    Ok((map, crcs))
}

/// Copies `len` bytes at `off` from `src` to the same offset in `dst`:
/// `copy_file_range` (in the kernel; a reflink where the filesystem can),
/// else read and write.
fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut a = (off + done) as i64;
        let mut b = a;
        let want = ((len - done) as usize).min(1 << 30);
        // SAFETY: both descriptors are open files we own; the offsets are
        // valid pointers to locals that live across the call.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, want, 0)
        };
        if n > 0 {
            done += n as u64;
            continue;
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source ended early",
            ));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => break,
            _ => return Err(e),
        }
    }
    let mut buf = vec![0u8; (len - done).min(1 << 20) as usize];
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off + done)?;
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
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
        let ov = d.path().join("ov");
        let mut disk = CowDisk::open(&b, &ov).unwrap();
        disk.write_at(0, b"one").unwrap();
        let snap = d.path().join("snap");
        fs::create_dir(&snap).unwrap();
        let how = disk.save_into(&snap, "disk").unwrap();
        // The running disk overwrites the saved block and writes a new one.
        disk.write_at(0, b"ONE").unwrap();
        disk.write_at(8192, b"two").unwrap();
        disk.flush().unwrap();
        if how == "hard link" {
            assert!(!disk.is_shared());
            use std::os::unix::fs::MetadataExt;
            assert_ne!(
                fs::metadata(&ov).unwrap().ino(),
                fs::metadata(snap.join("disk")).unwrap().ino(),
                "the live overlay still shares the snapshot's inode"
            );
        }
        let saved = CowDisk::open(&b, &snap.join("disk")).unwrap();
        assert_eq!(saved.verify_all().unwrap(), 1);
        let mut buf = [0u8; 3];
        saved.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"one", "stored as {how}");
        saved.read_at(8192, &mut buf).unwrap();
        assert_eq!(buf, [8192 % 251, 8193 % 251, 8194 % 251].map(|x| x as u8));
        // The live disk has its new content.
        let mut live = [0u8; 3];
        disk.read_at(0, &mut live).unwrap();
        assert_eq!(&live, b"ONE");
        // The copy used across filesystems holds the same data.
        let c = d.path().join("copy");
        let out = File::options()
            .write(true)
            .create_new(true)
            .open(&c)
            .unwrap();
        saved.copy_blocks_to(&out, &c).unwrap();
        let mut a = vec![0u8; 64 * 1024];
        let mut cc = vec![0u8; 64 * 1024];
        saved.overlay.read_exact_at(&mut a, 0).unwrap();
        File::open(&c).unwrap().read_exact_at(&mut cc, 0).unwrap();
        assert_eq!(a, cc);
    }

    #[test]
    fn unaligned_writes_keep_checksums_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        // A size that is not a multiple of the block.
        let b = base(d.path(), 5 * 4096 + 100);
        let ov = d.path().join("ov");
        let orig = fs::read(&b).unwrap();
        let mut want = orig.clone();
        {
            let mut disk = CowDisk::open(&b, &ov).unwrap();
            for (off, len, v) in [
                (100u64, 50usize, 1u8),
                (4000, 5000, 2),
                (4096, 4096, 3),
                (5 * 4096 + 10, 90, 4),
                (130, 10, 5),
            ] {
                disk.write_at(off, &vec![v; len]).unwrap();
                want[off as usize..off as usize + len].fill(v);
            }
            let mut all = vec![0u8; want.len()];
            disk.read_at(0, &mut all).unwrap();
            assert_eq!(all, want);
        }
        let disk = CowDisk::open(&b, &ov).unwrap();
        assert_eq!(disk.verify_all().unwrap(), 4);
        for (off, len) in [
            (0usize, want.len()),
            (99, 3),
            (4095, 2),
            (5 * 4096 + 50, 50),
        ] {
            let mut got = vec![0u8; len];
            disk.read_at(off as u64, &mut got).unwrap();
            assert_eq!(got, want[off..off + len], "{off}+{len}");
        }
    }

    #[test]
    fn a_flipped_overlay_byte_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path(), 64 * 1024);
        let ov = d.path().join("ov");
        {
            let mut disk = CowDisk::open(&b, &ov).unwrap();
            disk.write_at(0, &[7u8; 3 * 4096]).unwrap();
        }
        let f = File::options().read(true).write(true).open(&ov).unwrap();
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, 4096 + 17).unwrap();
        f.write_all_at(&[byte[0] ^ 0x20], 4096 + 17).unwrap();
        let mut disk = CowDisk::open(&b, &ov).unwrap();
        let is_corrupt_at = |e: Error, want: u64| match e {
            Error::Corrupt {
                offset, ref path, ..
            } if offset == want && path == &ov => {
                let m = e.to_string();
                assert!(m.contains("offset 4096") && m.contains("checksum"), "{m}");
            }
            e => panic!("expected corruption at {want}, got {e}"),
        };
        // Any read touching the block fails; others do not.
        let mut buf = [0u8; 10];
        is_corrupt_at(disk.read_at(4096 + 100, &mut buf).unwrap_err(), 4096);
        is_corrupt_at(disk.read_at(4090, &mut buf).unwrap_err(), 4096);
        disk.read_at(0, &mut buf).unwrap();
        disk.read_at(8192, &mut buf).unwrap();
        is_corrupt_at(disk.verify_all().unwrap_err(), 4096);
        // A partial write would merge with bad data: refused.
        is_corrupt_at(disk.write_at(4096 + 1, b"x").unwrap_err(), 4096);
        // A whole-block write replaces it.
        disk.write_at(4096, &[9u8; 4096]).unwrap();
        assert_eq!(disk.verify_all().unwrap(), 3);
    }

    #[test]
    fn an_old_version_map_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path(), 64 * 1024);
        let ov = d.path().join("ov");
        drop(CowDisk::open(&b, &ov).unwrap());
        // A version-1 map: header and words, no block checksums.
        let mut v1 = Vec::new();
        v1.extend_from_slice(MAGIC);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        v1.extend_from_slice(&(64u64 * 1024).to_le_bytes());
        v1.extend_from_slice(&1u64.to_le_bytes());
        v1.extend_from_slice(&1u64.to_le_bytes());
        let c = CRC64.checksum(&v1);
        v1.extend_from_slice(&c.to_le_bytes());
        fs::write(map_path(&ov), &v1).unwrap();
        let e = CowDisk::open(&b, &ov).unwrap_err().to_string();
        assert!(
            e.contains("version 1") && e.contains("without data checksums"),
            "{e}"
        );
        // A checksum missing from a version-2 map.
        let mut v2 = v1.clone();
        v2[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        let n = v2.len() - 8;
        v2.truncate(n);
        let c = CRC64.checksum(&v2);
        v2.extend_from_slice(&c.to_le_bytes());
        fs::write(map_path(&ov), &v2).unwrap();
        let e = CowDisk::open(&b, &ov).unwrap_err().to_string();
        assert!(e.contains("block checksums"), "{e}");
    }
}

#[cfg(test)]
mod fork_tests {
    use super::*;

    #[test]
    fn forks_of_one_layer_diverge_and_never_touch_it() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("base.img");
        fs::write(&b, vec![7u8; 64 * 1024]).unwrap();
        let ov = d.path().join("ov");
        let mut disk = CowDisk::open(&b, &ov).unwrap();
        disk.write_at(0, b"snapshot").unwrap();
        let snap = d.path().join("snap");
        fs::create_dir(&snap).unwrap();
        disk.save_into(&snap, "disk").unwrap();
        drop(disk);
        let layer = snap.join("disk");
        let layer_bytes = fs::read(&layer).unwrap();
        let layer_map = fs::read(map_path(&layer)).unwrap();

        let (a, c) = (d.path().join("a"), d.path().join("c"));
        let mut fa = CowDisk::fork(&b, &layer, &a).unwrap();
        let mut fc = CowDisk::fork(&b, &layer, &c).unwrap();
        let mut buf = [0u8; 8];
        for f in [&fa, &fc] {
            f.read_at(0, &mut buf).unwrap();
            assert_eq!(&buf, b"snapshot");
        }
        fa.write_at(0, b"clone--A").unwrap();
        fc.write_at(4096, b"clone--C").unwrap();
        fa.flush().unwrap();
        fc.flush().unwrap();
        fa.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"clone--A");
        fc.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"snapshot", "a fork saw its sibling's write");
        fc.read_at(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"clone--C");
        fa.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 8]);
        drop((fa, fc));
        assert_eq!(fs::read(&layer).unwrap(), layer_bytes, "layer data changed");
        assert_eq!(
            fs::read(map_path(&layer)).unwrap(),
            layer_map,
            "layer map changed"
        );
        // Reopened, each fork keeps its own writes.
        let ra = CowDisk::open_existing(&b, &a).unwrap();
        ra.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"clone--A");
        // A fork onto an existing path is refused; a missing layer is an
        // error naming it.
        assert!(CowDisk::fork(&b, &layer, &a).is_err());
        let e = CowDisk::fork(&b, &d.path().join("nope"), &d.path().join("x")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
