//! A fake guest drives the muxer through `send_pkt`/`recv_pkt` while real
//! host clients talk to it over its Unix socket.

use super::*;
use crate::vsock::{GUEST_CID, HDR_LEN};
use std::thread;

/// Generous bound for anything these tests wait for.
const LIMIT: Duration = Duration::from_secs(20);
const GUEST_PORT: u32 = 49983;
/// The fake guest's receive buffer, smaller than the data sent so that
/// credit updates are exercised.
const GUEST_BUF: u32 = 64 * 1024;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    mux: Muxer,
    /// Waits on the muxer's fd the way the device thread does.
    outer: Epoll,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vsock.sock");
        let mux = Muxer::new(&path, GUEST_CID).expect("muxer");
        let outer = Epoll::new().expect("epoll");
        outer
            .ctl(
                ControlOperation::Add,
                mux.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .expect("epoll add");
        Fixture {
            _dir: dir,
            path,
            mux,
            outer,
        }
    }

    /// Waits (bounded) until the muxer's fd is readable, then processes.
    fn pump(&mut self, wait_ms: i32) {
        let mut ev = [EpollEvent::default(); 1];
        let _ = self.outer.wait(wait_ms, &mut ev);
        self.mux.process();
    }

    /// The next packet for the guest, waiting for one up to `limit`.
    fn try_pkt(&mut self, limit: Duration) -> Option<(Header, Vec<u8>)> {
        let end = Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        loop {
            self.mux.process();
            if let Some(h) = self.mux.recv_pkt(&mut buf) {
                assert!(
                    h.len as usize <= buf.len(),
                    "payload larger than the buffer"
                );
                return Some((h, buf[..h.len as usize].to_vec()));
            }
            if Instant::now() >= end {
                return None;
            }
            self.pump(20);
        }
    }

    fn pkt(&mut self) -> (Header, Vec<u8>) {
        self.try_pkt(LIMIT)
            .expect("timed out waiting for a packet for the guest")
    }

    /// Asserts the guest gets nothing for a short while (no packet is
    /// expected; this bounds how long we look, it times nothing).
    fn assert_quiet(&mut self) {
        if let Some((h, _)) = self.try_pkt(Duration::from_millis(200)) {
            panic!("unexpected packet for the guest: {h:?}");
        }
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        self.mux.send_pkt(&h, payload);
    }

    /// A host client connected to guest port `port` and accepted by the
    /// guest; returns it and its host port.
    fn connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = self.client(port);
        let (req, _) = self.pkt();
        assert_eq!(req.op, OP_REQUEST, "{req:?}");
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(req.dst_port, port);
        assert_eq!(req.type_, TYPE_STREAM);
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        assert!(req.src_port >= 1024, "{req:?}");
        self.send(ghdr(OP_RESPONSE, port, req.src_port, 0, 0), &[]);
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (c, req.src_port)
    }

    /// A host client that has sent `CONNECT <port>`.
    fn client(&self, port: u32) -> UnixStream {
        let mut c = UnixStream::connect(&self.path).expect("connect to the muxer");
        c.set_read_timeout(Some(LIMIT)).expect("timeout");
        c.write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("write CONNECT");
        c
    }
}

/// A packet from the guest (guest port `gport`) to host port `hport`.
fn ghdr(op: u16, gport: u32, hport: u32, len: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: gport,
        dst_port: hport,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt,
    }
}

/// Reads one line byte by byte (so nothing after it is consumed).
fn read_line(c: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = c.read(&mut b).expect("read line");
        assert_eq!(
            n,
            1,
            "stream closed after {:?}",
            String::from_utf8_lossy(&line)
        );
        line.push(b[0]);
        if b[0] == b'\n' {
            return String::from_utf8(line).expect("utf-8 line");
        }
    }
}

