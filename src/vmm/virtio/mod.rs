//! virtio-mmio devices of a VM: a block device over a copy-on-write disk
//! and a vsock device, their KVM wiring and the device thread that runs
//! them.
//!
//! Layout: device `n` has its 4 KiB register window at
//! `0xd000_0000 + n * 0x1000` and IRQ `5 + n` (ISA IRQs, which the MP table
//! routes to the same IOAPIC pins); the guest learns of them from
//! `virtio_mmio.device=4K@<addr>:<irq>` words on its command line. The
//! block device, if any, comes first (so it is `/dev/vda`), then vsock.
//!
//! Threads: vCPU threads only access registers ([`Bus`]). Queue
//! notifications arrive on one ioeventfd per queue (KVM_IOEVENTFD on
//! QueueNotify, matching the queue index), interrupts leave through an
//! irqfd per device. One device thread per VM waits (epoll) on those
//! eventfds and the vsock multiplexer's fd and does all the I/O. Pausing
//! stops that thread between requests (block requests are synchronous, so
//! nothing is in flight) and flushes the disk; resuming starts a new thread,
//! which first processes every queue once, so requests the guest queued
//! while the thread was stopped (or before a snapshot) are not lost.
//!
//! Snapshots: each device's transport registers and queue positions go into
//! [`VirtioState`]; the disk's overlay and map are put into the snapshot
//! directory ([`cow::CowDisk::save_into`]) and a restore opens them there,
//! in place: a restored VM writes to the snapshot's overlay, so a snapshot
//! is resumed once (what the API does: the next pause writes a new snapshot
//! and removes the old one). To resume one snapshot several times, copy its
//! directory first. A VM that runs on after a snapshot never changes it
//! (the disk copies a hard-linked overlay away before its next write, see
//! [`cow`]). The vsock device comes back with no connections: the
//! multiplexer is reset and the guest gets a transport-reset event.
//!
//! Disk integrity: when an existing overlay is opened (a restore, or a
//! reused `--overlay`), a background thread checks every written block
//! against its checksum, in 1 MiB steps under the device's lock (so never
//! against a half-done write). Its first mismatch, or one found by a guest
//! read, is the VM's [`block::DiskFault`]: [`Virtio::disk_fault`] reports
//! it and the notifier given to [`Virtio::on_disk_fault`] is called, and
//! the VM stops with that error.

pub mod block;
pub mod cow;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::block::{Block, DiskFault};
use self::cow::CowDisk;
use self::mmio::{Interrupt, Transport, TransportState};
use self::vsock::Vsock;
use crate::vsock::Muxer;

/// Register window of the first device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// IRQ of the first device.
pub const IRQ_BASE: u32 = 5;
/// Name of the disk overlay inside a snapshot directory (its map is
/// `disk.overlay.map`).
pub const SNAPSHOT_OVERLAY: &str = "disk.overlay";

/// Errors of the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The copy-on-write disk could not be opened or saved.
    #[error(transparent)]
    Disk(#[from] cow::Error),
    /// The vsock backend could not be started.
    #[error("vsock device: {0}")]
    Vsock(#[from] crate::vsock::Error),
    /// An eventfd, epoll or thread could not be created.
    #[error("virtio: cannot create {what}")]
    Sys {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused to wire an ioeventfd or irqfd.
    #[error("virtio: KVM refused {what}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Saved device state does not fit.
    #[error("saved virtio device state is invalid: {0}")]
    BadState(String),
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Sys { what, source }
}

/// The disk of a VM: a read-only base image and a copy-on-write overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Base image (e.g. a template's ext4 root filesystem); never written.
    pub base: PathBuf,
    /// The overlay file (its map is `<overlay>.map`): reused if it exists,
    /// created otherwise. `None`: a temporary overlay, removed with the VM.
    pub overlay: Option<PathBuf>,
}

/// Saved state of the virtio devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// The devices, in slot order.
    pub devices: Vec<DeviceState>,
}

