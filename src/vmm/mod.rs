//! The VMM: a KVM virtual machine with its guest memory, vCPU threads and
//! legacy devices, booted from a kernel image or the built-in test guest,
//! paused and resumed from another thread, and ended cleanly.
//!
//! Every KVM call on a vCPU happens on that vCPU's own thread or before the
//! thread starts; callers talk to vCPU threads over channels whose commands
//! carry their own reply senders.

pub mod backing;
pub mod boot;
pub mod devices;
pub mod memory;
pub mod mptable;
pub mod persist;
pub mod vcpu;
pub mod virtio;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use boot::Kernel;
pub use devices::{Console, ConsoleBuffer};
pub use persist::{
    PersistError, RestoreMode, RestoreOpts, RestorePaths, RestorePhases, RestoreStats,
    SnapshotOpts, SnapshotStats, VmState,
};
pub use vcpu::ExitReason;
pub use virtio::DiskConfig;

use crate::guest::GuestStatus;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// How long a vCPU may take to stop after being kicked before we give up.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm can't be opened.
    #[error("cannot open /dev/kvm: {0} (stasis needs KVM: run as root or as a member of the kvm group on an x86_64 Linux host with virtualization enabled)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// The vCPU count is out of range.
    #[error("{asked} vCPUs is not valid: this host allows 1 to {max}")]
    BadVcpus {
        /// Asked for.
        asked: u8,
        /// Allowed.
        max: u8,
    },
    /// A VM-level KVM call failed.
    #[error("KVM refused {what}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Kernel loading or vCPU boot setup failed.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// Device setup failed.
    #[error(transparent)]
    Devices(#[from] devices::Error),
    /// A virtio device failed.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
    /// The network device's tap could not be opened.
    #[error("network device: {0}")]
    Tap(#[from] crate::net::tap::Error),
    /// vCPU state save/restore failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Snapshot or restore failed.
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    /// A vCPU thread couldn't be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// vCPUs didn't stop in time.
    #[error("vCPUs did not stop within {0:?} of being asked")]
    StopTimeout(Duration),
    /// The operation needs a running or paused VM, but the guest has ended.
    #[error("the VM has already ended: {0}")]
    Ended(ExitReason),
    /// The operation needs the VM in another state.
    #[error("the VM is {actual}, but this needs it {needed}")]
    WrongState {
        /// Current state.
        actual: &'static str,
        /// Needed state.
        needed: &'static str,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// What to boot.
    pub kernel: Kernel,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Where the serial console goes.
    pub console: Console,
    /// A virtio-blk disk (copy-on-write over a base image). The caller
    /// puts `root=/dev/vda` etc. on the command line.
    pub disk: Option<DiskConfig>,
    /// A virtio-vsock device whose host side is this Unix socket.
    pub vsock: Option<PathBuf>,
    /// What backs guest memory: asked for in a config given to
    /// [`Vm::boot`]; the backing in use in [`Vm::config`].
    pub memory_backing: memory::MemoryBacking,
}

/// A virtio-net device for a VM: the tap [`crate::net::TAP_NAME`] inside
/// the sandbox's network namespace (made by [`crate::net::Network::setup`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetAttach {
    /// The namespace (a file such as `/run/netns/stasis-0a0b0008`).
    pub netns: PathBuf,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl NetAttach {
    /// Opens the tap inside the namespace.
    pub fn open_tap(&self) -> Result<std::fs::File, Error> {
        Ok(crate::net::tap::open_in(&self.netns, crate::net::TAP_NAME)?)
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: Kernel::TestGuest,
            initrd: None,
            cmdline: crate::guest::Workload::default().cmdline(),
            mem_bytes: 256 << 20,
            vcpus: 1,
            console: Console::Sink,
            disk: None,
            vsock: None,
            memory_backing: memory::MemoryBacking::Auto,
        }
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped and can be saved or resumed.
    Paused,
    /// The guest ended.
    Exited,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Exited => "exited",
        }
    }
}

struct VcpuHandle {
    cmds: Sender<vcpu::Cmd>,
    thread: Option<JoinHandle<()>>,
    /// Still inside its run loop (not reported paused or exited).
    running: bool,
    exited: bool,
}

struct Control {
    events: Receiver<vcpu::Event>,
    vcpus: Vec<VcpuHandle>,
    state: RunState,
    exit: Option<ExitReason>,
}

