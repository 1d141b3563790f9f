//! virtio-vsock (device 19): the guest's RX, TX and event queues, moving
//! packets between them and the host-side connection multiplexer
//! ([`crate::vsock::Muxer`], behind the small [`Backend`] trait so the queue
//! handling can be tested without sockets).
//!
//! TX: each chain is a 44-byte header plus payload, gathered from its
//! device-readable descriptors and handed to the backend. RX: while the
//! backend has packets and the guest has buffers, one packet is scattered
//! into each chain's device-writable descriptors. Event: after a restore the
//! device posts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, telling the guest that
//! every connection is gone (the backend dropped its side).

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{gather_readable, read_config_bytes, VirtioDevice};
use crate::vsock::{Header, Muxer, HDR_LEN};

/// Virtio device ID of a vsock device.
pub const DEVICE_TYPE: u32 = 19;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RXQ: usize = 0;
/// TX queue.
pub const TXQ: usize = 1;
/// Event queue.
pub const EVQ: usize = 2;
/// Largest payload moved in one packet (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// What the device needs from the host side.
pub trait Backend {
    /// A packet from the guest.
    fn send_pkt(&mut self, hdr: &Header, payload: &[u8]);
    /// The next packet for the guest, its payload written into `payload`.
    fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<Header>;
    /// Whether `recv_pkt` has a packet.
    fn has_rx(&self) -> bool;
    /// Drop every connection.
    fn reset(&mut self);
}

impl Backend for Muxer {
    fn send_pkt(&mut self, hdr: &Header, payload: &[u8]) {
        Muxer::send_pkt(self, hdr, payload)
    }
    fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<Header> {
        Muxer::recv_pkt(self, payload)
    }
    fn has_rx(&self) -> bool {
        Muxer::has_rx(self)
    }
    fn reset(&mut self) {
        Muxer::reset(self)
    }
}

/// A virtio-vsock device.
pub struct Vsock<B> {
    backend: B,
    cid: u64,
    config: [u8; 8],
    /// A transport-reset event waits for an event-queue buffer.
    reset_pending: bool,
    buf: Vec<u8>,
}

impl<B: Backend> Vsock<B> {
    /// A device for a guest with CID `cid`.
    pub fn new(backend: B, cid: u64) -> Vsock<B> {
        Vsock {
            backend,
            cid,
            config: cid.to_le_bytes(),
            reset_pending: false,
            buf: vec![0u8; HDR_LEN + MAX_PAYLOAD],
        }
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// After a restore: the backend drops its connections and the guest is
    /// told so on the event queue (see [`Self::process_event`]).
    pub fn transport_reset(&mut self) {
        self.backend.reset();
        self.reset_pending = true;
    }

    /// Whether a transport-reset event is still waiting to be posted.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending
    }

