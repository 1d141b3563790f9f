//! Pause to disk and restore: the saved state of a whole VM (vCPUs, in-kernel
//! irqchip, PIT, kvmclock, devices, memory layout) and the two operations
//! that write it (`Vm::snapshot`) and bring it back (`Vm::restore`, eagerly
//! or lazily through userfaultfd).

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::devices::{Console, Devices, DevicesState};
use super::vcpu::{self, VcpuState};
use super::virtio::{self, DeviceKind, DiskConfig, Virtio, VirtioState};
use super::{kvm_err, memory, new_shell, Error, Kernel, RunState, Vm, VmConfig};
use crate::snapshot::layers::{self, ChainFile, ParentRef};
use crate::snapshot::memfile::{self, MemRegion, MemoryMeta, ReadOpts, WriteOpts};
use crate::snapshot::uffd::{HugeFill, LazyLoader, LazyOpts, LazyStats};
use crate::snapshot::{PageBitmap, SnapshotDir, TmpDir};

/// Errors of snapshot and restore.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The snapshot directory or its state file is bad.
    #[error(transparent)]
    Dir(#[from] crate::snapshot::Error),
    /// The memory file is bad or couldn't be written/read.
    #[error(transparent)]
    Memory(#[from] memfile::Error),
    /// Lazy restore failed.
    #[error(transparent)]
    Lazy(#[from] crate::snapshot::uffd::Error),
    /// A layer of the snapshot's chain is missing or damaged.
    #[error(transparent)]
    Layers(#[from] layers::Error),
    /// The state is valid as a file but not as a VM.
    #[error("snapshot state is inconsistent: {0}")]
    Inconsistent(String),
    /// The caller asked for something the snapshot doesn't match.
    #[error("snapshot has {found} vCPUs, but {wanted} were requested")]
    VcpuMismatch {
        /// In the snapshot.
        found: usize,
        /// Requested.
        wanted: usize,
    },
}

/// Saved state of a VM: what `state.bin` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// What was booted (for `snapshot info`).
    pub kernel: String,
    /// Kernel command line it was booted with.
    pub cmdline: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created_unix: u64,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<VcpuState>,
    /// In-kernel PIC master.
    pub pic_master: kvm_irqchip,
    /// In-kernel PIC slave.
    pub pic_slave: kvm_irqchip,
    /// In-kernel IOAPIC.
    pub ioapic: kvm_irqchip,
    /// In-kernel PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// Host wall-clock time (ns since the Unix epoch) when `clock` was read;
    /// a restore advances the guest's clock by the time since.
    pub clock_unix_ns: u64,
    /// Port-I/O devices.
    pub devices: DevicesState,
    /// virtio devices (the disk's overlay is a file in the snapshot).
    pub virtio: VirtioState,
    /// Memory file layout, present pages and working set.
    pub memory: MemoryMeta,
}

/// Host paths a restore needs, given by the caller (CLI arguments, the
/// worker's request), never taken from the snapshot's state.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestorePaths<'a> {
    /// Where the vsock device's host socket goes (a snapshot with a vsock
    /// device needs it).
    pub vsock: Option<&'a Path>,
    /// The disk's base image (a snapshot with a disk needs it).
    pub disk_base: Option<&'a Path>,
    /// A new writable disk overlay forked from the snapshot's
    /// ([`virtio::cow::CowDisk::fork`]): the snapshot is never written and
    /// any number of VMs restore it, concurrently. `None`: the snapshot's
    /// overlay is used in place (it resumes once).
    pub own_overlay: Option<&'a Path>,
    /// The sandbox's network namespace, re-created by the caller with the
    /// same addresses: the saved network device's tap is opened in it. A
    /// snapshot with a network device and no namespace is an error.
    pub netns: Option<&'a Path>,
}

// The state-file cap covers the memory metadata of the largest guest (a
// CRC32C and two bitmap bits per page) with room for the rest.
const _: () =
    assert!(crate::snapshot::format::MAX_STATE_LEN >= (32 << 20) + memory::MAX_MEM / 4096 * 5);

/// How to bring guest memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreMode {
    /// Read the whole memory file before running.
    Eager,
    /// Run at once; pages arrive by userfaultfd on demand and by prefetch.
    #[default]
    Lazy,
}