/// Whether the host stream was closed by the muxer: EOF (or a reset)
/// before any data.
fn assert_closed(c: &mut UnixStream) {
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("expected a closed stream, got {:?}", &b[..n]),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected a closed stream, got {e}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

#[test]
fn connect_handshake_answers_ok() {
    let mut f = Fixture::new();
    let (_c, port) = f.connect(GUEST_PORT);
    let (_c2, port2) = f.connect(GUEST_PORT);
    assert_ne!(port, port2, "each connection gets a fresh host port");
    f.assert_quiet();
}

#[test]
fn data_before_ok_waits_for_the_connection() {
    let mut f = Fixture::new();
    let mut c = UnixStream::connect(&f.path).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    // The line and the first data in one write.
    c.write_all(b"CONNECT 7\nhello").unwrap();
    let (req, _) = f.pkt();
    assert_eq!(req.op, OP_REQUEST);
    f.send(ghdr(OP_RESPONSE, 7, req.src_port, 0, 0), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
    let (h, data) = f.pkt();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, req.src_port, 7));
    assert_eq!(data, b"hello");
}

#[test]
fn bytes_both_ways_beyond_buf_alloc() {
    const N: usize = 1024 * 1024 + 12_345;
    let mut f = Fixture::new();
    let (c, hport) = f.connect(GUEST_PORT);
    let to_guest = pattern(N, 0x5a);
    let to_host = pattern(N + 777, 0xa5);

    let mut writer = c.try_clone().unwrap();
    let data = to_guest.clone();
    let w = thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = c;
    let r = thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        got
    });

    // The fake guest: consumes host data at once (so its fwd_cnt follows
    // what it received), sends its own data within the muxer's credit.
    let mut received = Vec::new();
    let mut sent = 0usize;
    let mut host_fwd_cnt = 0u32; // the muxer's fwd_cnt as last heard
    let mut host_shutdown = 0u32;
    let mut sent_shutdown = false;
    let mut saw_rst = false;
    let mut advertised = 0usize; // the fwd_cnt the muxer last heard from us
    let end = Instant::now() + LIMIT * 3;
    while !saw_rst {
        assert!(
            Instant::now() < end,
            "transfer stalled: received {} sent {sent}",
            received.len()
        );
        // Send what the muxer's credit allows.
        let credit = BUF_ALLOC as usize - (sent - host_fwd_cnt as usize);
        if sent < to_host.len() && credit > 0 {
            let n = credit.min(4096).min(to_host.len() - sent);
            let chunk = to_host[sent..sent + n].to_vec();
            f.send(
                ghdr(OP_RW, GUEST_PORT, hport, n as u32, received.len() as u32),
                &chunk,
            );
            advertised = received.len();
            sent += n;
            continue;
        }
        if sent == to_host.len() && !sent_shutdown {
            let mut h = ghdr(OP_SHUTDOWN, GUEST_PORT, hport, 0, received.len() as u32);
            h.flags = SHUTDOWN_SEND;
            f.send(h, &[]);
            sent_shutdown = true;
        }
        let Some((h, data)) = f.try_pkt(Duration::from_millis(100)) else {
            continue;
        };
        assert_eq!((h.src_port, h.dst_port), (hport, GUEST_PORT), "{h:?}");
        assert_eq!(h.buf_alloc, BUF_ALLOC);
        host_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RW => {
                assert_eq!(
                    host_shutdown & SHUTDOWN_SEND,
                    0,
                    "data after SHUTDOWN(SEND)"
                );
                received.extend_from_slice(&data);
                // Never more in flight than we advertised.
                assert!(
                    received.len() - advertised <= GUEST_BUF as usize,
                    "credit exceeded"
                );
                // Consume and tell the muxer every 16 KiB.
                if received.len() % (16 * 1024) < data.len() {
                    f.send(
                        ghdr(
                            OP_CREDIT_UPDATE,
                            GUEST_PORT,
                            hport,
                            0,
                            received.len() as u32,
                        ),
                        &[],
                    );
                    advertised = received.len();
                }
            }
            OP_CREDIT_REQUEST => {
                f.send(
                    ghdr(
                        OP_CREDIT_UPDATE,
                        GUEST_PORT,
                        hport,
                        0,
                        received.len() as u32,
                    ),
                    &[],
                );
                advertised = received.len();
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => host_shutdown |= h.flags,
            OP_RST => saw_rst = true,
            op => panic!("unexpected op {op}: {h:?}"),
        }
    }
    w.join().unwrap();
    let got = r.join().unwrap();
    assert_eq!(
        host_shutdown & SHUTDOWN_SEND,
        SHUTDOWN_SEND,
        "host EOF reached the guest"
    );
    assert!(
        received.len() == to_guest.len() && received == to_guest,
        "host -> guest bytes differ"
    );
    assert!(
        got.len() == to_host.len() && got == to_host,
        "guest -> host bytes differ"
    );
}

