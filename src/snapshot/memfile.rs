//! The guest memory file: writing guest RAM to a sparse image and reading it
//! back eagerly.
//!
//! Guest RAM is described by [`MemRegion`]s: host mappings laid out back to
//! back in the file (region `i` starts where region `i - 1` ends). The file
//! has the full logical size; pages that were never touched or are all
//! zero are holes, and [`MemoryMeta::present`] records which pages hold
//! data. This module owns that layout, the metadata that describes it
//! ([`MemoryMeta`], embedded by the VMM in `state.bin`) and the bulk I/O;
//! lazy restore lives in [`super::uffd`].
//!
//! **Checksums**: every present page has a CRC32C ([`super::crc32c`]),
//! computed by the writer from guest memory right before the page is
//! written and stored in [`MemoryMeta::sums`] (so in `state.bin`, under its
//! CRC-64). Every reader verifies them before guest memory is used: the
//! eager reader per run it reads, the lazy loader per run before
//! `UFFDIO_COPY`, [`verify_file`] (for `snapshot info`) all of them. A hole
//! must read as zero: [`verify_holes`] checks that no page the metadata
//! calls a hole holds non-zero data in the file. A mismatch is
//! [`Error::ChecksumMismatch`] / [`Error::HoleNotZero`], naming the file and
//! the offset of the page.
//!
//! Residency is taken from `/proc/self/pagemap` (present or swapped), not
//! `mincore()`: `mincore` reports a swapped-out anonymous page as absent,
//! which would silently drop its contents from the snapshot. Either way,
//! untouched memory is never read, so it costs no page faults.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::bitmap::PageBitmap;

/// Page size used throughout the memory file.
pub const PAGE_SIZE: usize = 4096;
const PAGE_SHIFT: u32 = 12;
/// Pages whose residency is looked up per pagemap read.
const SCAN_CHUNK_PAGES: usize = 2048;

/// Errors from writing or reading the memory file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The write was abandoned through [`WriteOpts::cancel`].
    #[error("the memory write was abandoned")]
    Cancelled,
    /// Regions or metadata do not describe a valid layout.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
    /// The memory file's size disagrees with the metadata.
    #[error("memory file {file} is {actual} bytes, layout says {expected}")]
    SizeMismatch {
        /// The file.
        file: String,
        /// Its length.
        actual: u64,
        /// `MemoryMeta::total_bytes`.
        expected: u64,
    },
    /// The file ended before a present range.
    #[error("memory file {file} ended early: short read of {len} bytes at offset {offset}")]
    ShortRead {
        /// The file.
        file: String,
        /// Offset of the read.
        offset: u64,
        /// Bytes requested.
        len: usize,
    },
    /// A read, write or other file operation failed.
    #[error("{op} memory file {file} at offset {offset} ({len} bytes)")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        file: String,
        /// Offset in the file.
        offset: u64,
        /// Length of the operation.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A present page's content does not match its stored checksum.
    #[error("memory file {file}: checksum mismatch in the page at offset {offset:#x} ({offset}): stored CRC32C {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The file.
        file: String,
        /// Offset of the page in the file.
        offset: u64,
        /// Checksum in the snapshot's metadata.
        stored: u32,
        /// Checksum of the data read.
        computed: u32,
    },
    /// A page the metadata calls a hole holds non-zero data in the file.
    #[error("memory file {file}: the page at offset {offset:#x} ({offset}) is a hole in the snapshot's metadata but holds non-zero data")]
    HoleNotZero {
        /// The file.
        file: String,
        /// Offset of the page in the file.
        offset: u64,
    },
    /// Reading `/proc/self/pagemap` failed.
    #[error("reading /proc/self/pagemap for guest memory at {addr:#x}")]
    Pagemap {
        /// Host address being looked up.
        addr: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The file's path as the kernel knows it (for error messages).
pub(crate) fn file_name(file: &File) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .unwrap_or_else(|_| PathBuf::from(format!("<fd {}>", file.as_raw_fd())))
        .display()
        .to_string()
}

fn io_err<'a>(
    op: &'static str,
    file: &'a File,
    offset: u64,
    len: u64,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        file: file_name(file),
        offset,
        len,
        source,
    }
}

/// One guest RAM region: its host mapping and where it lives in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    host_addr: usize,
    len: usize,
    file_offset: u64,
}

impl MemRegion {
    /// Describes a region of `len` bytes mapped at `host_addr`, stored at
    /// `file_offset` in the memory file. All three must be multiples of
    /// [`PAGE_SIZE`] (checked by the functions that take regions).
    ///
    /// # Safety
    /// `host_addr..host_addr + len` must be a private anonymous mapping that
    /// stays mapped, readable and writable for as long as this value (or a
    /// copy) is used by this module, including the whole life of a
    /// [`LazyLoader`](super::uffd::LazyLoader) started with it. While
    /// [`write_memory`] or [`read_memory_eager`] runs, nothing else may
    /// write to it (the vCPUs are stopped); while a `LazyLoader` runs, the
    /// mapping must be fresh (no page touched before `start`).
    pub unsafe fn new(host_addr: *mut u8, len: usize, file_offset: u64) -> Self {
        MemRegion {
            host_addr: host_addr as usize,
            len,
            file_offset,
        }
    }

    /// Host address of the mapping.
    pub fn host_addr(&self) -> *mut u8 {
        self.host_addr as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the region is empty (never valid in a layout).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the region in the memory file.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    pub(crate) fn addr(&self) -> usize {
        self.host_addr
    }

    /// First page index (in file pages) of the region.
    pub(crate) fn first_page(&self) -> usize {
        (self.file_offset >> PAGE_SHIFT) as usize
    }

    /// Number of pages in the region.
    pub(crate) fn pages(&self) -> usize {
        self.len >> PAGE_SHIFT
    }
}

/// Checks that `regions` are page-aligned, non-empty and back to back from
/// offset 0; returns the total size in bytes.
pub fn check_layout(regions: &[MemRegion]) -> Result<u64> {
    let mut expect = 0u64;
    for (i, r) in regions.iter().enumerate() {
        let page = PAGE_SIZE as u64;
        if r.len == 0 || !r.len.is_multiple_of(PAGE_SIZE) || !r.host_addr.is_multiple_of(PAGE_SIZE)
        {
            return Err(Error::Layout(format!(
                "region {i} at host {:#x} with length {:#x} is empty or not page-aligned",
                r.host_addr, r.len
            )));
        }
        if r.file_offset != expect || !r.file_offset.is_multiple_of(page) {
            return Err(Error::Layout(format!(
                "region {i} is at file offset {:#x}, expected {expect:#x} (regions are back to back in order)",
                r.file_offset
            )));
        }
        expect = expect
            .checked_add(r.len as u64)
            .ok_or_else(|| Error::Layout("total size overflows".into()))?;
    }
    Ok(expect)
}

/// What the VMM stores in `state.bin` about guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMeta {
    /// Logical size of the memory file (sum of region lengths).
    pub total_bytes: u64,
    /// `(file_offset, len)` of each region, in file order.
    pub regions: Vec<(u64, u64)>,
    /// Pages stored in the file (everything else is a hole reading as zero).
    pub present: PageBitmap,
    /// Pages the guest touched recently (recorded by the VMM); prefetched
    /// first on lazy restore. Either covers all pages or is empty (none).
    pub working_set: PageBitmap,
    /// Bytes of data in the file (`present.count_ones() * PAGE_SIZE`).
    pub bytes_stored: u64,
    /// CRC32C of each present page, in file order (one per set bit of
    /// `present`).
    pub sums: Vec<u32>,
}