/// A virtual machine.
pub struct Vm {
    // Fields drop in order: the loader and the VM fd go before the memory
    // they use.
    /// Serves guest memory after a lazy restore.
    lazy: Option<crate::snapshot::uffd::LazyLoader>,
    /// Write tracking of an eagerly restored VM (incremental pause); with
    /// synchronous write protection its thread serves writes to guest
    /// memory until it is dropped.
    tracker: Option<crate::snapshot::dirty::WriteTracker>,
    fd: VmFd,
    mem: GuestMemoryMmap,
    devices: Arc<Mutex<devices::Devices>>,
    /// virtio devices and their thread.
    virtio: virtio::Virtio,
    pause: Arc<AtomicBool>,
    ctl: Mutex<Control>,
    config: VmConfig,
    /// Working set recorded in the snapshot this VM was restored from.
    working_set: Option<crate::snapshot::PageBitmap>,
    /// The layer this VM was resumed from, if it tracks writes.
    layer_parent: Option<persist::LayerParent>,
}

/// KVM, the VM and its memory, before any vCPU exists.
struct Shell {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    caps: vcpu::Caps,
    msr_indices: Vec<u32>,
    backing: memory::MemoryBacking,
}

fn new_shell(mem_bytes: u64, vcpus: u8, backing: memory::MemoryBacking) -> Result<Shell, Error> {
    let kvm = Kvm::new().map_err(Error::NoKvm)?;
    let max = kvm.get_max_vcpus().min(MAX_VCPUS as usize) as u8;
    if vcpus == 0 || vcpus > max {
        return Err(Error::BadVcpus { asked: vcpus, max });
    }
    let (mem, backing) = memory::create_backed(mem_bytes, backing)?;
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    fd.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    memory::register(&fd, &mem)?;
    let caps = vcpu::Caps {
        xsave: kvm.check_extension(Cap::Xsave),
        xcrs: kvm.check_extension(Cap::Xcrs),
    };
    let msr_indices = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    Ok(Shell {
        kvm,
        fd,
        mem,
        caps,
        msr_indices,
        backing,
    })
}

impl Vm {
    /// Creates and boots a VM; it is running when this returns.
    pub fn boot(config: VmConfig) -> Result<Vm, Error> {
        Vm::boot_with_net(config, None)
    }

    /// [`Vm::boot`] with a virtio-net device over the tap in `net`'s
    /// namespace (after the disk and vsock devices). The caller puts the
    /// guest's `ip=` on the command line.
    pub fn boot_with_net(mut config: VmConfig, net: Option<&NetAttach>) -> Result<Vm, Error> {
        // A new VM that may go on hugetlb gets whole 2 MiB pages.
        if matches!(
            config.memory_backing,
            memory::MemoryBacking::Auto | memory::MemoryBacking::Hugetlb
        ) && config.mem_bytes.is_multiple_of(memory::PAGE_SIZE)
            && !config.mem_bytes.is_multiple_of(memory::HUGE_PAGE)
        {
            let up = backing::round_up(config.mem_bytes);
            tracing::info!(
                asked = config.mem_bytes,
                rounded = up,
                "guest memory rounded up to a multiple of 2 MiB"
            );
            config.mem_bytes = up;
        }
        let shell = new_shell(config.mem_bytes, config.vcpus, config.memory_backing)?;
        config.memory_backing = shell.backing;
        let mut virtio = virtio::Virtio::create(
            &shell.fd,
            &shell.mem,
            config.disk.as_ref(),
            config.vsock.as_deref(),
        )?;
        if let Some(n) = net {
            virtio.add_net(&shell.fd, n.open_tap()?, n.mac)?;
        }
        let cmdline = format!("{}{}", config.cmdline, virtio.cmdline());
        let loaded = boot::load(
            &shell.mem,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
        )?;
        mptable::write(&shell.mem, config.vcpus)?;
        let devices = devices::Devices::new(&config.console, None)?;
        let mut fds = Vec::new();
        for id in 0..config.vcpus {
            let v = shell
                .fd
                .create_vcpu(id as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            boot::setup_vcpu(&shell.kvm, &v, id, config.vcpus, loaded.entry)?;
            fds.push(v);
        }
        Vm::start(shell, devices, virtio, fds, config)
    }

    /// Wires devices and starts one thread per vCPU, all running.
    fn start(
        shell: Shell,
        devices: devices::Devices,
        mut virtio: virtio::Virtio,
        fds: Vec<kvm_ioctls::VcpuFd>,
        config: VmConfig,
    ) -> Result<Vm, Error> {
        shell
            .fd
            .register_irqfd(devices.serial_irq(), devices::COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        vcpu::install_kick_handler();
        let (ev_tx, ev_rx) = mpsc::channel();
        let fault_tx = ev_tx.clone();
        virtio.on_disk_fault(move || {
            let _ = fault_tx.send(vcpu::Event::DeviceFault);
        });
        virtio.start()?;
        let bus = virtio.bus();
        let devices = Arc::new(Mutex::new(devices));
        let pause = Arc::new(AtomicBool::new(false));
        let msr_indices = Arc::new(shell.msr_indices);
        let mut vcpus = Vec::new();
        for (id, v) in fds.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let t = vcpu::Thread {
                id: id as u8,
                vcpu: v,
                devices: devices.clone(),
                mmio: bus.clone(),
                pause: pause.clone(),
                cmds: rx,
                events: ev_tx.clone(),
                caps: shell.caps,
                msr_indices: msr_indices.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::jail::seccomp::install_for(crate::jail::seccomp::ThreadKind::Vcpu);
                    t.run()
                })
                .map_err(Error::Thread)?;
            vcpus.push(VcpuHandle {
                cmds: tx,
                thread: Some(thread),
                running: true,
                exited: false,
            });
        }
        Ok(Vm {
            lazy: None,
            fd: shell.fd,
            mem: shell.mem,
            devices,
            virtio,
            pause,
            ctl: Mutex::new(Control {
                events: ev_rx,
                vcpus,
                state: RunState::Running,
                exit: None,
            }),
            config,
            working_set: None,
            tracker: None,
            layer_parent: None,
        })
    }

