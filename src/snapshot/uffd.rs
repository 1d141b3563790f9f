//! Lazy restore: serve guest memory from the memory file with userfaultfd
//! while the guest runs.
//!
//! [`LazyLoader::start`] registers every guest region (fresh anonymous
//! mappings) with a userfaultfd in MISSING mode before it returns, so the
//! caller can start vCPUs right away. Two threads then fill memory:
//!
//! - the **fault thread** `poll`s the userfaultfd and a stop eventfd. On a
//!   fault in a present page it `UFFDIO_COPY`s the missing present pages of
//!   the aligned block around it (`LazyOpts::fault_block`); on a fault in a
//!   hole it `UFFDIO_ZEROPAGE`s the hole run in that block (a write fault
//!   gets a real zeroed page instead, saving the copy-on-write fault that
//!   would follow);
//! - the **prefetcher** streams first the working set, then every other
//!   present page, in large chunks (`LazyOpts::prefetch_chunk`, one
//!   `UFFDIO_COPY` per run of missing pages). For the working set it first
//!   asks the kernel to read all of it from the file at once
//!   (`MADV_WILLNEED`: the reads overlap instead of waiting one after
//!   another; a sparse working set of 128 pages in a cold 256 MiB file went
//!   from 140 ms to 1-3 ms resident), then copies only working-set runs, not
//!   whole chunks. Holes are never prefetched;
//!   they are filled when they fault.
//!
//! **Layers**: the loader reads through a [`super::layers::LayerChain`]
//! ([`LazyLoader::start_chain`]): each run of pages comes from the layer
//! the chain's page table names, checked against that layer's checksums (a
//! plain snapshot is a chain of one). With [`LazyOpts::track_writes`] the
//! regions are registered in WP mode too and every copy is
//! `UFFDIO_COPY_MODE_WP`, so the pagemap tells which pages the guest wrote
//! ([`super::dirty`]); the regions then stay registered after completion
//! (unregistering would drop the protection). With asynchronous write
//! protection the kernel drops a page's protection on its first write;
//! with synchronous (a kernel without `UFFD_FEATURE_WP_ASYNC`, or
//! `STASIS_WRITE_TRACKING=sync`) that write is a fault message flagged
//! `UFFD_PAGEFAULT_FLAG_WP`, which the fault thread resolves by
//! un-protecting the page (`UFFDIO_WRITEPROTECT`, which wakes the writer),
//! never by a fill; missing-page faults are served exactly as without
//! tracking (a write to a missing page is a missing fault first, then, once
//! the page is in place write-protected, a WP fault).
//!
//! **Verified before it is copied**: each run is `pread` into a private
//! buffer, every page's CRC32C is checked against the snapshot's
//! ([`memfile::MemoryMeta::sums`]), and only then is the buffer the
//! `UFFDIO_COPY` source; the data the guest gets is exactly the data that
//! was checked (a shared mapping of the file could change between check and
//! copy). Holes are checked to be zero in the file at start
//! ([`memfile::verify_holes`]). The read-only shared mapping of the file
//! remains for `MADV_WILLNEED` read-ahead.
//!
//! Demand faults never queue behind prefetch: they are served by their own
//! thread, and the two threads race safely because the kernel installs each
//! page at most once (`UFFDIO_COPY` on an existing page fails with `EEXIST`,
//! which is skipped and woken). A shared atomic bitmap of filled pages
//! keeps both threads from reading pages that are already in place.
//!
//! Once every present page is resident the loader (by default) unregisters
//! the regions: what remains are holes, and the kernel's own anonymous
//! fault path fills those with zeros faster than a userfaultfd round trip.
//!
//! **Failure**: if a read, a checksum or a copy fails, the loader records
//! the error ([`LazyLoader::error`]) and wakes waiters with it, but leaves
//! the regions registered and serves nothing more: a faulter stays blocked
//! (interruptibly: the VMM's vCPU kick signal takes a vCPU out of it) and
//! never sees memory that was not verified. The VMM sees the error, stops
//! its vCPUs and ends the VM with it. [`LazyLoader::stop`] then unregisters
//! the regions; a thread still blocked is woken and sees **zero pages**, so
//! stop a VM (or `wait_complete`) before stopping its loader.
//!
//! **hugetlb memory** (2 MiB pages, `vmm::backing`) is detected at
//! registration: the kernel offers COPY and WAKE but no ZEROPAGE there.
//! Memory is then filled in whole huge pages, the only unit the kernel
//! accepts: the present 4 KiB pages of the 2 MiB block are read from the
//! file into a zeroed 2 MiB buffer (holes stay zero), verified, and the
//! block is one `UFFDIO_COPY`. A fault (present page or hole) fills its
//! block; the prefetcher fills the blocks holding working-set pages first,
//! then every block holding a present page; blocks of holes only are left
//! to fault (after release, the kernel's own hugetlb fault path zeroes
//! them). Fill state is kept per 4 KiB page as elsewhere, always set for a
//! whole block at once.
//!
//! **hugetlb with `UFFDIO_CONTINUE`** ([`HugeFill::Continue`], selectable
//! when the caller hands over the memfds behind the regions,
//! [`LazyLoader::start_chain_on`]): the regions are registered in MISSING
//! *and* MINOR mode. The loader maps each memfd a second time (not
//! registered) and `pread`s a block's present pages straight into the
//! memfd's page cache through it (the kernel zeroes a new huge page, so
//! holes need no writing), verifies them there, then `UFFDIO_CONTINUE`
//! maps the block into the guest. It is **not the default**: measured side
//! by side (`stasis bench --backing hugetlb`, 962 MiB), COPY made memory
//! resident in a median 251 ms against 292 ms (12 resumes each). The kernel
//! zeroes every huge page it adds to the page cache, so CONTINUE writes
//! each 2 MiB to memory twice (zero, then data) and checksums it from
//! memory, while COPY reads and checksums in a 2 MiB buffer that stays in
//! the CPU cache and `UFFDIO_COPY` allocates the guest's page without
//! zeroing it: one write to memory per byte. The guest never sees a
//! block before its CONTINUE: a touch of a block not yet in the page cache
//! is a MISSING fault, of one being written a MINOR fault, and both wait
//! for the loader. Exactly one thread writes a block (a claim bit per
//! block; a demand fault on a block the prefetcher is writing waits for
//! that one block, whose CONTINUE wakes it). A block that fails
//! verification is punched out of the page cache, so nothing unverified is
//! left for a guest released by `stop`. Blocks of holes only are allocated
//! zeroed on their fault and CONTINUEd. A kernel without
//! `UFFD_FEATURE_MINOR_HUGETLBFS` falls back to `UFFDIO_COPY` with a log
//! line; [`HUGE_FILL_ENV`] or [`LazyOpts::huge_fill`] select either method.
//!
//! **Wake-ups**: unregistering a region wakes the threads blocked on it,
//! but on this kernel (per-VMA locks) the wake comes before the region's
//! VMA is write-locked: a faulter that had just found the region registered
//! queues itself *after* that wake and then sleeps. If its fault message was
//! read by the fault thread before the unregister, the fill then fails
//! (region gone) and nobody woke it: the lost wake-up the 100 ms poll used
//! to mask. So [`Shared::release`] wakes every region once more after the
//! unregister returns (by then every such faulter is queued), and a fill
//! that fails after release wakes its range. The poll timeout stays as a
//! safety net that *counts*: when it finds a thread that faulted on our
//! regions asleep in `handle_userfault` with no message pending, that is a
//! stall; it is counted ([`LazyStats::timeout_wakes`]), logged at warn, and
//! woken.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::uffd_sys::{
    Fault, Modes, Uffd, IOCTL_CONTINUE, IOCTL_COPY, IOCTL_WAKE, IOCTL_ZEROPAGE,
    UFFD_FEATURE_MINOR_HUGETLBFS,
};

use super::bitmap::PageBitmap;
use super::dirty;
use super::memfile::{self, AnonMapping, MemRegion, MemoryMeta, PAGE_SIZE};

const PAGE_SHIFT: u32 = 12;
/// Pages of a 2 MiB huge page (the fill unit on hugetlb memory).
const HUGE_PAGES: usize = (2 << 20) / PAGE_SIZE;

/// Consecutive `EAGAIN`s (with nothing copied) before a fill is abandoned.
const MAX_EAGAIN: u32 = 100_000;