/// Finds a present page's checksum in [`MemoryMeta::sums`]: the number of
/// present pages before each bitmap word.
#[derive(Debug, Clone)]
pub(crate) struct SumIndex {
    rank: Vec<usize>,
}

impl SumIndex {
    pub(crate) fn new(present: &PageBitmap) -> SumIndex {
        let mut acc = 0;
        let rank = present
            .words()
            .iter()
            .map(|w| {
                let r = acc;
                acc += w.count_ones() as usize;
                r
            })
            .collect();
        SumIndex { rank }
    }

    /// Index in `sums` of page `p` (which must be present).
    pub(crate) fn index(&self, present: &PageBitmap, p: usize) -> usize {
        let w = present.words()[p / 64];
        self.rank[p / 64] + (w & ((1u64 << (p % 64)) - 1)).count_ones() as usize
    }
}

/// Checks the present pages `s..s + data.len() / PAGE_SIZE` (all present,
/// consecutive), held in `data`, against their checksums.
pub(crate) fn verify_run(
    file: &File,
    present: &PageBitmap,
    sums: &[u32],
    index: &SumIndex,
    s: usize,
    data: &[u8],
    scratch: &mut Vec<u32>,
) -> Result<()> {
    scratch.clear();
    super::crc32c::pages_into(data, scratch);
    let first = index.index(present, s);
    let want = sums.get(first..first + scratch.len()).ok_or_else(|| {
        Error::Layout(format!(
            "checksums end before page {} ({} stored)",
            s + scratch.len(),
            sums.len()
        ))
    })?;
    for (i, (&got, &stored)) in scratch.iter().zip(want).enumerate() {
        if got != stored {
            return Err(Error::ChecksumMismatch {
                file: file_name(file),
                offset: ((s + i) as u64) << PAGE_SHIFT,
                stored,
                computed: got,
            });
        }
    }
    Ok(())
}

/// Checks that every page `meta` calls a hole reads as zero in `file`.
/// Only the file's data extents (`SEEK_DATA`/`SEEK_HOLE`) are read, so for
/// a sparse file as the writer makes it this costs a few `lseek`s; a copy
/// that filled the holes in is read in full. Returns the hole pages read.
pub fn verify_holes(file: &File, meta: &MemoryMeta) -> Result<u64> {
    let fd = file.as_raw_fd();
    let total = meta.total_bytes;
    let mut off = 0u64;
    let mut buf = vec![0u8; 64 * PAGE_SIZE];
    let mut checked = 0;
    while off < total {
        // SAFETY: lseek on our own descriptor; no memory is passed.
        let d = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        let (d, h) = if d < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // no data after `off`
                // No SEEK_DATA on this filesystem: treat the rest as data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => (off as i64, total as i64),
                _ => return Err(io_err("seeking data in", file, off, 0)(e)),
            }
        } else {
            // SAFETY: as above.
            let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
            if h < 0 {
                return Err(io_err("seeking a hole in", file, d as u64, 0)(
                    std::io::Error::last_os_error(),
                ));
            }
            (d, h)
        };
        let (d, h) = ((d as u64).min(total), (h as u64).min(total));
        let (p0, p1) = ((d >> PAGE_SHIFT) as usize, (h as usize).div_ceil(PAGE_SIZE));
        let mut p = p0;
        while p < p1 {
            if meta.present.get(p) {
                p += 1;
                continue;
            }
            // A run of hole pages inside a data extent: must be zero.
            let mut e = p + 1;
            while e < p1 && !meta.present.get(e) && e - p < 64 {
                e += 1;
            }
            let b = &mut buf[..(e - p) * PAGE_SIZE];
            read_exact_at(file, b, (p as u64) << PAGE_SHIFT)?;
            for (i, pg) in b.chunks_exact(PAGE_SIZE).enumerate() {
                if pg.iter().any(|&x| x != 0) {
                    return Err(Error::HoleNotZero {
                        file: file_name(file),
                        offset: ((p + i) as u64) << PAGE_SHIFT,
                    });
                }
            }
            checked += (e - p) as u64;
            p = e;
        }
        off = h.max(d + 1);
    }
    Ok(checked)
}

/// Verifies a whole memory file against `meta`: its length, every present
/// page's checksum and that holes are zero. Returns the pages checked.
pub fn verify_file(file: &File, meta: &MemoryMeta) -> Result<u64> {
    meta.validate()?;
    meta.check_file(file)?;
    let index = SumIndex::new(&meta.present);
    let mut buf = vec![0u8; 1 << 20];
    let mut scratch = Vec::new();
    let mut n = 0;
    for (s, e) in meta.present.iter_runs() {
        let mut a = s;
        while a < e {
            let b = (a + buf.len() / PAGE_SIZE).min(e);
            let data = &mut buf[..(b - a) * PAGE_SIZE];
            read_exact_at(file, data, (a as u64) << PAGE_SHIFT)?;
            verify_run(
                file,
                &meta.present,
                &meta.sums,
                &index,
                a,
                data,
                &mut scratch,
            )?;
            n += (b - a) as u64;
            a = b;
        }
    }
    verify_holes(file, meta)?;
    Ok(n)
}

impl MemoryMeta {
    /// Builds the metadata for `regions` from a write report's `present`
    /// bitmap and the VMM's working set (an empty bitmap means none).
    pub fn new(
        regions: &[MemRegion],
        present: PageBitmap,
        sums: Vec<u32>,
        working_set: PageBitmap,
    ) -> Result<Self> {
        let total_bytes = check_layout(regions)?;
        let meta = MemoryMeta {
            total_bytes,
            regions: regions
                .iter()
                .map(|r| (r.file_offset, r.len as u64))
                .collect(),
            bytes_stored: (present.count_ones() * PAGE_SIZE) as u64,
            present,
            working_set,
            sums,
        };
        meta.validate()?;
        Ok(meta)
    }

