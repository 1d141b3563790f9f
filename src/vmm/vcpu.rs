//! vCPUs: one thread per vCPU running `KVM_RUN`, its exit handling, the
//! kick that interrupts it from another thread (a real-time signal whose
//! handler sets `immediate_exit`), and the save/restore of its state.
//!
//! A vCPU thread is a small state machine: `Running` until the VM's pause
//! flag is set (then it reports `Paused` and waits for commands) or the guest
//! ends (then it reports `Exited`). Commands carry their own reply sender.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use super::devices::{Devices, IoAction};

/// Errors of vCPU state save and restore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM refused {what} on vCPU {id}")]
    Kvm {
        /// The vCPU.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Saved state doesn't fit this host.
    #[error("saved state of vCPU {id} is invalid: {why}")]
    BadState {
        /// The vCPU.
        id: u8,
        /// What's wrong.
        why: String,
    },
    /// The vCPU thread is gone.
    #[error("vCPU {0} thread is not answering")]
    Gone(u8),
}

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest wrote its exit code to the debug-exit port.
    GuestExit(u8),
    /// The guest reset itself (i8042 or KVM system event): a clean end.
    Reset,
    /// The guest asked to power off (KVM system event).
    Shutdown,
    /// Triple fault.
    TripleFault {
        /// Where.
        rip: u64,
    },
    /// KVM couldn't emulate an instruction or hit an internal error.
    InternalError {
        /// KVM's suberror code.
        suberror: u32,
        /// Where.
        rip: u64,
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware reason.
        reason: u64,
        /// Where.
        rip: u64,
    },
    /// Something unexpected (an unhandled exit, a failing ioctl).
    Error(String),
    /// The VMM stopped it.
    Killed,
}

impl ExitReason {
    /// True for a guest that ended by its own will without error.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::GuestExit(0) | ExitReason::Reset | ExitReason::Shutdown
        )
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestExit(c) => write!(f, "guest exited with code {c}"),
            ExitReason::Reset => write!(f, "guest reset (clean exit)"),
            ExitReason::Shutdown => write!(f, "guest powered off"),
            ExitReason::TripleFault { rip } => {
                write!(f, "guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip={rip:#x}")
            }
            ExitReason::InternalError { suberror, rip } => write!(
                f,
                "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}{}) at rip={rip:#x}",
                if *suberror == 1 { ": emulation failure" } else { "" }
            ),
            ExitReason::FailEntry { reason, rip } => {
                write!(f, "VM entry failed (reason {reason:#x}) at rip={rip:#x}")
            }
            ExitReason::Error(e) => write!(f, "VMM error: {e}"),
            ExitReason::Killed => write!(f, "stopped by the VMM"),
        }
    }
}

/// Everything KVM holds for one vCPU, as saved in a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: Option<kvm_xsave>,
    /// Legacy FPU state when the host lacks XSAVE.
    pub fpu: Option<Vec<u8>>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// MSRs (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending events (exceptions, interrupts, NMI, SMI).
    pub events: kvm_vcpu_events,
}

/// Which optional state this host's KVM supports.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// KVM_CAP_XSAVE.
    pub xsave: bool,
    /// KVM_CAP_XCRS.
    pub xcrs: bool,
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { id, what, source }
}

