//! The userfaultfd system interface, raw: creating the descriptor, the API
//! handshake, (un)registering ranges in MISSING (and MINOR, WP) mode, waking
//! faulters and reading page-fault messages. Kept to exactly what the lazy loader uses so
//! that building stasis needs no bindgen/libclang.
//!
//! Constants and layouts are those of `<linux/userfaultfd.h>` (x86_64).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const UFFD_API: u64 = 0xaa;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// The fault is a write to a write-protected page (WP mode, synchronous
/// write protection), not a missing or minor page.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 2;
/// `UFFD_FEATURE_THREAD_ID`: page-fault messages carry the faulting
/// thread's id.
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
/// `UFFDIO_REGISTER_MODE_WP`: write-protect tracking on the range.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7+): a write to a write-protected page
/// is resolved by the kernel itself (the protection is dropped, no message),
/// so the protection bit left in `/proc/self/pagemap` (bit 57) tells which
/// pages were written since they were protected.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_FEATURE_MINOR_HUGETLBFS` (Linux 5.13+): MINOR mode on hugetlb
/// memory, resolved with `UFFDIO_CONTINUE`.
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFDIO_REGISTER_MODE_MINOR`: faults on pages that are in the page cache
/// but not mapped in the registered range.
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// `UFFDIO_COPY_MODE_WP`: the copied page is installed write-protected.
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;

/// Bits of the `ioctls` mask that REGISTER returns.
pub const IOCTL_WAKE: u64 = 1 << 0x02;
/// `UFFDIO_COPY` is allowed on the range.
pub const IOCTL_COPY: u64 = 1 << 0x03;
/// `UFFDIO_ZEROPAGE` is allowed on the range.
pub const IOCTL_ZEROPAGE: u64 = 1 << 0x04;
/// `UFFDIO_CONTINUE` is allowed on the range.
pub const IOCTL_CONTINUE: u64 = 1 << 0x07;

/// Registration modes of a range (see [`Uffd::register_mode`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Modes {
    /// Faults on pages that do not exist (MISSING).
    pub missing: bool,
    /// Write-protect tracking (WP).
    pub wp: bool,
    /// Faults on pages in the page cache but not mapped here (MINOR).
    pub minor: bool,
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffd_msg`: 32 bytes; for page faults `arg` holds flags, address
/// and thread id.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

/// One page fault read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address (not page-aligned).
    pub addr: u64,
    /// A write fault.
    pub write: bool,
    /// A write-protect fault (`UFFD_PAGEFAULT_FLAG_WP`): the page is present
    /// and write-protected; resolve it with [`Uffd::write_unprotect`], never
    /// with a fill.
    pub wp: bool,
    /// The faulting thread's id (0 if the kernel did not report it).
    pub tid: u32,
}