/// Saved state of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Register window.
    pub base: u64,
    /// IRQ.
    pub irq: u32,
    /// Which device, with what it needs to be reopened.
    pub kind: DeviceKind,
    /// Transport registers and queues.
    pub transport: TransportState,
}

/// What a saved device is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// virtio-blk; the overlay is [`SNAPSHOT_OVERLAY`] in the snapshot.
    Block {
        /// The base image when saved: shown by `snapshot info`, compared
        /// (a warning) with the one a restore is given, never opened.
        base: PathBuf,
        /// Its size when saved.
        size: u64,
    },
    /// virtio-vsock.
    Vsock {
        /// The host-side Unix socket: saved empty, ignored on restore (the
        /// caller names the socket).
        uds: PathBuf,
        /// The guest's CID.
        cid: u64,
    },
    /// virtio-net; the tap is the caller's (re-created on restore).
    Net {
        /// The guest's MAC address.
        mac: [u8; 6],
    },
}

/// One device with its transport. A VM has at most two, so the size
/// difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Device {
    /// virtio-blk.
    Block(Transport<Block>),
    /// virtio-vsock.
    Vsock(Transport<Vsock<Muxer>>),
    /// virtio-net over a tap.
    Net(Transport<net::Net<net::Tap>>),
}

impl Device {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self {
            Device::Block(t) => t.read(offset, data),
            Device::Vsock(t) => t.read(offset, data),
            Device::Net(t) => t.read(offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match self {
            Device::Block(t) => t.write(offset, data),
            Device::Vsock(t) => t.write(offset, data),
            Device::Net(t) => t.write(offset, data),
        }
    }

    fn queue_count(&self) -> usize {
        match self {
            Device::Block(t) => t.queues.len(),
            Device::Vsock(t) => t.queues.len(),
            Device::Net(t) => t.queues.len(),
        }
    }

    fn interrupt(&self) -> &Interrupt {
        match self {
            Device::Block(t) => &t.interrupt,
            Device::Vsock(t) => &t.interrupt,
            Device::Net(t) => &t.interrupt,
        }
    }

    /// Handles a notification of queue `q` (or, with `None`, every queue).
    fn process(&mut self, q: Option<usize>, mem: &GuestMemoryMmap) {
        let notify = match self {
            Device::Block(t) => {
                if !t.activated() {
                    return;
                }
                let Transport { device, queues, .. } = t;
                queues
                    .get_mut(0)
                    .is_some_and(|queue| device.process(queue, mem))
            }
            Device::Vsock(t) => {
                if !t.activated() {
                    return;
                }
                let Transport { device, queues, .. } = t;
                let [rx, tx, ev] = &mut queues[..] else {
                    return;
                };
                let mut n = false;
                if q.is_none() || q == Some(vsock::EVQ) {
                    n |= device.process_event(ev, mem);
                }
                if q.is_none() || q == Some(vsock::TXQ) {
                    n |= device.process_tx(tx, mem);
                }
                // RX after TX: the backend may have answered.
                n |= device.process_rx(rx, mem);
                n
            }
            Device::Net(t) => {
                if !t.activated() {
                    return;
                }
                let Transport { device, queues, .. } = t;
                let [rx, tx] = &mut queues[..] else {
                    return;
                };
                let mut n = false;
                if q.is_none() || q == Some(net::TXQ) {
                    n |= device.process_tx(tx, mem);
                }
                if q.is_none() || q == Some(net::RXQ) {
                    n |= device.process_rx(rx, mem);
                }
                n
            }
        };
        if notify {
            self.interrupt().raise(mmio::INT_VRING);
        }
    }