    /// Number of pages in the layout.
    pub fn total_pages(&self) -> usize {
        (self.total_bytes >> PAGE_SHIFT) as usize
    }

    /// Checks internal consistency (for metadata read from a snapshot).
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::Layout(s));
        if !self.total_bytes.is_multiple_of(PAGE_SIZE as u64) {
            return bad(format!(
                "total size {:#x} is not page-aligned",
                self.total_bytes
            ));
        }
        let mut expect = 0u64;
        for (i, &(off, len)) in self.regions.iter().enumerate() {
            if off != expect || len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
                return bad(format!(
                    "region {i} ({off:#x}, {len:#x}) is empty, unaligned or not back to back"
                ));
            }
            expect = match expect.checked_add(len) {
                Some(e) => e,
                None => return bad("region sizes overflow".into()),
            };
        }
        if expect != self.total_bytes {
            return bad(format!(
                "regions cover {expect} bytes, total says {}",
                self.total_bytes
            ));
        }
        let pages = self.total_bytes >> PAGE_SHIFT;
        if self.present.len() as u64 != pages {
            return bad(format!(
                "present bitmap covers {} pages, layout has {pages}",
                self.present.len()
            ));
        }
        if !self.working_set.is_empty() && self.working_set.len() as u64 != pages {
            return bad(format!(
                "working-set bitmap covers {} pages, layout has {pages}",
                self.working_set.len()
            ));
        }
        if self.bytes_stored != (self.present.count_ones() * PAGE_SIZE) as u64 {
            return bad(format!(
                "bytes_stored {} disagrees with {} present pages",
                self.bytes_stored,
                self.present.count_ones()
            ));
        }
        if self.sums.len() != self.present.count_ones() {
            return bad(format!(
                "{} page checksums for {} present pages",
                self.sums.len(),
                self.present.count_ones()
            ));
        }
        Ok(())
    }

    /// Checks that `regions` have the layout this metadata describes.
    pub fn check_regions(&self, regions: &[MemRegion]) -> Result<()> {
        self.validate()?;
        check_layout(regions)?;
        let given: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.file_offset, r.len as u64))
            .collect();
        if given != self.regions {
            return Err(Error::Layout(format!(
                "regions {given:x?} differ from the snapshot's {:x?}",
                self.regions
            )));
        }
        Ok(())
    }

    /// Checks that `file` has the length this metadata describes.
    pub fn check_file(&self, file: &File) -> Result<()> {
        let actual = file.metadata().map_err(io_err("stat", file, 0, 0))?.len();
        if actual != self.total_bytes {
            return Err(Error::SizeMismatch {
                file: file_name(file),
                actual,
                expected: self.total_bytes,
            });
        }
        Ok(())
    }
}

/// Options for [`write_memory`].
#[derive(Debug, Clone)]
pub struct WriteOpts {
    /// Worker threads; 0 means the number of available cores.
    pub threads: usize,
    /// fsync the file before returning.
    pub fsync: bool,
    /// Largest single `pwrite` (runs of data pages are coalesced up to this).
    pub max_write: usize,
    /// Compute each present page's CRC32C (needed for a snapshot; off only
    /// to measure what the checksums cost).
    pub checksums: bool,
    /// Once set, the write stops at its next chunk with
    /// [`Error::Cancelled`] (an asynchronous pause resumed from memory).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Incremental (a child layer, see [`super::layers`]): write only the
    /// pages written since write tracking began ([`super::dirty`]), where
    /// the bitmap holds the pages the parent layers store. A written page
    /// that is all zero is stored when a parent has it (it must override
    /// the parent's page), else left a hole.
    pub incremental: Option<std::sync::Arc<PageBitmap>>,
}

impl Default for WriteOpts {
    fn default() -> Self {
        WriteOpts {
            threads: 0,
            fsync: false,
            max_write: 4 << 20,
            checksums: true,
            cancel: None,
            incremental: None,
        }
    }
}

/// What [`write_memory`] did.
#[derive(Debug, Clone)]
pub struct MemWriteReport {
    /// Pages stored in the file (non-holes).
    pub present: PageBitmap,
    /// Bytes written (`present.count_ones() * PAGE_SIZE`).
    pub bytes_written: u64,
    /// CRC32C of each present page in file order (empty if
    /// `WriteOpts::checksums` was off).
    pub sums: Vec<u32>,
    /// Time spent computing checksums, summed over threads.
    pub hash_time: Duration,
    /// Pages in the layout.
    pub pages_scanned: u64,
    /// Pages resident (present or swapped) in the mappings.
    pub pages_resident: u64,
    /// Resident pages that were all zero (stored as holes).
    pub pages_zero: u64,
    /// Time spent on residency lookup and zero detection, summed over threads.
    pub scan_time: Duration,
    /// Time spent in `pwrite`, summed over threads.
    pub write_time: Duration,
    /// Time spent in fsync.
    pub fsync_time: Duration,
    /// Wall-clock time of the whole call.
    pub elapsed: Duration,
    /// Threads used.
    pub threads: usize,
}

