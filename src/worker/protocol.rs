//! The wire protocol between the server and a sandbox worker.
//!
//! Framing: newline-delimited JSON over a Unix stream socket, one frame per
//! line, at most [`MAX_FRAME`] bytes. The server sends [`RequestFrame`]s, each
//! with an id it chose (strictly increasing per connection); the worker
//! answers every request with exactly one [`ReplyFrame`] carrying the same id,
//! in request order (except [`Request::AwaitDurable`], answered when a
//! background write ends). A reply whose id does not match an outstanding request is
//! a protocol error, so a reply can never be taken for another request's.
//!
//! After replying [`Reply::Paused`] or [`Reply::ShuttingDown`] the worker
//! exits; the server sees EOF. EOF at any other time means the worker died.
//! After [`Reply::PausedWriting`] (asynchronous pause) the worker stays,
//! holding the paused VM, until told to shut down or to resume from memory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest frame either side accepts, newline included.
pub const MAX_FRAME: u64 = 1 << 20;

/// Which VM implementation a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A thread that counts; pause writes the counter to the snapshot dir.
    Fake,
    /// The real KVM VMM (`stasis::vmm`).
    Vm,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fake" => Ok(BackendKind::Fake),
            "vm" => Ok(BackendKind::Vm),
            other => Err(format!("unknown backend {other:?} (expected fake or vm)")),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Fake => "fake",
            BackendKind::Vm => "vm",
        })
    }
}

/// Mirrors `vmm::Kernel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSpec {
    TestGuest,
    Path(PathBuf),
}

/// Mirrors `vmm::Console`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleSpec {
    Sink,
    Stdout,
    File(PathBuf),
}

/// A copy-on-write disk: a read-only base image and the sandbox's own
/// overlay file (mirrors `vmm::DiskConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The template's root filesystem image; never written.
    pub base: PathBuf,
    /// The sandbox's overlay (created by the VMM if missing).
    pub overlay: PathBuf,
}

/// Mirrors `vmm::VmConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    pub kernel: KernelSpec,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_bytes: u64,
    pub vcpus: u8,
    pub console: ConsoleSpec,
    /// The root disk, for Linux templates.
    #[serde(default)]
    pub disk: Option<DiskSpec>,
    /// Host side of the guest's vsock device: the Unix socket through which
    /// the server reaches the agent (`CONNECT <port>` handshake). Set for
    /// agent templates; with the fake backend the worker then runs the agent
    /// on the host (`stasis-envd --uds <vsock> --root <dir of vsock>/root`).
    #[serde(default)]
    pub vsock: Option<PathBuf>,
    /// Fake backend: the host agent also runs the code-interpreter server
    /// with this Python (`stasis-envd --interpreter PYTHON`). Linux guests
    /// run it from their image's init instead.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Guest memory backing (`auto` when absent).
    #[serde(default)]
    pub memory_backing: crate::vmm::memory::MemoryBacking,
    /// A virtio-net device over the tap in this sandbox network namespace
    /// (real VMM only; the fake backend has no network device).
    #[serde(default)]
    pub net: Option<crate::vmm::NetAttach>,
}

/// Mirrors `vmm::RestoreMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreModeSpec {
    Eager,
    Lazy,
}