    fn save(&self, base: u64, irq: u32) -> DeviceState {
        let (kind, transport) = match self {
            Device::Block(t) => (
                DeviceKind::Block {
                    base: t.device.disk().base_path().to_owned(),
                    size: t.device.disk().size(),
                },
                t.save(),
            ),
            Device::Vsock(t) => (
                DeviceKind::Vsock {
                    uds: PathBuf::new(),
                    cid: t.device.cid(),
                },
                t.save(),
            ),
            Device::Net(t) => (
                DeviceKind::Net {
                    mac: t.device.mac(),
                },
                t.save(),
            ),
        };
        DeviceState {
            base,
            irq,
            kind,
            transport,
        }
    }
}

struct Slot {
    base: u64,
    irq: u32,
    dev: Arc<Mutex<Device>>,
    /// One per queue.
    notify: Vec<EventFd>,
}

fn lock(d: &Mutex<Device>) -> MutexGuard<'_, Device> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// The register windows, for vCPU threads.
#[derive(Clone, Default)]
pub struct Bus {
    windows: Vec<(u64, Arc<Mutex<Device>>)>,
}

impl Bus {
    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<Device>>)> {
        self.windows
            .iter()
            .find(|(b, _)| addr >= *b && addr < b + mmio::WINDOW)
            .map(|(b, d)| (addr - b, d))
    }

    /// An MMIO read; addresses with no device read as zeros.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((off, d)) => lock(d).read(off, data),
            None => data.fill(0),
        }
    }

    /// An MMIO write; addresses with no device are ignored.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((off, d)) = self.find(addr) {
            lock(d).write(off, data);
        }
    }
}

struct Running {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// The virtio devices of one VM.
pub struct Virtio {
    slots: Vec<Slot>,
    mem: GuestMemoryMmap,
    vsock_uds: Option<PathBuf>,
    /// A temporary overlay to remove with the VM.
    temp_overlay: Option<PathBuf>,
    running: Option<Running>,
    /// The disk's integrity errors.
    disk_fault: Option<Arc<DiskFault>>,
    /// The background check of an existing overlay.
    scrub: Scrub,
}

/// The background check of an overlay's written blocks.
#[derive(Default)]
enum Scrub {
    /// Nothing to check.
    #[default]
    None,
    /// To start with the device thread.
    Pending,
    /// Running (or done).
    Started {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    },
}

impl Virtio {
    /// No devices.
    pub fn none(mem: &GuestMemoryMmap) -> Virtio {
        Virtio {
            slots: Vec::new(),
            mem: mem.clone(),
            vsock_uds: None,
            temp_overlay: None,
            running: None,
            disk_fault: None,
            scrub: Scrub::None,
        }
    }

    /// Creates the devices of a new VM and wires them into KVM.
    pub fn create(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        disk: Option<&DiskConfig>,
        vsock_uds: Option<&Path>,
    ) -> Result<Virtio, Error> {
        let mut v = Virtio::none(mem);
        if let Some(d) = disk {
            let (overlay, temp) = match &d.overlay {
                Some(p) => (p.clone(), false),
                None => (temp_overlay_path(), true),
            };
            let base = std::fs::canonicalize(&d.base).unwrap_or_else(|_| d.base.clone());
            let disk = CowDisk::open(&base, &overlay)?;
            if temp {
                v.temp_overlay = Some(overlay);
            }
            if disk.allocated_blocks() > 0 {
                v.scrub = Scrub::Pending;
            }
            let irq = Interrupt::new().map_err(sys("an interrupt eventfd"))?;
            let blk = Block::new(disk);
            v.disk_fault = Some(blk.fault().clone());
            v.add(vm, Device::Block(Transport::new(blk, irq)))?;
        }
        if let Some(uds) = vsock_uds {
            let muxer = Muxer::new(uds, crate::vsock::GUEST_CID)?;
            let irq = Interrupt::new().map_err(sys("an interrupt eventfd"))?;
            let dev = Vsock::new(muxer, crate::vsock::GUEST_CID);
            v.add(vm, Device::Vsock(Transport::new(dev, irq)))?;
            v.vsock_uds = Some(uds.to_owned());
        }
        Ok(v)
    }

