//! virtio-blk over a [`CowDisk`]: one request queue; read, write, flush
//! and get-id requests, executed synchronously on the device thread.
//!
//! A request is a descriptor chain: a 16-byte device-readable header (type,
//! reserved, sector), data descriptors (device-writable for reads,
//! device-readable for writes) and a final device-writable status byte.
//! Anything else the guest sends (a chain without a status byte, a header
//! that is short or not in guest memory, data in the wrong direction or
//! outside guest memory, sectors past the end) completes with
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP` (or, with no status byte to
//! write, a used length of 0); none of it panics.
//!
//! Disk data that fails its checksum ([`cow::Error::Corrupt`]) also
//! completes with `VIRTIO_BLK_S_IOERR`, is logged, and is recorded in the
//! device's [`DiskFault`], whose first error ends the VM (`Vm` polls it and
//! is woken by its notifier): a guest is never served wrong disk data, and
//! corruption is never only a guest-visible I/O error.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cow::{self, CowDisk};
use super::mmio::{read_config_bytes, VirtioDevice};

/// Virtio device ID of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
/// VIRTIO_BLK_F_SEG_MAX.
const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_FLUSH.
const F_FLUSH: u64 = 1 << 9;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get the device ID string.
pub const T_GET_ID: u32 = 8;
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error (also: a malformed request).
pub const S_IOERR: u8 = 1;
/// Status: unsupported request type.
pub const S_UNSUPP: u8 = 2;
/// Length of the ID string.
const ID_LEN: usize = 20;
/// Largest copy between the disk and guest memory in one step.
const CHUNK: usize = 1 << 20;

/// The first disk-integrity error of a VM, with whom to tell. Shared by
/// the block device and the background check of its overlay.
#[derive(Default)]
pub struct DiskFault {
    first: Mutex<Option<String>>,
    notify: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl DiskFault {
    /// Records `e` (logged; only the first is kept) and calls the notifier.
    pub fn record(&self, e: &cow::Error) {
        let msg = e.to_string();
        tracing::error!("virtio-blk: {msg}");
        {
            let mut f = self.first.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_some() {
                return;
            }
            *f = Some(msg);
        }
        if let Some(n) = &*self.notify.lock().unwrap_or_else(|p| p.into_inner()) {
            n();
        }
    }

    /// The first recorded error.
    pub fn get(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls `f` (from the recording thread) when an error is recorded.
    pub fn set_notify(&self, f: Box<dyn Fn() + Send>) {
        *self.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }
}

/// Why a read or write request failed.
enum ReqError {
    Disk(cow::Error),
    Guest(String),
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqError::Disk(e) => write!(f, "{e}"),
            ReqError::Guest(e) => f.write_str(e),
        }
    }
}

impl From<&str> for ReqError {
    fn from(s: &str) -> Self {
        ReqError::Guest(s.to_owned())
    }
}

/// A virtio-blk device.
pub struct Block {
    disk: CowDisk,
    config: [u8; 16],
    id: [u8; ID_LEN],
    buf: Vec<u8>,
    fault: Arc<DiskFault>,
}

impl Block {
    /// A device over `disk`.
    pub fn new(disk: CowDisk) -> Block {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&(disk.size() / SECTOR).to_le_bytes());
        // size_max (unused) then seg_max.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        let mut id = [0u8; ID_LEN];
        let name = b"stasis-cow-disk";
        id[..name.len()].copy_from_slice(name);
        Block {
            disk,
            config,
            id,
            buf: Vec::new(),
            fault: Arc::default(),
        }
    }

    /// Where this device records disk-integrity errors.
    pub fn fault(&self) -> &Arc<DiskFault> {
        &self.fault
    }

    /// The disk.
    pub fn disk(&self) -> &CowDisk {
        &self.disk
    }

    /// The disk, mutably (flush, snapshot).
    pub fn disk_mut(&mut self) -> &mut CowDisk {
        &mut self.disk
    }

    /// Executes every available request; returns whether any completed
    /// and the guest wants an interrupt.
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write: d.is_write_only(),
                })
                .collect();
            let len = self.execute(&descs, mem);
            if let Err(e) = q.add_used(mem, head, len) {
                tracing::warn!("virtio-blk: cannot complete request {head}: {e}");
                q.go_to_previous_position();
                break;
            }
            used = true;
        }
        used && q.needs_notification(mem).unwrap_or(true)
    }

    /// Executes one request; returns the used length (bytes written into
    /// the chain).
    fn execute(&mut self, descs: &[Desc], mem: &GuestMemoryMmap) -> u32 {
        let Some((status, rest)) = descs.split_last() else {
            return 0;
        };
        if !status.write || status.len < 1 || rest.is_empty() {
            tracing::debug!("virtio-blk: request without a status byte");
            return 0;
        }
        let (hdr, data) = rest.split_first().expect("rest is not empty");
        let (code, written) = self.request(hdr, data, mem);
        if mem.write_obj(code, GuestAddress(status.addr)).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    /// Returns the status and the bytes of data written to the guest.
    fn request(&mut self, hdr: &Desc, data: &[Desc], mem: &GuestMemoryMmap) -> (u8, u32) {
        let mut h = [0u8; 16];
        if hdr.write || hdr.len < 16 || mem.read_slice(&mut h, GuestAddress(hdr.addr)).is_err() {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[8..16]);
        let sector = u64::from_le_bytes(s);
        match kind {
            T_IN | T_OUT => {
                let want_write = kind == T_IN;
                if data.is_empty() || data.iter().any(|d| d.write != want_write) {
                    return (S_IOERR, 0);
                }
                let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                let Some(start) = sector.checked_mul(SECTOR) else {
                    return (S_IOERR, 0);
                };
                if start
                    .checked_add(total)
                    .is_none_or(|end| end > self.disk.size())
                {
                    return (S_IOERR, 0);
                }
                let r = if kind == T_IN {
                    self.read(start, data, mem)
                } else {
                    self.write(start, data, mem)
                };
                match r {
                    Ok(()) if kind == T_IN => (S_OK, total as u32),
                    Ok(()) => (S_OK, 0),
                    Err(ReqError::Disk(e @ cow::Error::Corrupt { .. })) => {
                        self.fault.record(&e);
                        (S_IOERR, 0)
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.write) else {
                    return (S_IOERR, 0);
                };
                let n = (d.len as usize).min(ID_LEN);
                if mem
                    .write_slice(&self.id[..n], GuestAddress(d.addr))
                    .is_err()
                {
                    return (S_IOERR, 0);
                }
                (S_OK, n as u32)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    fn read(&mut self, mut pos: u64, data: &[Desc], mem: &GuestMemoryMmap) -> Result<(), ReqError> {
        for d in data {
            let mut off = 0u64;
            while off < u64::from(d.len) {
                let n = ((u64::from(d.len) - off) as usize).min(CHUNK);
                self.buf.resize(n, 0);
                self.disk
                    .read_at(pos, &mut self.buf[..n])
                    .map_err(ReqError::Disk)?;
                let at = d.addr.checked_add(off).ok_or("address overflow")?;
                mem.write_slice(&self.buf[..n], GuestAddress(at))
                    .map_err(|e| ReqError::Guest(format!("read buffer at {at:#x}: {e}")))?;
                off += n as u64;
                pos += n as u64;
            }
        }
        Ok(())
    }

    fn write(
        &mut self,
        mut pos: u64,
        data: &[Desc],
        mem: &GuestMemoryMmap,
    ) -> Result<(), ReqError> {
        for d in data {
            let mut off = 0u64;
            while off < u64::from(d.len) {
                let n = ((u64::from(d.len) - off) as usize).min(CHUNK);
                self.buf.resize(n, 0);
                let at = d.addr.checked_add(off).ok_or("address overflow")?;
                mem.read_slice(&mut self.buf[..n], GuestAddress(at))
                    .map_err(|e| ReqError::Guest(format!("write buffer at {at:#x}: {e}")))?;
                self.disk
                    .write_at(pos, &self.buf[..n])
                    .map_err(ReqError::Disk)?;
                off += n as u64;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }
    fn features(&self) -> u64 {
        F_FLUSH | F_SEG_MAX
    }
    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{Chain, TestRing};
    use super::*;

    const W: bool = true;
    const R: bool = false;

    fn setup() -> (tempfile::TempDir, GuestMemoryMmap, Block) {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i / 512) as u8).collect();
        std::fs::write(&base, data).unwrap();
        let disk = CowDisk::open(&base, &d.path().join("ov")).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        (d, mem, Block::new(disk))
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn config_reports_capacity_in_sectors() {
        let (_d, _mem, blk) = setup();
        let mut b = [0u8; 8];
        blk.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 128);
        assert_eq!(blk.features() & F_FLUSH, F_FLUSH);
    }

    #[test]
    fn write_then_read_back_flush_and_id() {
        let (_d, mem, mut blk) = setup();
        let ring = TestRing::new(&mem);
        let mut q = ring.queue();
        // Write 1024 bytes of 0xab at sector 3 in two data descriptors.
        mem.write_slice(&[0xab; 1024], GuestAddress(0x20_0000))
            .unwrap();
        header(&mem, 0x10_0000, T_OUT, 3);
        ring.add(&Chain(vec![
            (0x10_0000, 16, R),
            (0x20_0000, 512, R),
            (0x20_0200, 512, R),
            (0x10_1000, 1, W),
        ]));
        // Read sectors 2..6 back.
        header(&mem, 0x10_0100, T_IN, 2);
        ring.add(&Chain(vec![
            (0x10_0100, 16, R),
            (0x30_0000, 2048, W),
            (0x10_1001, 1, W),
        ]));
        header(&mem, 0x10_0200, T_FLUSH, 0);
        ring.add(&Chain(vec![(0x10_0200, 16, R), (0x10_1002, 1, W)]));
        header(&mem, 0x10_0300, T_GET_ID, 0);
        ring.add(&Chain(vec![
            (0x10_0300, 16, R),
            (0x40_0000, 20, W),
            (0x10_1003, 1, W),
        ]));
        assert!(blk.process(&mut q, &mem));
        for i in 0..4 {
            assert_eq!(status(&mem, 0x10_1000 + i), S_OK, "request {i}");
        }
        let mut back = vec![0u8; 2048];
        mem.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
        assert!(back[..512].iter().all(|&b| b == 2));
        assert!(back[512..1536].iter().all(|&b| b == 0xab));
        assert!(back[1536..].iter().all(|&b| b == 5));
        assert_eq!(ring.used(), vec![(0, 1), (4, 2049), (7, 1), (9, 21)]);
        let mut id = [0u8; 15];
        mem.read_slice(&mut id, GuestAddress(0x40_0000)).unwrap();
        assert_eq!(&id, b"stasis-cow-disk");
    }

    #[test]
    fn bad_requests_get_error_statuses() {
        let (_d, mem, mut blk) = setup();
        let ring = TestRing::new(&mem);
        let mut q = ring.queue();
        // Sector past the end.
        header(&mem, 0x10_0000, T_IN, 127);
        ring.add(&Chain(vec![
            (0x10_0000, 16, R),
            (0x30_0000, 1024, W),
            (0x10_1000, 1, W),
        ]));
        // Sector whose byte offset overflows.
        header(&mem, 0x10_0100, T_OUT, u64::MAX / 2);
        ring.add(&Chain(vec![
            (0x10_0100, 16, R),
            (0x30_0000, 512, R),
            (0x10_1001, 1, W),
        ]));
        // Unknown type.
        header(&mem, 0x10_0200, 77, 0);
        ring.add(&Chain(vec![(0x10_0200, 16, R), (0x10_1002, 1, W)]));
        // Short header.
        ring.add(&Chain(vec![(0x10_0200, 8, R), (0x10_1003, 1, W)]));
        // Read into a device-readable buffer.
        header(&mem, 0x10_0300, T_IN, 0);
        ring.add(&Chain(vec![
            (0x10_0300, 16, R),
            (0x30_0000, 512, R),
            (0x10_1004, 1, W),
        ]));
        // Data outside guest memory.
        header(&mem, 0x10_0400, T_IN, 0);
        ring.add(&Chain(vec![
            (0x10_0400, 16, R),
            (0xffff_0000, 512, W),
            (0x10_1005, 1, W),
        ]));
        // Header outside guest memory.
        ring.add(&Chain(vec![(0x7fff_0000, 16, R), (0x10_1006, 1, W)]));
        // No status byte (last descriptor is readable): used length 0.
        ring.add(&Chain(vec![(0x10_0000, 16, R), (0x10_1007, 1, R)]));
        // Status byte outside guest memory.
        ring.add(&Chain(vec![(0x10_0200, 16, R), (0x7fff_0000, 1, W)]));
        // A huge descriptor length that is not in memory.
        header(&mem, 0x10_0500, T_OUT, 0);
        ring.add(&Chain(vec![
            (0x10_0500, 16, R),
            (0x30_0000, 0xf000_0000, R),
            (0x10_1008, 1, W),
        ]));
        mem.write_slice(&[0x55u8; 9], GuestAddress(0x10_1000))
            .unwrap();
        assert!(blk.process(&mut q, &mem));
        let want = [
            S_IOERR, S_IOERR, S_UNSUPP, S_IOERR, S_IOERR, S_IOERR, S_IOERR, 0x55, S_IOERR,
        ];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(status(&mem, 0x10_1000 + i as u64), *w, "request {i}");
        }
        let used = ring.used();
        assert_eq!(used.len(), 10);
        assert_eq!(used[7].1, 0);
        assert_eq!(used[8].1, 0);
        // Nothing was written to the disk.
        assert_eq!(blk.disk().allocated_blocks(), 0);
    }

    #[test]
    fn corrupted_overlay_data_fails_the_read_and_records_the_fault() {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (d, mem, mut blk) = setup();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        blk.fault().set_notify(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        blk.disk_mut().write_at(4096, &[0x5a; 8192]).unwrap();
        blk.disk_mut().flush().unwrap();
        // Flip one byte of the second written block behind the disk's back.
        let ov = std::fs::File::options()
            .read(true)
            .write(true)
            .open(d.path().join("ov"))
            .unwrap();
        ov.write_all_at(&[0xa5], 8192 + 100).unwrap();
        let ring = TestRing::new(&mem);
        let mut q = ring.queue();
        // Sectors 16..24 (the bad block), then 8..16 (a good one).
        header(&mem, 0x10_0000, T_IN, 16);
        ring.add(&Chain(vec![
            (0x10_0000, 16, R),
            (0x30_0000, 4096, W),
            (0x10_1000, 1, W),
        ]));
        header(&mem, 0x10_0100, T_IN, 8);
        ring.add(&Chain(vec![
            (0x10_0100, 16, R),
            (0x31_0000, 4096, W),
            (0x10_1001, 1, W),
        ]));
        assert!(blk.process(&mut q, &mem));
        assert_eq!(status(&mem, 0x10_1000), S_IOERR);
        assert_eq!(status(&mem, 0x10_1001), S_OK);
        let mut good = vec![0u8; 4096];
        mem.read_slice(&mut good, GuestAddress(0x31_0000)).unwrap();
        assert!(good.iter().all(|&b| b == 0x5a));
        let f = blk.fault().get().expect("fault recorded");
        assert!(
            f.contains("/ov is corrupted") && f.contains("block at offset 8192"),
            "{f}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_bogus_avail_index_stops_processing() {
        let (_d, mem, mut blk) = setup();
        let ring = TestRing::new(&mem);
        let mut q = ring.queue();
        ring.set_avail_idx(1000);
        assert!(!blk.process(&mut q, &mem));
        assert!(ring.used().is_empty());
    }
}