/// What the server asks of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Boot a fresh VM; reply [`Reply::Running`].
    Boot {
        backend: BackendKind,
        config: BootConfig,
    },
    /// Restore a VM from a snapshot directory; reply [`Reply::Running`].
    Restore {
        backend: BackendKind,
        snapshot_dir: PathBuf,
        mode: RestoreModeSpec,
        console: ConsoleSpec,
        /// Where the vsock device's Unix socket goes (agent templates).
        #[serde(default)]
        vsock: Option<PathBuf>,
        /// The disk's base image (the template's root filesystem); a path
        /// recorded in the snapshot is never used.
        #[serde(default)]
        disk_base: Option<PathBuf>,
        /// Restore from a reusable snapshot, leaving it untouched: the
        /// VM's own disk overlay (forked from the snapshot's; real VMs) or
        /// the new sandbox's directory for its host agent's files (fake).
        /// `None`: the snapshot is the sandbox's own, used in place.
        #[serde(default)]
        own_overlay: Option<PathBuf>,
        /// Guest memory backing of the restored VM (`auto` when absent).
        #[serde(default)]
        memory_backing: crate::vmm::memory::MemoryBacking,
        /// The re-created network namespace whose tap backs a saved
        /// network device.
        #[serde(default)]
        net: Option<crate::vmm::NetAttach>,
        /// Track the guest's writes from the resume on (real VMs), so that
        /// a later pause with `incremental` writes only the changed pages.
        #[serde(default)]
        track_writes: bool,
    },
    /// Pause and snapshot into `snapshot_dir` (which must not exist yet);
    /// reply [`Reply::Paused`], then exit. On failure the VM keeps running
    /// and the reply is [`Reply::Error`].
    Pause {
        snapshot_dir: PathBuf,
        /// Write a child memory layer over the snapshot the VM was resumed
        /// from (its sibling directory) when it tracks writes and the chain
        /// is within its depth limit; else (and always for a booted VM or
        /// the fake backend) a full one.
        #[serde(default)]
        incremental: bool,
    },
    /// Asynchronous pause: stop the vCPUs, capture the VM, reply
    /// [`Reply::PausedWriting`] at once and write the snapshot into
    /// `snapshot_dir` (which must not exist yet) on a background thread; the
    /// worker keeps the paused VM and its memory. A backend that cannot
    /// split the two (the fake) writes first and replies [`Reply::Paused`],
    /// then exits, exactly as for [`Request::Pause`].
    PauseBackground {
        snapshot_dir: PathBuf,
        /// As for [`Request::Pause`].
        #[serde(default)]
        incremental: bool,
    },
    /// After [`Reply::PausedWriting`]: reply [`Reply::Durable`] once the
    /// background write is durable (or [`Reply::Error`] if it failed or was
    /// abandoned). The worker stays: the server then sends
    /// [`Request::Shutdown`] or [`Request::ResumeFromMemory`]. The one
    /// reply that may come out of request order: requests sent after it are
    /// served (and answered) meanwhile.
    AwaitDurable,
    /// After [`Reply::PausedWriting`]: abandon the background write (a
    /// write already done stays), then continue the paused vCPUs from the
    /// memory the worker kept; reply [`Reply::Running`].
    ResumeFromMemory,
    /// Reply [`Reply::Status`].
    Status,
    /// Kill the VM, reply [`Reply::ShuttingDown`], exit.
    Shutdown,
    /// Tests of the jail only: try `op` from inside the worker and reply
    /// [`Reply::Probe`]. Refused unless the worker runs with
    /// `STASIS_FAULT=jail-probe` (see `worker::probe`).
    Probe { probe: String },
}

/// Progress of the built-in test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProgress {
    pub round: u64,
    pub acc: u64,
}

/// What a worker answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Running {
        guest: Option<GuestProgress>,
        /// The memory backing in use (real VMs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_backing: Option<crate::vmm::memory::MemoryBacking>,
    },
    Paused {
        snapshot_bytes: u64,
        guest: Option<GuestProgress>,
    },
    /// The vCPUs are stopped and the VM captured; its snapshot is being
    /// written in the background (see [`Request::PauseBackground`]).
    PausedWriting {
        guest: Option<GuestProgress>,
    },
    /// The background write is durable: `snapshot_bytes` on disk.
    Durable {
        snapshot_bytes: u64,
    },
    Status {
        alive: bool,
        exit_reason: Option<String>,
        guest: Option<GuestProgress>,
    },
    ShuttingDown,
    /// What a [`Request::Probe`] found.
    Probe {
        outcome: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyFrame {
    pub id: u64,
    pub reply: Reply,
}

/// Serialises a frame as one line (with the trailing newline).
pub fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(frame)?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_as_single_lines() {
        let req = RequestFrame {
            id: 7,
            request: Request::Boot {
                backend: BackendKind::Fake,
                config: BootConfig {
                    kernel: KernelSpec::TestGuest,
                    initrd: None,
                    cmdline: "stasis.work=counter\nx".into(),
                    mem_bytes: 64 << 20,
                    vcpus: 1,
                    console: ConsoleSpec::File("/tmp/c".into()),
                    disk: Some(DiskSpec {
                        base: "/b.img".into(),
                        overlay: "/o".into(),
                    }),
                    vsock: Some("/v.sock".into()),
                    interpreter: None,
                    memory_backing: Default::default(),
                    net: None,
                },
            },
        };
        let line = encode(&req).unwrap();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: RequestFrame = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, req);

        let rep = ReplyFrame {
            id: 7,
            reply: Reply::Paused {
                snapshot_bytes: 3,
                guest: Some(GuestProgress { round: 1, acc: 2 }),
            },
        };
        let back: ReplyFrame = serde_json::from_slice(&encode(&rep).unwrap()).unwrap();
        assert_eq!(back, rep);
    }

    #[test]
    fn backend_parses() {
        assert_eq!("fake".parse::<BackendKind>(), Ok(BackendKind::Fake));
        assert!("kvm".parse::<BackendKind>().is_err());
    }
}