    /// Re-creates saved devices: the disk from the overlay in `snapshot`
    /// (in place) over the base image `disk_base`, vsock on `vsock_uds`,
    /// with no connections. The state is untrusted input: no host path it
    /// records is used (the overlay is the snapshot's, the base and the
    /// socket are the caller's); a snapshot with a disk or a vsock device
    /// and no such path given is [`Error::BadState`]. With `own_overlay`
    /// the disk is a new writable overlay forked from the snapshot's
    /// ([`CowDisk::fork`]): the snapshot is never written and can be
    /// restored again, concurrently. `net_tap` (opened in the sandbox's
    /// re-created namespace) backs a saved network device.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        st: &VirtioState,
        snapshot: &Path,
        vsock_uds: Option<&Path>,
        disk_base: Option<&Path>,
        own_overlay: Option<&Path>,
        mut net_tap: Option<std::fs::File>,
    ) -> Result<Virtio, Error> {
        let mut v = Virtio::none(mem);
        for (i, d) in st.devices.iter().enumerate() {
            let (base, irq) = slot_place(i);
            if (d.base, d.irq) != (base, irq) {
                return Err(Error::BadState(format!(
                    "device {i} at {:#x} IRQ {}, expected {base:#x} IRQ {irq}",
                    d.base, d.irq
                )));
            }
            let interrupt = Interrupt::new().map_err(sys("an interrupt eventfd"))?;
            let bad = |e: String| Error::BadState(format!("device {i}: {e}"));
            let dev = match &d.kind {
                DeviceKind::Block {
                    base: recorded,
                    size,
                } => {
                    let base = disk_base.ok_or_else(|| {
                        Error::BadState(format!(
                            "the snapshot has a disk: its base image must be given \
                             (the snapshot records {}, which is not used)",
                            recorded.display()
                        ))
                    })?;
                    if base != recorded.as_path() {
                        tracing::warn!(
                            given = %base.display(),
                            recorded = %recorded.display(),
                            "restore: the disk's base image differs from the one the snapshot \
                             records; using the given one"
                        );
                    }
                    let layer = snapshot.join(SNAPSHOT_OVERLAY);
                    let disk = match own_overlay {
                        Some(own) => CowDisk::fork(base, &layer, own)?,
                        None => CowDisk::open_existing(base, &layer)?,
                    };
                    if disk.size() != *size {
                        return Err(Error::BadState(format!(
                            "base image {} is {} bytes now, {size} when the snapshot was taken",
                            base.display(),
                            disk.size()
                        )));
                    }
                    if disk.allocated_blocks() > 0 {
                        v.scrub = Scrub::Pending;
                    }
                    let blk = Block::new(disk);
                    v.disk_fault = Some(blk.fault().clone());
                    Device::Block(Transport::restore(blk, interrupt, &d.transport).map_err(bad)?)
                }
                DeviceKind::Vsock { cid, .. } => {
                    // A path in the state is never used: the muxer removes
                    // whatever is at its socket path before binding.
                    let uds = vsock_uds.ok_or_else(|| {
                        Error::BadState(
                            "the snapshot has a vsock device: its host socket path must be given"
                                .into(),
                        )
                    })?;
                    let dev = Vsock::new(Muxer::new(uds, *cid)?, *cid);
                    v.vsock_uds = Some(uds.to_owned());
                    let mut t = Transport::restore(dev, interrupt, &d.transport).map_err(bad)?;
                    if t.activated() {
                        // Connections did not survive: tell the driver.
                        t.device.transport_reset();
                    }
                    Device::Vsock(t)
                }
                DeviceKind::Net { mac } => {
                    let tap = net_tap.take().ok_or_else(|| {
                        Error::BadState(
                            "the snapshot has a network device: a tap must be given".into(),
                        )
                    })?;
                    let dev = net::Net::new(net::Tap(tap), *mac);
                    Device::Net(Transport::restore(dev, interrupt, &d.transport).map_err(bad)?)
                }
            };
            v.add(vm, dev)?;
        }
        Ok(v)
    }

    /// Adds a virtio-net device over `tap` (opened with a 12-byte virtio
    /// header, see [`crate::net::tap`]), after the disk and vsock devices.
    pub fn add_net(&mut self, vm: &VmFd, tap: std::fs::File, mac: [u8; 6]) -> Result<(), Error> {
        let irq = Interrupt::new().map_err(sys("an interrupt eventfd"))?;
        let dev = net::Net::new(net::Tap(tap), mac);
        self.add(vm, Device::Net(Transport::new(dev, irq)))
    }

