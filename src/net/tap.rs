//! Opening a sandbox's tap device from inside its network namespace.
//!
//! The tap (`tap0`, made persistent with a virtio-net header by
//! [`super::Network::setup`]) lives in the sandbox namespace. A helper thread
//! enters that namespace (`setns(CLONE_NEWNET)` changes only the calling
//! thread), opens `/dev/net/tun` with `TUNSETIFF`, and hands the descriptor
//! back: the descriptor keeps working for the whole process whatever
//! namespace its threads are in. A worker already started inside the
//! namespace can call [`open_here`] instead.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Errors of opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A step failed.
    #[error("tap {name}: {what}")]
    Io {
        /// The tap's name.
        name: String,
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The name does not fit an interface name.
    #[error("tap name {0:?} is not a valid interface name")]
    BadName(String),
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens the tap `name` in this thread's namespace, with a 12-byte virtio
/// net header (`virtio_net_hdr_v1`) on every frame, non-blocking.
pub fn open_here(name: &str) -> Result<File, Error> {
    if name.is_empty() || name.len() > 15 || name.contains('\0') {
        return Err(Error::BadName(name.to_string()));
    }
    let io = |what, source| Error::Io {
        name: name.to_string(),
        what,
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io("open /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes); `req`
    // is one, alive for the call, and the fd is an open tun device.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io("TUNSETIFF", std::io::Error::last_os_error()));
    }
    let sz: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, valid here.
    let rc = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            TUNSETVNETHDRSZ as _,
            &sz as *const libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Opens the tap `name` inside the namespace at `netns` (a file such as
/// `/run/netns/stasis-0a0b0008`), from a short-lived helper thread.
pub fn open_in(netns: &Path, name: &str) -> Result<File, Error> {
    if let Some(f) = take_preopened(name) {
        return Ok(f);
    }
    let ns = File::open(netns).map_err(|source| Error::Io {
        name: name.to_string(),
        what: "open the network namespace",
        source,
    })?;
    let name2 = name.to_string();
    let h = std::thread::Builder::new()
        .name("stasis-tap".into())
        .spawn(move || {
            // SAFETY: setns on a valid namespace fd; it changes only this
            // helper thread's network namespace, and the thread ends after.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc < 0 {
                return Err(Error::Io {
                    name: name2,
                    what: "setns into the network namespace",
                    source: std::io::Error::last_os_error(),
                });
            }
            open_here(&name2)
        })
        .map_err(|source| Error::Io {
            name: name.to_string(),
            what: "spawn a thread",
            source,
        })?;
    h.join().unwrap_or_else(|_| {
        Err(Error::Io {
            name: name.to_string(),
            what: "helper thread",
            source: std::io::Error::other("panicked"),
        })
    })
}

use std::os::unix::fs::OpenOptionsExt;

/// A tap opened by a jailed worker in its (joined) namespace while it was
/// still privileged: after `pivot_root` and with every capability dropped
/// neither the namespace path nor `/dev/net/tun` is reachable, so
/// [`open_in`] hands this one out instead.
static PREOPENED: std::sync::Mutex<Option<(String, File)>> = std::sync::Mutex::new(None);

/// Opens tap `name` in this process's network namespace and keeps it for
/// the next [`open_in`] of that name. A namespace without the tap is not
/// an error here (the sandbox may have no network device); the later
/// [`open_in`] then fails as usual.
pub fn preopen_here(name: &str) {
    if let Ok(f) = open_here(name) {
        *PREOPENED.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.to_string(), f));
    }
}

fn take_preopened(name: &str) -> Option<File> {
    let mut g = PREOPENED.lock().unwrap_or_else(|e| e.into_inner());
    match g.take() {
        Some((n, f)) if n == name => Some(f),
        other => {
            *g = other;
            None
        }
    }
}