    fn ctl(&self) -> std::sync::MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration this VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> RunState {
        let mut c = self.ctl();
        self.poll(&mut c);
        c.state
    }

    /// Handles pending vCPU events, and ends the VM if its lazy loader
    /// failed (its memory can no longer be trusted, so it must not run on)
    /// or its disk's data failed a checksum.
    fn poll(&self, c: &mut Control) {
        Self::drain(c, &self.pause, None);
        if c.exit.is_some() {
            return;
        }
        let fault = if let Some(err) = self.lazy.as_ref().and_then(|l| l.error()) {
            tracing::error!("lazy restore failed, stopping the VM: {err}");
            format!("guest memory could not be restored: {err}")
        } else if let Some(err) = self.virtio.disk_fault() {
            tracing::error!("disk data corrupted, stopping the VM: {err}");
            format!("disk data corrupted: {err}")
        } else {
            return;
        };
        if self.stop_vcpus(c).is_err() {
            tracing::error!("vCPUs did not stop after a fault");
        }
        if c.exit.is_none() {
            c.exit = Some(ExitReason::Error(fault));
        }
        c.state = RunState::Exited;
    }

    /// Handles vCPU events; waits up to `timeout` for the first one.
    /// Returns whether an event was seen.
    fn drain(c: &mut Control, pause: &AtomicBool, timeout: Option<Duration>) -> bool {
        let mut seen = false;
        let mut wait = timeout;
        loop {
            let ev = match wait.take() {
                Some(t) => match c.events.recv_timeout(t) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => return seen,
                    Err(RecvTimeoutError::Disconnected) => return seen,
                },
                None => match c.events.try_recv() {
                    Ok(e) => e,
                    Err(_) => return seen,
                },
            };
            seen = true;
            match ev {
                vcpu::Event::Paused(id) => c.vcpus[id as usize].running = false,
                // Seen by the caller's next poll.
                vcpu::Event::DeviceFault => {}
                vcpu::Event::Exited(id, reason) => {
                    let h = &mut c.vcpus[id as usize];
                    h.running = false;
                    h.exited = true;
                    if c.exit.is_none() {
                        c.exit = Some(reason);
                        c.state = RunState::Exited;
                        // The guest is over: stop its other vCPUs too.
                        pause.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
    }

    /// Kicks every still-running vCPU until all have stopped.
    fn stop_vcpus(&self, c: &mut Control) -> Result<(), Error> {
        self.pause.store(true, Ordering::SeqCst);
        let start = Instant::now();
        loop {
            Self::drain(c, &self.pause, None);
            let running: Vec<usize> = (0..c.vcpus.len()).filter(|&i| c.vcpus[i].running).collect();
            if running.is_empty() {
                return Ok(());
            }
            if start.elapsed() > STOP_DEADLINE {
                return Err(Error::StopTimeout(STOP_DEADLINE));
            }
            for i in running {
                if let Some(t) = &c.vcpus[i].thread {
                    use std::os::unix::thread::JoinHandleExt;
                    // SAFETY: the thread is alive (we hold its JoinHandle and
                    // haven't joined it); the signal's handler only stores
                    // to that thread's kvm_run.
                    unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
                }
            }
            // A kicked vCPU answers within milliseconds; re-kick if a signal
            // raced with entering KVM_RUN.
            Self::drain(c, &self.pause, Some(Duration::from_millis(2)));
        }
    }

    /// Stops every vCPU at a consistent point (outside KVM_RUN, its last
    /// I/O exit completed). No-op if already paused.
    pub fn pause(&mut self) -> Result<(), Error> {
        {
            let mut c = self.ctl();
            match c.state {
                RunState::Paused => return Ok(()),
                RunState::Exited => {
                    return Err(Error::Ended(c.exit.clone().unwrap_or(ExitReason::Killed)))
                }
                RunState::Running => {}
            }
            self.stop_vcpus(&mut c)?;
            if let Some(e) = &c.exit {
                return Err(Error::Ended(e.clone()));
            }
            c.state = RunState::Paused;
        }
        // vCPUs are stopped, so no new requests: stop the device thread
        // between requests and make the disk durable.
        self.virtio.stop();
        if let Ok(mut d) = self.devices.lock() {
            d.flush();
        }
        self.virtio.flush()?;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<(), Error> {
        {
            let c = self.ctl();
            match c.state {
                RunState::Running => return Ok(()),
                RunState::Exited => {
                    return Err(Error::Ended(c.exit.clone().unwrap_or(ExitReason::Killed)))
                }
                RunState::Paused => {}
            }
        }
        self.virtio.start()?;
        let mut c = self.ctl();
        self.pause.store(false, Ordering::SeqCst);
        for h in c.vcpus.iter_mut() {
            if !h.exited && h.cmds.send(vcpu::Cmd::Resume).is_ok() {
                h.running = true;
            }
        }
        c.state = RunState::Running;
        Ok(())
    }

    /// Why the guest ended, if it has; never blocks.
    pub fn exited(&self) -> Option<ExitReason> {
        let mut c = self.ctl();
        self.poll(&mut c);
        c.exit.clone()
    }

    /// Waits up to `timeout` (forever if `None`) for the guest to end.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut c = self.ctl();
        loop {
            self.poll(&mut c);
            if let Some(e) = &c.exit {
                return Some(e.clone());
            }
            let step = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            // While memory is still arriving, look at the loader often.
            let filling = self
                .lazy
                .as_ref()
                .is_some_and(|l| l.stats().complete_time().is_none());
            let step = if filling {
                step.min(Duration::from_millis(20))
            } else {
                step
            };
            Self::drain(&mut c, &self.pause, Some(step));
        }
    }

    /// The test guest's status page, if the guest has written one.
    pub fn guest_status(&self) -> Option<GuestStatus> {
        let mut page = [0u8; 40];
        self.mem
            .read_slice(&mut page, GuestAddress(crate::guest::STATUS_ADDR))
            .ok()?;
        GuestStatus::parse(&page)
    }

    /// Runs `f` on the VM's disk between two virtio-blk requests (`None`:
    /// no disk). For tests and tools: writes go through the same path as
    /// the guest's.
    pub fn with_disk<R>(&self, f: impl FnOnce(&mut virtio::cow::CowDisk) -> R) -> Option<R> {
        self.virtio.with_disk(f)
    }

    /// Stops the VM for good.
    pub fn kill(self) {
        drop(self)
    }

    fn shutdown(&mut self) {
        let mut c = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        if self.stop_vcpus(&mut c).is_err() {
            tracing::error!("vCPUs did not stop; detaching their threads");
        }
        if c.exit.is_none() {
            c.exit = Some(ExitReason::Killed);
        }
        c.state = RunState::Exited;
        for h in c.vcpus.iter_mut() {
            let _ = h.cmds.send(vcpu::Cmd::Stop);
        }
        for h in c.vcpus.iter_mut() {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
        drop(c);
        self.virtio.stop();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
