//! Guest memory: the physical layout (RAM below an MMIO gap under 4 GiB, the
//! rest above 4 GiB), the anonymous host mappings that back it, and their
//! registration with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
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
    fn create_maps_a_large_guest_cheaply() {
        let mem = create(8 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
    }
}