    fn add(&mut self, vm: &VmFd, dev: Device) -> Result<(), Error> {
        let (base, irq) = slot_place(self.slots.len());
        vm.register_irqfd(dev.interrupt().eventfd(), irq)
            .map_err(|source| Error::Kvm {
                what: "KVM_IRQFD",
                source,
            })?;
        let mut notify = Vec::new();
        for q in 0..dev.queue_count() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(sys("a queue eventfd"))?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(base + mmio::QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(|source| Error::Kvm {
                what: "KVM_IOEVENTFD",
                source,
            })?;
            notify.push(evt);
        }
        self.slots.push(Slot {
            base,
            irq,
            dev: Arc::new(Mutex::new(dev)),
            notify,
        });
        Ok(())
    }

    /// The `virtio_mmio.device=` words for the kernel command line.
    pub fn cmdline(&self) -> String {
        self.slots
            .iter()
            .map(|s| format!(" virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq))
            .collect()
    }

    /// The register windows, for vCPU threads.
    pub fn bus(&self) -> Bus {
        Bus {
            windows: self.slots.iter().map(|s| (s.base, s.dev.clone())).collect(),
        }
    }

    /// The saved state.
    pub fn save(&self) -> VirtioState {
        VirtioState {
            devices: self
                .slots
                .iter()
                .map(|s| {
                    let mut st = lock(&s.dev).save(s.base, s.irq);
                    if let DeviceKind::Vsock { uds, .. } = &mut st.kind {
                        *uds = self.vsock_uds.clone().unwrap_or_default();
                    }
                    st
                })
                .collect(),
        }
    }

    /// Puts the disk (if any) into snapshot directory `dir`; the device
    /// thread must be stopped.
    pub fn save_disk(&self, dir: &Path) -> Result<(), Error> {
        for s in &self.slots {
            if let Device::Block(t) = &mut *lock(&s.dev) {
                let how = t.device.disk_mut().save_into(dir, SNAPSHOT_OVERLAY)?;
                tracing::debug!(how, "disk overlay saved with the snapshot");
            }
        }
        Ok(())
    }

    /// The first disk-integrity error (a block that failed its checksum,
    /// read by the guest or found by the background check), if any.
    pub fn disk_fault(&self) -> Option<String> {
        self.disk_fault.as_ref().and_then(|f| f.get())
    }

    /// Calls `f` (from a device or checking thread) when the disk records
    /// an integrity error.
    pub fn on_disk_fault(&self, f: impl Fn() + Send + 'static) {
        if let Some(fault) = &self.disk_fault {
            fault.set_notify(Box::new(f));
        }
    }

    /// Runs `f` on the disk between two requests (`None`: no disk).
    pub fn with_disk<R>(&self, f: impl FnOnce(&mut CowDisk) -> R) -> Option<R> {
        for s in &self.slots {
            if let Device::Block(t) = &mut *lock(&s.dev) {
                return Some(f(t.device.disk_mut()));
            }
        }
        None
    }

    /// Starts the background check of the overlay's written blocks.
    fn start_scrub(&mut self) -> Result<(), Error> {
        let Some(fault) = self.disk_fault.clone() else {
            return Ok(());
        };
        let Some(dev) = self
            .slots
            .iter()
            .find(|s| matches!(&*lock(&s.dev), Device::Block(_)))
            .map(|s| s.dev.clone())
        else {
            return Ok(());
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("disk-check".into())
            .spawn(move || {
                crate::jail::seccomp::install_for(crate::jail::seccomp::ThreadKind::Device);
                scrub_thread(dev, fault, stop2)
            })
            .map_err(sys("the disk check thread"))?;
        self.scrub = Scrub::Started { stop, thread };
        Ok(())
    }

    /// Makes the disk's writes durable.
    pub fn flush(&self) -> Result<(), Error> {
        for s in &self.slots {
            if let Device::Block(t) = &mut *lock(&s.dev) {
                t.device.disk_mut().flush()?;
            }
        }
        Ok(())
    }

    /// Starts the device thread (no-op without devices or if running).
    pub fn start(&mut self) -> Result<(), Error> {
        if self.slots.is_empty() || self.running.is_some() {
            return Ok(());
        }
        if matches!(self.scrub, Scrub::Pending) {
            self.start_scrub()?;
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(sys("the stop eventfd"))?;
        let epoll = Epoll::new().map_err(sys("an epoll instance"))?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(sys("an epoll registration"))
        };
        use std::os::fd::AsRawFd;
        add(stop.as_raw_fd(), STOP_TOKEN)?;
        let mut devs = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let mut fds = Vec::new();
            for (q, e) in s.notify.iter().enumerate() {
                let e = e.try_clone().map_err(sys("a queue eventfd"))?;
                add(e.as_raw_fd(), token(i, q))?;
                fds.push(e);
            }
            if let Device::Vsock(t) = &*lock(&s.dev) {
                let fd = t.device.backend().as_raw_fd();
                if fd >= 0 {
                    add(fd, token(i, BACKEND_QUEUE))?;
                }
            }
            if let Device::Net(t) = &*lock(&s.dev) {
                use self::net::NetBackend;
                let fd = t.device.backend().fd();
                if fd >= 0 {
                    // Edge-triggered: with the RX ring full the tap stays
                    // readable; the guest's RX notification resumes reading.
                    epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(
                                EventSet::IN | EventSet::EDGE_TRIGGERED,
                                token(i, BACKEND_QUEUE),
                            ),
                        )
                        .map_err(sys("an epoll registration"))?;
                }
            }
            devs.push((s.dev.clone(), fds));
        }
        let mem = self.mem.clone();
        let thread = std::thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                crate::jail::seccomp::install_for(crate::jail::seccomp::ThreadKind::Device);
                device_thread(epoll, devs, mem)
            })
            .map_err(sys("the device thread"))?;
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    /// Stops the device thread after its current request.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            if let Err(e) = r.stop.write(1) {
                tracing::error!("virtio: cannot stop the device thread: {e}");
                return;
            }
            if r.thread.join().is_err() {
                tracing::error!("virtio: the device thread panicked");
            }
        }
    }
}

