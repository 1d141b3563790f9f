//! Seccomp allowlists, one per kind of worker thread, built with rust-vmm's
//! `seccompiler`.
//!
//! A jailed worker installs [`ThreadKind::Control`] on its main thread once
//! it is inside the jail, before it reads its first request (so before any
//! guest runs). Threads started later inherit that filter, and each one adds
//! its own narrower list as the first thing it does ([`install_for`], called
//! from the VMM's thread spawns). The kernel runs every filter of a thread
//! and takes the strictest answer, so a vCPU thread is limited to
//! `Control ∩ Vcpu`. Anything outside a list kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`): a guest that escaped into the VMM and tries
//! `execve`, `ptrace`, `mount` or a socket to the network dies at once.
//!
//! `ioctl` is allowed only for the request families the VMM uses: KVM
//! (type `0xAE`), userfaultfd (`0xAA`), `FIONBIO`/`FIOCLEX` and the
//! terminal queries the standard library makes. Any other ioctl (e.g.
//! `TIOCSTI`, network or disk ioctls) kills the process too.
//!
//! Filters are only installed in jailed workers ([`enable`]); the same VMM
//! code run by tests or by `stasis run` is not filtered.
//!
//! The lists were found by tracing workers (`strace -f`) through boot,
//! vsock/disk I/O, pause, eager and lazy restore with the KVM tests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the {0:?} seccomp filter: {1}")]
    Build(ThreadKind, String),
    #[error("installing the {0:?} seccomp filter: {1}")]
    Install(ThreadKind, String),
}

/// What a worker thread does, which decides the syscalls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The worker's main thread (requests, boot, pause, restore, files) and
    /// its helpers (guest monitor, disk check): the widest list.
    Control,
    /// A vCPU thread: `KVM_RUN`, port/MMIO exits, the kick signal.
    Vcpu,
    /// The virtio device thread: epoll, queues, disk file and vsock sockets.
    Device,
    /// The userfaultfd loader (fault and prefetch threads): reads the memory
    /// file and fills guest pages.
    Uffd,
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns on per-thread filters in this process (jailed workers only).
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether this process filters its threads.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Installs `kind`'s filter on the calling thread if filtering is on. A
/// failure aborts the process: a jailed thread must never run unfiltered.
pub fn install_for(kind: ThreadKind) {
    if !enabled() {
        return;
    }
    if let Err(e) = install(kind) {
        eprintln!("stasis worker: {e}; aborting");
        std::process::abort();
    }
}

/// Installs `kind`'s filter on the calling thread.
pub fn install(kind: ThreadKind) -> Result<(), Error> {
    let prog = program(kind)?;
    seccompiler::apply_filter(&prog).map_err(|e| Error::Install(kind, e.to_string()))
}

/// Syscalls every thread makes: memory, futexes, signals, time, plain I/O on
/// descriptors it already holds, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The control thread's extra syscalls: files in its jail, threads, the
/// server socket and the vsock listener, VM setup.
const CONTROL: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_prctl,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_readlinkat,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_epoll_create1,
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_socketpair,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    // Threads add their own, narrower filter when they start.
    libc::SYS_seccomp,
    libc::SYS_getppid,
    libc::SYS_sched_setaffinity,
    libc::SYS_munlock,
    libc::SYS_mlock,
    libc::SYS_fadvise64,
    libc::SYS_getcwd,
    libc::SYS_copy_file_range,
    libc::SYS_lseek,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_kill,
];

/// The device thread's extras: the vsock connections it accepts and
/// serves, the disk overlay it writes, the disk check.
const DEVICE: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_socket,
    libc::SYS_shutdown,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_timerfd_settime,
    libc::SYS_sync_file_range,
    libc::SYS_copy_file_range,
    libc::SYS_fstatfs,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// The userfaultfd loader's extras.
/// (On a pause after a lazy restore it opens the memory file again to
/// finish loading.)
const UFFD: &[i64] = &[libc::SYS_fadvise64, libc::SYS_openat, libc::SYS_fallocate];

/// ioctl request types allowed (the `_IOC_TYPE` byte).
const IOCTL_TYPES: &[u64] = &[
    0xAE, // KVM
    0xAA, // userfaultfd
];

/// Exact ioctl requests allowed besides those families.
const IOCTL_REQUESTS: &[u64] = &[
    libc::FIONBIO,
    libc::FIOCLEX,
    libc::FIONCLEX,
    libc::TCGETS,
    libc::TIOCGWINSZ,
    // FICLONE: a pause reflinks the disk overlay into the snapshot.
    0x4004_9409,
];

fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let types: &[u64] = match kind {
        ThreadKind::Vcpu => &[0xAE],
        ThreadKind::Uffd => &[0xAA],
        ThreadKind::Control | ThreadKind::Device => IOCTL_TYPES,
    };
    let mut rules = Vec::new();
    for &t in types {
        rules.push(SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            t << 8,
        )?])?);
    }
    for &r in IOCTL_REQUESTS {
        rules.push(SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            r,
        )?])?);
    }
    Ok(rules)
}

/// The syscall numbers `kind` may make (ioctl aside).
pub fn syscalls(kind: ThreadKind) -> Vec<i64> {
    let extra: &[i64] = match kind {
        ThreadKind::Control => CONTROL,
        ThreadKind::Vcpu => &[],
        ThreadKind::Device => DEVICE,
        ThreadKind::Uffd => UFFD,
    };
    let mut v: Vec<i64> = COMMON.iter().chain(extra).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Compiles `kind`'s filter.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let build = |e: &dyn std::fmt::Display| Error::Build(kind, e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls(kind).into_iter().map(|s| (s, vec![])).collect();
    rules.insert(libc::SYS_ioctl, ioctl_rules(kind).map_err(|e| build(&e))?);
    let mismatch = if std::env::var("STASIS_SECCOMP_LOG").is_ok_and(|v| v == "1") {
        // Debugging aid: log instead of kill (shows in the kernel log).
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    let arch = std::env::consts::ARCH.try_into().map_err(|e| build(&e))?;
    let filter =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(|e| build(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_excludes_exec() {
        for k in [
            ThreadKind::Control,
            ThreadKind::Vcpu,
            ThreadKind::Device,
            ThreadKind::Uffd,
        ] {
            assert!(!program(k).unwrap().is_empty());
            let s = syscalls(k);
            for banned in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_setuid,
                libc::SYS_open_by_handle_at,
            ] {
                assert!(!s.contains(&banned), "{k:?} allows syscall {banned}");
            }
            // A narrower list never allows what Control does not.
            for x in &s {
                assert!(syscalls(ThreadKind::Control).contains(x), "{k:?} {x}");
            }
        }
    }
}
