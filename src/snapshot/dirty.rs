//! Dirty tracking for a VM resumed from a snapshot: which pages did the
//! guest write since the resume?
//!
//! Mechanism: **userfaultfd write protection**. Guest memory is registered
//! in WP mode and every page that came from the snapshot is
//! write-protected: the eager path protects the whole range once the file
//! has been read ([`WriteTracker::start`]); the lazy loader installs each
//! page with `UFFDIO_COPY_MODE_WP` ([`super::uffd::LazyOpts::track_writes`]).
//! The first write to such a page (from a vCPU, from KVM on its behalf, or
//! from a VMM thread) drops the protection, in one of two ways:
//!
//! - **asynchronous** (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+): the kernel
//!   drops it itself, without a message;
//! - **synchronous** (any kernel with userfaultfd WP: anonymous memory
//!   since 5.7, shmem and hugetlb since 5.19): the writer blocks in the
//!   kernel and a message with `UFFD_PAGEFAULT_FLAG_WP` reaches our thread,
//!   which un-protects exactly the faulting page (`UFFDIO_WRITEPROTECT`
//!   without `MODE_WP`: 4 KiB, or the whole 2 MiB page on hugetlb); that
//!   ioctl wakes the writer, whose write then goes through. The thread is
//!   [`WriteTracker`]'s own for the eager path, and the lazy loader's fault
//!   thread for the lazy path (it tells a WP message from a missing-page one
//!   by that flag, resolves it with that ioctl and never with a fill, and
//!   runs until the loader is stopped, so as long as the VM).
//!
//! Either way the page table ends up the same: the uffd-wp bit of a written
//! page is clear, of an unwritten one set. At pause the writer reads
//! `/proc/self/pagemap`, which it reads anyway for residency: a page is
//! **dirty** when it is resident (or swapped) and its uffd-wp bit (57) is
//! clear. A page never faulted in since the resume is not resident, so it
//! is clean by definition; a page first touched after the resume that was
//! a hole everywhere (a fresh anonymous page) is resident and unprotected,
//! so it counts as written. The pause side does not know which way the
//! protection was dropped.
//!
//! **Which way** (logged once per process): `UFFD_FEATURE_WP_ASYNC` where
//! the kernel offers it, else synchronous WP where registering guest memory
//! in WP mode works, else no tracking (every pause writes a full layer).
//! [`WRITE_TRACKING_ENV`] (`STASIS_WRITE_TRACKING`, read once) overrides
//! it: `auto` (the default), `async` (asynchronous or nothing), `sync`
//! (synchronous even where asynchronous is offered: tests, and measuring)
//! or `off`. On hugetlb a lazy loader in synchronous mode fills with
//! `UFFDIO_COPY` (it does not use `UFFDIO_CONTINUE`, whose `MODE_WP` older
//! kernels lack).
//!
//! Measured on the development host (kernel 6.18, shadow-paging KVM):
//! protecting 1 GiB (half resident) takes 23 ms; the first write to a
//! protected page costs 2.9 µs asynchronously (76 ms for 10 % of 1 GiB)
//! and 12 µs synchronously (a round trip through the tracking thread;
//! `first_write_cost` below: a host thread writes one byte to each of
//! 16384 protected 4 KiB pages: 12-32 µs over runs on this 2-core host
//! while a build ran, against 1.6-1.9 µs asynchronously in the same runs);
//! reading the pagemap of 1 GiB takes 13 ms. Soft-dirty (`clear_refs` "4" + pagemap bit
//! 55) is not available on this kernel (`CONFIG_MEM_SOFT_DIRTY` off: bit 55
//! never sets), and it would not work for the lazy path anyway:
//! `UFFDIO_COPY` marks the pages it installs soft-dirty. KVM dirty logging
//! was rejected earlier (it slows shadow paging 4-5x).
//!
//! hugetlb memory: userfaultfd write protection works on whole 2 MiB pages,
//! so a write dirties its 2 MiB block (the pagemap reports the block's bit
//! on each of its 4 KiB entries). Where registration in WP mode fails (an
//! old kernel, a backing the kernel refuses), [`WriteTracker::start`] fails
//! and the VMM writes full layers (with a log line).
//!
//! **Failure** (synchronous mode): if un-protecting a page fails, or the
//! tracking thread cannot read its descriptor, the eager tracker
//! unregisters the region(s) (which drops the protection and wakes every
//! writer: nothing stays blocked) and marks itself broken
//! ([`WriteTracker::intact`]), so the next pause writes a full layer; the
//! lazy loader fails like on any fill error (the VM ends with the error).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use super::memfile::{MemRegion, PAGE_SIZE};
use super::uffd_sys::{Fault, Modes, Uffd, IOCTL_ZEROPAGE, UFFD_FEATURE_WP_ASYNC};