/// Errors from the lazy loader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The userfaultfd could not be created.
    #[error("creating a userfaultfd (needs /dev/userfaultfd access, or CAP_SYS_PTRACE for kernel-mode faults)")]
    Create(#[source] std::io::Error),
    /// A region could not be registered.
    #[error("registering guest memory {addr:#x}+{len:#x} with userfaultfd")]
    Register {
        /// Host address.
        addr: usize,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel does not offer COPY/ZEROPAGE/WAKE on a region.
    #[error("userfaultfd on {addr:#x} lacks COPY/ZEROPAGE/WAKE (offers {offered})")]
    MissingIoctls {
        /// Host address.
        addr: usize,
        /// What the kernel offered.
        offered: String,
    },
    /// A region already has resident pages.
    #[error("guest memory region {index} at {addr:#x} has {resident} resident pages; lazy restore needs a fresh, untouched mapping")]
    NotFresh {
        /// Region index.
        index: usize,
        /// Host address.
        addr: usize,
        /// Resident pages found.
        resident: usize,
    },
    /// Layout, size or read error on the memory file.
    #[error(transparent)]
    Memfile(#[from] memfile::Error),
    /// `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` failed.
    #[error("{op} of {len} bytes to {addr:#x} (memory file offset {file_offset})")]
    Fill {
        /// Which ioctl.
        op: &'static str,
        /// Destination.
        addr: usize,
        /// Length.
        len: usize,
        /// File offset of the destination's first page.
        file_offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping or reading the memory file failed.
    #[error("reading memory file {file} at offset {offset} ({len} bytes)")]
    ReadFile {
        /// The file.
        file: String,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading fault events failed.
    #[error("reading userfaultfd events")]
    ReadEvents(#[source] std::io::Error),
    /// `poll`, `eventfd` or thread creation failed.
    #[error("{0}")]
    Sys(&'static str, #[source] std::io::Error),
    /// Prefetch ended with present pages still missing (an internal bug).
    #[error("prefetch finished but {missing} present pages are not resident")]
    Incomplete {
        /// Pages still missing.
        missing: usize,
    },
    /// The loader failed earlier; the cause is the source.
    #[error("lazy loader failed")]
    Failed(#[source] Arc<Error>),
    /// The loader was stopped before the awaited condition.
    #[error("lazy loader stopped before {0}")]
    Stopped(&'static str),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Options for [`LazyLoader::start`].
#[derive(Debug, Clone)]
pub struct LazyOpts {
    /// Bytes served around a demand fault in a present page (aligned block,
    /// power of two, at least one page).
    pub fault_block: usize,
    /// Bytes per prefetch chunk (aligned within each region); each run of
    /// missing pages in a chunk is one `UFFDIO_COPY`.
    pub prefetch_chunk: usize,
    /// Run the background prefetcher (false: pure demand paging).
    pub prefetch: bool,
    /// Unregister the regions once every present page is resident, letting
    /// the kernel zero-fill remaining holes itself. If false, the fault
    /// thread keeps serving hole faults until [`LazyLoader::stop`].
    pub release_when_complete: bool,
    /// Track the guest's writes ([`super::dirty`]): register in WP mode too
    /// and install every page write-protected, so the pagemap tells which
    /// pages the guest wrote. Implies never releasing the regions
    /// (unregistering would drop the protection).
    pub track_writes: bool,
    /// How writes are tracked with `track_writes` (asynchronous or
    /// synchronous write protection, [`super::dirty`]); the default is
    /// [`dirty::Policy::from_env`].
    pub tracking: dirty::Policy,
    /// How hugetlb memory is filled when the loader is given the memfds
    /// behind it ([`LazyLoader::start_chain_on`]); without them, or on a
    /// kernel without minor faults on hugetlb, it is `UFFDIO_COPY`.
    pub huge_fill: HugeFill,
}

impl Default for LazyOpts {
    fn default() -> Self {
        LazyOpts {
            fault_block: 64 << 10,
            prefetch_chunk: 2 << 20,
            prefetch: true,
            release_when_complete: true,
            track_writes: false,
            tracking: dirty::Policy::from_env(),
            huge_fill: HugeFill::default(),
        }
    }
}

/// How the loader fills hugetlb guest memory (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugeFill {
    /// Read and verify each 2 MiB block in a private buffer, then one
    /// `UFFDIO_COPY` into the guest mapping. The default: measured faster
    /// (see the module doc).
    #[default]
    Copy,
    /// Read each block straight into the memfd's page cache through a
    /// second mapping, verify it there, then `UFFDIO_CONTINUE` maps it into
    /// the guest (minor faults).
    Continue,
}

/// Environment variable that picks the hugetlb fill method (`copy` or
/// `continue`) for restores that do not choose one (the bench sets it per
/// row).
pub const HUGE_FILL_ENV: &str = "STASIS_HUGETLB_FILL";

impl HugeFill {
    /// `copy` or `continue`.
    pub fn name(self) -> &'static str {
        match self {
            HugeFill::Copy => "copy",
            HugeFill::Continue => "continue",
        }
    }

    /// The method named by [`HUGE_FILL_ENV`], else the default; a value
    /// that names neither is ignored with a warning.
    pub fn from_env() -> HugeFill {
        match std::env::var(HUGE_FILL_ENV) {
            Ok(v) => v.parse().unwrap_or_else(|_| {
                tracing::warn!(value = %v, "{HUGE_FILL_ENV}: use copy or continue; using the default");
                HugeFill::default()
            }),
            Err(_) => HugeFill::default(),
        }
    }
}

impl std::str::FromStr for HugeFill {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "copy" => Ok(HugeFill::Copy),
            "continue" | "cont" => Ok(HugeFill::Continue),
            _ => Err(format!(
                "unknown hugetlb fill method {s:?}: use copy or continue"
            )),
        }
    }
}

impl std::fmt::Display for HugeFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const NOT_YET: u64 = u64::MAX;

/// Live counters of a [`LazyLoader`]; read them at any time.
#[derive(Debug)]
pub struct LazyStats {
    /// Present pages in the memory file (the completion target).
    pub present_pages: u64,
    /// Present pages in the working set (the working-set target).
    pub working_set_pages: u64,
    /// Fault events handled.
    pub faults: AtomicU64,
    /// Present pages copied by the fault thread (the faulting page and its
    /// block).
    pub pages_demand: AtomicU64,
    /// Present pages copied by the prefetcher.
    pub pages_prefetched: AtomicU64,
    /// Hole pages filled with zeros on a fault.
    pub pages_zero_filled: AtomicU64,
    /// Copies that found the page already in place (`EEXIST`), and, on
    /// hugetlb, demand faults whose block the other thread had just
    /// filled or was filling (one each).
    ///
    /// Such a copy marks the page filled at once (it may have been put
    /// there outside the loader), so completion can be seen a moment before
    /// the thread whose copy won has added its page to `pages_demand` /
    /// `pages_prefetched`: right after completion those two may lag by the
    /// pages still being counted.
    pub pages_already_filled: AtomicU64,
    /// Bytes copied from the memory file into guest memory.
    pub bytes_copied: AtomicU64,
    /// Present pages whose checksum was verified before they were copied.
    pub pages_verified: AtomicU64,
    /// Write-protect faults resolved (synchronous write tracking: the
    /// first write to each page installed write-protected).
    pub wp_faults: AtomicU64,
    /// Faulting threads found stalled (asleep on a fault with no message
    /// pending) and woken by the idle timeout: a lost wake-up. Always 0
    /// unless the loader has a bug; logged at warn when not.
    pub timeout_wakes: AtomicU64,
    working_set_ns: AtomicU64,
    complete_ns: AtomicU64,
}

impl LazyStats {
    fn new(present_pages: u64, working_set_pages: u64) -> Self {
        LazyStats {
            present_pages,
            working_set_pages,
            faults: AtomicU64::new(0),
            pages_demand: AtomicU64::new(0),
            pages_prefetched: AtomicU64::new(0),
            pages_zero_filled: AtomicU64::new(0),
            pages_already_filled: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            pages_verified: AtomicU64::new(0),
            wp_faults: AtomicU64::new(0),
            timeout_wakes: AtomicU64::new(0),
            working_set_ns: AtomicU64::new(NOT_YET),
            complete_ns: AtomicU64::new(NOT_YET),
        }
    }

    /// Time from start until the working set was resident, once it is.
    pub fn working_set_time(&self) -> Option<Duration> {
        match self.working_set_ns.load(Ordering::Acquire) {
            NOT_YET => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Time from start until every present page was resident, once it is.
    pub fn complete_time(&self) -> Option<Duration> {
        match self.complete_ns.load(Ordering::Acquire) {
            NOT_YET => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

#[derive(Default)]
struct WaitState {
    working_set: bool,
    complete: bool,
    stopped: bool,
    error: Option<Arc<Error>>,
}

/// Who filled a page (for the stats).
#[derive(Clone, Copy, PartialEq)]
enum Who {
    Demand,
    Prefetch,
    Zero,
}

/// A thread's copy buffer: data read from the file is verified here before
/// it is the `UFFDIO_COPY` source.
struct CopyBuf {
    map: AnonMapping,
    scratch: Vec<u32>,
}

impl CopyBuf {
    fn new(bytes: usize) -> Result<CopyBuf> {
        let bytes = bytes.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        Ok(CopyBuf {
            map: AnonMapping::new(bytes).map_err(|e| Error::Sys("mapping a copy buffer", e))?,
            scratch: Vec::new(),
        })
    }

    fn pages(&self) -> usize {
        self.map.len() / PAGE_SIZE
    }
}

/// A read-only shared mapping of the memory file (read-ahead target).
struct FileMap {
    addr: usize,
    len: usize,
}

impl FileMap {
    fn new(file: &File, len: u64) -> Result<FileMap> {
        let err = |source| Error::ReadFile {
            file: memfile::file_name(file),
            offset: 0,
            len: len as usize,
            source,
        };
        let len = usize::try_from(len)
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
        if len == 0 {
            return Ok(FileMap { addr: 0, len: 0 });
        }
        // SAFETY: a new read-only shared mapping of an open file at a
        // kernel-chosen address; it aliases no Rust memory, and we never
        // read it from user space (only the kernel does, in UFFDIO_COPY and
        // MADV_POPULATE_READ, which report errors instead of SIGBUS).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(FileMap {
            addr: addr as usize,
            len,
        })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `new`.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

/// hugetlb filled with `UFFDIO_CONTINUE`: a second, unregistered mapping
/// of each region's memfd, through which the loader writes the page cache,
/// and a claim bit per 2 MiB block so that exactly one thread writes a
/// block (a block half-written by one thread must not be written again
/// under a guest that already runs on it).
struct ContinueFill {
    files: Vec<File>,
    /// `(address, len)` of each region's alias mapping.
    alias: Vec<(usize, usize)>,
    claimed: Vec<AtomicU64>,
}

impl ContinueFill {
    fn new(files: Vec<File>, regions: &[MemRegion]) -> Result<ContinueFill> {
        let mut alias: Vec<(usize, usize)> = Vec::with_capacity(files.len());
        let mut me = ContinueFill {
            files: Vec::new(),
            alias: Vec::new(),
            claimed: Vec::new(),
        };
        for (f, r) in files.iter().zip(regions) {
            // SAFETY: a new shared mapping of our memfd at a kernel-chosen
            // address; it aliases no Rust memory. Only the loader writes
            // it, each 2 MiB block by the one thread that claimed it, and
            // only before the block is mapped into the guest.
            let a = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    r.len(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            if a == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                me.alias = alias;
                return Err(Error::Sys(
                    "mapping guest memory a second time (UFFDIO_CONTINUE)",
                    e,
                ));
            }
            alias.push((a as usize, r.len()));
        }
        let pages: usize = regions
            .iter()
            .map(|r| r.first_page() + r.pages())
            .max()
            .unwrap_or(0);
        me.alias = alias;
        me.files = files;
        me.claimed = (0..pages.div_ceil(HUGE_PAGES).div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(me)
    }

    /// Claims the block starting at global page `b0`; false if another
    /// thread holds it (it will map the block and wake its faulters).
    fn claim(&self, b0: usize) -> bool {
        let b = b0 / HUGE_PAGES;
        let bit = 1u64 << (b % 64);
        self.claimed[b / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
}

impl Drop for ContinueFill {
    fn drop(&mut self) {
        for &(a, len) in &self.alias {
            // SAFETY: unmaps exactly a mapping made in `new`.
            unsafe { libc::munmap(a as *mut libc::c_void, len) };
        }
    }
}

struct Shared {
    uffd: Uffd,
    map: FileMap,
    stop_fd: OwnedFd,
    /// The layers pages are read from and the page -> layer table.
    chain: super::layers::LayerChain,
    /// `UFFDIO_COPY` mode: write-protected copies when tracking writes.
    copy_mode: u64,
    /// How writes are tracked, if they are. `Sync`: the fault thread
    /// resolves write-protect faults.
    tracking: Option<dirty::Mode>,
    regions: Vec<MemRegion>,
    /// hugetlb memory: filled in whole 2 MiB blocks.
    huge: bool,
    /// hugetlb filled through the page cache with `UFFDIO_CONTINUE`.
    cont: Option<ContinueFill>,
    present: PageBitmap,
    /// Present pages of the working set.
    ws: PageBitmap,
    filled: Vec<AtomicU64>,
    /// Pages the guest faulted on before the prefetcher brought them: the
    /// part of its working set it needed first (recorded for next time).
    demanded: Vec<AtomicU64>,
    present_filled: AtomicUsize,
    ws_filled: AtomicUsize,
    stats: Arc<LazyStats>,
    opts: LazyOpts,
    start: Instant,
    stop: AtomicBool,
    released: AtomicBool,
    failed: AtomicBool,
    state: Mutex<WaitState>,
    cond: Condvar,
}

/// Serves a lazily restored VM's memory from its memory file.
pub struct LazyLoader {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for LazyLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLoader")
            .field("stats", &self.shared.stats)
            .finish_non_exhaustive()
    }
}

impl LazyLoader {
    /// Registers `regions` with a new userfaultfd and starts serving them
    /// from `memfile` according to `meta`. When this returns, every region
    /// is registered, so vCPUs may run.
    ///
    /// The regions must be fresh anonymous mappings (no page touched; this
    /// is checked) that outlive the loader (the [`MemRegion::new`]
    /// contract). `memfile` must be the file `meta` describes (its length is
    /// checked).
    pub fn start(
        memfile: File,
        regions: Vec<MemRegion>,
        meta: &MemoryMeta,
        opts: LazyOpts,
    ) -> Result<LazyLoader> {
        meta.check_regions(&regions)?;
        let chain = super::layers::LayerChain::single(
            memfile::file_name(&memfile).into(),
            memfile,
            meta.clone(),
        )?;
        Self::start_chain(chain, regions, opts)
    }

    /// [`Self::start`] over a chain of layers: each page is served from the
    /// layer the chain's table names, verified against that layer's
    /// checksums. The working set is the nearest layer's.
    pub fn start_chain(
        chain: super::layers::LayerChain,
        regions: Vec<MemRegion>,
        opts: LazyOpts,
    ) -> Result<LazyLoader> {
        Self::start_chain_on(chain, regions, opts, Vec::new())
    }

    /// [`Self::start_chain`] on hugetlb memory whose regions are shared
    /// mappings of `memfds` (one per region, in order, each mapped from
    /// offset 0, fresh: nothing in their page cache), which lets the
    /// loader fill them with `UFFDIO_CONTINUE` ([`LazyOpts::huge_fill`]).
    /// With `memfds` empty, or a kernel without minor faults on hugetlb
    /// (logged), memory is filled with `UFFDIO_COPY`.
    pub fn start_chain_on(
        chain: super::layers::LayerChain,
        regions: Vec<MemRegion>,
        mut opts: LazyOpts,
        memfds: Vec<File>,
    ) -> Result<LazyLoader> {
        let meta = &chain.top().meta;
        chain.check_regions(&regions)?;
        // Holes are never read from the file, so check now that they are
        // holes (a few lseeks for a sparse file).
        chain.verify_holes()?;
        if opts.track_writes {
            opts.release_when_complete = false;
        }
        if !opts.fault_block.is_power_of_two() || opts.fault_block < PAGE_SIZE {
            return Err(memfile::Error::Layout(format!(
                "fault block {:#x} is not a power of two >= one page",
                opts.fault_block
            ))
            .into());
        }
        if !memfds.is_empty() && memfds.len() != regions.len() {
            return Err(memfile::Error::Layout(format!(
                "{} memfds for {} regions",
                memfds.len(),
                regions.len()
            ))
            .into());
        }
        if memfds.is_empty() {
            check_fresh(&regions)?;
        } else {
            // hugetlbfs counts the blocks of a file's page cache: none
            // means no page of it is mapped anywhere either (a pagemap walk
            // of every region costs milliseconds per GiB).
            check_fresh_memfds(&memfds, &regions)?;
        }

        let want_minor = !memfds.is_empty() && opts.huge_fill == HugeFill::Continue;
        let optional = if want_minor {
            UFFD_FEATURE_MINOR_HUGETLBFS
        } else {
            0
        };
        // KVM touches guest memory from kernel mode (get_user_pages); those
        // faults must reach us too: not user-mode only.
        let mut tracking = None;
        let uffd = if opts.track_writes {
            match dirty::create_uffd(opts.tracking, optional) {
                Ok((u, mode)) => {
                    tracking = Some(mode);
                    u
                }
                Err(e) => {
                    dirty::log_choice(None, &crate::error_chain(&e));
                    opts.track_writes = false;
                    Uffd::create_features(false, 0, optional).map_err(Error::Create)?
                }
            }
        } else {
            Uffd::create_features(false, 0, optional).map_err(Error::Create)?
        };
        let mut minor = want_minor && uffd.has_feature(UFFD_FEATURE_MINOR_HUGETLBFS);
        if want_minor && !minor {
            tracing::warn!("this kernel has no userfaultfd minor faults on hugetlb (UFFD_FEATURE_MINOR_HUGETLBFS): filling guest memory with UFFDIO_COPY");
        }
        if minor && tracking == Some(dirty::Mode::Sync) {
            // UFFDIO_CONTINUE_MODE_WP is younger than synchronous WP
            // (kernels without WP_ASYNC may lack it): fill with COPY.
            tracing::info!("synchronous write tracking: filling hugetlb guest memory with UFFDIO_COPY, not UFFDIO_CONTINUE");
            minor = false;
        }
        // WP mode on every region, or on none (a backing the kernel
        // refuses write protection on: no tracking, full layers).
        if opts.track_writes {
            let mut done = Vec::new();
            for r in &regions {
                let modes = Modes {
                    missing: true,
                    wp: true,
                    minor,
                };
                match uffd.register_mode(r.host_addr().cast(), r.len(), modes) {
                    Ok(_) => done.push(r),
                    Err(e) => {
                        tracing::warn!(addr = r.addr(), error = %e,
                            "write protection refused on guest memory: the next pause writes a full layer");
                        dirty::log_choice(
                            None,
                            &format!("registering guest memory in WP mode: {e}"),
                        );
                        for d in done.drain(..) {
                            let _ = uffd.unregister(d.host_addr().cast(), d.len());
                        }
                        opts.track_writes = false;
                        tracking = None;
                        break;
                    }
                }
            }
            if let Some(m) = tracking {
                dirty::log_choice(Some(m), &"");
            }
        }
        let needed = IOCTL_COPY | IOCTL_WAKE;
        let mut huge = None;
        let mut i = 0;
        while i < regions.len() {
            let r = &regions[i];
            let modes = Modes {
                missing: true,
                wp: opts.track_writes,
                minor,
            };
            let offered = match uffd.register_mode(r.host_addr().cast(), r.len(), modes) {
                Ok(o) => o,
                Err(e) if minor => {
                    // MINOR refused (not hugetlb after all?): every region
                    // again without it.
                    tracing::warn!(addr = r.addr(), error = %e,
                        "userfaultfd minor mode refused on guest memory: filling it with UFFDIO_COPY");
                    for d in &regions[..i] {
                        let _ = uffd.unregister(d.host_addr().cast(), d.len());
                    }
                    minor = false;
                    huge = None;
                    i = 0;
                    continue;
                }
                Err(source) => {
                    return Err(Error::Register {
                        addr: r.addr(),
                        len: r.len(),
                        source,
                    })
                }
            };
            // No ZEROPAGE: hugetlb memory (see the module doc); all
            // regions must agree.
            let is_huge = offered & IOCTL_ZEROPAGE == 0;
            let huge_unit = HUGE_PAGES * PAGE_SIZE;
            if offered & needed != needed
                || (minor && offered & IOCTL_CONTINUE == 0)
                || huge.is_some_and(|h| h != is_huge)
                || (is_huge
                    && (!r.addr().is_multiple_of(huge_unit)
                        || !r.len().is_multiple_of(huge_unit)
                        || !r.file_offset().is_multiple_of(huge_unit as u64)))
            {
                return Err(Error::MissingIoctls {
                    addr: r.addr(),
                    offered: format!("{offered:#x}"),
                });
            }
            huge = Some(is_huge);
            i += 1;
        }
        let huge = huge.unwrap_or(false);
        let cont = if minor && huge {
            Some(ContinueFill::new(memfds, &regions)?)
        } else {
            None
        };
        // SAFETY: eventfd has no memory effects; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::Sys(
                "creating the stop eventfd",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `efd` is a new descriptor owned by nothing else.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };

        let present = chain.present().clone();
        let ws = if meta.working_set.is_empty() {
            PageBitmap::new(present.len())
        } else {
            present.and(&meta.working_set).ok_or_else(|| {
                memfile::Error::Layout("working-set bitmap length differs from the layout".into())
            })?
        };
        let present_pages = present.count_ones();
        let ws_pages = ws.count_ones();
        let stats = Arc::new(LazyStats::new(present_pages as u64, ws_pages as u64));
        let map = FileMap::new(&chain.top().file, meta.total_bytes)?;
        let shared = Arc::new(Shared {
            uffd,
            map,
            stop_fd,
            // UFFDIO_COPY_MODE_WP and UFFDIO_CONTINUE_MODE_WP are both bit 1.
            copy_mode: if opts.track_writes {
                super::uffd_sys::UFFDIO_COPY_MODE_WP
            } else {
                0
            },
            tracking,
            chain,
            filled: (0..present.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            demanded: (0..present.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            present,
            ws,
            regions,
            huge,
            cont,
            present_filled: AtomicUsize::new(0),
            ws_filled: AtomicUsize::new(0),
            stats,
            opts,
            start: Instant::now(),
            stop: AtomicBool::new(false),
            released: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            state: Mutex::new(WaitState::default()),
            cond: Condvar::new(),
        });
        // Empty targets are reached at once.
        shared.account(0, 0, true);

        let loader = LazyLoader {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let s = shared.clone();
        let fault = std::thread::Builder::new()
            .name("stasis-uffd".into())
            .spawn(move || {
                crate::jail::seccomp::install_for(crate::jail::seccomp::ThreadKind::Uffd);
                s.fault_thread()
            })
            .map_err(|e| Error::Sys("spawning the userfaultfd thread", e))?;
        loader.threads.lock().expect("not poisoned").push(fault);
        if shared.opts.prefetch {
            let s = shared.clone();
            // On failure `loader` is dropped, which stops the fault thread.
            let pf = std::thread::Builder::new()
                .name("stasis-prefetch".into())
                .spawn(move || {
                    crate::jail::seccomp::install_for(crate::jail::seccomp::ThreadKind::Uffd);
                    s.prefetch_thread()
                })
                .map_err(|e| Error::Sys("spawning the prefetch thread", e))?;
            loader.threads.lock().expect("not poisoned").push(pf);
        }
        Ok(loader)
    }

    /// How hugetlb memory is being filled (`None`: not hugetlb memory).
    pub fn huge_fill(&self) -> Option<HugeFill> {
        self.shared.huge.then_some(if self.shared.cont.is_some() {
            HugeFill::Continue
        } else {
            HugeFill::Copy
        })
    }

    /// True if the loader installs pages write-protected (write tracking).
    pub fn tracks_writes(&self) -> bool {
        self.shared.opts.track_writes
    }

    /// How the guest's writes are tracked (`None`: they are not).
    pub fn write_tracking(&self) -> Option<dirty::Mode> {
        self.shared.tracking
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<LazyStats> {
        &self.shared.stats
    }

    /// Pages the guest faulted on (demand faults, present pages and holes)
    /// since `start`, as a bitmap over memory-file pages.
    pub fn demanded(&self) -> PageBitmap {
        let words: Vec<u64> = self
            .shared
            .demanded
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        let len = self.shared.present.len();
        PageBitmap::from_words(len, words).unwrap_or_else(|| PageBitmap::new(len))
    }

    /// The error that stopped the loader, if any.
    pub fn error(&self) -> Option<Arc<Error>> {
        self.shared
            .state
            .lock()
            .expect("not poisoned")
            .error
            .clone()
    }

    /// Blocks until the working set's present pages are resident (pages of
    /// the working set that are holes do not count); returns the time from
    /// start. Returns at once if no working set was recorded. Fails if the
    /// loader failed or was stopped first.
    pub fn wait_working_set(&self) -> Result<Duration> {
        self.wait(|s| s.working_set, "the working set was resident", None)?;
        Ok(self.shared.stats.working_set_time().unwrap_or_default())
    }

    /// Blocks until every present page is resident (call before pausing a
    /// lazily restored VM again); returns the time from start.
    pub fn wait_complete(&self) -> Result<Duration> {
        self.wait(|s| s.complete, "all memory was resident", None)?;
        Ok(self.shared.stats.complete_time().unwrap_or_default())
    }

    /// Like [`wait_complete`](Self::wait_complete) with a timeout; `Ok(None)`
    /// if it timed out.
    pub fn wait_complete_timeout(&self, timeout: Duration) -> Result<Option<Duration>> {
        let done = self.wait(|s| s.complete, "all memory was resident", Some(timeout))?;
        Ok(done.then(|| self.shared.stats.complete_time().unwrap_or_default()))
    }

    fn wait(
        &self,
        cond: impl Fn(&WaitState) -> bool,
        what: &'static str,
        timeout: Option<Duration>,
    ) -> Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.shared.state.lock().expect("not poisoned");
        loop {
            if cond(&st) {
                return Ok(true);
            }
            if let Some(e) = &st.error {
                return Err(Error::Failed(e.clone()));
            }
            if st.stopped {
                return Err(Error::Stopped(what));
            }
            st = match deadline {
                None => self.shared.cond.wait(st).expect("not poisoned"),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    self.shared
                        .cond
                        .wait_timeout(st, d - now)
                        .expect("not poisoned")
                        .0
                }
            };
        }
    }

    /// Stops both threads and unregisters the regions. Idempotent; also run
    /// on drop. Pages not yet filled become ordinary zero-filled anonymous
    /// memory, so only stop a loader whose VM is stopped or whose memory is
    /// complete.
    pub fn stop(&self) {
        let sh = &self.shared;
        sh.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let rc = unsafe {
            libc::write(
                sh.stop_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc < 0 {
            // Only EAGAIN is possible (counter full): already signalled.
            tracing::debug!(error = %std::io::Error::last_os_error(), "stop eventfd write");
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("not poisoned"));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("userfaultfd loader thread panicked");
            }
        }
        sh.release();
        let mut st = sh.state.lock().expect("not poisoned");
        st.stopped = true;
        sh.cond.notify_all();
    }
}

impl Drop for LazyLoader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fails unless the page cache of every memfd is empty.
fn check_fresh_memfds(memfds: &[File], regions: &[MemRegion]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for (index, (f, r)) in memfds.iter().zip(regions).enumerate() {
        let blocks = f
            .metadata()
            .map_err(|e| Error::Sys("fstat on guest memory", e))?
            .blocks();
        if blocks != 0 {
            return Err(Error::NotFresh {
                index,
                addr: r.addr(),
                resident: (blocks * 512 / PAGE_SIZE as u64) as usize,
            });
        }
    }
    Ok(())
}

/// Fails if any page of `regions` is already resident.
fn check_fresh(regions: &[MemRegion]) -> Result<()> {
    let pagemap = File::open("/proc/self/pagemap")
        .map_err(|e| Error::Sys("opening /proc/self/pagemap", e))?;
    let mut entries = vec![0u64; 4096];
    for (index, r) in regions.iter().enumerate() {
        let mut resident = 0;
        let mut done = 0;
        while done < r.len() / PAGE_SIZE {
            let n = (r.len() / PAGE_SIZE - done).min(entries.len());
            let addr = r.addr() + done * PAGE_SIZE;
            // SAFETY: `entries` is a live u64 buffer; viewing it as bytes
            // is sound (u64 has no invalid bit patterns).
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(entries.as_mut_ptr().cast::<u8>(), n * 8) };
            std::os::unix::fs::FileExt::read_exact_at(
                &pagemap,
                bytes,
                ((addr / PAGE_SIZE) * 8) as u64,
            )
            .map_err(|e| Error::Sys("reading /proc/self/pagemap", e))?;
            resident += entries[..n].iter().filter(|&&e| e & (3 << 62) != 0).count();
            done += n;
        }
        if resident > 0 {
            return Err(Error::NotFresh {
                index,
                addr: r.addr(),
                resident,
            });
        }
    }
    Ok(())
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioContinue {
    start: u64,
    len: u64,
    mode: u64,
    mapped: i64,
}

/// `_IOWR(0xAA, 0x07, struct uffdio_continue)`.
const UFFDIO_CONTINUE: libc::c_ulong = 0xc020_aa07;

/// `UFFDIO_CONTINUE` of `[dst, dst+len)`: maps the page cache's pages
/// there and wakes the faulters; bytes mapped or errno.
fn ioctl_continue(fd: i32, dst: usize, len: usize, mode: u64) -> std::io::Result<usize> {
    let mut c = UffdioContinue {
        start: dst as u64,
        len: len as u64,
        mode,
        mapped: 0,
    };
    // SAFETY: `c` is a valid uffdio_continue; the kernel only maps page
    // cache pages into the registered destination range.
    let rc = unsafe { libc::ioctl(fd, UFFDIO_CONTINUE, &mut c as *mut UffdioContinue) };
    if rc == 0 {
        return Ok(len);
    }
    let err = std::io::Error::last_os_error();
    if c.mapped > 0 {
        Ok(c.mapped as usize)
    } else {
        Err(err)
    }
}

/// `_IOWR(0xAA, 0x03, struct uffdio_copy)` (checked against userfaultfd-sys).
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;

/// Result of one fill ioctl: bytes installed (possibly partial), or errno.
/// We issue the ioctls ourselves because the crate's wrappers cannot tell
/// a partial copy from an `EAGAIN` with nothing copied.
fn ioctl_fill(
    fd: i32,
    dst: usize,
    src: Option<*const u8>,
    len: usize,
    copy_mode: u64,
) -> std::result::Result<usize, std::io::Error> {
    let (rc, done) = match src {
        Some(src) => {
            let mut c = UffdioCopy {
                dst: dst as u64,
                src: src as u64,
                len: len as u64,
                mode: copy_mode,
                copy: 0,
            };
            // SAFETY: `c` is a valid uffdio_copy; the kernel reads `len`
            // bytes from `src` (a live buffer of the caller) and writes only
            // missing pages of the registered destination range.
            let rc = unsafe { libc::ioctl(fd, UFFDIO_COPY, &mut c as *mut UffdioCopy) };
            (rc, c.copy)
        }
        None => {
            let mut z = UffdioZeropage {
                start: dst as u64,
                len: len as u64,
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: `z` is a valid uffdio_zeropage; the kernel only maps
            // zero pages into missing pages of the registered range.
            let rc = unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE, &mut z as *mut UffdioZeropage) };
            (rc, z.zeropage)
        }
    };
    if rc == 0 {
        return Ok(len);
    }
    let err = std::io::Error::last_os_error();
    if done > 0 {
        // Partial: the kernel installed `done` bytes then stopped (EAGAIN).
        Ok(done as usize)
    } else {
        Err(err)
    }
}

impl Shared {
    fn fd(&self) -> i32 {
        self.uffd.as_raw_fd()
    }

    /// The region holding host address `addr` and its global page index.
    fn locate(&self, addr: usize) -> Option<(&MemRegion, usize)> {
        self.regions
            .iter()
            .find(|r| addr >= r.addr() && addr < r.addr() + r.len())
            .map(|r| (r, r.first_page() + (addr - r.addr()) / PAGE_SIZE))
    }

    fn page_addr(r: &MemRegion, gp: usize) -> usize {
        r.addr() + ((gp - r.first_page()) << PAGE_SHIFT)
    }

    fn is_filled(&self, p: usize) -> bool {
        self.filled[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    /// Words of "wanted and not filled" for word index `w`.
    fn missing_word(&self, bits: &PageBitmap, w: usize) -> u64 {
        bits.words()[w] & !self.filled[w].load(Ordering::Acquire)
    }

    /// First page in `from..to` set in `bits` and not filled, if any.
    fn next_missing(&self, bits: &PageBitmap, from: usize, to: usize) -> Option<usize> {
        let mut p = from;
        while p < to {
            let w = self.missing_word(bits, p / 64) & (!0u64 << (p % 64));
            if w != 0 {
                let i = (p / 64) * 64 + w.trailing_zeros() as usize;
                return (i < to).then_some(i);
            }
            p = (p / 64 + 1) * 64;
        }
        None
    }

    /// First page in `from..to` that is not (set in `bits` and not filled).
    fn next_not_missing(&self, bits: &PageBitmap, from: usize, to: usize) -> usize {
        let mut p = from;
        while p < to {
            let w = !self.missing_word(bits, p / 64) & (!0u64 << (p % 64));
            if w != 0 {
                return ((p / 64) * 64 + w.trailing_zeros() as usize).min(to);
            }
            p = (p / 64 + 1) * 64;
        }
        to
    }

    /// Last page in `from..to` set in `bits` and not filled, if any.
    fn last_missing(&self, bits: &PageBitmap, from: usize, to: usize) -> Option<usize> {
        let mut end = to;
        while end > from {
            let w = (end - 1) / 64;
            let lo = (w * 64).max(from);
            let mut m = self.missing_word(bits, w);
            let hi_bits = end - w * 64; // 1..=64 bits valid from the word start
            if hi_bits < 64 {
                m &= (1u64 << hi_bits) - 1;
            }
            m &= !0u64 << (lo - w * 64);
            if m != 0 {
                return Some(w * 64 + 63 - m.leading_zeros() as usize);
            }
            end = lo;
        }
        None
    }

    /// Marks pages `s..e` filled; counts newly filled present and
    /// working-set pages toward the targets.
    fn mark_filled(&self, s: usize, e: usize) {
        let (mut new_present, mut new_ws) = (0usize, 0usize);
        let mut p = s;
        while p < e {
            let w = p / 64;
            let bit = p % 64;
            let n = (64 - bit).min(e - p);
            let mask = if n == 64 {
                !0u64
            } else {
                ((1u64 << n) - 1) << bit
            };
            let old = self.filled[w].fetch_or(mask, Ordering::AcqRel);
            let newly = mask & !old;
            new_present += (newly & self.present.words()[w]).count_ones() as usize;
            new_ws += (newly & self.ws.words()[w]).count_ones() as usize;
            p += n;
        }
        self.account(new_present, new_ws, false);
    }

    fn account(&self, new_present: usize, new_ws: usize, initial: bool) {
        let ws_now = self.ws_filled.fetch_add(new_ws, Ordering::AcqRel) + new_ws;
        let present_now =
            self.present_filled.fetch_add(new_present, Ordering::AcqRel) + new_present;
        // Exactly one call crosses each target; `initial` covers empty ones.
        let ws_done = (new_ws > 0 || initial) && ws_now as u64 == self.stats.working_set_pages;
        let all_done =
            (new_present > 0 || initial) && present_now as u64 == self.stats.present_pages;
        if !ws_done && !all_done {
            return;
        }
        let ns = self.start.elapsed().as_nanos() as u64;
        {
            let mut st = self.state.lock().expect("not poisoned");
            if ws_done && !st.working_set {
                st.working_set = true;
                self.stats.working_set_ns.store(ns, Ordering::Release);
            }
            if all_done && !st.complete {
                st.complete = true;
                self.stats.complete_ns.store(ns, Ordering::Release);
            }
            self.cond.notify_all();
        }
        if all_done && self.opts.release_when_complete {
            self.release();
        }
    }

    /// Unregisters every region (waking blocked faulters, who then see
    /// ordinary anonymous memory). Runs once.
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host_addr().cast(), r.len()) {
                tracing::warn!(addr = r.addr(), error = %e, "unregistering guest memory from userfaultfd");
            }
        }
        // The unregister's own wake runs before it write-locks the VMA, so
        // a faulter can queue after it (see the module doc); by now every
        // such faulter is queued: wake them.
        for r in &self.regions {
            let _ = self.uffd.wake(r.host_addr().cast(), r.len());
        }
    }

    /// Records a fatal error and wakes waiters. The regions stay
    /// registered and nothing more is served, so no faulter runs on memory
    /// that was not verified; [`LazyLoader::stop`] releases them.
    fn fail(&self, e: Error) {
        tracing::error!(error = %e, "lazy memory loader failed");
        self.failed.store(true, Ordering::SeqCst);
        let mut st = self.state.lock().expect("not poisoned");
        if st.error.is_none() {
            st.error = Some(Arc::new(e));
        }
        self.cond.notify_all();
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Installs pages `gp..gp + n` of region `r` from `src` (or zero pages
    /// if `None`), skipping pages that turn out to be filled already.
    fn fill(
        &self,
        r: &MemRegion,
        gp: usize,
        n: usize,
        src: Option<*const u8>,
        who: Who,
    ) -> Result<()> {
        let dst0 = Self::page_addr(r, gp);
        let len = n << PAGE_SHIFT;
        let mut off = 0;
        let mut again = 0u32;
        while off < len {
            let s = src.map(|p| p.wrapping_add(off));
            match ioctl_fill(self.fd(), dst0 + off, s, len - off, self.copy_mode) {
                Ok(done) => {
                    let p = gp + (off >> PAGE_SHIFT);
                    let k = done >> PAGE_SHIFT;
                    // Counters first, then the bitmap: whoever sees
                    // completion also sees every counter that led to it.
                    let counter = match who {
                        Who::Demand => &self.stats.pages_demand,
                        Who::Prefetch => &self.stats.pages_prefetched,
                        Who::Zero => &self.stats.pages_zero_filled,
                    };
                    counter.fetch_add(k as u64, Ordering::Relaxed);
                    if who != Who::Zero {
                        self.stats
                            .bytes_copied
                            .fetch_add(done as u64, Ordering::Relaxed);
                    }
                    self.mark_filled(p, p + k);
                    off += done;
                    again = 0;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Filled by the other thread: account it, make sure
                    // its waiters are awake, move past it.
                    let p = gp + (off >> PAGE_SHIFT);
                    self.stats
                        .pages_already_filled
                        .fetch_add(1, Ordering::Relaxed);
                    self.mark_filled(p, p + 1);
                    let _ = self.uffd.wake((dst0 + off) as *mut libc::c_void, PAGE_SIZE);
                    off += PAGE_SIZE;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && again < MAX_EAGAIN => {
                    // The mm is changing under us; retry.
                    again += 1;
                    std::thread::yield_now();
                }
                Err(_) if self.released.load(Ordering::SeqCst) => {
                    // Regions were unregistered (complete or stopped). A
                    // faulter whose message we read may have queued after
                    // the unregister's wake: wake the rest of the range.
                    let _ = self.uffd.wake((dst0 + off) as *mut libc::c_void, len - off);
                    return Ok(());
                }
                Err(source) => {
                    return Err(Error::Fill {
                        op: if src.is_some() {
                            "UFFDIO_COPY"
                        } else {
                            "UFFDIO_ZEROPAGE"
                        },
                        addr: dst0 + off,
                        len: len - off,
                        file_offset: ((gp as u64) << PAGE_SHIFT) + off as u64,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Copies the missing present pages in `lo..hi` (inside region `r`),
    /// one run of consecutive missing pages at a time.
    fn copy_span(
        &self,
        r: &MemRegion,
        lo: usize,
        hi: usize,
        who: Who,
        buf: &mut CopyBuf,
    ) -> Result<()> {
        if self.huge {
            // Every block holding a missing present page in lo..hi.
            let mut p = lo;
            while let Some(s) = self.next_missing(&self.present, p, hi) {
                let b0 = Self::block_start(r, s);
                self.fill_huge(r, b0, who, buf)?;
                p = b0 + HUGE_PAGES;
            }
            return Ok(());
        }
        let mut p = lo;
        while let Some(s) = self.next_missing(&self.present, p, hi) {
            let e = self.next_not_missing(&self.present, s, hi);
            let mut a = s;
            while a < e {
                let b = (a + buf.pages()).min(e);
                self.copy_run(r, a, b, who, buf)?;
                a = b;
            }
            p = e;
        }
        Ok(())
    }

    /// Copies pages `s..e` (at most `buf.pages()`): reads them from the
    /// file into `buf`, verifies their checksums, then `UFFDIO_COPY`s from
    /// `buf`, so what the guest gets is what was verified.
    fn copy_run(
        &self,
        r: &MemRegion,
        s: usize,
        e: usize,
        who: Who,
        buf: &mut CopyBuf,
    ) -> Result<()> {
        if self.failed() {
            return Ok(());
        }
        let off = (s as u64) << PAGE_SHIFT;
        let len = (e - s) << PAGE_SHIFT;
        // SAFETY: `buf.map` is our own mapping of at least `len` bytes
        // (e - s <= buf.pages()), used by this thread only.
        let data = unsafe { std::slice::from_raw_parts_mut(buf.map.addr(), len) };
        let _ = off;
        self.chain.read_verified(s, data, &mut buf.scratch)?;
        self.stats
            .pages_verified
            .fetch_add((e - s) as u64, Ordering::Relaxed);
        self.fill(r, s, e - s, Some(buf.map.addr() as *const u8), who)
    }

    /// First page of the 2 MiB block holding page `gp` of region `r`.
    fn block_start(r: &MemRegion, gp: usize) -> usize {
        let rp0 = r.first_page();
        rp0 + (gp - rp0) / HUGE_PAGES * HUGE_PAGES
    }

    /// hugetlb: installs the 2 MiB block starting at page `b0` of region
    /// `r` (its present pages read and verified into a zeroed buffer, holes
    /// zero) with one `UFFDIO_COPY`, unless it is filled already.
    fn fill_huge(&self, r: &MemRegion, b0: usize, who: Who, buf: &mut CopyBuf) -> Result<()> {
        let b1 = b0 + HUGE_PAGES;
        let len = HUGE_PAGES * PAGE_SIZE;
        let dst = Self::page_addr(r, b0);
        if self.failed() {
            return Ok(());
        }
        if self.is_filled(b0) {
            // Filled between the fault thread's check and here: the fault
            // was served by the other thread (counted, so that every
            // demanded page shows up in the counters).
            if who == Who::Demand {
                self.stats
                    .pages_already_filled
                    .fetch_add(1, Ordering::Relaxed);
            }
            let _ = self.uffd.wake(dst as *mut libc::c_void, len);
            return Ok(());
        }
        if let Some(c) = &self.cont {
            return self.fill_huge_continue(c, r, b0, who);
        }
        debug_assert!(buf.pages() >= HUGE_PAGES);
        // SAFETY: `buf.map` is our own mapping of at least 2 MiB, used by
        // this thread only.
        let data = unsafe { std::slice::from_raw_parts_mut(buf.map.addr(), len) };
        data.fill(0);
        let mut present = 0usize;
        let mut p = b0;
        while p < b1 {
            if !self.present.get(p) {
                p += 1;
                continue;
            }
            let mut e = p + 1;
            while e < b1 && self.present.get(e) {
                e += 1;
            }
            let part = &mut data[(p - b0) * PAGE_SIZE..(e - b0) * PAGE_SIZE];
            self.chain.read_verified(p, part, &mut buf.scratch)?;
            present += e - p;
            p = e;
        }
        self.stats
            .pages_verified
            .fetch_add(present as u64, Ordering::Relaxed);
        let src = buf.map.addr() as *const u8;
        self.finish_huge(who, (b0, b1), (dst, len), present, len, || {
            ioctl_fill(self.fd(), dst, Some(src), len, self.copy_mode)
        })
        .map_err(|source| Error::Fill {
            op: "UFFDIO_COPY (2 MiB)",
            addr: dst,
            len,
            file_offset: (b0 as u64) << PAGE_SHIFT,
            source,
        })
    }

    /// hugetlb with `UFFDIO_CONTINUE`: unless another thread claimed the
    /// block, reads its present pages straight into the memfd's page cache
    /// through the alias mapping (holes stay as the kernel zeroed the new
    /// huge page), verifies them there, then maps the block into the guest.
    /// The guest cannot see the block before the `UFFDIO_CONTINUE` (its
    /// faults on it wait in the kernel), so what it gets is what was
    /// verified. A block that fails verification is punched out of the
    /// page cache, so a guest released by `stop` sees zeros, not bad data.
    fn fill_huge_continue(
        &self,
        c: &ContinueFill,
        r: &MemRegion,
        b0: usize,
        who: Who,
    ) -> Result<()> {
        if !c.claim(b0) {
            // Being filled by the other thread, whose UFFDIO_CONTINUE
            // wakes this block's faulters. The prefetcher waits for that
            // one block (the fault thread never waits: it has faults to
            // serve), so that it finishes only when everything is in.
            if who == Who::Demand {
                self.stats
                    .pages_already_filled
                    .fetch_add(1, Ordering::Relaxed);
            }
            if who == Who::Prefetch {
                while !self.is_filled(b0)
                    && !self.failed()
                    && !self.stop.load(Ordering::Relaxed)
                    && !self.released.load(Ordering::Relaxed)
                {
                    std::thread::yield_now();
                }
            }
            return Ok(());
        }
        let b1 = b0 + HUGE_PAGES;
        let len = HUGE_PAGES * PAGE_SIZE;
        let dst = Self::page_addr(r, b0);
        let ri = self
            .regions
            .iter()
            .position(|x| x.first_page() == r.first_page())
            .unwrap_or(0);
        let (abase, alen) = c.alias[ri];
        let boff = (b0 - r.first_page()) * PAGE_SIZE;
        debug_assert!(boff + len <= alen);
        let mut scratch = Vec::new();
        let mut present = 0usize;
        let mut p = b0;
        while p < b1 {
            let Some(s) = self.present.next_one(p).filter(|&s| s < b1) else {
                break;
            };
            let e = self.present.next_zero(s).min(b1);
            // SAFETY: pages s..e of the block lie inside the alias mapping
            // (boff + len <= alen); this thread holds the block's claim, so
            // nothing else reads or writes these bytes now.
            let part = unsafe {
                std::slice::from_raw_parts_mut(
                    (abase + boff + (s - b0) * PAGE_SIZE) as *mut u8,
                    (e - s) * PAGE_SIZE,
                )
            };
            if let Err(e) = self.chain.read_verified(s, part, &mut scratch) {
                self.punch(c, ri, boff, len);
                return Err(e.into());
            }
            present += e - s;
            p = e;
        }
        if present == 0 {
            // A block of holes: allocate its (zeroed) page in the page
            // cache so that UFFDIO_CONTINUE has something to map.
            // SAFETY: an in-bounds byte of the alias mapping, claimed by us.
            unsafe { ((abase + boff) as *mut u8).write_volatile(0) };
        }
        self.stats
            .pages_verified
            .fetch_add(present as u64, Ordering::Relaxed);
        self.finish_huge(
            who,
            (b0, b1),
            (dst, len),
            present,
            present * PAGE_SIZE,
            || ioctl_continue(self.fd(), dst, len, self.copy_mode),
        )
        .map_err(|source| {
            self.punch(c, ri, boff, len);
            Error::Fill {
                op: "UFFDIO_CONTINUE (2 MiB)",
                addr: dst,
                len,
                file_offset: (b0 as u64) << PAGE_SHIFT,
                source,
            }
        })
    }

    /// Drives one 2 MiB fill (`op`: UFFDIO_COPY or UFFDIO_CONTINUE of
    /// `len` bytes at `dst`, blocks `b0..b1`, `present` pages of data,
    /// `bytes` moved) to its end: done (counted, blocks marked filled);
    /// filled by another thread first (EEXIST); retried on EAGAIN; given up
    /// quietly once the loader is released. Err: the ioctl's error.
    fn finish_huge(
        &self,
        who: Who,
        (b0, b1): (usize, usize),
        (dst, len): (usize, usize),
        present: usize,
        bytes: usize,
        mut op: impl FnMut() -> std::io::Result<usize>,
    ) -> std::io::Result<()> {
        let mut again = 0u32;
        loop {
            match op() {
                Ok(_) => {
                    let counter = match (who, present) {
                        (_, 0) => &self.stats.pages_zero_filled,
                        (Who::Prefetch, _) => &self.stats.pages_prefetched,
                        _ => &self.stats.pages_demand,
                    };
                    counter.fetch_add(
                        if present == 0 { HUGE_PAGES } else { present } as u64,
                        Ordering::Relaxed,
                    );
                    self.stats
                        .bytes_copied
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    self.mark_filled(b0, b1);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.stats
                        .pages_already_filled
                        .fetch_add(HUGE_PAGES as u64, Ordering::Relaxed);
                    self.mark_filled(b0, b1);
                    let _ = self.uffd.wake(dst as *mut libc::c_void, len);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && again < MAX_EAGAIN => {
                    again += 1;
                    std::thread::yield_now();
                }
                Err(_) if self.released.load(Ordering::SeqCst) => {
                    let _ = self.uffd.wake(dst as *mut libc::c_void, len);
                    return Ok(());
                }
                Err(source) => return Err(source),
            }
        }
    }

    /// Removes a block that was never mapped into the guest from its
    /// memfd's page cache (best effort; logged).
    fn punch(&self, c: &ContinueFill, ri: usize, off: usize, len: usize) {
        // SAFETY: fallocate on our own memfd; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                c.files[ri].as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), off, "removing an unverified block from guest memory");
        }
    }

    fn fault_thread(self: Arc<Self>) {
        if let Err(e) = self.fault_loop() {
            // Regions are released by `fail`, which wakes every faulter.
            self.fail(e);
        }
    }

    fn fault_loop(&self) -> Result<()> {
        let zero = AnonMapping::new(PAGE_SIZE)
            .map_err(|e| Error::Sys("mapping the zero page buffer", e))?;
        let block = if self.huge {
            self.opts.fault_block.max(HUGE_PAGES * PAGE_SIZE)
        } else {
            self.opts.fault_block
        };
        let mut buf = CopyBuf::new(block)?;
        // Threads that faulted on our regions (for stall detection).
        let mut faulters = std::collections::BTreeSet::new();
        let mut events: Vec<Fault> = Vec::with_capacity(64);
        let mut pfds = [
            libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `pfds` is a valid array of two pollfds.
            let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, SAFETY_WAKE_MS) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Sys("polling the userfaultfd", e));
            }
            if rc == 0 {
                if !self.failed() {
                    self.safety_wake(&mut faulters);
                }
                continue;
            }
            if pfds[1].revents != 0 || self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if pfds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err(Error::Sys(
                    "userfaultfd reported an error condition",
                    std::io::Error::other(format!("revents {:#x}", pfds[0].revents)),
                ));
            }
            loop {
                let read = self
                    .uffd
                    .read_faults(&mut events)
                    .map_err(Error::ReadEvents)?;
                for f in &events {
                    if f.tid != 0 && faulters.len() < MAX_TRACKED_FAULTERS {
                        faulters.insert(f.tid);
                    }
                    if f.wp {
                        // A write to a present, write-protected page
                        // (synchronous write tracking): never a fill.
                        self.on_wp_fault(f.addr as usize);
                        continue;
                    }
                    self.stats.faults.fetch_add(1, Ordering::Relaxed);
                    if self.failed() {
                        // Serve nothing after a failure: the faulter stays
                        // blocked until the VMM stops it (see module doc).
                        continue;
                    }
                    if self.released.load(Ordering::SeqCst) {
                        // Regions are (being) unregistered. The unregister
                        // wakes faulters, but one queued around it was seen
                        // asleep: wake it here too; it faults again on the
                        // plain mapping.
                        let unit = if self.huge {
                            HUGE_PAGES * PAGE_SIZE
                        } else {
                            PAGE_SIZE
                        };
                        let page = (f.addr as usize) & !(unit - 1);
                        let _ = self.uffd.wake(page as *mut libc::c_void, unit);
                        continue;
                    }
                    if let Err(e) = self.on_fault(f.addr as usize, f.write, &zero, &mut buf) {
                        if self.tracking != Some(dirty::Mode::Sync) {
                            return Err(e);
                        }
                        // Fail as the thread's end would, but stay to
                        // resolve write-protect faults (writes to pages that
                        // are in place and verified) until `stop`.
                        self.fail(e);
                    }
                }
                if read == 0 {
                    break;
                }
            }
        }
    }

    /// Resolves a write-protect fault at `addr` (synchronous write
    /// tracking): un-protects its page (its 2 MiB block on hugetlb), which
    /// wakes the writer. Also after a failure: the page is in place and was
    /// verified. If un-protecting fails the loader fails and the writer
    /// stays blocked like a missing-page faulter after a failure (the VMM
    /// stops the VM; `stop` releases it).
    fn on_wp_fault(&self, addr: usize) {
        let unit = if self.huge {
            HUGE_PAGES * PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        if self.released.load(Ordering::SeqCst) {
            // Unregistered: the protection is gone; just wake it.
            let _ = self
                .uffd
                .wake((addr & !(unit - 1)) as *mut libc::c_void, unit);
            return;
        }
        // Counted before the ioctl wakes the writer: whoever the write
        // unblocks sees it counted.
        self.stats.wp_faults.fetch_add(1, Ordering::Relaxed);
        match dirty::resolve_wp(&self.uffd, addr, unit) {
            Ok(()) => {}
            Err(_) if self.released.load(Ordering::SeqCst) => {
                let _ = self
                    .uffd
                    .wake((addr & !(unit - 1)) as *mut libc::c_void, unit);
            }
            Err(source) => {
                let page = addr & !(unit - 1);
                self.fail(Error::Fill {
                    op: "UFFDIO_WRITEPROTECT (un-protect)",
                    addr: page,
                    len: unit,
                    file_offset: self
                        .locate(page)
                        .map_or(0, |(_, gp)| (gp as u64) << PAGE_SHIFT),
                    source,
                });
            }
        }
    }

    /// Runs when the fault thread was idle for [`SAFETY_WAKE_MS`]: finds
    /// threads that faulted on our regions and are asleep in
    /// `handle_userfault` with no fault message pending (a lost wake-up: no
    /// one will serve them), counts them in [`LazyStats::timeout_wakes`]
    /// (warn), and wakes every faulter in our regions. A woken faulter
    /// whose page is still missing simply faults again and is served.
    fn safety_wake(&self, faulters: &mut std::collections::BTreeSet<u32>) {
        let mut stuck = Vec::new();
        faulters.retain(|&tid| match in_userfault(tid) {
            None => false, // exited
            Some(true) => {
                stuck.push(tid);
                true
            }
            Some(false) => true,
        });
        // A message pending now means the faulter is merely not served yet.
        if !stuck.is_empty() && !self.message_pending() {
            self.stats
                .timeout_wakes
                .fetch_add(stuck.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                threads = ?stuck,
                total = self.stats.timeout_wakes.load(Ordering::Relaxed),
                "userfaultfd: faulting threads were asleep with no fault pending (lost wake-up); waking them"
            );
        }
        // Also after the regions were released: a faulter queued on them
        // before the unregister is still woken through this userfaultfd.
        for r in &self.regions {
            let _ = self.uffd.wake(r.host_addr().cast(), r.len());
        }
    }

    /// True if a fault message is waiting to be read.
    fn message_pending(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc > 0 && pfd.revents & libc::POLLIN != 0
    }

    fn on_fault(
        &self,
        addr: usize,
        write: bool,
        zero: &AnonMapping,
        buf: &mut CopyBuf,
    ) -> Result<()> {
        let Some((r, gp)) = self.locate(addr) else {
            tracing::warn!(addr, "userfaultfd fault outside guest memory");
            return Ok(());
        };
        let page = Self::page_addr(r, gp);
        if self.is_filled(gp) {
            // Already brought in (by the prefetcher, or by an earlier fault
            // in its block): not demanded, just wake the faulter.
            let _ = self.uffd.wake(page as *mut libc::c_void, PAGE_SIZE);
            return Ok(());
        }
        // The guest needed this page before anyone brought it: its working
        // set (recorded for the next restore).
        self.demanded[gp / 64].fetch_or(1 << (gp % 64), Ordering::AcqRel);
        if self.huge {
            return self.fill_huge(r, Self::block_start(r, gp), Who::Demand, buf);
        }
        let bp = self.opts.fault_block / PAGE_SIZE;
        let rp0 = r.first_page();
        let rp1 = rp0 + r.len() / PAGE_SIZE;
        let b0 = rp0 + (gp - rp0) / bp * bp;
        let b1 = (b0 + bp).min(rp1);
        if self.present.get(gp) {
            self.copy_span(r, b0, b1, Who::Demand, buf)?;
            if !self.is_filled(gp) {
                // Not reachable unless the kernel misbehaves; do not leave
                // the faulter asleep.
                let _ = self.uffd.wake(page as *mut libc::c_void, PAGE_SIZE);
            }
            return Ok(());
        }
        // A hole: the run of unfilled hole pages around it in this block.
        let unfilled_hole = |p: usize| !self.present.get(p) && !self.is_filled(p);
        let mut hs = gp;
        while hs > b0 && unfilled_hole(hs - 1) {
            hs -= 1;
        }
        let mut he = gp + 1;
        while he < b1 && unfilled_hole(he) {
            he += 1;
        }
        if write {
            // A real zeroed page now saves the copy-on-write fault that a
            // zero-page mapping would take on this write.
            self.fill(r, gp, 1, Some(zero.addr() as *const u8), Who::Zero)?;
            if hs < gp {
                self.fill(r, hs, gp - hs, None, Who::Zero)?;
            }
            if gp + 1 < he {
                self.fill(r, gp + 1, he - gp - 1, None, Who::Zero)?;
            }
        } else {
            self.fill(r, hs, he - hs, None, Who::Zero)?;
        }
        Ok(())
    }

    fn prefetch_thread(self: Arc<Self>) {
        if let Err(e) = self.prefetch_all() {
            self.fail(e);
        }
    }

    /// Asks the kernel to start reading every run of working-set pages from
    /// the memory file at once (`MADV_WILLNEED` on the file mapping), so the
    /// copies below find them in the page cache instead of waiting for one
    /// read after another.
    fn read_ahead_working_set(&self) {
        let mut p = 0;
        let total = self.map.len / PAGE_SIZE;
        while let Some(s) = self.next_missing(&self.ws, p, total) {
            let e = self.next_not_missing(&self.ws, s, total);
            // hugetlb fills whole blocks: read their other pages ahead too
            // (regions start on 2 MiB boundaries in the file).
            let (rs, re) = if self.huge {
                (
                    s / HUGE_PAGES * HUGE_PAGES,
                    e.next_multiple_of(HUGE_PAGES).min(total),
                )
            } else {
                (s, e)
            };
            let (off, len) = (rs << PAGE_SHIFT, (re - rs) << PAGE_SHIFT);
            // SAFETY: advice on a sub-range of our own read-only file
            // mapping; it only starts reads into the page cache.
            unsafe {
                libc::madvise(
                    (self.map.addr + off) as *mut libc::c_void,
                    len,
                    libc::MADV_WILLNEED,
                )
            };
            p = e;
        }
    }

    fn prefetch_all(&self) -> Result<()> {
        let mut chunk = (self.opts.prefetch_chunk / PAGE_SIZE).max(1);
        if self.huge {
            chunk = chunk.next_multiple_of(HUGE_PAGES);
        }
        let mut buf = CopyBuf::new(chunk * PAGE_SIZE)?;
        self.read_ahead_working_set();
        for (pass, bits) in [&self.ws, &self.present].into_iter().enumerate() {
            let ws_pass = pass == 0;
            for r in &self.regions {
                let rp1 = r.first_page() + r.len() / PAGE_SIZE;
                let mut p = r.first_page();
                while p < rp1 {
                    if self.stop.load(Ordering::Relaxed)
                        || self.released.load(Ordering::Relaxed)
                        || self.failed()
                    {
                        return Ok(());
                    }
                    let end = (p + chunk).min(rp1);
                    if ws_pass {
                        // Only the working set's own pages (runs closer than
                        // WS_GAP_PAGES merged): a sparse working set must not
                        // cost whole chunks before it counts as resident.
                        let mut q = p;
                        while let Some(s) = self.next_missing(bits, q, end) {
                            let mut e = self.next_not_missing(bits, s, end);
                            while let Some(n) = self.next_missing(bits, e, end) {
                                if n - e > WS_GAP_PAGES {
                                    break;
                                }
                                e = self.next_not_missing(bits, n, end);
                            }
                            self.copy_span(r, s, e, Who::Prefetch, &mut buf)?;
                            q = e;
                        }
                    } else if let Some(first) = self.next_missing(bits, p, end) {
                        let last = self.last_missing(bits, first, end).unwrap_or(first);
                        self.copy_span(r, first, last + 1, Who::Prefetch, &mut buf)?;
                    }
                    p = end;
                }
            }
        }
        let missing =
            self.stats.present_pages as usize - self.present_filled.load(Ordering::Acquire);
        if missing > 0 && !self.released.load(Ordering::SeqCst) && !self.failed() {
            return Err(Error::Incomplete { missing });
        }
        Ok(())
    }
}

/// How often (in ms) an idle fault thread looks for faulters left asleep
/// and wakes all of them (see `Shared::safety_wake`).
const SAFETY_WAKE_MS: libc::c_int = 100;

/// Faulting thread ids remembered for stall detection (vCPUs and a few
/// others in practice; the bound only caps memory).
const MAX_TRACKED_FAULTERS: usize = 1024;

/// Whether thread `tid` of this process is asleep on a userfaultfd fault
/// (its wait channel is `handle_userfault`); `None` if it has exited.
pub(crate) fn in_userfault(tid: u32) -> Option<bool> {
    match std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")) {
        Ok(w) => Some(w.trim() == "handle_userfault"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) => Some(false),
    }
}

/// Working-set prefetch: gaps of at most this many pages between working-set
/// pages are copied through (one larger copy beats several small ones).
const WS_GAP_PAGES: usize = 16;

/// Result of [`fill_rate_probe`].
#[derive(Debug, Clone)]
pub struct FillProbe {
    /// Bytes filled.
    pub bytes: u64,
    /// Time from `start` until all memory was resident.
    pub elapsed: Duration,
    /// `bytes / elapsed` in GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
    /// `start` itself (registration and checks).
    pub start_time: Duration,
    /// Raw `UFFDIO_COPY` rate in the same run: 2 MiB copies from an
    /// in-memory buffer into a fresh registered mapping, no file, no faults.
    pub baseline_gb_per_s: f64,
}

/// Raw `UFFDIO_COPY` throughput into a fresh mapping of `bytes`.
fn copy_baseline(bytes: usize) -> Result<f64> {
    let chunk = 2 << 20;
    let src = AnonMapping::new(chunk).map_err(|e| Error::Sys("mapping probe memory", e))?;
    // SAFETY: in-bounds write to our own fresh mapping.
    unsafe { std::ptr::write_bytes(src.addr(), 0x5a, chunk) };
    let dst = AnonMapping::new(bytes).map_err(|e| Error::Sys("mapping probe memory", e))?;
    let uffd = Uffd::create(false).map_err(Error::Create)?;
    uffd.register(dst.addr().cast(), bytes)
        .map_err(|source| Error::Register {
            addr: dst.addr() as usize,
            len: bytes,
            source,
        })?;
    let t = Instant::now();
    let mut off = 0;
    while off < bytes {
        let n = chunk.min(bytes - off);
        let done = ioctl_fill(
            uffd.as_raw_fd(),
            dst.addr() as usize + off,
            Some(src.addr()),
            n,
            0,
        )
        .map_err(|source| Error::Fill {
            op: "UFFDIO_COPY",
            addr: dst.addr() as usize + off,
            len: n,
            file_offset: 0,
            source,
        })?;
        off += done;
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// Measures the lazy loader's prefetch fill rate: writes a fully present
/// memory file of `bytes` in `dir`, warms it in the page cache, then fills
/// a fresh mapping from it with no faults. For `stasis bench`.
pub fn fill_rate_probe(bytes: usize, dir: &Path) -> Result<FillProbe> {
    let bytes = bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let src = AnonMapping::new(bytes).map_err(|e| Error::Sys("mapping probe memory", e))?;
    for p in 0..bytes / PAGE_SIZE {
        // SAFETY: in-bounds write to our own fresh mapping.
        unsafe {
            src.addr()
                .add(p * PAGE_SIZE)
                .cast::<u64>()
                .write(p as u64 + 1)
        };
    }
    let path = dir.join(format!("stasis-fill-probe-{}.bin", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| Error::Sys("creating the probe file", e))?;
    let _ = std::fs::remove_file(&path);
    let region = src.region(0);
    let rep = memfile::write_memory(&file, &[region], &memfile::WriteOpts::default())?;
    drop(src);
    let meta = MemoryMeta::new(&[region], rep.present, rep.sums, PageBitmap::new(0))?;
    // Warm the page cache.
    let warm = AnonMapping::new(bytes).map_err(|e| Error::Sys("mapping probe memory", e))?;
    memfile::read_memory_eager(
        &file,
        &[warm.region(0)],
        &meta,
        &memfile::ReadOpts::default(),
    )?;
    drop(warm);
    let baseline_gb_per_s = copy_baseline(bytes)?;
    let dst = AnonMapping::new(bytes).map_err(|e| Error::Sys("mapping probe memory", e))?;
    let t = Instant::now();
    let loader = LazyLoader::start(file, vec![dst.region(0)], &meta, LazyOpts::default())?;
    let start_time = t.elapsed();
    let elapsed = loader.wait_complete()?;
    loader.stop();
    let gb_per_s = bytes as f64 / elapsed.as_secs_f64() / 1e9;
    Ok(FillProbe {
        bytes: bytes as u64,
        elapsed,
        gb_per_s,
        start_time,
        baseline_gb_per_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memfile::{write_memory, WriteOpts};
    use crate::snapshot::testutil::{huge_map, kernel_write, pagemap, HugeMap};
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc;

    const MIB: usize = 1 << 20;

    /// Fails loudly unless userfaultfd (with kernel-mode faults) works here,
    /// or `STASIS_ALLOW_SKIP=1` is set, in which case the test is skipped.
    fn require_uffd() -> bool {
        match Uffd::create(false) {
            Ok(_) => true,
            Err(e) if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") => {
                eprintln!("\n*** SKIPPED (not passed): userfaultfd unavailable ({e}); STASIS_ALLOW_SKIP=1 ***\n");
                false
            }
            Err(e) => panic!(
                "userfaultfd is unavailable ({e}): these tests need root or /dev/userfaultfd; \
                 set STASIS_ALLOW_SKIP=1 to skip them"
            ),
        }
    }

    /// Page kinds: 0 untouched hole, 1 zero-written hole, 2 data.
    fn kind(p: usize) -> u8 {
        match p % 11 {
            0 | 4 => 0,
            7 => 1,
            _ if (p / 300) % 4 == 3 => 0, // long hole runs too
            _ => 2,
        }
    }

    fn word(p: usize, i: usize) -> u64 {
        ((p as u64) << 20) ^ (i as u64).wrapping_mul(0x9e37_79b9) | 1
    }

    /// A source image of `sizes` regions, its memory file and metadata.
    struct Image {
        file: File,
        meta: MemoryMeta,
        sizes: Vec<usize>,
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    /// Inverts the byte at `off` of the file at `path`.
    fn flip_byte(path: &Path, off: u64) {
        let f = File::options().read(true).write(true).open(path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[!b[0]], off).unwrap();
    }

    fn make_image(sizes: &[usize], ws: impl Fn(usize) -> bool) -> Image {
        let maps: Vec<AnonMapping> = sizes
            .iter()
            .map(|&s| AnonMapping::new(s).unwrap())
            .collect();
        let regions = regions_of(&maps);
        for r in &regions {
            for i in 0..r.pages() {
                let p = r.first_page() + i;
                let page = (r.addr() + i * PAGE_SIZE) as *mut u64;
                match kind(p) {
                    0 => {}
                    // SAFETY: in-bounds write to the test's own mapping.
                    1 => unsafe { page.write(0) },
                    _ => {
                        for w in 0..PAGE_SIZE / 8 {
                            // SAFETY: in-bounds write to the test's own mapping.
                            unsafe { page.add(w).write(word(p, w)) };
                        }
                    }
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let rep = write_memory(&file, &regions, &WriteOpts::default()).unwrap();
        let total = rep.present.len();
        let mut wsb = PageBitmap::new(total);
        (0..total).filter(|&p| ws(p)).for_each(|p| wsb.set(p));
        let meta = MemoryMeta::new(&regions, rep.present, rep.sums, wsb).unwrap();
        Image {
            file,
            meta,
            sizes: sizes.to_vec(),
            _dir: dir,
            path,
        }
    }

    fn regions_of(maps: &[AnonMapping]) -> Vec<MemRegion> {
        let mut off = 0u64;
        maps.iter()
            .map(|m| {
                let r = m.region(off);
                off += m.len() as u64;
                r
            })
            .collect()
    }

    fn fresh(img: &Image) -> (Vec<AnonMapping>, Vec<MemRegion>) {
        let maps: Vec<AnonMapping> = img
            .sizes
            .iter()
            .map(|&s| AnonMapping::new(s).unwrap())
            .collect();
        let regions = regions_of(&maps);
        (maps, regions)
    }

    /// Reads page `p` (faulting it in) and checks it against the source.
    fn check_page(regions: &[MemRegion], p: usize) -> std::result::Result<(), String> {
        let r = memfile::region_of(regions, p).unwrap();
        let page = (r.addr() + (p - r.first_page()) * PAGE_SIZE) as *const u64;
        for w in 0..PAGE_SIZE / 8 {
            // SAFETY: in-bounds volatile read of a registered page; the
            // loader fills it on fault.
            let got = unsafe { page.add(w).read_volatile() };
            let want = if kind(p) == 2 { word(p, w) } else { 0 };
            if got != want {
                return Err(format!("page {p} word {w}: got {got:#x}, want {want:#x}"));
            }
        }
        Ok(())
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    fn concurrent_readers(prefetch: bool) {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[16 * MIB, 32 * MIB], |p| p % 5 == 0);
        let (_maps, regions) = fresh(&img);
        let present = img.meta.present.count_ones() as u64;
        let opts = LazyOpts {
            prefetch,
            prefetch_chunk: 512 << 10,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts,
        )
        .unwrap();
        let total = img.meta.total_pages();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let regions = &regions;
                s.spawn(move || {
                    let mut seed =
                        0x1234_5678_9abc_def1 ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    for _ in 0..3000 {
                        let p = (xorshift(&mut seed) % total as u64) as usize;
                        check_page(regions, p).unwrap();
                    }
                });
            }
        });
        // Touch every page (demand-only mode completes only this way).
        for p in 0..total {
            check_page(&regions, p).unwrap();
        }
        let done = loader.wait_complete().unwrap();
        assert!(loader.wait_working_set().unwrap() <= done);
        let st = loader.stats();
        let demand = st.pages_demand.load(Ordering::Relaxed);
        let pre = st.pages_prefetched.load(Ordering::Relaxed);
        assert_eq!(demand + pre, present, "demand {demand} + prefetched {pre}");
        assert_eq!(
            st.bytes_copied.load(Ordering::Relaxed),
            present * PAGE_SIZE as u64
        );
        assert!(st.faults.load(Ordering::Relaxed) > 0);
        if !prefetch {
            assert_eq!(pre, 0);
            assert!(st.pages_zero_filled.load(Ordering::Relaxed) > 0);
        }
        assert!(loader.error().is_none());
        loader.stop();
        loader.stop(); // idempotent
    }

    #[test]
    fn lazy_restore_with_prefetch_and_concurrent_readers() {
        concurrent_readers(true);
    }

    #[test]
    fn lazy_restore_demand_only() {
        concurrent_readers(false);
    }

    /// The kernel itself reading guest memory (as KVM does) faults to the
    /// loader too: `write(2)` from an unfilled page must see its data.
    #[test]
    fn kernel_mode_fault_is_served() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[MIB], |_| false);
        let (_maps, regions) = fresh(&img);
        let opts = LazyOpts {
            prefetch: false,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts,
        )
        .unwrap();
        let p = img.meta.present.next_one(0).unwrap();
        let r = &regions[0];
        // SAFETY: in-bounds view of a registered page, only read (by the
        // kernel, via write(2)) while the loader fills it.
        let src = unsafe {
            std::slice::from_raw_parts((r.addr() + p * PAGE_SIZE) as *const u8, PAGE_SIZE)
        };
        let mut out = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut out, src).unwrap();
        let mut back = vec![0u8; PAGE_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&out, &mut back, 0).unwrap();
        for (w, chunk) in back.chunks_exact(8).enumerate() {
            assert_eq!(u64::from_le_bytes(chunk.try_into().unwrap()), word(p, w));
        }
        assert!(loader.stats().faults.load(Ordering::Relaxed) >= 1);
        loader.stop();
    }

    /// A page installed by someone else between our bitmap check and our
    /// copy (what a racing prefetcher does) makes the demand copy of its
    /// block hit EEXIST: it must be skipped, counted once, not overwritten,
    /// and the rest of the block still filled.
    #[test]
    fn eexist_on_racing_copy() {
        if !require_uffd() {
            return;
        }
        // All pages data (kind 2) in the first block? Find a block of 16
        // pages with several present pages.
        let img = make_image(&[4 * MIB], |_| false);
        let (_maps, regions) = fresh(&img);
        let opts = LazyOpts {
            prefetch: false,
            release_when_complete: false,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts,
        )
        .unwrap();
        let bp = 16;
        let block = (0..img.meta.total_pages() / bp)
            .find(|b| {
                (b * bp..b * bp + bp)
                    .filter(|&p| img.meta.present.get(p))
                    .count()
                    >= 8
            })
            .unwrap();
        let racing: Vec<usize> = (block * bp..block * bp + bp)
            .filter(|&p| img.meta.present.get(p))
            .collect();
        let (x, y) = (racing[1], racing[2]);
        // Install page x behind the loader's back, as the racing thread would.
        let marker = AnonMapping::new(PAGE_SIZE).unwrap();
        // SAFETY: in-bounds write to our own buffer.
        unsafe { std::ptr::write_bytes(marker.addr(), 0xee, PAGE_SIZE) };
        let r = &regions[0];
        let xaddr = r.addr() + x * PAGE_SIZE;
        assert_eq!(
            ioctl_fill(loader.shared.fd(), xaddr, Some(marker.addr()), PAGE_SIZE, 0).unwrap(),
            PAGE_SIZE
        );
        // Fault on y: the handler copies the whole block, meeting x.
        check_page(&regions, y).unwrap();
        // y is woken as soon as its own page is in; a second fault, in
        // another block, is served only after the handler is done with y's
        // block, so after it the counters for that block are final.
        let z = (0..img.meta.total_pages())
            .find(|&p| p / bp != block && !img.meta.present.get(p))
            .unwrap();
        check_page(&regions, z).unwrap();
        let st = loader.stats();
        assert_eq!(st.pages_already_filled.load(Ordering::Relaxed), 1);
        assert_eq!(
            st.pages_demand.load(Ordering::Relaxed),
            racing.len() as u64 - 1
        );
        // x keeps what was installed first; the rest of the block is right.
        // SAFETY: x is now resident; in-bounds read.
        assert_eq!(unsafe { *(xaddr as *const u8) }, 0xee);
        for &p in &racing {
            if p != x {
                check_page(&regions, p).unwrap();
            }
        }
        // x counts toward completion exactly once: touch everything else.
        for p in 0..img.meta.total_pages() {
            if p != x {
                check_page(&regions, p).unwrap();
            }
        }
        assert!(loader.wait_complete().is_ok());
        let present = img.meta.present.count_ones() as u64;
        assert_eq!(st.pages_demand.load(Ordering::Relaxed), present - 1);
        // With release_when_complete = false, holes still fault to us.
        assert!(st.pages_zero_filled.load(Ordering::Relaxed) > 0);
    }

    /// Page-level race stress: many threads fault the same pages while the
    /// prefetcher copies them in small chunks; every page arrives once.
    #[test]
    fn same_page_fault_storm_during_prefetch() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[8 * MIB], |p| p % 2 == 0);
        let (_maps, regions) = fresh(&img);
        let opts = LazyOpts {
            prefetch_chunk: 64 << 10,
            fault_block: PAGE_SIZE,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts,
        )
        .unwrap();
        let total = img.meta.total_pages();
        std::thread::scope(|s| {
            for t in 0..4 {
                let regions = &regions;
                // Threads walk the pages from different ends.
                s.spawn(move || {
                    for i in 0..total {
                        let p = if t % 2 == 0 { i } else { total - 1 - i };
                        check_page(regions, p).unwrap();
                    }
                });
            }
        });
        loader.wait_complete().unwrap();
        let st = loader.stats();
        let present = img.meta.present.count_ones() as u64;
        // The winner of a race counts its page just after the loser's EEXIST
        // may have completed the load (see `pages_already_filled`): wait for
        // the counters to settle, bounded.
        let counted = || {
            st.pages_demand.load(Ordering::Relaxed) + st.pages_prefetched.load(Ordering::Relaxed)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while counted() < present && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(counted(), present);
        assert_eq!(
            st.bytes_copied.load(Ordering::Relaxed),
            present * PAGE_SIZE as u64
        );
    }

    fn gettid() -> u32 {
        // SAFETY: gettid has no arguments and no memory effects.
        unsafe { libc::syscall(libc::SYS_gettid) as u32 }
    }

    /// Polls `cond` until it holds, for at most 30 s (a hang is the bug;
    /// the deadline only turns it into a failure).
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts a thread that reads page `p` of region 0 and sends its tid
    /// first, then the first word it read.
    fn spawn_faulter(
        regions: &[MemRegion],
        p: usize,
    ) -> (u32, mpsc::Receiver<u64>, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let addr = regions[0].addr() + p * PAGE_SIZE;
        let h = std::thread::spawn(move || {
            tx.send(gettid() as u64).unwrap();
            // SAFETY: in-bounds read of a registered page of a live mapping.
            let v = unsafe { (addr as *const u64).read_volatile() };
            let _ = tx.send(v);
        });
        let tid = rx.recv().unwrap() as u32;
        (tid, rx, h)
    }

    /// The memory file shrinks under the loader: the read fails, the error
    /// is recorded and waiters get it; the faulting thread is *not* handed
    /// a zero page while the loader is failed (it stays blocked, as a vCPU
    /// would until the VMM stops it); `stop` releases it.
    #[test]
    fn read_error_keeps_faulter_blocked_until_stop() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[2 * MIB], |_| false);
        let (_maps, regions) = fresh(&img);
        let opts = LazyOpts {
            prefetch: false,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts,
        )
        .unwrap();
        File::options()
            .write(true)
            .open(&img.path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let p = img.meta.present.next_one(0).unwrap();
        let (tid, rx, faulter) = spawn_faulter(&regions, p);
        wait_for("the loader error", || loader.error().is_some());
        let e = loader.error().unwrap();
        assert!(e.to_string().contains("ended early: short read"), "{e}");
        assert!(matches!(loader.wait_complete(), Err(Error::Failed(_))));
        wait_for("the faulter to block", || in_userfault(tid) == Some(true));
        assert!(rx.try_recv().is_err(), "faulter got memory after a failure");
        loader.stop();
        let v = rx.recv().expect("faulter released by stop");
        faulter.join().unwrap();
        assert_eq!(v, 0, "after stop, unfilled pages read as zero");
    }

    /// One flipped byte in a present page of the file: the page is never
    /// copied into guest memory; the error names the file and the page's
    /// offset; on demand (faulter blocked until stop) and by prefetch.
    #[test]
    fn corrupt_page_is_never_copied() {
        if !require_uffd() {
            return;
        }
        for prefetch in [false, true] {
            let img = make_image(&[2 * MIB], |_| false);
            let p = img.meta.present.iter_ones().nth(100).unwrap();
            let off = (p * PAGE_SIZE + 77) as u64;
            flip_byte(&img.path, off);
            let (_maps, regions) = fresh(&img);
            let opts = LazyOpts {
                prefetch,
                ..LazyOpts::default()
            };
            let loader = LazyLoader::start(
                img.file.try_clone().unwrap(),
                regions.clone(),
                &img.meta,
                opts,
            )
            .unwrap();
            let want = format!(
                "memory file {}: checksum mismatch in the page at offset {:#x}",
                img.path.display(),
                p * PAGE_SIZE
            );
            if prefetch {
                let e = loader.wait_complete().unwrap_err();
                let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
                assert!(chain.contains(&want), "{chain}");
            }
            let (tid, rx, faulter) = spawn_faulter(&regions, p);
            wait_for("the loader error", || loader.error().is_some());
            let e = loader.error().unwrap().to_string();
            assert!(e.contains(&want), "{e}");
            wait_for("the faulter to block", || in_userfault(tid) == Some(true));
            assert!(rx.try_recv().is_err(), "faulter ran on unverified memory");
            loader.stop();
            assert_eq!(rx.recv().unwrap(), 0);
            faulter.join().unwrap();
        }
    }

    /// Writes `v` to the first word of page `p` of region 0 from kernel
    /// mode (`read` from a pipe), as KVM and device threads write guest
    /// memory.
    fn kernel_write_word(regions: &[MemRegion], p: usize, v: u64) {
        let dst = (regions[0].addr() + p * PAGE_SIZE) as *mut u8;
        kernel_write(dst, &v.to_le_bytes());
    }

    fn write_word(regions: &[MemRegion], p: usize, v: u64) {
        let a = regions[0].addr() + p * PAGE_SIZE;
        // SAFETY: in-bounds write to a registered page of a live mapping.
        unsafe { (a as *mut u64).write_volatile(v) };
    }

    fn read_word(regions: &[MemRegion], p: usize) -> u64 {
        let a = regions[0].addr() + p * PAGE_SIZE;
        // SAFETY: in-bounds read of a registered page of a live mapping.
        unsafe { (a as *const u64).read_volatile() }
    }

    /// Synchronous write protection (forced, as on a kernel without
    /// `UFFD_FEATURE_WP_ASYNC`), with and without prefetch: pages written
    /// by this thread, by another thread and from kernel mode (each first
    /// missing, then in place write-protected: a missing fault, then a WP
    /// fault) are dirty in the pagemap and hold what was written; present
    /// pages read or only prefetched are clean and intact.
    #[test]
    fn sync_write_protection_tracks_lazy_writes() {
        if !require_uffd() {
            return;
        }
        for prefetch in [false, true] {
            let img = make_image(&[4 * MIB], |p| p % 7 == 0);
            let (_maps, regions) = fresh(&img);
            let opts = LazyOpts {
                prefetch,
                track_writes: true,
                tracking: dirty::Policy::Sync,
                ..LazyOpts::default()
            };
            let loader = LazyLoader::start(
                img.file.try_clone().unwrap(),
                regions.clone(),
                &img.meta,
                opts,
            )
            .unwrap();
            assert_eq!(loader.write_tracking(), Some(dirty::Mode::Sync));
            let n = regions[0].pages();
            let data: Vec<usize> = (0..n).filter(|&p| kind(p) == 2).collect();
            let hole = (0..n).find(|&p| kind(p) == 0 && p > 600).unwrap();
            let (mine, other, kernel) = (data[3], data[200], data[400]);
            let read = [data[4], data[201], data[500]];
            for &p in &read {
                check_page(&regions, p).unwrap();
            }
            write_word(&regions, mine, 0xfeed_0001);
            write_word(&regions, hole, 0xfeed_0002);
            let rs = regions.clone();
            std::thread::spawn(move || write_word(&rs, other, 0xfeed_0003))
                .join()
                .unwrap();
            kernel_write_word(&regions, kernel, 0xfeed_0004);
            if prefetch {
                loader.wait_complete().unwrap();
            }
            assert!(loader.error().is_none());
            let wp = loader.stats().wp_faults.load(Ordering::Relaxed);
            assert!(wp >= 4, "{wp} write-protect faults for 4 written pages");
            // Every other page read (faulted in without prefetch).
            for p in (0..n).filter(|p| ![mine, hole, other, kernel].contains(p)) {
                check_page(&regions, p).unwrap();
            }
            let pm = pagemap(regions[0].addr(), n);
            let dirty_data: Vec<usize> = data
                .iter()
                .copied()
                .filter(|&p| dirty::entry_is_dirty(pm[p]))
                .collect();
            let mut want = vec![mine, other, kernel];
            want.sort_unstable();
            assert_eq!(dirty_data, want, "prefetch {prefetch}");
            assert!(dirty::entry_is_dirty(pm[hole]));
            for (p, v) in [
                (mine, 0xfeed_0001),
                (hole, 0xfeed_0002),
                (other, 0xfeed_0003),
                (kernel, 0xfeed_0004),
            ] {
                assert_eq!(read_word(&regions, p), v, "page {p}");
            }
            // Reading everything took no write-protect fault.
            assert_eq!(loader.stats().wp_faults.load(Ordering::Relaxed), wp);
            loader.stop();
        }
    }

    /// Synchronous write protection after the loader failed (a corrupt
    /// page): missing faults are no longer served (the faulter stays
    /// blocked until stop), but a write to a page already in place is
    /// still resolved: nothing else hangs.
    #[test]
    fn sync_write_protection_serves_writes_after_a_failure() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[2 * MIB], |_| false);
        let bad = img.meta.present.iter_ones().nth(300).unwrap();
        flip_byte(&img.path, (bad * PAGE_SIZE + 5) as u64);
        let good = img.meta.present.iter_ones().nth(1).unwrap();
        let (_maps, regions) = fresh(&img);
        let opts = LazyOpts {
            prefetch: false,
            track_writes: true,
            tracking: dirty::Policy::Sync,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts,
        )
        .unwrap();
        check_page(&regions, good).unwrap();
        let (tid, rx, faulter) = spawn_faulter(&regions, bad);
        wait_for("the loader error", || loader.error().is_some());
        wait_for("the faulter to block", || in_userfault(tid) == Some(true));
        write_word(&regions, good, 0xabcd);
        assert_eq!(read_word(&regions, good), 0xabcd);
        assert_eq!(loader.stats().wp_faults.load(Ordering::Relaxed), 1);
        assert!(rx.try_recv().is_err(), "faulter ran on unverified memory");
        loader.stop();
        assert_eq!(rx.recv().unwrap(), 0);
        faulter.join().unwrap();
    }

    /// Fresh hugetlb regions for `img` (one mapping per region, as the VMM
    /// makes them), their memfds; `None` (with a loud SKIPPED banner, only
    /// under STASIS_ALLOW_SKIP=1) without a pool.
    fn huge_fresh(img: &Image) -> Option<(Vec<HugeMap>, Vec<MemRegion>, Vec<File>)> {
        let (mut maps, mut regions, mut files) = (Vec::new(), Vec::new(), Vec::new());
        let mut off = 0u64;
        for &len in &img.sizes {
            let (map, f) = huge_map(len)?;
            // SAFETY: the mapping outlives the regions in every test.
            regions.push(unsafe { MemRegion::new(map.addr, len, off) });
            maps.push(map);
            files.push(f);
            off += len as u64;
        }
        Some((maps, regions, files))
    }

    fn start_huge(
        img: &Image,
        regions: &[MemRegion],
        files: Vec<File>,
        opts: LazyOpts,
    ) -> LazyLoader {
        let chain = super::super::layers::LayerChain::single(
            img.path.clone(),
            img.file.try_clone().unwrap(),
            img.meta.clone(),
        )
        .unwrap();
        LazyLoader::start_chain_on(chain, regions.to_vec(), opts, files).unwrap()
    }

    /// hugetlb, both fill methods, with and without prefetch: threads read
    /// every page from both ends while the loader fills; every page is
    /// right, every present page verified once, nothing left to a timeout.
    #[test]
    fn hugetlb_fills_serve_concurrent_readers() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[4 * MIB, 6 * MIB], |p| p % 5 == 0);
        let present = img.meta.present.count_ones() as u64;
        for (fill, prefetch) in [
            (HugeFill::Continue, true),
            (HugeFill::Continue, false),
            (HugeFill::Copy, true),
            (HugeFill::Copy, false),
        ] {
            let Some((_maps, regions, files)) = huge_fresh(&img) else {
                return;
            };
            let opts = LazyOpts {
                prefetch,
                huge_fill: fill,
                ..LazyOpts::default()
            };
            let loader = start_huge(&img, &regions, files, opts);
            assert_eq!(
                loader.huge_fill(),
                Some(fill),
                "kernel lacks minor faults on hugetlb?"
            );
            let total = img.meta.total_pages();
            std::thread::scope(|s| {
                for t in 0..4 {
                    let regions = &regions;
                    s.spawn(move || {
                        for i in 0..total {
                            let p = if t % 2 == 0 { i } else { total - 1 - i };
                            check_page(regions, p).unwrap();
                        }
                    });
                }
            });
            loader.wait_complete().unwrap();
            let st = loader.stats();
            let verified = st.pages_verified.load(Ordering::Relaxed);
            // CONTINUE: exactly once (one thread claims a block); COPY: both
            // threads may read a block, one copy then finds it in place.
            match fill {
                HugeFill::Continue => assert_eq!(verified, present, "{prefetch}"),
                HugeFill::Copy => assert!(verified >= present, "{prefetch}: {verified}"),
            }
            assert_eq!(st.timeout_wakes.load(Ordering::Relaxed), 0);
            loader.stop();
            // Released: every page still right.
            for p in 0..total {
                check_page(&regions, p).unwrap();
            }
        }
        // Memory already holding a page is refused (memfd blocks counted).
        let Some((maps, regions, files)) = huge_fresh(&img) else {
            return;
        };
        // SAFETY: in-bounds write to our own mapping, not registered.
        unsafe { maps[1].addr.add(3 * MIB).write(1) };
        let chain = super::super::layers::LayerChain::single(
            img.path.clone(),
            img.file.try_clone().unwrap(),
            img.meta.clone(),
        )
        .unwrap();
        let e = LazyLoader::start_chain_on(chain, regions, LazyOpts::default(), files).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NotFresh {
                    index: 1,
                    resident: 512,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// hugetlb with CONTINUE: a flipped byte in a present page is never
    /// mapped into the guest (the faulter stays blocked), the error names
    /// the page, and after stop the bad block was removed from the page
    /// cache: the released faulter reads zero, not the unverified data.
    #[test]
    fn hugetlb_continue_never_maps_a_corrupt_page() {
        if !require_uffd() {
            return;
        }
        for prefetch in [false, true] {
            let img = make_image(&[4 * MIB], |_| false);
            let p = img.meta.present.iter_ones().nth(600).unwrap();
            let off = (p * PAGE_SIZE + 13) as u64;
            flip_byte(&img.path, off);
            let Some((_maps, regions, files)) = huge_fresh(&img) else {
                return;
            };
            let opts = LazyOpts {
                prefetch,
                huge_fill: HugeFill::Continue,
                ..LazyOpts::default()
            };
            let loader = start_huge(&img, &regions, files, opts);
            assert_eq!(loader.huge_fill(), Some(HugeFill::Continue));
            let want = format!(
                "memory file {}: checksum mismatch in the page at offset {:#x}",
                img.path.display(),
                p * PAGE_SIZE
            );
            let (tid, rx, faulter) = spawn_faulter(&regions, p);
            wait_for("the loader error", || loader.error().is_some());
            let e = loader.error().unwrap().to_string();
            assert!(e.contains(&want), "{e}");
            wait_for("the faulter to block", || in_userfault(tid) == Some(true));
            assert!(rx.try_recv().is_err(), "faulter ran on unverified memory");
            loader.stop();
            assert_eq!(
                rx.recv().unwrap(),
                0,
                "unverified data left in the page cache"
            );
            faulter.join().unwrap();
        }
    }

    /// The stall detector itself: a thread blocked on an unserved
    /// userfaultfd fault is seen in `handle_userfault`; an exited one is
    /// gone. (Without this, a zero `timeout_wakes` could mean "blind".)
    /// hugetlb with synchronous write protection: a write dirties its
    /// whole 2 MiB block (each of its 4 KiB pagemap entries), a read or a
    /// prefetch leaves it clean; asked for `UFFDIO_CONTINUE`, the loader
    /// fills with `UFFDIO_COPY` in this mode.
    #[test]
    fn sync_write_protection_tracks_hugetlb_blocks() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[8 * MIB], |_| false);
        let Some((_maps, regions, files)) = huge_fresh(&img) else {
            return;
        };
        let opts = LazyOpts {
            track_writes: true,
            tracking: dirty::Policy::Sync,
            huge_fill: HugeFill::Continue,
            ..LazyOpts::default()
        };
        let loader = start_huge(&img, &regions, files, opts);
        assert_eq!(loader.write_tracking(), Some(dirty::Mode::Sync));
        assert_eq!(loader.huge_fill(), Some(HugeFill::Copy));
        let per = HUGE_PAGES;
        let data = |b: usize| (b * per..(b + 1) * per).find(|&p| kind(p) == 2).unwrap();
        check_page(&regions, data(1)).unwrap();
        write_word(&regions, data(0) + 3, 0x77);
        kernel_write_word(&regions, data(2) + 9, 0x78);
        loader.wait_complete().unwrap();
        let pm = pagemap(regions[0].addr(), 4 * per);
        let dirty: Vec<usize> = (0..4)
            .filter(|&b| {
                let d = (b * per..(b + 1) * per)
                    .filter(|&p| dirty::entry_is_dirty(pm[p]))
                    .count();
                assert!(d == 0 || d == per, "block {b}: {d} of {per} dirty");
                d == per
            })
            .collect();
        assert_eq!(dirty, vec![0, 2]);
        assert!(loader.stats().wp_faults.load(Ordering::Relaxed) >= 2);
        assert_eq!(read_word(&regions, data(0) + 3), 0x77);
        assert_eq!(read_word(&regions, data(2) + 9), 0x78);
        loader.stop();
    }

    #[test]
    fn stall_detector_sees_a_blocked_faulter() {
        if !require_uffd() {
            return;
        }
        let m = AnonMapping::new(PAGE_SIZE).unwrap();
        let uffd = Uffd::create(false).unwrap();
        assert!(uffd.has_thread_ids(), "kernel lacks UFFD_FEATURE_THREAD_ID");
        uffd.register(m.addr().cast(), PAGE_SIZE).unwrap();
        let regions = [m.region(0)];
        let (tid, rx, h) = spawn_faulter(&regions, 0);
        wait_for("the faulter to block", || in_userfault(tid) == Some(true));
        let mut faults = Vec::new();
        wait_for("the fault message", || {
            uffd.read_faults(&mut faults).unwrap();
            !faults.is_empty()
        });
        assert_eq!(faults[0].tid, tid);
        let src = AnonMapping::new(PAGE_SIZE).unwrap();
        // SAFETY: in-bounds write to our own buffer.
        unsafe { (src.addr() as *mut u64).write(42) };
        ioctl_fill(
            uffd.as_raw_fd(),
            m.addr() as usize,
            Some(src.addr()),
            PAGE_SIZE,
            0,
        )
        .unwrap();
        assert_eq!(rx.recv().unwrap(), 42);
        h.join().unwrap();
        wait_for("the thread to be gone", || in_userfault(tid).is_none());
    }

    /// Item 6 of issue 9, the lost wake-up: many threads fault (present
    /// pages and holes, reads and writes) while the prefetcher completes
    /// and the loader unregisters, looped; no faulter may ever need the
    /// idle-timeout wake. Seeded (`STASIS_TEST_SEED`), seed printed.
    #[test]
    fn no_faulter_needs_the_timeout_wake() {
        if !require_uffd() {
            return;
        }
        let seed: u64 = std::env::var("STASIS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("no_faulter_needs_the_timeout_wake: STASIS_TEST_SEED={seed}");
        let img = make_image(&[4 * MIB, 4 * MIB], |p| p % 7 == 0);
        let total = img.meta.total_pages();
        let mut woken = 0;
        let mut faults = 0;
        for iter in 0..40u64 {
            let (_maps, regions) = fresh(&img);
            let opts = LazyOpts {
                prefetch_chunk: 128 << 10,
                fault_block: PAGE_SIZE * 4,
                ..LazyOpts::default()
            };
            let loader = LazyLoader::start(
                img.file.try_clone().unwrap(),
                regions.clone(),
                &img.meta,
                opts,
            )
            .unwrap();
            std::thread::scope(|s| {
                for t in 0..8u64 {
                    let regions = &regions;
                    s.spawn(move || {
                        let mut x =
                            seed ^ (iter << 32) ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        for _ in 0..1500 {
                            let p = (xorshift(&mut x) % total as u64) as usize;
                            if x & 1 == 0 {
                                check_page(regions, p).unwrap();
                            } else {
                                let r = memfile::region_of(regions, p).unwrap();
                                let a = r.addr() + (p - r.first_page()) * PAGE_SIZE;
                                // SAFETY: in-bounds access to a registered
                                // page; writing back what is read keeps the
                                // page's content.
                                unsafe {
                                    let w = (a as *mut u64).read_volatile();
                                    (a as *mut u64).write_volatile(w);
                                }
                            }
                        }
                    });
                }
            });
            loader.wait_complete().unwrap();
            let st = loader.stats();
            woken += st.timeout_wakes.load(Ordering::Relaxed);
            faults += st.faults.load(Ordering::Relaxed);
            loader.stop();
        }
        eprintln!("40 runs: {faults} faults, {woken} faulters needed the timeout wake");
        assert!(faults > 0);
        assert_eq!(woken, 0, "lost wake-ups (seed {seed})");
    }

    /// A fault on a page that is already filled (the prefetcher or an
    /// earlier fault got there first) does not put it in the working set;
    /// a fault on a missing page does.
    #[test]
    fn demanded_excludes_pages_already_filled() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[MIB], |_| false);
        let (_maps, regions) = fresh(&img);
        let opts = LazyOpts {
            prefetch: false,
            fault_block: PAGE_SIZE,
            release_when_complete: false,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts,
        )
        .unwrap();
        let mut it = img.meta.present.iter_ones();
        let (a, b) = (it.next().unwrap(), it.nth(5).unwrap());
        check_page(&regions, a).unwrap();
        // b: installed and marked filled, then a (late) fault message for it.
        let r = &regions[0];
        let src = AnonMapping::new(PAGE_SIZE).unwrap();
        let baddr = r.addr() + b * PAGE_SIZE;
        ioctl_fill(loader.shared.fd(), baddr, Some(src.addr()), PAGE_SIZE, 0).unwrap();
        loader.shared.mark_filled(b, b + 1);
        let zero = AnonMapping::new(PAGE_SIZE).unwrap();
        let mut buf = CopyBuf::new(PAGE_SIZE).unwrap();
        loader
            .shared
            .on_fault(baddr, false, &zero, &mut buf)
            .unwrap();
        let d = loader.demanded();
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), vec![a]);
        loader.stop();
    }

    #[test]
    fn stop_wakes_waiters_and_rejects_touched_memory() {
        if !require_uffd() {
            return;
        }
        let img = make_image(&[MIB], |_| false);
        let (maps, regions) = fresh(&img);
        let opts = LazyOpts {
            prefetch: false,
            ..LazyOpts::default()
        };
        let loader = LazyLoader::start(
            img.file.try_clone().unwrap(),
            regions.clone(),
            &img.meta,
            opts.clone(),
        )
        .unwrap();
        assert_eq!(loader.wait_complete_timeout(Duration::ZERO).unwrap(), None);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| loader.wait_complete());
            loader.stop();
            assert!(matches!(waiter.join().unwrap(), Err(Error::Stopped(_))));
        });
        drop(loader);

        // Touched memory is refused.
        // SAFETY: in-bounds write; the region is no longer registered.
        unsafe { maps[0].addr().write(1) };
        let e =
            LazyLoader::start(img.file.try_clone().unwrap(), regions, &img.meta, opts).unwrap_err();
        assert!(matches!(e, Error::NotFresh { resident: 1, .. }), "{e}");
    }

    /// Prints the prefetch fill rate for 1 GiB in the page cache.
    /// `cargo test --release --lib fill_rate -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn fill_rate() {
        if !require_uffd() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let r = fill_rate_probe(1 << 30, dir.path()).unwrap();
            eprintln!(
                "lazy fill: {} MiB in {:?} = {:.2} GB/s (start {:?}); raw UFFDIO_COPY {:.2} GB/s",
                r.bytes >> 20,
                r.elapsed,
                r.gb_per_s,
                r.start_time,
                r.baseline_gb_per_s
            );
        }
    }
}