/// A userfaultfd descriptor and the features its API handshake enabled.
#[derive(Debug)]
pub struct Uffd(OwnedFd, u64);

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the request's matching `#[repr(C)]`
    // argument structure, which the kernel reads and writes within bounds.
    let rc = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Creates a non-blocking, close-on-exec userfaultfd. With
    /// `user_mode_only` false it also sees faults the kernel takes on behalf
    /// of user space (KVM's accesses to guest memory), which needs root
    /// (CAP_SYS_PTRACE) or access to /dev/userfaultfd.
    pub fn create(user_mode_only: bool) -> io::Result<Uffd> {
        Self::create_features(user_mode_only, 0, 0)
    }

    /// Creates a userfaultfd with the `required` features (fails without
    /// them), plus thread ids and the `optional` features where the kernel
    /// offers them; [`Self::has_feature`] tells which were enabled.
    pub fn create_features(user_mode_only: bool, required: u64, optional: u64) -> io::Result<Uffd> {
        let optional = optional | UFFD_FEATURE_THREAD_ID;
        // Most to least: all, all but thread ids, without the extras, bare.
        let tries = [
            required | optional,
            required | (optional & !UFFD_FEATURE_THREAD_ID),
            required | (optional & UFFD_FEATURE_THREAD_ID),
            required,
        ];
        let mut last = io::Error::from_raw_os_error(libc::EINVAL);
        for (i, &f) in tries.iter().enumerate() {
            if tries[..i].contains(&f) {
                continue;
            }
            match Self::create_with(user_mode_only, f) {
                Ok(u) => return Ok(u),
                // A kernel without one of the features.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// True if the handshake enabled `feature` (`UFFD_FEATURE_*`).
    pub fn has_feature(&self, feature: u64) -> bool {
        self.1 & feature == feature
    }

    /// Registers `[addr, addr+len)` in the given modes (WP needs a
    /// kernel with userfaultfd write protection, MINOR one with
    /// `UFFD_FEATURE_MINOR_HUGETLBFS` and hugetlb memory); returns the mask
    /// of ioctls allowed on it.
    pub fn register_mode(
        &self,
        addr: *mut libc::c_void,
        len: usize,
        modes: Modes,
    ) -> io::Result<u64> {
        let mut mode = 0;
        if modes.missing {
            mode |= UFFDIO_REGISTER_MODE_MISSING;
        }
        if modes.wp {
            mode |= UFFDIO_REGISTER_MODE_WP;
        }
        if modes.minor {
            mode |= UFFDIO_REGISTER_MODE_MINOR;
        }
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// Write-protects the resident pages of a WP-registered range.
    pub fn write_protect(&self, addr: *mut libc::c_void, len: usize) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut w)
    }

    /// Removes the write protection of `[addr, addr+len)` (a WP-registered
    /// range; on hugetlb whole huge pages) and wakes the threads blocked on
    /// write-protect faults in it: how a synchronous WP fault is resolved.
    pub fn write_unprotect(&self, addr: *mut libc::c_void, len: usize) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: 0,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut w)
    }

    /// True if fault messages carry the faulting thread's id.
    pub fn has_thread_ids(&self) -> bool {
        self.has_feature(UFFD_FEATURE_THREAD_ID)
    }

    fn create_with(user_mode_only: bool, features: u64) -> io::Result<Uffd> {
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if user_mode_only {
            flags |= UFFD_USER_MODE_ONLY;
        }
        // SAFETY: the userfaultfd syscall takes only flags.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let fd = if fd >= 0 {
            // SAFETY: a new descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        } else {
            let sys_err = io::Error::last_os_error();
            // Fall back to /dev/userfaultfd (Linux 6.1+), whose permissions
            // may grant what the syscall's capability check refused.
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/userfaultfd")
                .map_err(|_| sys_err)?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and
            // returns a new descriptor.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
        // The kernel answers with every feature it supports; one we asked
        // for and it lacks is refused like an unknown one.
        if features & !api.features != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(Uffd(fd, features))
    }

    /// Registers `[addr, addr+len)` in MISSING mode; returns the mask of
    /// ioctls allowed on it (`IOCTL_*`).
    pub fn register(&self, addr: *mut libc::c_void, len: usize) -> io::Result<u64> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// Unregisters a range; threads blocked on it are woken.
    pub fn unregister(&self, addr: *mut libc::c_void, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: addr as u64,
            len: len as u64,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_UNREGISTER, &mut r)
    }

    /// Wakes threads blocked on faults in a range.
    pub fn wake(&self, addr: *mut libc::c_void, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: addr as u64,
            len: len as u64,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_WAKE, &mut r)
    }

    /// Reads pending page faults into `out` (cleared first) without blocking;
    /// other events are skipped. Returns how many messages were read.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        out.clear();
        let mut msgs = [UffdMsg::default(); 64];
        let size = std::mem::size_of_val(&msgs);
        // SAFETY: reading into a buffer we own of exactly `size` bytes;
        // UffdMsg is plain data for which any bytes are valid.
        let n = unsafe { libc::read(self.0.as_raw_fd(), msgs.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        for m in &msgs[..count] {
            if m.event == UFFD_EVENT_PAGEFAULT {
                out.push(Fault {
                    addr: m.address,
                    write: m.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    wp: m.flags & UFFD_PAGEFAULT_FLAG_WP != 0,
                    tid: if self.has_thread_ids() {
                        m.ptid as u32
                    } else {
                        0
                    },
                });
            }
        }
        Ok(count)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
    }
}