/// pagemap bit 63: present in RAM; bit 62: swapped out.
pub const PM_RESIDENT: u64 = 3 << 62;
/// pagemap bit 57: the page is userfaultfd write-protected.
pub const PM_UFFD_WP: u64 = 1 << 57;

/// Size of a hugetlb page (the write-protection unit on hugetlb memory).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Environment variable that picks how writes are tracked: `auto` (the
/// default), `async`, `sync` or `off` (see the module doc). Read once.
pub const WRITE_TRACKING_ENV: &str = "STASIS_WRITE_TRACKING";

/// True if a pagemap entry describes a page written since it was
/// write-protected (or created after the protection was applied).
pub fn entry_is_dirty(entry: u64) -> bool {
    entry & PM_RESIDENT != 0 && entry & PM_UFFD_WP == 0
}

/// How the protection of a written page is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By the kernel, without a message (`UFFD_FEATURE_WP_ASYNC`).
    Async,
    /// By our thread, on a write-protect fault message.
    Sync,
}

impl Mode {
    /// `async` or `sync`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which tracking to use ([`WRITE_TRACKING_ENV`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Asynchronous where offered, else synchronous.
    #[default]
    Auto,
    /// Asynchronous only (none without it).
    Async,
    /// Synchronous even where asynchronous is offered.
    Sync,
    /// No tracking: every pause writes a full layer.
    Off,
}

impl Policy {
    /// The policy named by [`WRITE_TRACKING_ENV`], read once per process;
    /// `auto` if unset, or (with a warning) if it names none.
    pub fn from_env() -> Policy {
        static POLICY: OnceLock<Policy> = OnceLock::new();
        *POLICY.get_or_init(|| match std::env::var(WRITE_TRACKING_ENV) {
            Ok(v) => v.parse().unwrap_or_else(|e: String| {
                tracing::warn!("{WRITE_TRACKING_ENV}: {e}; using auto");
                Policy::Auto
            }),
            Err(_) => Policy::Auto,
        })
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Policy::Auto),
            "async" => Ok(Policy::Async),
            "sync" => Ok(Policy::Sync),
            "off" | "none" => Ok(Policy::Off),
            _ => Err(format!(
                "unknown write tracking {s:?}: use auto, async, sync or off"
            )),
        }
    }
}