#[test]
fn guest_never_gets_more_than_its_credit() {
    let mut f = Fixture::new();
    let (c, hport) = f.connect(GUEST_PORT);
    let data = pattern(3 * GUEST_BUF as usize, 1);
    let mut writer = c.try_clone().unwrap();
    let d = data.clone();
    let w = thread::spawn(move || writer.write_all(&d));
    let mut got = 0usize;
    // Take everything the muxer sends without consuming (fwd_cnt stays 0).
    while got < GUEST_BUF as usize {
        let (h, p) = f.pkt();
        if h.op == OP_RW {
            got += p.len();
        }
    }
    assert_eq!(got, GUEST_BUF as usize, "exactly the credit, no more");
    // Out of credit: the muxer asks for an update, then sends nothing.
    let (h, _) = f.pkt();
    assert_eq!(h.op, OP_CREDIT_REQUEST, "{h:?}");
    f.assert_quiet();
    // Free everything: the rest flows.
    f.send(ghdr(OP_CREDIT_UPDATE, GUEST_PORT, hport, 0, GUEST_BUF), &[]);
    while got < 2 * GUEST_BUF as usize {
        let (h, p) = f.pkt();
        if h.op == OP_RW {
            got += p.len();
        }
    }
    f.send(
        ghdr(OP_CREDIT_UPDATE, GUEST_PORT, hport, 0, 2 * GUEST_BUF),
        &[],
    );
    while got < data.len() {
        let (h, p) = f.pkt();
        if h.op == OP_RW {
            got += p.len();
        }
    }
    w.join().unwrap().unwrap();
    assert_eq!(got, data.len());
    c.shutdown(Shutdown::Both).unwrap();
}

#[test]
fn credit_request_is_answered() {
    let mut f = Fixture::new();
    let (mut c, hport) = f.connect(GUEST_PORT);
    f.send(ghdr(OP_RW, GUEST_PORT, hport, 3, 0), b"abc");
    let mut b = [0u8; 3];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"abc");
    f.send(ghdr(OP_CREDIT_REQUEST, GUEST_PORT, hport, 0, 0), &[]);
    let (h, _) = f.pkt();
    assert_eq!(h.op, OP_CREDIT_UPDATE);
    assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF_ALLOC, 3));
}

#[test]
fn guest_refusal_closes_host_stream_without_ok() {
    let mut f = Fixture::new();
    let mut c = f.client(GUEST_PORT);
    let (req, _) = f.pkt();
    assert_eq!(req.op, OP_REQUEST);
    f.send(ghdr(OP_RST, GUEST_PORT, req.src_port, 0, 0), &[]);
    f.mux.process();
    assert_closed(&mut c);
    f.assert_quiet(); // never answer a RST with a RST
}

#[test]
fn unanswered_request_times_out() {
    let mut f = Fixture::new();
    let mut c = f.client(GUEST_PORT);
    let (req, _) = f.pkt();
    assert_eq!(req.op, OP_REQUEST);
    // The guest stays silent; the muxer gives up on its own.
    let (h, _) = f
        .try_pkt(CONNECT_TIMEOUT + LIMIT)
        .expect("RST after the timeout");
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (OP_RST, req.src_port, GUEST_PORT)
    );
    assert_closed(&mut c);
}