fn default_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// True if the page at `p` is all zero.
///
/// # Safety
/// `p` must be page-aligned and valid for reading `PAGE_SIZE` bytes.
unsafe fn is_zero_page(p: *const u8) -> bool {
    // SAFETY: the caller guarantees a readable, page-aligned page, so it is
    // valid and aligned as 512 u64 words.
    let words = unsafe { std::slice::from_raw_parts(p as *const u64, PAGE_SIZE / 8) };
    // 64-byte groups OR-reduce branch-free (vectorises); early-out per group.
    words
        .chunks_exact(8)
        .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

/// Per-thread result of the writer.
#[derive(Default)]
struct SliceResult {
    words: Vec<u64>,
    sums: Vec<u32>,
    hash: Duration,
    bytes: u64,
    resident: u64,
    zero: u64,
    scan: Duration,
    write: Duration,
}

/// Writes guest memory to `file` as a sparse image of the full logical size.
///
/// The file is truncated to zero and extended to the total size, so every
/// page that is not written is a hole. Per chunk of pages, residency is
/// looked up in `/proc/self/pagemap`; non-resident pages are skipped without
/// touching them, resident pages are checked for zero, and runs of non-zero
/// pages are written with one `pwrite` each (up to `opts.max_write`). The
/// file's pages are split into `opts.threads` contiguous slices.
///
/// Pages that are registered with a running
/// [`LazyLoader`](super::uffd::LazyLoader) but not yet filled read as not
/// resident: wait for `wait_complete` before pausing a lazily-restored VM.
pub fn write_memory(
    file: &File,
    regions: &[MemRegion],
    opts: &WriteOpts,
) -> Result<MemWriteReport> {
    let start = Instant::now();
    let total = check_layout(regions)?;
    let total_pages = (total >> PAGE_SHIFT) as usize;
    file.set_len(0).map_err(io_err("truncating", file, 0, 0))?;
    file.set_len(total)
        .map_err(io_err("setting the length of", file, 0, total))?;

    let pagemap = File::open("/proc/self/pagemap").map_err(|source| Error::Pagemap {
        addr: regions.first().map_or(0, |r| r.host_addr),
        source,
    })?;
    let max_write_pages = (opts.max_write / PAGE_SIZE).max(1);
    // Slices are whole bitmap words so each thread owns its words.
    let threads = default_threads(opts.threads)
        .min(total_pages.div_ceil(64 * 256).max(1))
        .max(1);
    let words_total = total_pages.div_ceil(64);
    let words_per = words_total.div_ceil(threads);
    let mut bounds: Vec<(usize, usize)> = (0..threads)
        .map(|t| {
            (
                (t * words_per * 64).min(total_pages),
                ((t + 1) * words_per * 64).min(total_pages),
            )
        })
        .collect();
    if opts.incremental.is_some() && threads > 1 {
        bounds = dirty_balanced_slices(&pagemap, regions, total_pages, threads)?;
    }
    let results: Vec<Result<SliceResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = bounds
            .iter()
            .map(|&(p0, p1)| {
                let pagemap = &pagemap;
                let checksums = opts.checksums;
                let cancel = opts.cancel.as_deref();
                let base = opts.incremental.as_deref();
                s.spawn(move || {
                    let slice = Slice {
                        p0,
                        p1,
                        max_write_pages,
                        checksums,
                        cancel,
                        base,
                    };
                    write_slice(file, pagemap, regions, slice)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("memory writer thread panicked"))
            .collect()
    });

    let mut words = Vec::with_capacity(words_total);
    let mut report = MemWriteReport {
        present: PageBitmap::default(),
        bytes_written: 0,
        sums: Vec::new(),
        hash_time: Duration::ZERO,
        pages_scanned: total_pages as u64,
        pages_resident: 0,
        pages_zero: 0,
        scan_time: Duration::ZERO,
        write_time: Duration::ZERO,
        fsync_time: Duration::ZERO,
        elapsed: Duration::ZERO,
        threads,
    };
    for r in results {
        let r = r?;
        words.extend_from_slice(&r.words);
        report.sums.extend_from_slice(&r.sums);
        report.hash_time += r.hash;
        report.bytes_written += r.bytes;
        report.pages_resident += r.resident;
        report.pages_zero += r.zero;
        report.scan_time += r.scan;
        report.write_time += r.write;
    }
    words.resize(words_total, 0);
    report.present = PageBitmap::from_words(total_pages, words).expect("word count matches");
    if opts.fsync {
        let t = Instant::now();
        file.sync_all()
            .map_err(io_err("fsyncing", file, 0, total))?;
        report.fsync_time = t.elapsed();
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Incremental writes: slices of whole bitmap words, back to back, each
/// holding about the same number of dirty pages (they cluster where the
/// guest worked, so equal address ranges would leave one thread with all
/// the writing). One extra pass over the pagemap (13 ms for 1 GiB here).
fn dirty_balanced_slices(
    pagemap: &File,
    regions: &[MemRegion],
    total_pages: usize,
    threads: usize,
) -> Result<Vec<(usize, usize)>> {
    let words = total_pages.div_ceil(64);
    let mut per_word = vec![0u32; words];
    let mut entries = vec![0u64; SCAN_CHUNK_PAGES];
    for r in regions {
        let mut page = r.first_page();
        let end = r.first_page() + r.pages();
        while page < end {
            let n = (end - page).min(SCAN_CHUNK_PAGES);
            let addr = r.host_addr + ((page - r.first_page()) << PAGE_SHIFT);
            read_pagemap(pagemap, addr, &mut entries[..n])?;
            for (i, &e) in entries[..n].iter().enumerate() {
                if super::dirty::entry_is_dirty(e) {
                    per_word[(page + i) / 64] += 1;
                }
            }
            page += n;
        }
    }
    let total: u64 = per_word.iter().map(|&c| c as u64).sum();
    let mut out = Vec::with_capacity(threads);
    let (mut start, mut acc) = (0usize, 0u64);
    for (w, &c) in per_word.iter().enumerate() {
        acc += c as u64;
        let k = out.len() as u64 + 1;
        if out.len() + 1 < threads && acc * threads as u64 >= total * k {
            let p1 = ((w + 1) * 64).min(total_pages);
            out.push((start, p1));
            start = p1;
        }
    }
    out.push((start, total_pages));
    Ok(out)
}

/// Writes file pages `p0..p1` (global page indices) and returns their
/// bitmap words (`p0` is a multiple of 64).
/// One writer thread's part of [`write_memory`].
struct Slice<'a> {
    p0: usize,
    p1: usize,
    max_write_pages: usize,
    checksums: bool,
    cancel: Option<&'a std::sync::atomic::AtomicBool>,
    /// Incremental: the parent layers' pages (see [`WriteOpts::incremental`]).
    base: Option<&'a PageBitmap>,
}

fn write_slice(
    file: &File,
    pagemap: &File,
    regions: &[MemRegion],
    slice: Slice<'_>,
) -> Result<SliceResult> {
    let Slice {
        p0,
        p1,
        max_write_pages,
        checksums,
        cancel,
        base,
    } = slice;
    let mut res = SliceResult {
        words: vec![0; (p1 - p0).div_ceil(64)],
        ..Default::default()
    };
    let mut entries = vec![0u64; SCAN_CHUNK_PAGES];
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for r in regions {
        let (rp0, rp1) = (r.first_page(), r.first_page() + r.pages());
        let (lo, hi) = (rp0.max(p0), rp1.min(p1));
        if lo >= hi {
            continue;
        }
        // Open run of data pages (global indices), flushed when it ends.
        let mut run: Option<(usize, usize)> = None;
        let mut page = lo;
        while page < hi {
            if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire)) {
                return Err(Error::Cancelled);
            }
            let n = (hi - page).min(SCAN_CHUNK_PAGES);
            let t = Instant::now();
            let addr = r.host_addr + ((page - rp0) << PAGE_SHIFT);
            read_pagemap(pagemap, addr, &mut entries[..n])?;
            runs.clear();
            for (i, &e) in entries[..n].iter().enumerate() {
                // Bit 63: present in RAM; bit 62: swapped out.
                if e & (3 << 62) == 0 {
                    continue;
                }
                if base.is_some() && !super::dirty::entry_is_dirty(e) {
                    continue;
                }
                res.resident += 1;
                let gp = page + i;
                // SAFETY: the page lies inside region `r`, which the
                // MemRegion contract makes readable and unaliased by writers
                // for the duration of this call; it is resident, so reading
                // it does not allocate.
                if unsafe { is_zero_page((addr + (i << PAGE_SHIFT)) as *const u8) }
                    && !base.is_some_and(|b| b.get(gp))
                {
                    res.zero += 1;
                    continue;
                }
                let local = gp - p0;
                res.words[local / 64] |= 1 << (local % 64);
                match run {
                    Some((s, e)) if e == gp && e - s < max_write_pages => run = Some((s, e + 1)),
                    _ => {
                        if let Some(done) = run.replace((gp, gp + 1)) {
                            runs.push(done);
                        }
                    }
                }
            }
            res.scan += t.elapsed();
            write_batch(file, r, &runs, checksums, &mut res)?;
            page += n;
        }
        if let Some(last) = run {
            write_batch(file, r, &[last], checksums, &mut res)?;
        }
    }
    Ok(res)
}

/// Batches at least this many pages are hashed on a helper thread while
/// they are written (smaller ones inline: a thread costs more).
const PARALLEL_HASH_PAGES: usize = 256;

/// Writes `runs` (global pages, in file order, inside region `r`) and
/// appends their checksums to `res.sums` in the same order. The checksums
/// are computed by a helper thread *while* this thread writes (an O_DIRECT
/// `pwrite` waits for the disk with the CPU idle), so hashing does not
/// slow the pause below the disk's rate.
fn write_batch(
    file: &File,
    r: &MemRegion,
    runs: &[(usize, usize)],
    checksums: bool,
    res: &mut SliceResult,
) -> Result<()> {
    let pages: usize = runs.iter().map(|&(s, e)| e - s).sum();
    if pages == 0 {
        return Ok(());
    }
    let hash_runs = move || {
        let t = Instant::now();
        let mut sums = Vec::with_capacity(pages);
        for &(s, e) in runs {
            super::crc32c::pages_into(run_bytes(r, s, e), &mut sums);
        }
        (sums, t.elapsed())
    };
    let write_runs = |res: &mut SliceResult| -> Result<()> {
        let t = Instant::now();
        for &(s, e) in runs {
            res.bytes += write_run(file, r, s, e)?;
        }
        res.write += t.elapsed();
        Ok(())
    };
    let (sums, hash) = if !checksums {
        write_runs(res)?;
        (Vec::new(), Duration::ZERO)
    } else if pages < PARALLEL_HASH_PAGES {
        let h = hash_runs();
        write_runs(res)?;
        h
    } else {
        std::thread::scope(|sc| -> Result<(Vec<u32>, Duration)> {
            let h = sc.spawn(hash_runs);
            let w = write_runs(res);
            let h = h.join().expect("checksum thread panicked");
            w.map(|()| h)
        })?
    };
    res.sums.extend_from_slice(&sums);
    res.hash += hash;
    Ok(())
}

/// The bytes of global pages `s..e` of region `r`.
fn run_bytes(r: &MemRegion, s: usize, e: usize) -> &[u8] {
    let addr = r.host_addr + ((s - r.first_page()) << PAGE_SHIFT);
    // SAFETY: pages s..e are inside region `r`, readable per the MemRegion
    // contract and not written while the writer runs (only read, by the
    // writer and the checksum thread).
    unsafe { std::slice::from_raw_parts(addr as *const u8, (e - s) << PAGE_SHIFT) }
}

/// Writes global pages `s..e` of region `r` to the file.
fn write_run(file: &File, r: &MemRegion, s: usize, e: usize) -> Result<u64> {
    let off = (s as u64) << PAGE_SHIFT;
    let buf = run_bytes(r, s, e);
    file.write_all_at(buf, off)
        .map_err(io_err("writing", file, off, buf.len() as u64))?;
    Ok(buf.len() as u64)
}

/// Reads the pagemap entries of `out.len()` pages starting at `addr`.
fn read_pagemap(pagemap: &File, addr: usize, out: &mut [u64]) -> Result<()> {
    let off = ((addr >> PAGE_SHIFT) * 8) as u64;
    // SAFETY: `out` is a valid, initialised u64 slice; viewing it as bytes of
    // the same total size is sound (u64 has no invalid bit patterns).
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out.len() * 8) };
    pagemap
        .read_exact_at(bytes, off)
        .map_err(|source| Error::Pagemap { addr, source })
}

