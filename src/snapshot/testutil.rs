//! Test helpers shared by the snapshot modules' unit tests: reading
//! `/proc/self/pagemap`, writing memory from kernel mode, and hugetlb guest memory made as the VMM's hugetlb
//! backing makes it (one `MAP_SHARED` mapping of a 2 MiB-page memfd).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use super::memfile::PAGE_SIZE;

/// The pagemap entries of the `n` 4 KiB pages from `addr` in this process.
pub fn pagemap(addr: usize, n: usize) -> Vec<u64> {
    let pm = File::open("/proc/self/pagemap").unwrap();
    let mut b = vec![0u8; n * 8];
    pm.read_exact_at(&mut b, (addr / PAGE_SIZE * 8) as u64)
        .unwrap();
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Writes `data` to `dst` from kernel mode (`read` from a pipe: the
/// kernel's copy to user memory takes the fault, as KVM's and a device
/// thread's writes to guest memory do).
pub fn kernel_write(dst: *mut u8, data: &[u8]) {
    let mut fds = [0i32; 2];
    // SAFETY: a two-int array for the new pipe's descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: new descriptors nothing else owns.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    std::io::Write::write_all(&mut &w, data).unwrap();
    // SAFETY: `dst` points at `data.len()` writable bytes of the caller's
    // own mapping (a registered one: its fault is served).
    let n = unsafe { libc::read(r.as_raw_fd(), dst.cast(), data.len()) };
    assert_eq!(n, data.len() as isize);
}

/// A hugetlb mapping made by [`huge_map`]; unmapped on drop.
pub struct HugeMap {
    pub addr: *mut u8,
    pub len: usize,
}

impl Drop for HugeMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `huge_map`.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// A shared mapping of a new 2 MiB-page memfd of `len` bytes, and the
/// memfd; `None` (with a loud SKIPPED banner, only under
/// STASIS_ALLOW_SKIP=1) without free huge pages, else a panic.
pub fn huge_map(len: usize) -> Option<(HugeMap, File)> {
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe {
        libc::memfd_create(
            c"stasis-test".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << 26),
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len as u64).unwrap();
    // SAFETY: a new shared mapping of our memfd.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if a == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("\n*** SKIPPED (not passed): no free 2 MiB huge pages ({e}) ***\n");
            return None;
        }
        panic!("mapping hugetlb memory ({e}): reserve huge pages (echo 64 > /proc/sys/vm/nr_hugepages) or set STASIS_ALLOW_SKIP=1");
    }
    Some((
        HugeMap {
            addr: a.cast(),
            len,
        },
        f,
    ))
}