#[test]
fn host_close_reaches_guest_as_shutdown() {
    let mut f = Fixture::new();
    let (c, hport) = f.connect(GUEST_PORT);
    drop(c);
    let (h, _) = f.pkt();
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (OP_SHUTDOWN, hport, GUEST_PORT)
    );
    assert_eq!(h.flags, SHUTDOWN_SEND | SHUTDOWN_RCV, "full close: {h:?}");
    // The guest acknowledges with RST; the connection is gone.
    f.send(ghdr(OP_RST, GUEST_PORT, hport, 0, 0), &[]);
    f.assert_quiet();
    f.send(ghdr(OP_RW, GUEST_PORT, hport, 1, 0), b"x");
    let (h, _) = f.pkt();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, hport, GUEST_PORT));
}

#[test]
fn host_half_close_keeps_guest_direction_open() {
    let mut f = Fixture::new();
    let (mut c, hport) = f.connect(GUEST_PORT);
    c.write_all(b"request").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (h, d) = f.pkt();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"request"[..]));
    let (h, _) = f.pkt();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND), "{h:?}");
    f.send(ghdr(OP_RW, GUEST_PORT, hport, 8, 7), b"response");
    let mut sh = ghdr(OP_SHUTDOWN, GUEST_PORT, hport, 0, 7);
    sh.flags = SHUTDOWN_SEND;
    f.send(sh, &[]);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"response");
    // Both sides are done: the muxer ends the connection.
    let (h, _) = f.pkt();
    assert_eq!((h.op, h.src_port), (OP_RST, hport));
}

#[test]
fn guest_shutdown_closes_host_direction() {
    let mut f = Fixture::new();
    let (mut c, hport) = f.connect(GUEST_PORT);
    f.send(ghdr(OP_RW, GUEST_PORT, hport, 3, 0), b"bye");
    let mut sh = ghdr(OP_SHUTDOWN, GUEST_PORT, hport, 0, 0);
    sh.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    f.send(sh, &[]);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye", "data before the shutdown arrives, then EOF");
    let (h, _) = f.pkt();
    assert_eq!(
        (h.op, h.src_port),
        (OP_RST, hport),
        "full shutdown answered with RST"
    );
}

#[test]
fn guest_rst_closes_host_stream() {
    let mut f = Fixture::new();
    let (mut c, hport) = f.connect(GUEST_PORT);
    f.send(ghdr(OP_RST, GUEST_PORT, hport, 0, 0), &[]);
    assert_closed(&mut c);
    f.assert_quiet();
}

#[test]
fn garbage_connect_lines_are_closed() {
    let mut f = Fixture::new();
    let long = format!("CONNECT {}", "1".repeat(40));
    for bad in [
        "HELLO\n",
        "CONNECT\n",
        "CONNECT abc\n",
        "CONNECT -1\n",
        "CONNECT 99999999999\n",
        "connect 5\n",
        long.as_str(),
    ] {
        let mut c = UnixStream::connect(&f.path).unwrap();
        c.set_read_timeout(Some(LIMIT)).unwrap();
        c.write_all(bad.as_bytes()).unwrap();
        let end = Instant::now() + LIMIT;
        // Pump until the muxer has dealt with it; the client sees EOF.
        let mut b = [0u8; 8];
        c.set_nonblocking(true).unwrap();
        loop {
            f.pump(20);
            match c.read(&mut b) {
                Ok(0) => break,
                Ok(n) => panic!("{bad:?}: got {:?}", &b[..n]),
                // Closed with our bytes unread.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{bad:?}: {e}"),
            }
            assert!(Instant::now() < end, "{bad:?} not closed");
        }
        assert!(!f.mux.has_rx(), "{bad:?} reached the guest");
    }
    // A good line still works afterwards.
    f.connect(GUEST_PORT);
}