/// What a snapshot cost.
#[derive(Debug, Clone)]
pub struct SnapshotStats {
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Bytes written to the memory file.
    pub bytes_written: u64,
    /// Pages in the working set.
    pub working_set_pages: u64,
    /// The memory file was written with O_DIRECT.
    pub direct_io: bool,
    /// Computing the per-page checksums (summed over writer threads; they
    /// run interleaved with the writes, inside `memory_time`).
    pub hash_time: Duration,
    /// Waiting for a lazily restored VM's memory to be complete first.
    pub lazy_wait: Duration,
    /// Saving vCPU, VM and device state.
    pub state_time: Duration,
    /// Scanning and writing memory.
    pub memory_time: Duration,
    /// Fsyncs and the atomic rename.
    pub commit_time: Duration,
    /// All of it.
    pub total: Duration,
    /// An incremental pause: the parent layer the new snapshot's memory
    /// layer sits on (`None`: a full layer).
    pub parent: Option<std::path::PathBuf>,
    /// Parent layers of the new snapshot (0: a full layer).
    pub chain_depth: usize,
}

/// Options of [`Vm::snapshot_with`].
#[derive(Debug, Clone, Default)]
pub struct SnapshotOpts {
    /// Stop early (an error, nothing left that loads) once set.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Write a child layer holding only the pages written since the resume
    /// when the VM tracks writes ([`RestoreOpts::track_writes`]) and the
    /// chain stays within [`layers::MAX_CHAIN_DEPTH`]; else a full layer
    /// (with a log line saying why). The layer the VM was resumed from must
    /// then be kept as long as the new snapshot is (see [`layers`]).
    pub incremental: bool,
}

/// Options of [`Vm::restore_opts`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOpts {
    /// Track the guest's writes from the resume on ([`crate::snapshot::dirty`]),
    /// so that a later [`Vm::snapshot_with`] can write an incremental layer.
    pub track_writes: bool,
    /// How a lazy restore fills hugetlb memory; `None`: the
    /// [`HUGE_FILL_ENV`](crate::snapshot::uffd::HUGE_FILL_ENV) variable, else
    /// the default ([`HugeFill`]).
    pub huge_fill: Option<HugeFill>,
}

/// Where the time of a restore went, cumulative from the call (see
/// [`RestoreStats::phases`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestorePhases {
    /// `state.bin` read and checked.
    pub state: Duration,
    /// KVM VM created, guest memory mapped (hugetlb: reserved) and
    /// registered as memory slots.
    pub shell: Duration,
    /// Memory file and layer chain checked; memory read (eager) or the
    /// lazy loader registered with userfaultfd and started.
    pub memory: Duration,
    /// Clocks, interrupt controllers, vCPUs and devices restored.
    pub vcpus: Duration,
}

/// The layer a write-tracking VM was resumed from: the parent of its next
/// incremental snapshot.
#[derive(Debug)]
pub(crate) struct LayerParent {
    /// The parent and its own parents, nearest first.
    parents: Vec<ParentRef>,
    /// The parent's directory: a child names its parents as siblings, so
    /// it must be written beside it.
    dir: std::path::PathBuf,
    /// Pages the parent chain stores.
    present: Arc<PageBitmap>,
}

/// What a restore cost.
#[derive(Debug, Clone)]
pub struct RestoreStats {
    /// Eager or lazy.
    pub mode: RestoreMode,
    /// From the call to vCPUs running.
    pub to_running: Duration,
    /// Bytes the memory file stores.
    pub bytes_stored: u64,
    /// Pages in the recorded working set.
    pub working_set_pages: u64,
    /// How hugetlb memory was filled (lazy restores on hugetlb only).
    pub huge_fill: Option<HugeFill>,
    /// Where the time to running went.
    pub phases: RestorePhases,
}

/// Memory regions of `mem` as the memory file lays them out (back to back).
fn file_regions(mem: &GuestMemoryMmap) -> Vec<MemRegion> {
    let mut off = 0u64;
    memory::host_ranges(mem)
        .into_iter()
        .map(|(_, host, len)| {
            // SAFETY: `host..host+len` is a private anonymous mapping owned by
            // `mem`, which outlives every use of these regions: the Vm keeps
            // `mem` and drops its LazyLoader first.
            let r = unsafe { MemRegion::new(host, len, off) };
            off += len as u64;
            r
        })
        .collect()
}