/// Options for [`read_memory_eager`].
#[derive(Debug, Clone)]
pub struct ReadOpts {
    /// Worker threads; 0 means the number of available cores.
    pub threads: usize,
    /// Largest single `pread`.
    pub max_read: usize,
}

impl Default for ReadOpts {
    fn default() -> Self {
        ReadOpts {
            threads: 0,
            max_read: 4 << 20,
        }
    }
}

/// What [`read_memory_eager`] did.
#[derive(Debug, Clone)]
pub struct MemReadReport {
    /// Bytes read into guest memory.
    pub bytes_read: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// Threads used.
    pub threads: usize,
}

/// Splits the present pages of `meta` into runs `(start, end)` (global page
/// indices) that stay inside one region and are at most `max_pages` long.
pub(crate) fn present_runs(
    present: &PageBitmap,
    regions: &[MemRegion],
    max_pages: usize,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for r in regions {
        let (rp0, rp1) = (r.first_page(), r.first_page() + r.pages());
        let mut p = rp0;
        while let Some(s) = present.next_one(p) {
            if s >= rp1 {
                break;
            }
            let e = present.next_zero(s).min(rp1);
            let mut a = s;
            while a < e {
                let b = (a + max_pages).min(e);
                out.push((a, b));
                a = b;
            }
            p = e;
        }
    }
    out
}