#[test]
fn unknown_and_malformed_packets() {
    let mut f = Fixture::new();
    // Data for a connection that does not exist: RST, ports swapped.
    f.send(ghdr(OP_RW, 5000, 6000, 2, 0), b"hi");
    let (h, _) = f.pkt();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (OP_RST, HOST_CID, GUEST_CID, 6000, 5000)
    );
    // RST for an unknown connection: silence.
    f.send(ghdr(OP_RST, 5000, 6000, 0, 0), &[]);
    // Wrong destination or source CID: dropped.
    let mut h = ghdr(OP_RW, 5000, 6000, 0, 0);
    h.dst_cid = 7;
    f.send(h, &[]);
    let mut h = ghdr(OP_REQUEST, 5000, 6000, 0, 0);
    h.src_cid = 9;
    f.send(h, &[]);
    f.assert_quiet();
    // Wrong type: RST.
    let mut h = ghdr(OP_REQUEST, 5000, 6000, 0, 0);
    h.type_ = 2;
    f.send(h, &[]);
    assert_eq!(f.pkt().0.op, OP_RST);

    // On a live connection: a payload shorter than its header says, or an
    // unknown op, resets it.
    let (mut c, hport) = f.connect(GUEST_PORT);
    f.send(ghdr(OP_RW, GUEST_PORT, hport, 100, 0), b"short");
    assert_eq!(f.pkt().0.op, OP_RST);
    assert_closed(&mut c);
    let (mut c, hport) = f.connect(GUEST_PORT);
    f.send(ghdr(99, GUEST_PORT, hport, 0, 0), &[]);
    assert_eq!(f.pkt().0.op, OP_RST);
    assert_closed(&mut c);
}

#[test]
fn random_headers_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut f = Fixture::new();
    let (_c, hport) = f.connect(GUEST_PORT);
    let payload = [7u8; 64];
    let mut buf = [0u8; 256];
    for i in 0..20_000 {
        let h = Header {
            src_cid: if rng.random_bool(0.9) {
                GUEST_CID
            } else {
                rng.random()
            },
            dst_cid: if rng.random_bool(0.9) {
                HOST_CID
            } else {
                rng.random()
            },
            src_port: if rng.random_bool(0.5) {
                GUEST_PORT
            } else {
                rng.random()
            },
            dst_port: if rng.random_bool(0.5) {
                hport
            } else {
                rng.random()
            },
            len: if rng.random_bool(0.8) {
                rng.random_range(0..80)
            } else {
                rng.random()
            },
            type_: if rng.random_bool(0.9) {
                TYPE_STREAM
            } else {
                rng.random()
            },
            op: rng.random_range(0..10),
            flags: rng.random(),
            buf_alloc: rng.random(),
            fwd_cnt: rng.random(),
        };
        let n = rng.random_range(0..=payload.len());
        f.mux.send_pkt(&h, &payload[..n]);
        if i % 7 == 0 {
            f.mux.process();
            while f.mux.recv_pkt(&mut buf).is_some() {}
        }
    }
    // Still serving.
    f.mux.reset();
    while f.mux.recv_pkt(&mut buf).is_some() {}
    f.connect(GUEST_PORT);
}

#[test]
fn reset_closes_every_stream() {
    let mut f = Fixture::new();
    let (mut a, _) = f.connect(GUEST_PORT);
    let (mut b, hb) = f.connect(GUEST_PORT);
    let mut pending = f.client(GUEST_PORT);
    let (req, _) = f.pkt();
    assert_eq!(req.op, OP_REQUEST);
    f.send(ghdr(OP_RW, GUEST_PORT, hb, 1, 0), b"z");
    f.mux.reset();
    assert!(!f.mux.has_rx());
    assert_closed(&mut a);
    let mut z = [0u8; 1];
    b.read_exact(&mut z).unwrap();
    assert_closed(&mut b);
    assert_closed(&mut pending);
    // The old connection is unknown now; new ones work.
    f.send(ghdr(OP_RW, GUEST_PORT, hb, 1, 0), b"y");
    assert_eq!(f.pkt().0.op, OP_RST);
    f.connect(GUEST_PORT);
}

