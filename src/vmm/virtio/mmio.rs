//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! registers a driver programs (features, status, queue addresses and
//! sizes, interrupt status and acknowledgement, the device's config space)
//! and their saved form in snapshots. Queue notifications bypass it (they
//! arrive on ioeventfds); interrupts leave through [`Interrupt`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's register window.
pub const WINDOW: u64 = 0x1000;
/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Register offset of QueueNotify (what the ioeventfds watch).
pub const QUEUE_NOTIFY: u64 = 0x50;
/// Offset of the device-specific config space.
pub const CONFIG: u64 = 0x100;

/// VIRTIO_F_VERSION_1: the modern interface (required).
pub const F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device needs a reset.
    pub const NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the config space changed.
pub const INT_CONFIG: u32 = 2;

/// What a device model tells its transport.
pub trait VirtioDevice {
    /// Virtio device ID (2 block, 19 vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the queue count.
    fn queue_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of config space at `offset`; bytes past
    /// its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// Copies the device-readable parts of a descriptor chain into `buf`, in
/// order, as far as `buf` holds (the rest is cut off); the bytes copied, or
/// `None` if a descriptor points outside guest memory. Shared by the
/// devices whose TX queue carries one packet per chain (vsock, net).
pub fn gather_readable(
    chain: impl IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &vm_memory::GuestMemoryMmap,
    buf: &mut [u8],
) -> Option<usize> {
    use vm_memory::Bytes;
    let mut got = 0usize;
    for d in chain {
        if d.is_write_only() {
            continue;
        }
        let n = (d.len() as usize).min(buf.len() - got);
        mem.read_slice(&mut buf[got..got + n], d.addr()).ok()?;
        got += n;
        if got == buf.len() {
            break;
        }
    }
    Some(got)
}

/// Reads `data.len()` bytes at `offset` of `config`, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// A device's interrupt: the InterruptStatus bits and the irqfd that
/// raises its IRQ line.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl Interrupt {
    /// A new interrupt with its (non-blocking) eventfd.
    pub fn new() -> std::io::Result<Interrupt> {
        Ok(Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets `bits` in InterruptStatus and raises the IRQ.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio: cannot signal an interrupt: {e}");
        }
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn set(&self, v: u32) {
        self.status.store(v, Ordering::SeqCst);
    }
}

/// The saved registers of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// The saved transport of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueRegs>,
}

/// A virtio-mmio transport around device model `D`.
pub struct Transport<D> {
    /// The device model.
    pub device: D,
    /// The device's queues.
    pub queues: Vec<Queue>,
    /// Its interrupt.
    pub interrupt: Interrupt,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes
        .iter()
        .map(|&s| Queue::new(s).unwrap_or_else(|_| Queue::new(256).expect("256 is a valid size")))
        .collect()
}

