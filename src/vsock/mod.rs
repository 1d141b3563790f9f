//! Host side of virtio-vsock: the connection multiplexer behind the vsock
//! device ("hybrid vsock", the scheme Firecracker uses).
//!
//! This module owns the vsock packet header, the per-connection state
//! machine and credit-based flow control, and the Unix socket through which
//! host programs reach the guest. It knows nothing about virtqueues: the
//! device (`vmm::virtio`) moves packets between the guest's queues and the
//! [`Muxer`].
//!
//! Host-initiated connections: a host program connects to the Unix socket
//! at `uds_path`, writes `CONNECT <port>\n` and reads `OK <host-port>\n`
//! once the guest accepted on vsock port `<port>`; from then on the stream
//! carries the connection's bytes both ways. If the guest refuses (RST) the
//! host stream is closed without `OK`; so it is when the client sends no
//! valid line within 5 s or the guest does not answer within 5 s. Closing
//! the host stream (or `shutdown(Write)`) reaches the guest as a vsock
//! SHUTDOWN after all earlier bytes; a guest close closes the host stream.
//!
//! Port conventions between the host and the stasis agent in the guest:
//! [`ENVD_PORT`] is the agent's HTTP (envd) API; [`FORWARD_PORT`] is its TCP
//! forwarder: the host writes `<tcp-port>\n`, the agent connects to
//! `127.0.0.1:<tcp-port>` inside the guest and answers `OK\n` (or
//! `ERR <reason>\n` and closes), then splices bytes.
//!
//! Guest-initiated connections (the guest connects to the host's CID on
//! port `P`) are forwarded to the Unix socket `<uds_path>_<P>` when one is
//! listening there, and refused with RST otherwise.
//!
//! The per-connection state machine and flow control live in `muxer`;
//! this file holds the wire format and the constants shared with the
//! device and the agent.

mod muxer;

pub use muxer::Muxer;

/// The guest's vsock port of the agent's envd HTTP API.
pub const ENVD_PORT: u32 = 49983;
/// The guest's vsock port of the agent's TCP forwarder.
pub const FORWARD_PORT: u32 = 49982;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The CID stasis gives every guest.
pub const GUEST_CID: u64 = 3;
/// Size of a virtio-vsock packet header.
pub const HDR_LEN: usize = 44;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type stasis supports.
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// The sender will not receive (`SHUTDOWN_RCV`) and/or send
/// (`SHUTDOWN_SEND`) any more.
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit (buf_alloc/fwd_cnt) announcement.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for an `OP_CREDIT_UPDATE`.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// `OP_SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `OP_SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Receive buffer the host advertises per connection (`buf_alloc`): how
/// many bytes of guest data it buffers when the host program reads slowly.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Errors of the vsock backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Unix socket could not be created.
    #[error("vsock socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// epoll or another system call failed.
    #[error("vsock {what}: {source}")]
    Sys {
        /// The call.
        what: &'static str,
        /// What failed.
        source: std::io::Error,
    },
}

/// A virtio-vsock packet header (`struct virtio_vsock_hdr`, little endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// `VIRTIO_VSOCK_TYPE_STREAM` = 1.
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses the first [`HDR_LEN`] bytes; `None` if `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<Header> {
        let b = b.get(..HDR_LEN)?;
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// Writes the header into the first [`HDR_LEN`] bytes of `b`; `false`
    /// if `b` is shorter.
    pub fn write(&self, b: &mut [u8]) -> bool {
        let Some(b) = b.get_mut(..HDR_LEN) else {
            return false;
        };
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 2,
            dst_cid: 3,
            src_port: 1024,
            dst_port: ENVD_PORT,
            len: 7,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 9,
        };
        let mut b = [0u8; HDR_LEN];
        assert!(h.write(&mut b));
        assert_eq!(Header::parse(&b), Some(h));
        assert_eq!(Header::parse(&b[..HDR_LEN - 1]), None);
    }
}