impl Drop for Virtio {
    fn drop(&mut self) {
        self.stop();
        if let Scrub::Started { stop, thread } = std::mem::take(&mut self.scrub) {
            stop.store(true, Ordering::Relaxed);
            if thread.join().is_err() {
                tracing::error!("virtio: the disk check thread panicked");
            }
        }
        // Close the disk before removing a temporary overlay.
        self.slots.clear();
        if let Some(p) = self.temp_overlay.take() {
            let _ = std::fs::remove_file(cow::map_path(&p));
            let _ = std::fs::remove_file(p);
        }
    }
}

fn slot_place(i: usize) -> (u64, u32) {
    (MMIO_BASE + i as u64 * mmio::WINDOW, IRQ_BASE + i as u32)
}

fn temp_overlay_path() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "stasis-overlay-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

const STOP_TOKEN: u64 = u64::MAX;
const BACKEND_QUEUE: usize = 0xff;

fn token(dev: usize, q: usize) -> u64 {
    ((dev as u64) << 8) | q as u64
}

type ThreadDevices = Vec<(Arc<Mutex<Device>>, Vec<EventFd>)>;

/// Checks every written block of the block device's overlay, one step at a
/// time under the device lock; records the first mismatch in `fault`.
fn scrub_thread(dev: Arc<Mutex<Device>>, fault: Arc<DiskFault>, stop: Arc<AtomicBool>) {
    let t = std::time::Instant::now();
    let mut pos = 0;
    while !stop.load(Ordering::Relaxed) {
        let step = match &*lock(&dev) {
            Device::Block(b) => b.device.disk().scrub_step(pos),
            Device::Vsock(_) | Device::Net(_) => return,
        };
        match step {
            Ok(Some(next)) => pos = next,
            Ok(None) => {
                tracing::debug!(
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "disk overlay: every written block matches its checksum"
                );
                return;
            }
            Err(e @ cow::Error::Corrupt { .. }) => {
                fault.record(&e);
                return;
            }
            Err(e) => {
                tracing::warn!("disk overlay check stopped: {e}");
                return;
            }
        }
    }
}