impl<D: VirtioDevice> Transport<D> {
    /// A device in its reset state.
    pub fn new(device: D, interrupt: Interrupt) -> Transport<D> {
        let queues = new_queues(device.queue_sizes());
        Transport {
            device,
            queues,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// Rebuilds a transport from its saved registers.
    pub fn restore(
        device: D,
        interrupt: Interrupt,
        st: &TransportState,
    ) -> Result<Transport<D>, String> {
        let sizes = device.queue_sizes();
        if st.queues.len() != sizes.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                st.queues.len(),
                sizes.len()
            ));
        }
        let mut queues = Vec::new();
        for (i, (q, &max)) in st.queues.iter().zip(sizes).enumerate() {
            if q.max_size != max {
                return Err(format!(
                    "queue {i}: max size {} saved, {max} now",
                    q.max_size
                ));
            }
            let qs = QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            queues.push(Queue::try_from(qs).map_err(|e| format!("queue {i}: {e}"))?);
        }
        interrupt.set(st.interrupt_status);
        Ok(Transport {
            device,
            queues,
            interrupt,
            device_features_sel: st.device_features_sel,
            driver_features_sel: st.driver_features_sel,
            acked_features: st.acked_features,
            queue_sel: st.queue_sel,
            status: st.status,
            config_generation: st.config_generation,
        })
    }

    /// The registers to save.
    pub fn save(&self) -> TransportState {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueRegs {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                    }
                })
                .collect(),
        }
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    /// Feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The driver set DRIVER_OK (and not FAILED): queues may be used.
    pub fn activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::FAILED | status::NEEDS_RESET) == 0
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.set(0);
        self.device.reset();
    }

    /// A register read at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => 0x5354_5331, // vendor "1STS"
            0x10 => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.ready()))
                .unwrap_or(0),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    /// A register write at `offset` in the window. Writes the spec does not
    /// allow (wrong width, read-only registers, queue setup on a live queue)
    /// are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            return; // no writable config fields
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(b);
        let setup = self.status & status::DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & status::FEATURES_OK == 0 => {
                let offered = self.offered();
                match self.driver_features_sel {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | (u64::from(v) & offered)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered)
                    }
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected().filter(|q| !q.ready()) {
                    if u16::try_from(v).map(|s| q.try_set_size(s)).is_err() {
                        tracing::debug!("virtio: queue size {v} refused");
                    }
                }
            }
            0x44 => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.write_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                if let Some(q) = self.selected().filter(|q| setup && !q.ready()) {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 && self.acked_features & F_VERSION_1 == 0 {
            // Legacy drivers are not supported: refuse FEATURES_OK, which
            // the driver reads back and gives up.
            self.status = v & !status::FEATURES_OK;
            return;
        }
        if newly & status::DRIVER_OK != 0 {
            let event_idx = self.acked_features & (1 << 29) != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        }
        self.status = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        resets: u32,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4, 5], offset, data)
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn rd(t: &Transport<Fake>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut Transport<Fake>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// What Linux's virtio_mmio driver does, step by step.
    fn bring_up(t: &mut Transport<Fake>) {
        wr(t, 0x70, 0);
        wr(t, 0x70, status::ACKNOWLEDGE);
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x14, 0);
        let lo = rd(t, 0x10);
        wr(t, 0x14, 1);
        let hi = rd(t, 0x10);
        wr(t, 0x24, 0);
        wr(t, 0x20, lo);
        wr(t, 0x24, 1);
        wr(t, 0x20, hi);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, 0x70, s);
        assert_eq!(rd(t, 0x70), s);
        for (i, base) in [(0u32, 0x1000u64), (1, 0x2000)] {
            wr(t, 0x30, i);
            assert_eq!(rd(t, 0x44), 0);
            let max = rd(t, 0x34);
            wr(t, 0x38, max);
            wr(t, 0x80, base as u32);
            wr(t, 0x84, 0);
            wr(t, 0x90, (base + 0x400) as u32);
            wr(t, 0x94, 0);
            wr(t, 0xa0, (base + 0x800) as u32);
            wr(t, 0xa4, 0);
            wr(t, 0x44, 1);
        }
        wr(t, 0x70, s | status::DRIVER_OK);
    }

    #[test]
    fn identification_registers() {
        let t = Transport::new(Fake { resets: 0 }, Interrupt::new().unwrap());
        assert_eq!(rd(&t, 0x00), MAGIC);
        assert_eq!(rd(&t, 0x04), 2);
        assert_eq!(rd(&t, 0x08), 42);
        let mut b = [0u8; 2];
        t.read(0x103, &mut b);
        assert_eq!(b, [4, 5]);
        t.read(0x104, &mut b);
        assert_eq!(b, [5, 0]);
        t.read(u64::MAX, &mut b);
        assert_eq!(b, [0, 0]);
        // Wrong-width register reads are zero.
        let mut one = [9u8];
        t.read(0, &mut one);
        assert_eq!(one, [0]);
    }

    #[test]
    fn negotiation_queue_setup_and_reset() {
        let mut t = Transport::new(Fake { resets: 0 }, Interrupt::new().unwrap());
        bring_up(&mut t);
        assert!(t.activated());
        assert_eq!(t.acked_features(), F_VERSION_1 | (1 << 3));
        assert_eq!(t.queues[0].size(), 16);
        assert_eq!(t.queues[1].desc_table(), 0x2000);
        assert_eq!(t.queues[1].avail_ring(), 0x2400);
        assert_eq!(t.queues[1].used_ring(), 0x2800);
        // Queue addresses are frozen once running.
        wr(&mut t, 0x30, 1);
        wr(&mut t, 0x80, 0x9000);
        assert_eq!(t.queues[1].desc_table(), 0x2000);
        // Out-of-range queue select reads zeros and ignores writes.
        wr(&mut t, 0x30, 7);
        assert_eq!(rd(&t, 0x34), 0);
        wr(&mut t, 0x44, 1);
        // Interrupt status and acknowledgement.
        t.interrupt.raise(INT_VRING | INT_CONFIG);
        assert_eq!(rd(&t, 0x60), 3);
        wr(&mut t, 0x64, INT_VRING);
        assert_eq!(rd(&t, 0x60), INT_CONFIG);
        assert_eq!(t.interrupt.eventfd().read().unwrap(), 1);
        // Reset.
        wr(&mut t, 0x70, 0);
        assert!(!t.activated());
        assert_eq!(rd(&t, 0x60), 0);
        assert!(!t.queues[0].ready());
        assert_eq!(t.device.resets, 2); // bring_up reset it first
    }

    #[test]
    fn legacy_drivers_are_refused_and_bad_sizes_ignored() {
        let mut t = Transport::new(Fake { resets: 0 }, Interrupt::new().unwrap());
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x20, 1 << 3); // no VERSION_1
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&t, 0x70) & status::FEATURES_OK, 0);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 5); // not a power of two
        assert_eq!(t.queues[0].size(), 16);
        wr(&mut t, 0x38, 1 << 20);
        assert_eq!(t.queues[0].size(), 16);
        t.write(0x38, &[1, 2]); // wrong width
        assert_eq!(t.queues[0].size(), 16);
    }

    #[test]
    fn state_round_trips() {
        let mut t = Transport::new(Fake { resets: 0 }, Interrupt::new().unwrap());
        bring_up(&mut t);
        t.queues[0].set_next_avail(5);
        t.queues[0].set_next_used(4);
        t.interrupt.raise(INT_VRING);
        let st = t.save();
        let t2 = Transport::restore(Fake { resets: 0 }, Interrupt::new().unwrap(), &st).unwrap();
        assert_eq!(t2.save(), st);
        assert!(t2.activated());
        assert_eq!(rd(&t2, 0x60), INT_VRING);
        let mut bad = st.clone();
        bad.queues.pop();
        assert!(Transport::restore(Fake { resets: 0 }, Interrupt::new().unwrap(), &bad).is_err());
        let mut bad = st;
        bad.queues[0].desc_table = 3; // misaligned
        assert!(Transport::restore(Fake { resets: 0 }, Interrupt::new().unwrap(), &bad).is_err());
    }
}