/// Errors setting up write tracking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tracking is turned off.
    #[error("write tracking is off ({WRITE_TRACKING_ENV}=off)")]
    Off,
    /// The kernel refused the descriptor (or, with `async`, has no
    /// asynchronous write protection).
    #[error("creating a write-tracking userfaultfd (needs userfaultfd for kernel-mode faults: root or /dev/userfaultfd)")]
    Create(#[source] io::Error),
    /// Registering or protecting a region failed.
    #[error("{op} guest memory at {addr:#x} ({len} bytes) for write tracking")]
    Region {
        /// "registering" or "write-protecting".
        op: &'static str,
        /// Host address.
        addr: usize,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Starting the synchronous tracking thread failed.
    #[error("{0}")]
    Sys(&'static str, #[source] io::Error),
}

/// Creates the userfaultfd for write tracking under `policy`, seeing
/// kernel-mode faults too (KVM's), with thread ids and the `optional`
/// features where offered. Synchronous mode only needs WP registration to
/// work, which the caller finds out when it registers.
pub fn create_uffd(policy: Policy, optional: u64) -> Result<(Uffd, Mode), Error> {
    match policy {
        Policy::Off => Err(Error::Off),
        Policy::Sync => Uffd::create_features(false, 0, optional)
            .map(|u| (u, Mode::Sync))
            .map_err(Error::Create),
        Policy::Async | Policy::Auto => {
            match Uffd::create_features(false, UFFD_FEATURE_WP_ASYNC, optional) {
                Ok(u) => Ok((u, Mode::Async)),
                // EINVAL: the kernel lacks WP_ASYNC (or an optional feature,
                // which create_features already retried without).
                Err(e) if policy == Policy::Auto && e.raw_os_error() == Some(libc::EINVAL) => {
                    Uffd::create_features(false, 0, optional)
                        .map(|u| (u, Mode::Sync))
                        .map_err(Error::Create)
                }
                Err(e) => Err(Error::Create(e)),
            }
        }
    }
}

/// Logs the tracking chosen for a resumed VM (`None`: no tracking, `why`),
/// once per process for each outcome; later ones at debug level.
pub fn log_choice(mode: Option<Mode>, why: &dyn std::fmt::Display) {
    static LOGGED: AtomicU8 = AtomicU8::new(0);
    let bit = match mode {
        Some(Mode::Async) => 1,
        Some(Mode::Sync) => 2,
        None => 4,
    };
    let first = LOGGED.fetch_or(bit, Ordering::Relaxed) & bit == 0;
    match (mode, first) {
        (Some(Mode::Async), true) => tracing::info!(
            "write tracking: asynchronous userfaultfd write protection (UFFD_FEATURE_WP_ASYNC)"
        ),
        (Some(Mode::Sync), true) => tracing::info!(
            "write tracking: synchronous userfaultfd write protection ({})",
            if Policy::from_env() == Policy::Sync {
                format!("{WRITE_TRACKING_ENV}=sync")
            } else {
                "this kernel has no UFFD_FEATURE_WP_ASYNC".to_string()
            }
        ),
        (None, true) => tracing::warn!(
            "no write tracking on this kernel: the next pause writes a full layer: {why}"
        ),
        (Some(m), false) => tracing::debug!(mode = %m, "write tracking"),
        (None, false) => tracing::debug!("no write tracking: {why}"),
    }
}

/// Un-protects the write-protection unit (`unit` bytes, a power of two:
/// 4 KiB, or 2 MiB on hugetlb) holding `addr`, which wakes the threads
/// blocked on write-protect faults in it: resolves a synchronous WP fault.
/// Retries while the kernel answers `EAGAIN` (the mm is changing).
pub fn resolve_wp(uffd: &Uffd, addr: usize, unit: usize) -> io::Result<()> {
    let start = addr & !(unit - 1);
    let mut again = 0u32;
    loop {
        match uffd.write_unprotect(start as *mut libc::c_void, unit) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && again < 100_000 => {
                again += 1;
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

/// A guest region as the tracking thread sees it: host address, length,
/// protection unit.
#[derive(Debug, Clone, Copy)]
struct Span {
    addr: usize,
    len: usize,
    unit: usize,
}

impl Span {
    fn contains(&self, addr: usize) -> bool {
        addr >= self.addr && addr - self.addr < self.len
    }
}

/// State shared with the synchronous tracking thread.
#[derive(Debug)]
struct SyncShared {
    uffd: Uffd,
    spans: Vec<Span>,
    /// Write-protect faults resolved.
    wp_faults: AtomicU64,
    /// Tracking failed: some writes went untracked.
    broken: AtomicBool,
}

/// The synchronous tracking thread and its stop eventfd.
#[derive(Debug)]
struct Resolver {
    stop_fd: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

/// Tracks writes to eagerly restored guest memory. Keep it alive as long as
/// the tracking is needed: dropping it stops its thread (synchronous mode)
/// and closes the descriptor, which drops the protection.
#[derive(Debug)]
pub struct WriteTracker {
    mode: Mode,
    shared: Arc<SyncShared>,
    // Dropped (stopped and joined) in `Drop`, before the descriptor closes.
    resolver: Option<Resolver>,
}

impl WriteTracker {
    /// Registers `regions` in WP mode and write-protects their resident
    /// pages, tracking as [`Policy::from_env`] says (the choice is logged).
    /// From now on [`entry_is_dirty`] tells the written pages.
    pub fn start(regions: &[MemRegion]) -> Result<WriteTracker, Error> {
        let r = Self::start_with(regions, Policy::from_env());
        match &r {
            Ok(t) => log_choice(Some(t.mode), &""),
            Err(e) => log_choice(None, &crate::error_chain(e)),
        }
        r
    }

    /// [`Self::start`] under `policy` (not logged).
    pub fn start_with(regions: &[MemRegion], policy: Policy) -> Result<WriteTracker, Error> {
        let (uffd, mode) = create_uffd(policy, 0)?;
        let mut spans = Vec::with_capacity(regions.len());
        for r in regions {
            let err = |op| {
                move |source| Error::Region {
                    op,
                    addr: r.addr(),
                    len: r.len(),
                    source,
                }
            };
            let modes = Modes {
                wp: true,
                ..Default::default()
            };
            let offered = uffd
                .register_mode(r.host_addr().cast(), r.len(), modes)
                .map_err(err("registering"))?;
            uffd.write_protect(r.host_addr().cast(), r.len())
                .map_err(err("write-protecting"))?;
            // The kernel offers no ZEROPAGE on hugetlb (as in the loader).
            let unit = if offered & IOCTL_ZEROPAGE == 0 {
                HUGE_PAGE_SIZE
            } else {
                PAGE_SIZE
            };
            spans.push(Span {
                addr: r.addr(),
                len: r.len(),
                unit,
            });
        }
        let shared = Arc::new(SyncShared {
            uffd,
            spans,
            wp_faults: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        });
        let resolver = match mode {
            Mode::Async => None,
            Mode::Sync => Some(Resolver::spawn(shared.clone())?),
        };
        Ok(WriteTracker {
            mode,
            shared,
            resolver,
        })
    }

    /// How writes are tracked.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Write-protect faults resolved by the tracking thread (synchronous
    /// mode; always 0 in asynchronous mode).
    pub fn wp_faults(&self) -> u64 {
        self.shared.wp_faults.load(Ordering::Relaxed)
    }

    /// False if tracking failed (synchronous mode: a page could not be
    /// un-protected, or the thread could not read its descriptor) and the
    /// protection was dropped: the pagemap no longer tells every written
    /// page, so the next pause must write a full layer.
    pub fn intact(&self) -> bool {
        !self.shared.broken.load(Ordering::SeqCst)
    }
}

impl Drop for WriteTracker {
    fn drop(&mut self) {
        if let Some(r) = self.resolver.take() {
            r.stop();
        }
    }
}

impl Resolver {
    fn spawn(shared: Arc<SyncShared>) -> Result<Resolver, Error> {
        // SAFETY: eventfd has no memory effects; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::Sys(
                "creating the write tracker's stop eventfd",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `efd` is a new descriptor owned by nothing else.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop = stop_fd.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("stasis-wp".into())
            .spawn(move || {
                crate::jail::seccomp::install_for(crate::jail::seccomp::ThreadKind::Uffd);
                serve(&shared, stop);
            })
            .map_err(|e| Error::Sys("spawning the write tracker's thread", e))?;
        Ok(Resolver {
            stop_fd,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let rc = unsafe {
            libc::write(
                self.stop_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc < 0 {
            // Only EAGAIN (counter full) is possible: already signalled.
            tracing::debug!(error = %io::Error::last_os_error(), "write tracker stop eventfd");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("write tracker thread panicked");
            }
        }
    }
}

/// How long the tracking thread waits for a message before it wakes every
/// region once (a safety net: a woken writer whose page is still protected
/// faults again and is served).
const IDLE_WAKE_MS: libc::c_int = 1000;

/// The synchronous tracking thread: resolves every write-protect fault
/// until `stop` is signalled.
fn serve(sh: &SyncShared, stop: i32) {
    let uffd = &sh.uffd;
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let mut pfds = [
        libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `pfds` is a valid array of two pollfds.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, IDLE_WAKE_MS) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return give_up(sh, &format!("polling the userfaultfd: {e}"));
        }
        if pfds[1].revents != 0 {
            return;
        }
        if rc == 0 {
            for s in &sh.spans {
                let _ = uffd.wake(s.addr as *mut libc::c_void, s.len);
            }
            continue;
        }
        if pfds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return give_up(
                sh,
                &format!(
                    "userfaultfd error condition (revents {:#x})",
                    pfds[0].revents
                ),
            );
        }
        loop {
            let read = match uffd.read_faults(&mut faults) {
                Ok(n) => n,
                Err(e) => return give_up(sh, &format!("reading the userfaultfd: {e}")),
            };
            for f in &faults {
                on_fault(sh, f);
            }
            if read == 0 {
                break;
            }
        }
    }
}

fn on_fault(sh: &SyncShared, f: &Fault) {
    let addr = f.addr as usize;
    let Some(span) = sh.spans.iter().find(|s| s.contains(addr)) else {
        tracing::warn!(addr, "write tracker: fault outside guest memory");
        return;
    };
    if !f.wp {
        // Not registered for anything else: wake it, whatever it was.
        let page = addr & !(span.unit - 1);
        let _ = sh.uffd.wake(page as *mut libc::c_void, span.unit);
        return;
    }
    // Counted before the ioctl wakes the writer: whoever the write
    // unblocks sees it counted.
    sh.wp_faults.fetch_add(1, Ordering::Relaxed);
    match resolve_wp(&sh.uffd, addr, span.unit) {
        Ok(()) => {}
        Err(e) => {
            // Drop the whole region's protection (unregistering wakes its
            // writers) rather than leave a writer blocked.
            tracing::error!(addr, error = %e,
                "write tracker: un-protecting a written page failed; tracking off for its region, the next pause writes a full layer");
            sh.broken.store(true, Ordering::SeqCst);
            let _ = sh.uffd.unregister(span.addr as *mut libc::c_void, span.len);
            let _ = sh.uffd.wake(span.addr as *mut libc::c_void, span.len);
        }
    }
}

/// Ends synchronous tracking after an error the thread cannot serve past:
/// every region is unregistered (dropping its protection and waking its
/// writers), and the tracker is marked broken.
fn give_up(sh: &SyncShared, why: &str) {
    tracing::error!("write tracker: {why}; tracking off, the next pause writes a full layer");
    sh.broken.store(true, Ordering::SeqCst);
    for s in &sh.spans {
        let _ = sh.uffd.unregister(s.addr as *mut libc::c_void, s.len);
        let _ = sh.uffd.wake(s.addr as *mut libc::c_void, s.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memfile::AnonMapping;
    use crate::snapshot::testutil::{huge_map, kernel_write, pagemap};

    fn start_or_skip(regions: &[MemRegion], policy: Policy) -> Option<WriteTracker> {
        match WriteTracker::start_with(regions, policy) {
            Ok(t) => Some(t),
            Err(e) if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") => {
                eprintln!("SKIPPED (not passed): {}", crate::error_chain(&e));
                None
            }
            Err(e) => panic!("{}", crate::error_chain(&e)),
        }
    }

    fn written_read_and_untouched(policy: Policy) {
        let n = 64;
        let m = AnonMapping::new(n * PAGE_SIZE).unwrap();
        let base = m.addr() as usize;
        let page = |p: usize| (base + p * PAGE_SIZE) as *mut u8;
        for p in 0..32 {
            // SAFETY: page p < n of our own mapping ("restored" pages).
            unsafe { page(p).write_volatile(1) };
        }
        let Some(t) = start_or_skip(&[m.region(0)], policy) else {
            return;
        };
        match policy {
            Policy::Sync => assert_eq!(t.mode(), Mode::Sync),
            Policy::Async => assert_eq!(t.mode(), Mode::Async),
            _ => {}
        }
        let before = pagemap(base, n);
        assert!(before.iter().all(|&e| !entry_is_dirty(e)));
        // SAFETY (the four blocks): in-bounds accesses to our own mapping.
        unsafe { page(3).add(7).write_volatile(9) }; // restored page written
        let _ = unsafe { page(5).read_volatile() }; // restored page read
        unsafe { page(40).write_volatile(2) }; // fresh page written
        kernel_write(page(7), &[0xab; 100]); // restored page, kernel-mode write
        let p9 = page(9) as usize;
        std::thread::spawn(move || {
            // SAFETY: page 9 of the mapping, which outlives this thread.
            unsafe { (p9 as *mut u8).add(1).write_volatile(4) }
        })
        .join()
        .unwrap(); // another thread's write
        let after = pagemap(base, n);
        let dirty: Vec<usize> = (0..n).filter(|&p| entry_is_dirty(after[p])).collect();
        assert_eq!(dirty, vec![3, 7, 9, 40]);
        // SAFETY: in-bounds reads of our own mapping.
        unsafe {
            assert_eq!(page(3).add(7).read_volatile(), 9);
            assert_eq!(page(7).add(99).read_volatile(), 0xab);
            assert_eq!(page(9).add(1).read_volatile(), 4);
        }
        if t.mode() == Mode::Sync {
            // Pages 3, 7 and 9 (page 40 was not resident: not protected).
            assert_eq!(t.wp_faults(), 3);
        } else {
            assert_eq!(t.wp_faults(), 0);
        }
        assert!(t.intact());
        drop(t);
        // Stopped: the protection is gone, writes just go through.
        // SAFETY: in-bounds write to our own mapping.
        unsafe { page(11).write_volatile(1) };
    }

    #[test]
    fn written_pages_are_dirty_untouched_and_read_pages_are_not() {
        written_read_and_untouched(Policy::Auto);
    }

    #[test]
    fn sync_wp_written_pages_are_dirty_untouched_and_read_pages_are_not() {
        written_read_and_untouched(Policy::Sync);
    }

    #[test]
    fn policy_names_parse() {
        for (s, p) in [
            ("auto", Policy::Auto),
            ("", Policy::Auto),
            ("ASYNC", Policy::Async),
            (" sync ", Policy::Sync),
            ("off", Policy::Off),
        ] {
            assert_eq!(s.parse::<Policy>(), Ok(p), "{s:?}");
        }
        assert!("fast".parse::<Policy>().is_err());
        assert!(matches!(
            WriteTracker::start_with(&[], Policy::Off),
            Err(Error::Off)
        ));
    }

    /// hugetlb: a write dirties its whole 2 MiB page, a read or no touch
    /// leaves it clean, a write to a never-touched huge page counts too.
    fn hugetlb_tracking(policy: Policy) {
        const BLOCKS: usize = 4;
        let len = BLOCKS * HUGE_PAGE_SIZE;
        let Some((map, _f)) = huge_map(len) else {
            return;
        };
        let base = map.addr as usize;
        let block = |b: usize| (base + b * HUGE_PAGE_SIZE) as *mut u8;
        for b in 0..2 {
            // SAFETY: in-bounds write to our own mapping ("restored").
            unsafe { block(b).write_volatile(1) };
        }
        // SAFETY: the mapping outlives the tracker (dropped first below).
        let region = unsafe { MemRegion::new(block(0), len, 0) };
        let Some(t) = start_or_skip(&[region], policy) else {
            return;
        };
        let n = len / PAGE_SIZE;
        assert!(pagemap(base, n).iter().all(|&e| !entry_is_dirty(e)));
        // SAFETY (the three blocks): in-bounds accesses to our own mapping.
        unsafe { block(0).add(5000).write_volatile(7) }; // restored, written
        let _ = unsafe { block(1).add(9).read_volatile() }; // restored, read
        unsafe { block(3).add(4096 * 3).write_volatile(3) }; // never touched, written
        let after = pagemap(base, n);
        let per = HUGE_PAGE_SIZE / PAGE_SIZE;
        let dirty: Vec<usize> = (0..BLOCKS)
            .filter(|&b| {
                let d = (b * per..(b + 1) * per)
                    .filter(|&p| entry_is_dirty(after[p]))
                    .count();
                assert!(d == 0 || d == per, "block {b}: {d} of {per} pages dirty");
                d == per
            })
            .collect();
        assert_eq!(dirty, vec![0, 3]);
        if t.mode() == Mode::Sync {
            assert!(t.wp_faults() >= 1);
        }
        assert!(t.intact());
        drop(t);
        // SAFETY: in-bounds reads of our own mapping.
        unsafe {
            assert_eq!(block(0).add(5000).read_volatile(), 7);
            assert_eq!(block(3).add(4096 * 3).read_volatile(), 3);
        }
    }

    #[test]
    fn hugetlb_written_blocks_are_dirty() {
        hugetlb_tracking(Policy::Auto);
    }

    #[test]
    fn sync_wp_hugetlb_written_blocks_are_dirty() {
        hugetlb_tracking(Policy::Sync);
    }

    /// The first-write cost per page, asynchronous vs synchronous (the
    /// numbers in the module doc): a host thread writes one byte to each
    /// page of 64 MiB of protected memory; the same writes on the same,
    /// now unprotected, pages are the baseline subtracted. Run with
    /// `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn first_write_cost() {
        let n = 16_384;
        for policy in [Policy::Async, Policy::Sync] {
            let m = AnonMapping::new(n * PAGE_SIZE).unwrap();
            let base = m.addr() as usize;
            let touch = |v: u8| {
                let t = std::time::Instant::now();
                for p in 0..n {
                    // SAFETY: page p < n of our own mapping.
                    unsafe { ((base + p * PAGE_SIZE) as *mut u8).write_volatile(v) };
                }
                t.elapsed()
            };
            touch(1);
            let Some(t) = start_or_skip(&[m.region(0)], policy) else {
                continue;
            };
            let first = touch(2);
            let again = touch(3);
            let us = (first.as_secs_f64() - again.as_secs_f64()) * 1e6 / n as f64;
            eprintln!(
                "{policy:?}: first write {us:.2} µs/page over {n} pages ({first:?}; plain writes {again:?}); wp faults {}",
                t.wp_faults()
            );
        }
    }
}