/// Reads MSRs one batch at a time, dropping any index KVM refuses to read.
fn read_msrs(vcpu: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<(u32, u64)>, Error> {
    let mut want: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = want
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::BadState {
            id,
            why: format!("MSR list: {e:?}"),
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
        if n == want.len() {
            return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
        }
        // Entry n can't be read on this host: leave it out and retry.
        want.remove(n);
    }
}

fn fpu_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    // SAFETY: kvm_fpu is a plain-old-data C struct; viewing it as bytes for
    // its full size reads only initialised memory.
    unsafe {
        std::slice::from_raw_parts(
            (fpu as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    }
    .to_vec()
}

fn fpu_from_bytes(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != std::mem::size_of::<kvm_fpu>() {
        return None;
    }
    // SAFETY: the length matches and every bit pattern is a valid kvm_fpu
    // (integers and byte arrays only); read_unaligned copes with alignment.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<kvm_fpu>()) })
}

/// Saves a stopped vCPU's state.
pub fn save(vcpu: &VcpuFd, id: u8, caps: Caps, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(id, "KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: vcpu
            .get_mp_state()
            .map_err(kvm_err(id, "KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?,
        xsave: if caps.xsave {
            Some(vcpu.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?)
        } else {
            None
        },
        fpu: if caps.xsave {
            None
        } else {
            Some(fpu_bytes(
                &vcpu.get_fpu().map_err(kvm_err(id, "KVM_GET_FPU"))?,
            ))
        },
        xcrs: if caps.xcrs {
            Some(vcpu.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?)
        } else {
            None
        },
        debugregs: vcpu
            .get_debug_regs()
            .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, id, msr_indices)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Restores a vCPU's state into a fresh vCPU, in the order KVM needs.
///
/// MSR rule: an MSR this host's KVM refuses to set is skipped with a
/// warning (it was readable when saved, so it is one KVM emulates
/// differently here); everything else must be restored or the restore fails.
pub fn restore(vcpu: &VcpuFd, id: u8, st: &VcpuState) -> Result<(), Error> {
    let cpuid = CpuId::from_entries(&st.cpuid).map_err(|e| Error::BadState {
        id,
        why: format!("CPUID: {e:?}"),
    })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(st.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&st.regs)
        .map_err(kvm_err(id, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&st.sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    match (&st.xsave, &st.fpu) {
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy structure, which is
        // exactly what KVM_SET_XSAVE reads.
        (Some(x), _) => unsafe { vcpu.set_xsave(x) }.map_err(kvm_err(id, "KVM_SET_XSAVE"))?,
        (None, Some(f)) => {
            let fpu = fpu_from_bytes(f).ok_or_else(|| Error::BadState {
                id,
                why: format!("FPU state is {} bytes", f.len()),
            })?;
            vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?
        }
        (None, None) => {
            return Err(Error::BadState {
                id,
                why: "no FPU state".into(),
            })
        }
    }
    if let Some(x) = &st.xcrs {
        vcpu.set_xcrs(x).map_err(kvm_err(id, "KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&st.debugregs)
        .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&st.lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    let mut left: Vec<kvm_msr_entry> = st
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    while !left.is_empty() {
        let msrs = Msrs::from_entries(&left).map_err(|e| Error::BadState {
            id,
            why: format!("MSR list: {e:?}"),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if n == left.len() {
            break;
        }
        tracing::warn!(
            vcpu = id,
            msr = format!("{:#x}", left[n].index),
            "KVM refused to restore an MSR; skipped"
        );
        left.drain(..=n);
    }
    vcpu.set_vcpu_events(&st.events)
        .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// A command to a paused vCPU thread.
pub enum Cmd {
    /// Run again.
    Resume,
    /// Save state and send it back.
    Save(Sender<Result<VcpuState, Error>>),
    /// Tell the guest its clock was stopped (KVMCLOCK_CTRL), before resuming.
    ClockPaused,
    /// End the thread.
    Stop,
}

/// What a vCPU thread reports to its VM.
#[derive(Debug)]
pub enum Event {
    /// Stopped at the VM's request and waiting for commands.
    Paused(u8),
    /// The guest ended (or failed); the thread waits for `Stop`.
    Exited(u8, ExitReason),
    /// Not from a vCPU: a device recorded an integrity error (the disk's
    /// `DiskFault`); wakes the VM's waiter, which then stops the VM.
    DeviceFault,
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's own kvm_run mapping, set by the vCPU
        // loop before the first KVM_RUN and valid while the thread lives; a
        // byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Failure here means the signal number is invalid, which can't happen
        // for SIGRTMIN; a vCPU could then still be stopped between runs.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Everything a vCPU thread needs.
pub struct Thread {
    /// vCPU index.
    pub id: u8,
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// Shared port-I/O devices.
    pub devices: Arc<Mutex<Devices>>,
    /// virtio-mmio register windows.
    pub mmio: super::virtio::Bus,
    /// Set by the VM to ask every vCPU to pause.
    pub pause: Arc<AtomicBool>,
    /// Commands from the VM.
    pub cmds: Receiver<Cmd>,
    /// Reports to the VM.
    pub events: Sender<Event>,
    /// Saving: which optional state to read.
    pub caps: Caps,
    /// Saving: the MSR indices to read.
    pub msr_indices: Arc<Vec<u32>>,
}

impl Thread {
    /// The thread body.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.vcpu.get_kvm_run();
        KVM_RUN.with(|c| c.set(run_ptr));
        let mut running = true;
        loop {
            if !running || self.pause.load(Ordering::SeqCst) {
                if running {
                    running = false;
                    if self.events.send(Event::Paused(self.id)).is_err() {
                        break;
                    }
                }
                match self.cmds.recv() {
                    Ok(Cmd::Resume) => running = true,
                    Ok(Cmd::Save(reply)) => {
                        let _ = reply.send(save(&self.vcpu, self.id, self.caps, &self.msr_indices));
                    }
                    Ok(Cmd::ClockPaused) => {
                        // EINVAL when the guest doesn't use kvmclock: nothing to tell.
                        let _ = self.vcpu.kvmclock_ctrl();
                    }
                    Ok(Cmd::Stop) | Err(_) => break,
                }
                continue;
            }
            if let Some(reason) = self.run_once() {
                let _ = self.events.send(Event::Exited(self.id, reason));
                // Wait for the VM to stop us; still answer saves.
                loop {
                    match self.cmds.recv() {
                        Ok(Cmd::Save(reply)) => {
                            let _ =
                                reply.send(save(&self.vcpu, self.id, self.caps, &self.msr_indices));
                        }
                        Ok(Cmd::Stop) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                break;
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        if let Ok(mut d) = self.devices.lock() {
            d.flush();
        }
    }

    fn rip(&self) -> u64 {
        self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// One KVM_RUN; `Some` when the VM must end.
    fn run_once(&mut self) -> Option<ExitReason> {
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let action = self
                    .devices
                    .lock()
                    .map(|mut d| d.pio_out(port, data))
                    .unwrap_or(IoAction::None);
                match action {
                    IoAction::None => None,
                    IoAction::Reset => Some(ExitReason::Reset),
                    IoAction::Exit(c) => Some(ExitReason::GuestExit(c)),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if let Ok(mut d) = self.devices.lock() {
                    d.pio_in(port, data);
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault { rip: self.rip() }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Shutdown,
                k => ExitReason::Error(format!("unhandled system event {k}")),
            }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: reading the internal-error member of the kvm_run
                // union, which KVM filled for KVM_EXIT_INTERNAL_ERROR.
                let suberror =
                    unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(ExitReason::InternalError {
                    suberror,
                    rip: self.rip(),
                })
            }
            Ok(VcpuExit::FailEntry(reason, _)) => Some(ExitReason::FailEntry {
                reason,
                rip: self.rip(),
            }),
            Ok(other) => {
                let what = format!("{other:?}");
                Some(ExitReason::Error(format!(
                    "unhandled vCPU exit {what} at rip={:#x}",
                    self.rip()
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(ExitReason::Error(format!("KVM_RUN failed: {e}"))),
        }
    }
}