/// The device thread: processes every queue once, then serves events until
/// told to stop.
fn device_thread(epoll: Epoll, devs: ThreadDevices, mem: GuestMemoryMmap) {
    for (d, _) in &devs {
        lock(d).process(None, &mem);
    }
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio: epoll failed, device thread ends: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let t = ev.data();
            if t == STOP_TOKEN {
                return;
            }
            let (i, q) = ((t >> 8) as usize, (t & 0xff) as usize);
            let Some((dev, fds)) = devs.get(i) else {
                continue;
            };
            let mut d = lock(dev);
            if q == BACKEND_QUEUE {
                if let Device::Vsock(t) = &mut *d {
                    t.device.backend_mut().process();
                }
                let rxq = match &*d {
                    Device::Net(_) => net::RXQ,
                    _ => vsock::RXQ,
                };
                d.process(Some(rxq), &mem);
            } else if let Some(e) = fds.get(q) {
                // Reset the counter first: a notification that arrives
                // while we work wakes us again.
                let _ = e.read();
                d.process(Some(q), &mem);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::testutil::{Chain, TestRing};
    use super::*;

    fn write_reg(bus: &Bus, addr: u64, v: u32) {
        bus.write(addr, &v.to_le_bytes());
    }

    fn read_reg(bus: &Bus, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        bus.read(addr, &mut b);
        u32::from_le_bytes(b)
    }

    /// A block device in a `Virtio` without KVM: the driver's setup through
    /// the bus, requests through the device thread, notifications through
    /// the queue eventfd, completions through the interrupt eventfd.
    #[test]
    fn device_thread_serves_notified_and_replayed_requests() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base");
        std::fs::write(&base, vec![7u8; 64 * 1024]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let disk = CowDisk::open(&base, &d.path().join("ov")).unwrap();
        let irq = Interrupt::new().unwrap();
        let dev = Device::Block(Transport::new(Block::new(disk), irq.clone()));
        let mut v = Virtio::none(&mem);
        v.slots.push(Slot {
            base: MMIO_BASE,
            irq: IRQ_BASE,
            dev: Arc::new(Mutex::new(dev)),
            notify: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        });
        assert_eq!(v.cmdline(), " virtio_mmio.device=4K@0xd0000000:5");
        let bus = v.bus();
        assert_eq!(read_reg(&bus, MMIO_BASE), mmio::MAGIC);
        assert_eq!(read_reg(&bus, MMIO_BASE + 8), block::DEVICE_TYPE);
        assert_eq!(read_reg(&bus, MMIO_BASE + 0x2000), 0, "no device there");
        // Driver setup: features (VERSION_1), queue 0 at the test ring.
        write_reg(&bus, MMIO_BASE + 0x70, 3);
        write_reg(&bus, MMIO_BASE + 0x24, 1);
        write_reg(&bus, MMIO_BASE + 0x20, 1);
        write_reg(&bus, MMIO_BASE + 0x70, 3 | mmio::status::FEATURES_OK);
        write_reg(&bus, MMIO_BASE + 0x30, 0);
        write_reg(&bus, MMIO_BASE + 0x38, 256);
        write_reg(&bus, MMIO_BASE + 0x80, 0);
        write_reg(&bus, MMIO_BASE + 0x90, 0x1000);
        write_reg(&bus, MMIO_BASE + 0xa0, 0x2000);
        write_reg(&bus, MMIO_BASE + 0x44, 1);
        write_reg(&bus, MMIO_BASE + 0x70, 0xf);
        let ring = TestRing::new(&mem);
        let read_req = |at: u64, status: u64| {
            let mut h = [0u8; 16];
            h[8..].copy_from_slice(&1u64.to_le_bytes());
            mem.write_slice(&h, GuestAddress(at)).unwrap();
            ring.add(&Chain(vec![
                (at, 16, false),
                (0x20_0000, 512, true),
                (status, 1, true),
            ]));
        };
        let wait_irq = || {
            let end = Instant::now() + Duration::from_secs(10);
            while irq.eventfd().read().is_err() {
                assert!(Instant::now() < end, "no interrupt");
                std::thread::yield_now();
            }
        };
        // Queued before the thread starts: served when it starts.
        mem.write_obj(0xffu8, GuestAddress(0x10_1000)).unwrap();
        read_req(0x10_0000, 0x10_1000);
        v.start().unwrap();
        wait_irq();
        assert_eq!(read_reg(&bus, MMIO_BASE + 0x60), mmio::INT_VRING);
        write_reg(&bus, MMIO_BASE + 0x64, mmio::INT_VRING);
        assert_eq!(ring.used(), vec![(0, 513)]);
        // Notified through the queue eventfd.
        read_req(0x10_0100, 0x10_1001);
        v.slots[0].notify[0].write(1).unwrap();
        wait_irq();
        assert_eq!(ring.used().len(), 2);
        let st: u8 = mem.read_obj(GuestAddress(0x10_1001)).unwrap();
        assert_eq!(st, block::S_OK);
        // Stopped: a notification waits for the next start.
        v.stop();
        read_req(0x10_0200, 0x10_1002);
        v.slots[0].notify[0].write(1).unwrap();
        assert_eq!(ring.used().len(), 2);
        let saved = v.save();
        assert_eq!(saved.devices[0].transport.queues[0].next_avail, 2);
        v.start().unwrap();
        wait_irq();
        assert_eq!(ring.used().len(), 3);
        v.stop();
        v.flush().unwrap();
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A driver-side view of one split virtqueue in test memory.

    use std::cell::Cell;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const SIZE: u16 = 256;
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// Descriptors of one chain: (address, length, device-writable).
    pub struct Chain(pub Vec<(u64, u32, bool)>);

    /// A queue at guest address 0: descriptors, avail ring, used ring.
    pub struct TestRing<'a> {
        mem: &'a GuestMemoryMmap,
        next_desc: Cell<u16>,
        avail_idx: Cell<u16>,
    }

    impl<'a> TestRing<'a> {
        pub fn new(mem: &'a GuestMemoryMmap) -> Self {
            TestRing {
                mem,
                next_desc: Cell::new(0),
                avail_idx: Cell::new(0),
            }
        }

        /// The device's queue, set up as a driver would.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(SIZE).unwrap();
            q.set_size(SIZE);
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_ready(true);
            q
        }

        /// Adds a chain and makes it available.
        pub fn add(&self, c: &Chain) {
            let head = self.next_desc.get();
            for (k, &(addr, len, write)) in c.0.iter().enumerate() {
                let i = head + k as u16;
                let last = k + 1 == c.0.len();
                let flags: u16 = if last { 0 } else { 1 } | if write { 2 } else { 0 };
                let at = DESC + 16 * u64::from(i);
                self.mem.write_obj(addr, GuestAddress(at)).unwrap();
                self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                self.mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
            }
            self.next_desc.set(head + c.0.len() as u16);
            let idx = self.avail_idx.get();
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % SIZE)))
                .unwrap();
            self.set_avail_idx(idx.wrapping_add(1));
        }

        /// Writes the avail ring's index.
        pub fn set_avail_idx(&self, v: u16) {
            self.avail_idx.set(v);
            self.mem.write_obj(v, GuestAddress(AVAIL + 2)).unwrap();
        }

        /// The used ring's entries: (head, length).
        pub fn used(&self) -> Vec<(u32, u32)> {
            let n: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            (0..n)
                .map(|i| {
                    let at = USED + 4 + 8 * u64::from(i % SIZE);
                    (
                        self.mem.read_obj(GuestAddress(at)).unwrap(),
                        self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                    )
                })
                .collect()
        }
    }
}