/// Restores guest memory by reading every present range of `file` into the
/// mappings with large `pread`s, verifying each run's page checksums right
/// after it is read; holes are left untouched (fresh anonymous memory reads
/// as zero) after [`verify_holes`]. Checks the regions against `meta` and
/// the file's length against `meta.total_bytes` first.
pub fn read_memory_eager(
    file: &File,
    regions: &[MemRegion],
    meta: &MemoryMeta,
    opts: &ReadOpts,
) -> Result<MemReadReport> {
    let start = Instant::now();
    meta.check_regions(regions)?;
    meta.check_file(file)?;
    verify_holes(file, meta)?;
    let index = SumIndex::new(&meta.present);
    let runs = present_runs(&meta.present, regions, (opts.max_read / PAGE_SIZE).max(1));
    let total_pages: usize = runs.iter().map(|&(s, e)| e - s).sum();
    let threads = default_threads(opts.threads)
        .min(total_pages.div_ceil(256).max(1))
        .max(1);
    // Contiguous groups of runs of roughly equal byte count per thread.
    let per = total_pages.div_ceil(threads).max(1);
    let mut groups: Vec<&[(usize, usize)]> = Vec::with_capacity(threads);
    let (mut gs, mut acc) = (0, 0);
    for (i, &(s, e)) in runs.iter().enumerate() {
        acc += e - s;
        if acc >= per {
            groups.push(&runs[gs..=i]);
            gs = i + 1;
            acc = 0;
        }
    }
    if gs < runs.len() {
        groups.push(&runs[gs..]);
    }
    let results: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|g| {
                let index = &index;
                s.spawn(move || read_runs(file, regions, meta, index, g))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("memory reader thread panicked"))
            .collect()
    });
    let mut bytes_read = 0;
    for r in results {
        bytes_read += r?;
    }
    Ok(MemReadReport {
        bytes_read,
        elapsed: start.elapsed(),
        threads: groups.len(),
    })
}

/// Finds the region holding global page `page`.
pub(crate) fn region_of(regions: &[MemRegion], page: usize) -> Option<&MemRegion> {
    regions
        .iter()
        .find(|r| page >= r.first_page() && page < r.first_page() + r.pages())
}

fn read_runs(
    file: &File,
    regions: &[MemRegion],
    meta: &MemoryMeta,
    index: &SumIndex,
    runs: &[(usize, usize)],
) -> Result<u64> {
    let mut n = 0;
    let mut scratch = Vec::new();
    for &(s, e) in runs {
        let r = region_of(regions, s).expect("runs come from the regions");
        let off = (s as u64) << PAGE_SHIFT;
        let len = (e - s) << PAGE_SHIFT;
        let addr = r.host_addr + ((s - r.first_page()) << PAGE_SHIFT);
        // SAFETY: pages s..e lie inside region `r`, writable per the
        // MemRegion contract, and nothing else accesses them during restore.
        let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
        read_exact_at(file, buf, off)?;
        // Verified while the run is still in the cache; on a mismatch the
        // restore fails before any vCPU exists.
        verify_run(file, &meta.present, &meta.sums, index, s, buf, &mut scratch)?;
        n += len as u64;
    }
    Ok(n)
}

/// `read_exact_at` with a short read reported as [`Error::ShortRead`].
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                return Err(Error::ShortRead {
                    file: file_name(file),
                    offset: off,
                    len: buf.len(),
                })
            }
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading", file, off, buf.len() as u64)(e)),
        }
    }
    Ok(())
}

/// Result of [`write_rate_probe`].
#[derive(Debug, Clone)]
pub struct WriteProbe {
    /// The report of the measured [`write_memory`] call.
    pub report: MemWriteReport,
    /// `bytes_written / elapsed` in GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
    /// Raw rate in the same run: one thread writing the same data to a new
    /// file with 4 MiB `pwrite`s (what `dd` measures).
    pub raw_gb_per_s: f64,
}

/// Measures [`write_memory`] on `bytes` of fully touched, non-zero memory
/// written to a new file in `dir`, next to a raw sequential write of the
/// same bytes. For `stasis bench`.
pub fn write_rate_probe(
    bytes: usize,
    dir: &std::path::Path,
    opts: &WriteOpts,
) -> Result<WriteProbe> {
    let bytes = bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let map_err = |source| Error::Io {
        op: "mapping probe memory for",
        file: dir.display().to_string(),
        offset: 0,
        len: bytes as u64,
        source,
    };
    let m = AnonMapping::new(bytes).map_err(map_err)?;
    for p in 0..bytes / PAGE_SIZE {
        // SAFETY: in-bounds writes to our own fresh mapping.
        unsafe {
            std::ptr::write_bytes(m.addr().add(p * PAGE_SIZE), (p % 251 + 1) as u8, PAGE_SIZE)
        };
    }
    let new_file = |name: &str| {
        let path = dir.join(format!("stasis-write-probe-{}-{name}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| Error::Io {
                op: "creating",
                file: path.display().to_string(),
                offset: 0,
                len: 0,
                source,
            });
        let _ = std::fs::remove_file(&path);
        f
    };
    // Raw sequential write first, so both see the same page-cache state.
    let raw = new_file("raw")?;
    let t = Instant::now();
    let chunk = 4 << 20;
    let mut off = 0;
    while off < bytes {
        let n = chunk.min(bytes - off);
        // SAFETY: in-bounds read of our own mapping, not written meanwhile.
        let buf = unsafe { std::slice::from_raw_parts(m.addr().add(off), n) };
        raw.write_all_at(buf, off as u64)
            .map_err(io_err("writing", &raw, off as u64, n as u64))?;
        off += n;
    }
    let raw_gb_per_s = bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    drop(raw);
    let f = new_file("mem")?;
    let report = write_memory(&f, &[m.region(0)], opts)?;
    let gb_per_s = report.bytes_written as f64 / report.elapsed.as_secs_f64() / 1e9;
    Ok(WriteProbe {
        report,
        gb_per_s,
        raw_gb_per_s,
    })
}

/// Writes `bytes` of fully touched, non-zero memory to a new file in `dir`
/// the way a pause does (O_DIRECT where the filesystem allows it, fsync),
/// with or without the per-page checksums; returns the call's report. For
/// `stasis bench`, to measure what the checksums cost a pause.
pub fn pause_write_probe(
    bytes: usize,
    dir: &std::path::Path,
    checksums: bool,
) -> Result<MemWriteReport> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = bytes.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
    let path = dir.join(format!("stasis-pause-probe-{}", std::process::id()));
    let err = |op| {
        let file = path.display().to_string();
        move |source| Error::Io {
            op,
            file,
            offset: 0,
            len: bytes as u64,
            source,
        }
    };
    let m = AnonMapping::new(bytes).map_err(err("mapping probe memory for"))?;
    for p in 0..bytes / PAGE_SIZE {
        // SAFETY: in-bounds writes to our own fresh mapping.
        unsafe {
            std::ptr::write_bytes(m.addr().add(p * PAGE_SIZE), (p % 251 + 1) as u8, PAGE_SIZE)
        };
    }
    let open = |direct: bool| {
        let mut o = File::options();
        o.read(true).write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&path)
    };
    let f = open(true)
        .or_else(|_| open(false))
        .map_err(err("creating"))?;
    let _ = std::fs::remove_file(&path);
    write_memory(
        &f,
        &[m.region(0)],
        &WriteOpts {
            fsync: true,
            checksums,
            ..WriteOpts::default()
        },
    )
}