/// Switches the memory file to O_DIRECT where the filesystem allows it:
/// guest pages go from guest memory straight to the disk, without first
/// allocating and filling page-cache pages (several times faster here, and
/// the fsync has little left to do). Filesystems without O_DIRECT (tmpfs)
/// keep buffered writes (logged at warn). All writes are page-aligned, as
/// O_DIRECT requires. Returns whether O_DIRECT is on.
fn direct_io(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let ok = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_DIRECT) == 0
    };
    if !ok {
        tracing::warn!(
            file = %memfile::file_name(file),
            error = %std::io::Error::last_os_error(),
            "memory file: O_DIRECT not available on this filesystem, writing through the page cache"
        );
    }
    ok
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Vm {
    /// The working set to record: pages the guest faulted on first after
    /// its last lazy restore, added to the set recorded before (REAP-style:
    /// what a resumed guest needs first is what it needed first last time).
    /// A VM that was booted, not restored, has none yet: its memory is then
    /// prefetched in file order.
    fn working_set(&self) -> PageBitmap {
        let prev = self.working_set.clone();
        match (&self.lazy, prev) {
            (Some(l), Some(prev)) => {
                let d = l.demanded();
                d.or(&prev).unwrap_or(d)
            }
            (Some(l), None) => l.demanded(),
            (None, Some(prev)) => prev,
            (None, None) => PageBitmap::new(0),
        }
    }

    /// Writes the paused VM to `dir` (which must not exist) atomically: a
    /// crash or error midway leaves nothing that loads as a snapshot. The VM
    /// stays paused and can be resumed or snapshotted again.
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotStats, Error> {
        self.snapshot_cancellable(dir, None)
    }

    /// [`Vm::snapshot`] that stops early (an error, nothing left that loads
    /// as a snapshot) once `cancel` is set.
    pub fn snapshot_cancellable(
        &mut self,
        dir: &Path,
        cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<SnapshotStats, Error> {
        self.snapshot_with(
            dir,
            SnapshotOpts {
                cancel,
                incremental: false,
            },
        )
    }

    /// The parent chain of an incremental snapshot taken now into `to`, or
    /// why a full layer is written instead.
    fn incremental_base(&self, to: &Path) -> Result<&LayerParent, &'static str> {
        let parent = self
            .layer_parent
            .as_ref()
            .ok_or("the VM was not resumed from a snapshot with write tracking")?;
        if self.tracker.as_ref().is_some_and(|t| !t.intact()) {
            return Err("write tracking failed while the VM ran (see the log)");
        }
        if to.parent() != parent.dir.parent() || to.file_name().is_none() {
            return Err("the new snapshot is not written beside the one the VM was resumed from");
        }
        // `parents` (the resumed layer and its own parents) become the
        // child's parents.
        if parent.parents.len() > layers::MAX_CHAIN_DEPTH {
            return Err("the layer chain is at its depth limit");
        }
        Ok(parent)
    }

    /// [`Vm::snapshot`] with options: cancellable, incremental.
    pub fn snapshot_with(
        &mut self,
        dir: &Path,
        opts: SnapshotOpts,
    ) -> Result<SnapshotStats, Error> {
        let SnapshotOpts {
            cancel,
            incremental,
        } = opts;
        let base = if incremental {
            match self.incremental_base(dir) {
                Ok(b) => Some((b.parents.clone(), b.present.clone())),
                Err(why) => {
                    tracing::info!(dir = %dir.display(), "incremental pause: writing a full memory layer: {why}");
                    None
                }
            }
        } else {
            None
        };
        let t0 = Instant::now();
        {
            let c = self.ctl();
            if c.state != RunState::Paused {
                return Err(Error::WrongState {
                    actual: c.state.name(),
                    needed: "paused",
                });
            }
        }
        // Memory not yet fetched from the previous snapshot isn't resident;
        // it must be before we can write a complete image.
        // An incremental layer needs no wait: a page not yet fetched was not
        // written, the parent has it.
        let lazy_wait = match &self.lazy {
            Some(_) if base.is_some() => Duration::ZERO,
            Some(l) => {
                let w = Instant::now();
                l.wait_complete().map_err(PersistError::from)?;
                w.elapsed()
            }
            None => Duration::ZERO,
        };
        let ts = Instant::now();
        let mut vcpus = Vec::new();
        {
            let c = self.ctl();
            for (id, h) in c.vcpus.iter().enumerate() {
                let (tx, rx) = mpsc::channel();
                h.cmds
                    .send(vcpu::Cmd::Save(tx))
                    .map_err(|_| vcpu::Error::Gone(id as u8))?;
                vcpus.push(rx.recv().map_err(|_| vcpu::Error::Gone(id as u8))??);
            }
        }
        let chip = |id| -> Result<kvm_irqchip, Error> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        let pic_master = chip(KVM_IRQCHIP_PIC_MASTER)?;
        let pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = chip(KVM_IRQCHIP_IOAPIC)?;
        let pit = self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        let clock_unix_ns = unix_now_ns();
        let devices = self
            .devices
            .lock()
            .map_err(|_| PersistError::Inconsistent("device lock poisoned".into()))?
            .save();
        let virtio = self.virtio.save();
        let working_set = self.working_set();
        let state_time = ts.elapsed();

        let tm = Instant::now();
        let tmp = TmpDir::create(dir).map_err(PersistError::from)?;
        // The device thread is stopped (the VM is paused): the disk is quiet.
        self.virtio.save_disk(tmp.path())?;
        let file = tmp.create_memory_file().map_err(PersistError::from)?;
        let direct = direct_io(&file);
        let regions = file_regions(&self.mem);
        let report = memfile::write_memory(
            &file,
            &regions,
            &WriteOpts {
                fsync: true,
                cancel,
                incremental: base.as_ref().map(|b| b.1.clone()),
                ..WriteOpts::default()
            },
        )
        .map_err(PersistError::from)?;
        if let Some((parents, _)) = &base {
            ChainFile {
                parents: parents.clone(),
                ..ChainFile::default()
            }
            .write(tmp.path())
            .map_err(PersistError::from)?;
        }
        tracing::debug!(
            scan = ?report.scan_time,
            hash = ?report.hash_time,
            direct_io = direct,
            write = ?report.write_time,
            fsync = ?report.fsync_time,
            elapsed = ?report.elapsed,
            bytes = report.bytes_written,
            threads = report.threads,
            "memory file written"
        );
        let meta = MemoryMeta::new(&regions, report.present, report.sums, working_set)
            .map_err(PersistError::from)?;
        let memory_time = tm.elapsed();
        let working_set_pages = meta.working_set.count_ones() as u64;
        let state = VmState {
            kernel: match &self.config.kernel {
                Kernel::TestGuest => "built-in test guest".into(),
                Kernel::Path(p) => p.display().to_string(),
            },
            cmdline: self.config.cmdline.clone(),
            mem_bytes: self.config.mem_bytes,
            created_unix: unix_now(),
            vcpus,
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
            clock_unix_ns,
            devices,
            virtio,
            memory: meta,
        };
        let tc = Instant::now();
        tmp.write_state(&state).map_err(PersistError::from)?;
        tmp.commit().map_err(PersistError::from)?;
        Ok(SnapshotStats {
            mem_bytes: self.config.mem_bytes,
            bytes_written: report.bytes_written,
            working_set_pages,
            direct_io: direct,
            hash_time: report.hash_time,
            lazy_wait,
            state_time,
            memory_time,
            commit_time: tc.elapsed(),
            total: t0.elapsed(),
            parent: base
                .as_ref()
                .and_then(|b| b.0.first().and_then(|p| p.resolve(dir).ok())),
            chain_depth: base.as_ref().map_or(0, |b| b.0.len()),
        })
    }

    /// Brings a snapshot without a disk or vsock device back as a running
    /// VM, in this process (see [`Vm::restore_with`]).
    pub fn restore(
        dir: &Path,
        mode: RestoreMode,
        console: Console,
        vcpus: Option<u8>,
    ) -> Result<(Vm, RestoreStats), Error> {
        Vm::restore_with(dir, mode, console, vcpus, RestorePaths::default())
    }

    /// Brings a snapshot back as a running VM, in this process. `vcpus`,
    /// if given, must match the snapshot. `state.bin` is untrusted input:
    /// no host path it records is used. The disk is the snapshot's overlay
    /// (used in place, see [`virtio`]) over `paths.disk_base`; the vsock
    /// device listens on `paths.vsock`; a snapshot with such a device and
    /// no path for it is an error.
    pub fn restore_with(
        dir: &Path,
        mode: RestoreMode,
        console: Console,
        vcpus: Option<u8>,
        paths: RestorePaths<'_>,
    ) -> Result<(Vm, RestoreStats), Error> {
        Vm::restore_backed(
            dir,
            mode,
            console,
            vcpus,
            paths,
            memory::MemoryBacking::Auto,
        )
    }

    /// [`Vm::restore_with`] onto guest memory of the given backing (any
    /// backing restores any snapshot; `Auto` picks by the host's pool).
    /// The backing in use is in the restored VM's [`Vm::config`]. Memory is
    /// read from `memory.bin` read-only (concurrent resumes share its page
    /// cache); see [`RestorePaths`] for the disk and network.
    pub fn restore_backed(
        dir: &Path,
        mode: RestoreMode,
        console: Console,
        vcpus: Option<u8>,
        paths: RestorePaths<'_>,
        backing: memory::MemoryBacking,
    ) -> Result<(Vm, RestoreStats), Error> {
        Vm::restore_opts(
            dir,
            mode,
            console,
            vcpus,
            paths,
            backing,
            RestoreOpts::default(),
        )
    }

    /// [`Vm::restore_backed`] with options (write tracking for incremental
    /// pauses). A snapshot with parent layers (`layers.bin`) is restored
    /// from its whole chain, each page from the nearest layer holding it.
    pub fn restore_opts(
        dir: &Path,
        mode: RestoreMode,
        console: Console,
        vcpus: Option<u8>,
        paths: RestorePaths<'_>,
        backing: memory::MemoryBacking,
        ropts: RestoreOpts,
    ) -> Result<(Vm, RestoreStats), Error> {
        let t0 = Instant::now();
        let (snap, st): (_, VmState) =
            SnapshotDir::open_and_load(dir).map_err(PersistError::from)?;
        if let Some(w) = vcpus {
            if w as usize != st.vcpus.len() {
                return Err(PersistError::VcpuMismatch {
                    found: st.vcpus.len(),
                    wanted: w as usize,
                }
                .into());
            }
        }
        let n = u8::try_from(st.vcpus.len())
            .ok()
            .filter(|n| (1..=super::MAX_VCPUS).contains(n))
            .ok_or_else(|| PersistError::Inconsistent(format!("{} vCPUs", st.vcpus.len())))?;
        let layout: Vec<u64> = memory::ram_ranges(st.mem_bytes)?
            .iter()
            .map(|r| r.1)
            .collect();
        let meta_layout: Vec<u64> = st.memory.regions.iter().map(|r| r.1).collect();
        if layout != meta_layout {
            return Err(PersistError::Inconsistent(format!(
                "memory regions {meta_layout:?} do not fit a {}-byte guest",
                st.mem_bytes
            ))
            .into());
        }
        let t_state = t0.elapsed();
        let shell = new_shell(st.mem_bytes, n, backing)?;
        let backing = shell.backing;
        let t_shell = t0.elapsed();
        let regions = file_regions(&shell.mem);
        let file = snap.open_memory().map_err(PersistError::from)?;
        // Validate the memory file before creating anything that runs.
        st.memory.check_file(&file).map_err(PersistError::from)?;
        // The chain: this layer and its parents, checked before anything runs.
        let (chain, chain_file) = layers::open_chain(dir, file, st.memory.clone(), |d| {
            d.load_state::<VmState>()
                .map(|s| s.memory)
                .map_err(|e| crate::error_chain(&e))
        })
        .map_err(PersistError::from)?;
        let mut tracking = false;
        let mut tracker = None;
        let lazy = match mode {
            RestoreMode::Eager => {
                layers::read_eager(&chain, &regions, &ReadOpts::default())
                    .map_err(PersistError::from)?;
                if ropts.track_writes {
                    match crate::snapshot::dirty::WriteTracker::start(&regions) {
                        Ok(t) => {
                            tracker = Some(t);
                            tracking = true;
                        }
                        // Logged (once per process) by `start`.
                        Err(e) => tracing::debug!(
                            "no write tracking, the next pause writes a full layer: {}",
                            crate::error_chain(&e)
                        ),
                    }
                }
                None
            }
            RestoreMode::Lazy => {
                let opts = LazyOpts {
                    track_writes: ropts.track_writes,
                    huge_fill: ropts.huge_fill.unwrap_or_else(HugeFill::from_env),
                    ..LazyOpts::default()
                };
                let memfds = if backing == memory::MemoryBacking::Hugetlb {
                    memory::memfds(&shell.mem)
                } else {
                    Vec::new()
                };
                let l = LazyLoader::start_chain_on(chain, regions.clone(), opts, memfds)
                    .map_err(PersistError::from)?;
                tracking = l.tracks_writes();
                Some(l)
            }
        };
        let layer_parent = if tracking {
            let me = ParentRef::of(dir, st.memory.bytes_stored).map_err(|e| {
                PersistError::Inconsistent(format!("reading {}: {e}", snap.state_path().display()))
            })?;
            let (older, older_dirs) = match chain_file {
                Some(c) => {
                    let dirs = c.parent_dirs(dir).map_err(PersistError::from)?;
                    (c.parents, dirs)
                }
                None => (Vec::new(), Vec::new()),
            };
            let mut parents = vec![me];
            parents.extend(older);
            // Pages the chain stores: the union over every layer, rebuilt
            // from the metadata (the chain itself went to the loader).
            let mut present = st.memory.present.clone();
            for d in &older_dirs {
                let m: VmState = SnapshotDir::open(d)
                    .and_then(|d| d.load_state())
                    .map_err(PersistError::from)?;
                present = present.or(&m.memory.present).unwrap_or(present);
            }
            Some(LayerParent {
                parents,
                dir: dir.to_owned(),
                present: Arc::new(present),
            })
        } else {
            None
        };
        let t_mem = t0.elapsed();
        shell
            .fd
            .set_pit2(&st.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        // The guest's clock moves on by the time it spent on disk: its wall
        // clock stays right, its monotonic clock jumps by the paused time.
        let away = unix_now_ns().saturating_sub(st.clock_unix_ns);
        let clock = kvm_clock_data {
            clock: st.clock.clock.saturating_add(away),
            flags: 0,
            ..Default::default()
        };
        shell
            .fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in [&st.pic_master, &st.pic_slave, &st.ioapic] {
            shell
                .fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        let mut fds = Vec::new();
        for (id, vs) in st.vcpus.iter().enumerate() {
            let v = shell
                .fd
                .create_vcpu(id as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu::restore(&v, id as u8, vs)?;
            // Tell a kvmclock guest that it was stopped (no soft lockups).
            let _ = v.kvmclock_ctrl();
            fds.push(v);
        }
        let devices = Devices::new(&console, Some(&st.devices))?;
        let mut net_tap = None;
        if let Some(ns) = paths.netns {
            if st
                .virtio
                .devices
                .iter()
                .any(|d| matches!(d.kind, DeviceKind::Net { .. }))
            {
                net_tap = Some(crate::net::tap::open_in(ns, crate::net::TAP_NAME)?);
            }
        }
        let virtio = Virtio::restore(
            &shell.fd,
            &shell.mem,
            &st.virtio,
            dir,
            paths.vsock,
            paths.disk_base,
            paths.own_overlay,
            net_tap,
        )?;
        // Virtio::restore refused a device without its caller-given path.
        let mut disk = None;
        let mut vsock_path = None;
        for d in &st.virtio.devices {
            match &d.kind {
                DeviceKind::Block { .. } => {
                    disk = paths.disk_base.map(|b| DiskConfig {
                        base: b.to_owned(),
                        overlay: Some(
                            paths
                                .own_overlay
                                .map(Path::to_owned)
                                .unwrap_or_else(|| dir.join(virtio::SNAPSHOT_OVERLAY)),
                        ),
                    })
                }
                DeviceKind::Vsock { .. } => vsock_path = paths.vsock.map(Path::to_owned),
                DeviceKind::Net { .. } => {}
            }
        }
        let config = VmConfig {
            kernel: if st.kernel == "built-in test guest" {
                Kernel::TestGuest
            } else {
                Kernel::Path(st.kernel.clone().into())
            },
            initrd: None,
            cmdline: st.cmdline.clone(),
            mem_bytes: st.mem_bytes,
            vcpus: n,
            console,
            disk,
            vsock: vsock_path,
            memory_backing: backing,
        };
        let stats = RestoreStats {
            mode,
            to_running: Duration::ZERO,
            bytes_stored: st.memory.bytes_stored,
            working_set_pages: st.memory.working_set.count_ones() as u64,
            huge_fill: lazy.as_ref().and_then(|l| l.huge_fill()),
            phases: RestorePhases::default(),
        };
        let t_vcpus = t0.elapsed();
        let mut vm = Vm::start(shell, devices, virtio, fds, config)?;
        if !st.memory.working_set.is_empty() {
            vm.working_set = Some(st.memory.working_set.clone());
        }
        vm.tracker = tracker;
        vm.layer_parent = layer_parent;
        tracing::debug!(
            ?t_state,
            ?t_shell,
            ?t_mem,
            ?t_vcpus,
            running = ?t0.elapsed(),
            "restore phases (cumulative)"
        );
        vm.lazy = lazy;
        Ok((
            vm,
            RestoreStats {
                to_running: t0.elapsed(),
                phases: RestorePhases {
                    state: t_state,
                    shell: t_shell,
                    memory: t_mem,
                    vcpus: t_vcpus,
                },
                ..stats
            },
        ))
    }

    /// Pages the guest demanded (faulted on before they were brought in)
    /// since its lazy restore; `None` if it was not restored lazily. The
    /// next snapshot's working set is these plus the one restored from.
    pub fn lazy_demanded(&self) -> Option<PageBitmap> {
        self.lazy.as_ref().map(|l| l.demanded())
    }

    /// How the guest's writes are tracked for an incremental pause
    /// (`None`: they are not, the next pause writes a full layer).
    pub fn write_tracking(&self) -> Option<crate::snapshot::dirty::Mode> {
        match (&self.tracker, &self.lazy) {
            (Some(t), _) => Some(t.mode()),
            (None, Some(l)) => l.write_tracking(),
            (None, None) => None,
        }
    }

    /// Write-protect faults resolved so far by synchronous write tracking
    /// (0 with asynchronous tracking or none).
    pub fn write_tracking_faults(&self) -> u64 {
        match (&self.tracker, &self.lazy) {
            (Some(t), _) => t.wp_faults(),
            (None, Some(l)) => l
                .stats()
                .wp_faults
                .load(std::sync::atomic::Ordering::Relaxed),
            (None, None) => 0,
        }
    }

    /// Counters of the lazy loader, for a VM restored lazily.
    pub fn lazy_stats(&self) -> Option<Arc<LazyStats>> {
        self.lazy.as_ref().map(|l| l.stats().clone())
    }

    /// Blocks until the recorded working set is resident (lazy restore);
    /// returns the time from restore to that point.
    pub fn wait_working_set(&self) -> Result<Option<Duration>, Error> {
        match &self.lazy {
            Some(l) => Ok(Some(l.wait_working_set().map_err(PersistError::from)?)),
            None => Ok(None),
        }
    }

    /// Blocks until all of guest memory is resident (lazy restore).
    pub fn wait_memory_complete(&self) -> Result<Option<Duration>, Error> {
        match &self.lazy {
            Some(l) => Ok(Some(l.wait_complete().map_err(PersistError::from)?)),
            None => Ok(None),
        }
    }
}

/// What [`inspect`] found besides the state.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Bytes the memory file has allocated on disk (`st_blocks * 512`).
    pub allocated: u64,
    /// Present pages whose checksum was verified (all of them).
    pub pages_verified: u64,
}

/// Reads a snapshot's state without restoring it and verifies its memory
/// file completely: length, every present page's checksum, holes zero (for
/// `snapshot info`).
pub fn inspect(dir: &Path) -> Result<(VmState, Inspection), Error> {
    let snap = SnapshotDir::open(dir).map_err(PersistError::from)?;
    let st: VmState = snap.load_state().map_err(PersistError::from)?;
    let file = snap.open_memory().map_err(PersistError::from)?;
    let pages_verified = memfile::verify_file(&file, &st.memory).map_err(PersistError::from)?;
    let len = file
        .metadata()
        .map_err(|e| PersistError::Inconsistent(format!("memory file: {e}")))?;
    use std::os::unix::fs::MetadataExt;
    Ok((
        st,
        Inspection {
            allocated: len.blocks() * 512,
            pages_verified,
        },
    ))
}