    /// Hands every TX packet to the backend; returns whether the guest
    /// wants an interrupt.
    pub fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let got = gather_readable(chain, mem, &mut self.buf);
            match got.and_then(|got| Some((got, Header::parse(&self.buf[..got])?))) {
                Some((got, hdr)) if (hdr.len as usize) <= got - HDR_LEN => {
                    let payload = &self.buf[HDR_LEN..HDR_LEN + hdr.len as usize];
                    self.backend.send_pkt(&hdr, payload);
                }
                _ => tracing::debug!("virtio-vsock: malformed TX packet dropped"),
            }
            if q.add_used(mem, head, 0).is_err() {
                q.go_to_previous_position();
                break;
            }
            used = true;
        }
        used && q.needs_notification(mem).unwrap_or(true)
    }

    /// Delivers backend packets into RX buffers while both exist.
    pub fn process_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while self.backend.has_rx() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let bufs: Vec<(GuestAddress, usize)> = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            let cap: usize = bufs.iter().map(|b| b.1).sum();
            let mut len = 0u32;
            if cap >= HDR_LEN {
                let max = (cap - HDR_LEN).min(MAX_PAYLOAD);
                let (h, p) = self.buf.split_at_mut(HDR_LEN);
                match self.backend.recv_pkt(&mut p[..max]) {
                    Some(mut hdr) => {
                        hdr.len = hdr.len.min(max as u32);
                        hdr.write(h);
                        let total = HDR_LEN + hdr.len as usize;
                        if scatter(mem, &bufs, &self.buf[..total]) {
                            len = total as u32;
                        } else {
                            tracing::debug!("virtio-vsock: RX buffer outside guest memory");
                        }
                    }
                    None => {
                        q.go_to_previous_position();
                        break;
                    }
                }
            } else {
                tracing::debug!("virtio-vsock: RX buffer of {cap} bytes is too small");
            }
            if q.add_used(mem, head, len).is_err() {
                q.go_to_previous_position();
                break;
            }
            used = true;
        }
        used && q.needs_notification(mem).unwrap_or(true)
    }

    /// Posts a pending transport-reset event if the guest gave a buffer.
    pub fn process_event(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if !self.reset_pending {
            return false;
        }
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut len = 0;
        let target = chain
            .filter(|d| d.is_write_only() && d.len() >= 4)
            .map(|d| d.addr())
            .next();
        if let Some(a) = target {
            if mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), a).is_ok() {
                len = 4;
                self.reset_pending = false;
            }
        }
        if q.add_used(mem, head, len).is_err() {
            q.go_to_previous_position();
            return false;
        }
        q.needs_notification(mem).unwrap_or(true)
    }
}