#[test]
fn many_concurrent_connections_echo() {
    const CONNS: usize = 64;
    let mut f = Fixture::new();
    let mut clients = Vec::new();
    for i in 0..CONNS {
        clients.push(f.connect(1000 + i as u32));
    }
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        c.write_all(format!("message {i}").as_bytes()).unwrap();
    }
    // The guest echoes every RW back, upper-cased.
    let mut echoed = 0;
    while echoed < CONNS {
        let (h, d) = f.pkt();
        assert_eq!(h.op, OP_RW, "{h:?}");
        let reply = d.to_ascii_uppercase();
        f.send(
            ghdr(
                OP_RW,
                h.dst_port,
                h.src_port,
                reply.len() as u32,
                d.len() as u32,
            ),
            &reply,
        );
        echoed += 1;
    }
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        let want = format!("MESSAGE {i}");
        let mut got = vec![0u8; want.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, want.as_bytes());
    }
}

#[test]
fn guest_initiated_connections() {
    let mut f = Fixture::new();
    let mut p = f.path.clone().into_os_string();
    p.push("_5000");
    let listener = UnixListener::bind(&p).unwrap();
    f.send(ghdr(OP_REQUEST, 40000, 5000, 0, 0), &[]);
    let (h, _) = f.pkt();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 40000));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    f.send(ghdr(OP_RW, 40000, 5000, 4, 0), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    let (h, d) = f.pkt();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"pong"[..]));
    // Nobody listens on port 5001: refused.
    f.send(ghdr(OP_REQUEST, 40001, 5001, 0, 0), &[]);
    let (h, _) = f.pkt();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 5001, 40001));
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut f = Fixture::new();
    let (c, hport) = f.connect(GUEST_PORT);
    // The host never reads; the guest ignores the credit it was given.
    let chunk = vec![1u8; 4096];
    let mut sent = 0u32;
    let mut buf = [0u8; 4096];
    'outer: loop {
        f.send(ghdr(OP_RW, GUEST_PORT, hport, 4096, 0), &chunk);
        sent += 4096;
        assert!(sent < 64 * 1024 * 1024, "never reset");
        while let Some(h) = f.mux.recv_pkt(&mut buf) {
            if h.op == OP_RST {
                assert_eq!(h.src_port, hport);
                break 'outer;
            }
            assert_eq!(h.op, OP_CREDIT_UPDATE, "{h:?}");
        }
    }
    assert!(
        sent as usize > BUF_ALLOC as usize,
        "reset only beyond the credit"
    );
    drop(c);
}

#[test]
fn header_parse_never_panics_on_short_input() {
    for n in 0..HDR_LEN {
        assert_eq!(Header::parse(&vec![0xff; n]), None);
    }
    assert!(Header::parse(&[0xff; HDR_LEN + 3]).is_some());
}

#[test]
fn connect_line_parser() {
    assert_eq!(parse_connect(b"CONNECT 49983"), Some(49983));
    assert_eq!(parse_connect(b"CONNECT 1\r"), Some(1));
    assert_eq!(parse_connect(b"CONNECT +1"), None);
    assert_eq!(parse_connect(b"CONNECT 1 2"), None);
    assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
    assert_eq!(parse_connect(b"\xff"), None);
}

#[test]
fn host_gone_before_guest_answers() {
    let mut f = Fixture::new();
    let c = f.client(GUEST_PORT);
    let (req, _) = f.pkt();
    assert_eq!(req.op, OP_REQUEST);
    drop(c);
    f.mux.process();
    // The guest accepts, but nobody is there any more: RST.
    f.send(ghdr(OP_RESPONSE, GUEST_PORT, req.src_port, 0, 0), &[]);
    let (h, _) = f.pkt();
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (OP_RST, req.src_port, GUEST_PORT)
    );
    f.assert_quiet();
}

#[test]
fn stale_socket_file_is_replaced_and_removed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    std::fs::write(&path, b"stale").unwrap();
    let mux = Muxer::new(&path, GUEST_CID).expect("replaces the stale file");
    assert!(UnixStream::connect(&path).is_ok());
    drop(mux);
    assert!(!path.exists(), "socket file removed on drop");
    // A muxer whose file was replaced by a newer one leaves that alone.
    let old = Muxer::new(&path, GUEST_CID).unwrap();
    let new = Muxer::new(&path, GUEST_CID).unwrap();
    drop(old);
    assert!(
        UnixStream::connect(&path).is_ok(),
        "the newer muxer's socket survives"
    );
    drop(new);
}