/// An anonymous private mapping, unmapped on drop (tests and probes).
#[derive(Debug)]
pub struct AnonMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it has no thread
// affinity, and access synchronisation is the user's responsibility as with
// any raw pointer.
unsafe impl Send for AnonMapping {}
// SAFETY: as above; `&AnonMapping` only hands out the raw address.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`.
    pub fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address; no
        // existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(AnonMapping {
            addr: addr as *mut u8,
            len,
        })
    }

    /// Start address.
    pub fn addr(&self) -> *mut u8 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A region covering the whole mapping at `file_offset`.
    pub fn region(&self, file_offset: u64) -> MemRegion {
        // SAFETY: the mapping is private anonymous and lives as long as
        // `self`; callers that use the region keep `self` alive.
        unsafe { MemRegion::new(self.addr, self.len, file_offset) }
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which no one
        // references after drop.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Deterministic non-zero content for page `p`.
    fn fill_page(buf: &mut [u8], p: usize) {
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&((p as u64) << 32 | i as u64 | 1).to_le_bytes());
        }
    }

    /// Page kinds by index: 0 untouched, 1 written zero, 2 data.
    fn kind(p: usize) -> u8 {
        match p % 7 {
            0 | 3 => 0,
            5 => 1,
            _ => ((p / 1000) % 2 + 1) as u8,
        }
    }

    fn data_extents(f: &File, len: u64) -> u64 {
        let fd = f.as_raw_fd();
        let mut off = 0i64;
        let mut data = 0u64;
        loop {
            // SAFETY: lseek on a valid fd has no memory effects.
            let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
            if d < 0 {
                break;
            }
            // SAFETY: as above.
            let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
            data += (h - d) as u64;
            off = h;
            if off as u64 >= len {
                break;
            }
        }
        data
    }

    /// Same as the bytes in `m` at `off`.
    fn mapping_bytes(m: &AnonMapping, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= m.len());
        // SAFETY: in-bounds read of a live mapping used by one test thread.
        unsafe { std::slice::from_raw_parts(m.addr().add(off), len) }
    }

    #[test]
    fn sparse_write_and_eager_read_round_trip() {
        let len = 64 * MIB;
        let pages = len / PAGE_SIZE;
        let (a, b) = (
            AnonMapping::new(len / 4).unwrap(),
            AnonMapping::new(len - len / 4).unwrap(),
        );
        let regions = [a.region(0), b.region((len / 4) as u64)];
        let mut expect_present = PageBitmap::new(pages);
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            let r = region_of(&regions, p).unwrap();
            let addr = r.host_addr + ((p - r.first_page()) << PAGE_SHIFT);
            match kind(p) {
                0 => {}
                1 => {
                    // SAFETY: in-bounds write to the test's own mapping.
                    unsafe { std::ptr::write_bytes(addr as *mut u8, 0, PAGE_SIZE) };
                }
                _ => {
                    fill_page(&mut page, p);
                    // SAFETY: as above.
                    unsafe {
                        std::ptr::copy_nonoverlapping(page.as_ptr(), addr as *mut u8, PAGE_SIZE)
                    };
                    expect_present.set(p);
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut sums: Option<Vec<u32>> = None;
        for threads in [1, 2, 3] {
            let rep = write_memory(
                &f,
                &regions,
                &WriteOpts {
                    threads,
                    fsync: true,
                    max_write: 256 * 1024,
                    ..WriteOpts::default()
                },
            )
            .unwrap();
            assert_eq!(rep.present, expect_present);
            // Checksums do not depend on how the work was split.
            assert_eq!(sums.get_or_insert_with(|| rep.sums.clone()), &rep.sums);
            let data_pages = expect_present.count_ones() as u64;
            assert_eq!(rep.bytes_written, data_pages * PAGE_SIZE as u64);
            assert_eq!(rep.pages_scanned, pages as u64);
            let zero_pages = (0..pages).filter(|&p| kind(p) == 1).count() as u64;
            assert!(rep.pages_zero >= zero_pages);
            assert_eq!(rep.pages_resident - rep.pages_zero, data_pages);
            assert_eq!(f.metadata().unwrap().len(), len as u64);
            assert_eq!(data_extents(&f, len as u64), data_pages * PAGE_SIZE as u64);
        }

        let rep = write_memory(&f, &regions, &WriteOpts::default()).unwrap();
        assert_eq!(rep.sums.len(), expect_present.count_ones());
        let meta = MemoryMeta::new(
            &regions,
            expect_present.clone(),
            rep.sums,
            PageBitmap::new(0),
        )
        .unwrap();
        assert_eq!(
            verify_file(&f, &meta).unwrap(),
            meta.present.count_ones() as u64
        );
        let (c, d) = (
            AnonMapping::new(len / 4).unwrap(),
            AnonMapping::new(len - len / 4).unwrap(),
        );
        let regions2 = [c.region(0), d.region((len / 4) as u64)];
        let rep = read_memory_eager(&f, &regions2, &meta, &ReadOpts::default()).unwrap();
        assert_eq!(rep.bytes_read, meta.bytes_stored);
        assert_eq!(mapping_bytes(&a, 0, a.len()), mapping_bytes(&c, 0, c.len()));
        assert_eq!(mapping_bytes(&b, 0, b.len()), mapping_bytes(&d, 0, d.len()));
    }

    #[test]
    fn huge_sparse_mapping_writes_only_touched() {
        let len = 4usize << 30;
        let m = AnonMapping::new(len).unwrap();
        let touched = 16 * MIB;
        // Touch 16 MiB spread over 4 places.
        for part in 0..4 {
            let off = part * (len / 4) + 12345 * PAGE_SIZE;
            // SAFETY: in-bounds write to the test's own mapping.
            unsafe { std::ptr::write_bytes(m.addr().add(off), 0xa5, touched / 4) };
        }
        let f = tempfile::tempfile().unwrap();
        let rep = write_memory(&f, &[m.region(0)], &WriteOpts::default()).unwrap();
        assert_eq!(rep.bytes_written, touched as u64);
        assert_eq!(rep.present.count_ones() * PAGE_SIZE, touched);
        assert_eq!(rep.pages_zero, 0);
        assert_eq!(f.metadata().unwrap().len(), len as u64);
        assert_eq!(data_extents(&f, len as u64), touched as u64);
    }

    /// Prints write_memory throughput for 1 GiB touched.
    /// `cargo test --release --lib write_rate -- --ignored --nocapture`
    #[test]
    fn a_cancelled_write_stops_with_cancelled() {
        let len = 16 * MIB;
        let m = AnonMapping::new(len).unwrap();
        // SAFETY: in-bounds write to the test's own mapping.
        unsafe { std::ptr::write_bytes(m.addr(), 0x5a, len) };
        let f = tempfile::tempfile().unwrap();
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let opts = WriteOpts {
            cancel: Some(cancel.clone()),
            ..WriteOpts::default()
        };
        let e = write_memory(&f, &[m.region(0)], &opts).unwrap_err();
        assert!(matches!(e, Error::Cancelled), "{e}");
        cancel.store(false, std::sync::atomic::Ordering::Release);
        let rep = write_memory(&f, &[m.region(0)], &opts).unwrap();
        assert_eq!(rep.bytes_written, len as u64);
    }

    #[test]
    #[ignore]
    fn write_rate() {
        let dir = tempfile::tempdir().unwrap();
        for threads in [1, 2, 1, 2] {
            let opts = WriteOpts {
                threads,
                ..WriteOpts::default()
            };
            let r = write_rate_probe(1 << 30, dir.path(), &opts).unwrap();
            eprintln!(
                "write_memory 1 GiB, {threads} threads: {:?} = {:.2} GB/s (scan {:?}, write {:?}); raw pwrite {:.2} GB/s",
                r.report.elapsed, r.gb_per_s, r.report.scan_time, r.report.write_time, r.raw_gb_per_s
            );
        }
    }

    #[test]
    fn eager_read_validates() {
        let m = AnonMapping::new(MIB).unwrap();
        let regions = [m.region(0)];
        let mut present = PageBitmap::new(256);
        present.set(3);
        let meta = MemoryMeta::new(&regions, present, vec![0], PageBitmap::new(0)).unwrap();
        let f = tempfile::tempfile().unwrap();
        f.set_len(MIB as u64 - 4096).unwrap();
        let e = read_memory_eager(&f, &regions, &meta, &ReadOpts::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("is {} bytes, layout says {}", MIB - 4096, MIB)),
            "{e}"
        );
        let m2 = AnonMapping::new(2 * MIB).unwrap();
        let e = read_memory_eager(&f, &[m2.region(0)], &meta, &ReadOpts::default()).unwrap_err();
        assert!(matches!(e, Error::Layout(_)), "{e}");

        // Bad layouts.
        // SAFETY: never dereferenced (layout check fails first).
        let unaligned = unsafe { MemRegion::new(m.addr().add(1), 4096, 0) };
        assert!(check_layout(&[unaligned]).is_err());
        let gap = [m.region(0), m2.region(2 * MIB as u64)];
        assert!(check_layout(&gap).is_err());

        // Inconsistent metadata.
        let mut bad = meta.clone();
        bad.bytes_stored += 4096;
        assert!(bad.validate().is_err());
        let mut bad = meta.clone();
        bad.present = PageBitmap::new(255);
        assert!(bad.validate().is_err());
        let mut bad = meta.clone();
        bad.sums.push(1);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("2 page checksums for 1 present pages"));
    }

    /// One flipped byte in a present page, or data in a hole, is an error
    /// naming the file and the page's offset, for the eager reader and for
    /// the whole-file check; the untouched file passes both.
    #[test]
    fn corruption_is_detected_with_its_offset() {
        let pages = 512;
        let m = AnonMapping::new(pages * PAGE_SIZE).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        for p in (0..pages).filter(|p| p % 3 != 0) {
            fill_page(&mut page, p);
            // SAFETY: in-bounds write to the test's own mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(page.as_ptr(), m.addr().add(p * PAGE_SIZE), PAGE_SIZE)
            };
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let rep = write_memory(&f, &[m.region(0)], &WriteOpts::default()).unwrap();
        let meta =
            MemoryMeta::new(&[m.region(0)], rep.present, rep.sums, PageBitmap::new(0)).unwrap();
        let eager = |meta: &MemoryMeta| {
            let d = AnonMapping::new(pages * PAGE_SIZE).unwrap();
            read_memory_eager(&f, &[d.region(0)], meta, &ReadOpts::default()).map(|_| ())
        };
        eager(&meta).unwrap();
        assert_eq!(
            verify_file(&f, &meta).unwrap(),
            meta.present.count_ones() as u64
        );

        // Flip one byte in the middle of present page 301.
        let p = 301;
        assert!(meta.present.get(p));
        let off = (p * PAGE_SIZE + 1234) as u64;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], off).unwrap();
        let want = format!(
            "memory file {}: checksum mismatch in the page at offset {:#x} ({})",
            path.display(),
            p * PAGE_SIZE,
            p * PAGE_SIZE
        );
        for e in [
            eager(&meta).unwrap_err(),
            verify_file(&f, &meta).unwrap_err(),
        ] {
            assert!(
                matches!(e, Error::ChecksumMismatch { offset, .. } if offset == (p * PAGE_SIZE) as u64),
                "{e}"
            );
            assert!(e.to_string().contains(&want), "{e}");
        }
        f.write_all_at(&b, off).unwrap();
        eager(&meta).unwrap();

        // Data written into hole page 300.
        let h = 300;
        assert!(!meta.present.get(h));
        f.write_all_at(&[7], (h * PAGE_SIZE + 9) as u64).unwrap();
        let want = format!(
            "memory file {}: the page at offset {:#x} ({}) is a hole",
            path.display(),
            h * PAGE_SIZE,
            h * PAGE_SIZE
        );
        for e in [
            eager(&meta).unwrap_err(),
            verify_file(&f, &meta).unwrap_err(),
        ] {
            assert!(e.to_string().contains(&want), "{e}");
        }
        // A hole made allocated but still zero is fine.
        f.write_all_at(&[0], (h * PAGE_SIZE + 9) as u64).unwrap();
        eager(&meta).unwrap();
        assert!(verify_holes(&f, &meta).unwrap() >= 1);
    }
}
