//! Guest memory: the physical layout (RAM below an MMIO gap under 4 GiB, the
//! rest above 4 GiB), the anonymous host mappings that back it, and their
//! registration with KVM as memory slots.
//!
//! The host mappings come in three backings ([`super::backing`]): hugetlb
//! (2 MiB pages from the reserved pool, one memfd per range, reserved when
//! mapped), THP (anonymous, `MADV_HUGEPAGE`) and 4 KiB (anonymous);
//! [`create_backed`] resolves `auto` and maps.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::os::fd::{FromRawFd, OwnedFd};

pub use super::backing::{HugePool, MemoryBacking, HUGE_PAGE};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

/// Start of the MMIO gap below 4 GiB; RAM never lives in [GAP_START, 4 GiB).
pub const GAP_START: u64 = 0xC000_0000;
/// First address above the MMIO gap.
pub const HIGH_START: u64 = 1 << 32;
/// Smallest guest we boot.
pub const MIN_MEM: u64 = 32 << 20;
/// Largest guest we boot (the test guest maps up to 64 GiB of address space).
pub const MAX_MEM: u64 = 60 << 30;
/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested size is out of range or not page-aligned.
    #[error("guest memory of {0} bytes is not valid: it must be a multiple of 4 KiB between 32 MiB and 60 GiB")]
    BadSize(u64),
    /// mmap of the backing memory failed.
    #[error("cannot map {size} bytes of guest memory")]
    Mmap {
        /// Bytes asked for.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The backing cannot be used for this guest.
    #[error(transparent)]
    Backing(#[from] super::backing::Error),
    /// The hugetlb pool ran out between the check and the mapping (or its
    /// pages are not 2 MiB).
    #[error(
        "the hugetlb pool cannot hold {size} more bytes of guest memory (raise {})",
        super::backing::NR_HUGEPAGES
    )]
    HugePoolExhausted {
        /// Bytes asked for.
        size: u64,
    },
    /// memfd_create or ftruncate for hugetlb memory failed.
    #[error("cannot create hugetlb memory of {size} bytes ({what})")]
    Memfd {
        /// Bytes asked for.
        size: u64,
        /// The failing call.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The region list was rejected.
    #[error("guest memory regions are inconsistent")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot}")]
    SetSlot {
        /// Slot number.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest-physical RAM ranges for a guest of `mem_bytes`: (start, length).
pub fn ram_ranges(mem_bytes: u64) -> Result<Vec<(u64, u64)>, Error> {
    if !(MIN_MEM..=MAX_MEM).contains(&mem_bytes) || !mem_bytes.is_multiple_of(PAGE_SIZE) {
        return Err(Error::BadSize(mem_bytes));
    }
    let low = mem_bytes.min(GAP_START);
    let mut v = vec![(0, low)];
    if mem_bytes > low {
        v.push((HIGH_START, mem_bytes - low));
    }
    Ok(v)
}

/// Maps fresh, zeroed, lazily-allocated anonymous memory for every RAM range.
/// The mappings are private and `MAP_NORESERVE`: untouched guest memory costs
/// nothing on the host, which pause relies on.
pub fn create(mem_bytes: u64) -> Result<GuestMemoryMmap, Error> {
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(mem_bytes)? {
        let map = MmapRegion::build(
            None,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|source| Error::Mmap { size: len, source })?;
        // new() only fails on address overflow, which ram_ranges excludes.
        regions
            .push(GuestRegionMmap::new(map, GuestAddress(start)).ok_or(Error::BadSize(mem_bytes))?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)
}

/// Maps guest memory of `mem_bytes` on `backing` (`Auto` resolved by the
/// rule in [`super::backing`]) and returns it with the backing in use.
///
/// An explicit `Hugetlb` fails at once, with a one-line error naming
/// `nr_hugepages`, if the pool cannot hold the guest (checked, then
/// reserved by the mapping itself: a pool that runs out in between is
/// [`Error::HugePoolExhausted`]); `Auto` falls back to THP in that race,
/// with a warning. Holes in hugetlb memory cost a whole 2 MiB page once
/// touched, but untouched ranges stay unallocated (only reserved).
pub fn create_backed(
    mem_bytes: u64,
    backing: MemoryBacking,
) -> Result<(GuestMemoryMmap, MemoryBacking), Error> {
    let ranges = ram_ranges(mem_bytes)?;
    let chosen = backing.resolve(mem_bytes)?;
    match chosen {
        MemoryBacking::Hugetlb => match create_hugetlb(mem_bytes, &ranges) {
            Ok(m) => Ok((m, MemoryBacking::Hugetlb)),
            Err(e @ Error::HugePoolExhausted { .. }) if backing == MemoryBacking::Auto => {
                tracing::warn!(error = %e, "memory backing auto: hugetlb pool ran out, using THP");
                Ok((create_anon(mem_bytes, true)?, MemoryBacking::Thp))
            }
            Err(e) => Err(e),
        },
        MemoryBacking::Thp => Ok((create_anon(mem_bytes, true)?, MemoryBacking::Thp)),
        _ => Ok((create_anon(mem_bytes, false)?, MemoryBacking::Small)),
    }
}

fn create_hugetlb(mem_bytes: u64, ranges: &[(u64, u64)]) -> Result<GuestMemoryMmap, Error> {
    let mut regions = Vec::new();
    for &(start, len) in ranges {
        if !len.is_multiple_of(HUGE_PAGE) {
            return Err(super::backing::Error::Unaligned(mem_bytes).into());
        }
        let memfd_err = |what| {
            move |source| Error::Memfd {
                size: len,
                what,
                source,
            }
        };
        // MFD_HUGE_2MB: 21 << MFD_HUGE_SHIFT (26).
        let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << 26);
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"stasis-guest".as_ptr(), flags) };
        if fd < 0 {
            return Err(memfd_err("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len).map_err(memfd_err("ftruncate"))?;
        // MAP_SHARED without MAP_NORESERVE: the kernel reserves every huge
        // page of the range now or fails the mmap with ENOMEM.
        let map = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|source| match &source {
            vm_memory::mmap::MmapRegionError::Mmap(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                Error::HugePoolExhausted { size: len }
            }
            _ => Error::Mmap { size: len, source },
        })?;
        regions
            .push(GuestRegionMmap::new(map, GuestAddress(start)).ok_or(Error::BadSize(mem_bytes))?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)
}

fn create_anon(mem_bytes: u64, thp: bool) -> Result<GuestMemoryMmap, Error> {
    let mem = create(mem_bytes)?;
    let advice = if thp {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    for r in mem.iter() {
        // SAFETY: advice on a whole private anonymous mapping owned by
        // `mem`; it changes no contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, advice) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), thp, "madvise on guest memory");
        }
    }
    Ok(mem)
}

/// Registers every region of `mem` with KVM, slot i for region i.
///
/// No dirty logging: on shadow-paging hosts its write protection made the
/// first pass over memory after a restore 4-5x slower; the working set comes
/// from lazy-restore faults instead.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region.as_ptr() as u64;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the host range [host, host+len) is a live mapping owned by
        // `mem`, which the Vm keeps alive for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|source| Error::SetSlot { slot, source })?;
    }
    Ok(())
}

/// The memfds behind hugetlb guest memory, one per region in order (new
/// descriptors), for the lazy loader's `UFFDIO_CONTINUE` fill; empty if
/// any region is not a file mapping (anonymous backings) or a descriptor
/// cannot be duplicated.
pub fn memfds(mem: &GuestMemoryMmap) -> Vec<std::fs::File> {
    let mut v = Vec::new();
    for r in mem.iter() {
        match r.file_offset().map(|f| f.file().try_clone()) {
            Some(Ok(f)) if r.file_offset().is_some_and(|f| f.start() == 0) => v.push(f),
            _ => return Vec::new(),
        }
    }
    v
}

/// Host address and length of each region, in guest-physical order.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, *mut u8, usize)> {
    mem.iter()
        .map(|r| (r.start_addr().0, r.as_ptr(), r.len() as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_at_the_gap() {
        assert_eq!(ram_ranges(256 << 20).unwrap(), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30).unwrap(),
            vec![(0, GAP_START), (HIGH_START, (4 << 30) - GAP_START)]
        );
        assert!(ram_ranges(1 << 20).is_err());
        assert!(ram_ranges((64 << 20) + 1).is_err());
        assert!(ram_ranges(1 << 40).is_err());
    }

    #[test]
    fn thp_and_4k_map_cheaply_and_report_their_backing() {
        let (mem, b) = create_backed(8 << 30, MemoryBacking::Thp).unwrap();
        assert_eq!((mem.num_regions(), b), (2, MemoryBacking::Thp));
        let (_, b) = create_backed(64 << 20, MemoryBacking::Small).unwrap();
        assert_eq!(b, MemoryBacking::Small);
        let (_, b) = create_backed((64 << 20) + 4096, MemoryBacking::Auto).unwrap();
        assert_ne!(b, MemoryBacking::Hugetlb);
    }

    #[test]
    fn create_maps_a_large_guest_cheaply() {
        let mem = create(8 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
    }
}