/// Writes `data` across `bufs`; false if any part is outside guest memory.
fn scatter(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, usize)], data: &[u8]) -> bool {
    let mut done = 0;
    for &(addr, len) in bufs {
        if done == data.len() {
            break;
        }
        let n = len.min(data.len() - done);
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

impl<B> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{Chain, TestRing};
    use super::*;
    use std::collections::VecDeque;

    #[derive(Default)]
    struct Fake {
        sent: Vec<(Header, Vec<u8>)>,
        rx: VecDeque<(Header, Vec<u8>)>,
        resets: u32,
    }

    impl Backend for Fake {
        fn send_pkt(&mut self, hdr: &Header, payload: &[u8]) {
            self.sent.push((*hdr, payload.to_vec()));
        }
        fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<Header> {
            let (mut h, p) = self.rx.pop_front()?;
            let n = p.len().min(payload.len());
            payload[..n].copy_from_slice(&p[..n]);
            h.len = n as u32;
            Some(h)
        }
        fn has_rx(&self) -> bool {
            !self.rx.is_empty()
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.rx.clear();
        }
    }

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1025,
            dst_port: 49983,
            len,
            type_: 1,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn config_is_the_guest_cid() {
        let v = Vsock::new(Fake::default(), 3);
        let mut b = [0u8; 8];
        v.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 3);
        assert_eq!(v.queue_sizes().len(), 3);
    }

    #[test]
    fn tx_packets_reach_the_backend() {
        let mem = mem();
        let ring = TestRing::new(&mem);
        let mut q = ring.queue();
        let mut v = Vsock::new(Fake::default(), 3);
        // Header and payload in separate descriptors.
        let mut h = [0u8; HDR_LEN];
        hdr(5, 5).write(&mut h);
        mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x11_0000)).unwrap();
        ring.add(&Chain(vec![
            (0x10_0000, HDR_LEN as u32, false),
            (0x11_0000, 5, false),
        ]));
        // Header and payload in one descriptor.
        let mut one = vec![0u8; HDR_LEN + 3];
        hdr(5, 3).write(&mut one);
        one[HDR_LEN..].copy_from_slice(b"abc");
        mem.write_slice(&one, GuestAddress(0x12_0000)).unwrap();
        ring.add(&Chain(vec![(0x12_0000, one.len() as u32, false)]));
        // Malformed: shorter than a header; a len larger than the payload;
        // a descriptor outside guest memory.
        ring.add(&Chain(vec![(0x12_0000, 10, false)]));
        let mut lie = [0u8; HDR_LEN];
        hdr(5, 100).write(&mut lie);
        mem.write_slice(&lie, GuestAddress(0x13_0000)).unwrap();
        ring.add(&Chain(vec![(0x13_0000, HDR_LEN as u32, false)]));
        ring.add(&Chain(vec![(0x7000_0000, 64, false)]));
        assert!(v.process_tx(&mut q, &mem));
        let sent = &v.backend().sent;
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].1, b"hello");
        assert_eq!(sent[0].0.dst_port, 49983);
        assert_eq!(sent[1].1, b"abc");
        assert_eq!(ring.used().len(), 5);
    }

    #[test]
    fn rx_packets_fill_guest_buffers() {
        let mem = mem();
        let ring = TestRing::new(&mem);
        let mut q = ring.queue();
        let mut v = Vsock::new(Fake::default(), 3);
        v.backend_mut()
            .rx
            .push_back((hdr(5, 0), b"response".to_vec()));
        v.backend_mut().rx.push_back((hdr(5, 0), vec![7u8; 100]));
        v.backend_mut().rx.push_back((hdr(5, 0), b"later".to_vec()));
        // Nothing to fill yet.
        assert!(!v.process_rx(&mut q, &mem));
        // A buffer split across a header-sized and a payload descriptor,
        // then one that holds only 10 payload bytes.
        ring.add(&Chain(vec![
            (0x10_0000, HDR_LEN as u32, true),
            (0x11_0000, 4096, true),
        ]));
        ring.add(&Chain(vec![(0x12_0000, HDR_LEN as u32 + 10, true)]));
        assert!(v.process_rx(&mut q, &mem));
        let mut b = [0u8; HDR_LEN];
        mem.read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(Header::parse(&b).unwrap().len, 8);
        let mut p = [0u8; 8];
        mem.read_slice(&mut p, GuestAddress(0x11_0000)).unwrap();
        assert_eq!(&p, b"response");
        mem.read_slice(&mut b, GuestAddress(0x12_0000)).unwrap();
        assert_eq!(Header::parse(&b).unwrap().len, 10);
        assert_eq!(
            ring.used(),
            vec![(0, HDR_LEN as u32 + 8), (2, HDR_LEN as u32 + 10)]
        );
        // The third packet waits for a buffer; a too-small buffer is
        // returned empty without losing it.
        assert!(v.backend().has_rx());
        ring.add(&Chain(vec![(0x13_0000, 8, true)]));
        ring.add(&Chain(vec![(0x14_0000, 4096, true)]));
        assert!(v.process_rx(&mut q, &mem));
        assert_eq!(ring.used()[2], (3, 0));
        assert_eq!(ring.used()[3], (4, HDR_LEN as u32 + 5));
        assert!(!v.backend().has_rx());
    }

    #[test]
    fn transport_reset_is_posted_on_the_event_queue() {
        let mem = mem();
        let ring = TestRing::new(&mem);
        let mut q = ring.queue();
        let mut v = Vsock::new(Fake::default(), 3);
        assert!(!v.process_event(&mut q, &mem));
        v.backend_mut().rx.push_back((hdr(5, 0), b"x".to_vec()));
        v.transport_reset();
        assert_eq!(v.backend().resets, 1);
        assert!(!v.backend().has_rx());
        // No buffer yet: stays pending.
        assert!(!v.process_event(&mut q, &mem));
        assert!(v.reset_pending());
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x10_0000))
            .unwrap();
        ring.add(&Chain(vec![(0x10_0000, 4, true)]));
        assert!(v.process_event(&mut q, &mem));
        assert!(!v.reset_pending());
        let id: u32 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        assert_eq!(ring.used(), vec![(0, 4)]);
    }
}
