//! The connection multiplexer: per-connection state machines, credit-based
//! flow control, and the epoll set over the host Unix sockets.
//!
//! Every host stream is non-blocking and registered in one epoll set
//! (level-triggered while the muxer wants to read or write it; edge-
//! triggered with no events while it wants neither, so a hung-up stream
//! reports its hang-up once instead of spinning). Packets for the guest are
//! produced lazily by [`Muxer::recv_pkt`]: queued RSTs first, then each
//! connection's pending control packets, then data read straight from the
//! host streams, round-robin, never more than the guest's credit allows.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::{
    Error, Header, BUF_ALLOC, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// How long the guest has to answer a connection request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a host client has to send its `CONNECT <port>` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to acknowledge our full shutdown with RST.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most host streams (connections and handshakes) at once.
const MAX_STREAMS: usize = 1024;
/// Most RSTs waiting for the guest's RX queue; beyond that, RSTs for
/// packets of unknown connections are dropped.
const MAX_RST_QUEUE: usize = 4096;
/// Send an unsolicited credit update once this many bytes were forwarded
/// to the host since the guest last heard our `fwd_cnt`.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1024;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 2;

// Pending control packets of a connection, in the order they are sent.
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_CREDIT_UPDATE: u8 = 4;
const P_CREDIT_REQUEST: u8 = 8;
const P_SHUTDOWN: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: OP_REQUEST queued or sent, waiting for OP_RESPONSE.
    Connecting {
        deadline: Instant,
    },
    Established,
}

/// A host client that has not finished its `CONNECT <port>` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// One vsock stream connection and its host stream.
struct Conn {
    stream: UnixStream,
    /// The host side's port (ours).
    local_port: u32,
    /// The guest side's port.
    peer_port: u32,
    state: State,
    /// What the stream is registered for in the epoll set.
    interest: EventSet,

    // Guest -> host.
    /// Guest data the host stream has not taken yet (at most BUF_ALLOC).
    tx_buf: VecDeque<u8>,
    /// Bytes of guest data written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_sent: Wrapping<u32>,

    // Host -> guest.
    /// Bytes of host data sent to the guest.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,

    // Shutdown.
    /// The host stream reached EOF: the host sends no more.
    host_eof: bool,
    /// The host stream hung up completely: the host receives no more.
    host_hup: bool,
    /// SHUTDOWN flags the guest has sent us (cumulative).
    peer_shutdown: u32,
    /// SHUTDOWN flags we have sent the guest (cumulative).
    sent_shutdown: u32,
    host_write_shut: bool,
    /// Set once we sent a full shutdown: the guest should RST by then.
    kill_deadline: Option<Instant>,

    // Queues.
    pending: u8,
    in_ready: bool,
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Conn {
        Conn {
            stream,
            local_port,
            peer_port,
            state,
            interest: EventSet::IN,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_eof: false,
            host_hup: false,
            peer_shutdown: 0,
            sent_shutdown: 0,
            host_write_shut: false,
            kill_deadline: None,
            pending: 0,
            in_ready: false,
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data should be read and sent to the guest now.
    fn can_read_host(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// The epoll registration this connection wants.
    fn wanted_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.can_read_host() && !self.in_ready {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        if e.is_empty() {
            // Nothing wanted: hang-ups and errors are still reported, but
            // only once each.
            EventSet::EDGE_TRIGGERED
        } else {
            e
        }
    }

    /// SHUTDOWN flags the guest should have heard from us by now: once
    /// the host's data is all delivered (EOF), SEND, and RCV too if the
    /// host has closed its stream completely.
    fn wanted_shutdown(&self) -> u32 {
        match (self.host_eof, self.host_hup) {
            (false, _) => 0,
            (true, false) => SHUTDOWN_SEND,
            (true, true) => SHUTDOWN_SEND | SHUTDOWN_RCV,
        }
    }

    /// Writes as much of `tx_buf` to the host stream as it takes.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Multiplexes guest vsock connections onto host Unix-socket streams.
///
/// Single-threaded: the device thread owns it and calls it from its event
/// loop. All its sockets are non-blocking.
pub struct Muxer {
    uds_path: PathBuf,
    /// Inode of the socket file we bound, so that drop removes only ours.
    uds_ino: u64,
    guest_cid: u64,
    listener: UnixListener,
    /// The listener is out of the epoll set after running out of fds.
    listener_paused: bool,
    epoll: Epoll,
    timer: TimerFd,
    /// When the timer is armed to fire.
    timer_at: Option<Instant>,
    next_token: u64,
    next_local_port: u32,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<u64, Conn>,
    /// (local port, peer port) -> connection token.
    by_ports: HashMap<(u32, u32), u64>,
    /// RSTs to send: (local port, peer port).
    rst_queue: VecDeque<(u32, u32)>,
    /// Connections with pending control packets.
    ctrl_queue: VecDeque<u64>,
    /// Connections whose host streams have data (or EOF) for the guest.
    ready: VecDeque<u64>,
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Sys { what, source }
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket file there is replaced) for a
    /// guest with CID `guest_cid`.
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Muxer, Error> {
        let bind_err = |source| Error::Bind {
            path: uds_path.display().to_string(),
            source,
        };
        match std::fs::remove_file(uds_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let uds_ino = std::fs::metadata(uds_path).map_err(bind_err)?.ino();
        let epoll = Epoll::new().map_err(sys("epoll_create"))?;
        let timer = TimerFd::new().map_err(|e| Error::Sys {
            what: "timerfd_create",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(sys("epoll_ctl"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(sys("epoll_ctl"))?;
        Ok(Muxer {
            uds_path: uds_path.to_path_buf(),
            uds_ino,
            guest_cid,
            listener,
            listener_paused: false,
            epoll,
            timer,
            timer_at: None,
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            rst_queue: VecDeque::new(),
            ctrl_queue: VecDeque::new(),
            ready: VecDeque::new(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// A packet the guest put on its TX queue. Malformed or unexpected
    /// packets are answered with RST or dropped, never a panic.
    pub fn send_pkt(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            tracing::debug!(?hdr, "vsock: dropping packet with wrong CIDs");
            return;
        }
        let ports = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.queue_rst(ports);
            }
            return;
        }
        let Some(&tok) = self.by_ports.get(&ports) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(hdr),
                OP_RST => {}
                _ => self.queue_rst(ports),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&tok) else {
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            OP_RESPONSE => {
                if !matches!(conn.state, State::Connecting { .. }) {
                    return self.kill(tok, true);
                }
                conn.state = State::Established;
                let ok = format!("OK {}\n", conn.local_port);
                // A fresh stream's send buffer always has room for one line.
                match conn.stream.write(ok.as_bytes()) {
                    Ok(n) if n == ok.len() => {}
                    _ => return self.kill(tok, true),
                }
            }
            OP_RST => return self.kill(tok, false),
            OP_SHUTDOWN => {
                conn.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if conn.peer_shutdown & SHUTDOWN_RCV != 0 {
                    // The guest takes no more: host writers get EPIPE.
                    let _ = conn.stream.shutdown(Shutdown::Read);
                }
            }
            OP_RW => {
                if conn.state != State::Established {
                    return self.kill(tok, true);
                }
                if conn.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return;
                }
                let Some(data) = payload.get(..hdr.len as usize) else {
                    tracing::debug!(len = hdr.len, got = payload.len(), "vsock: short packet");
                    return self.kill(tok, true);
                };
                if conn.tx_buf.len() + data.len() > BUF_ALLOC as usize {
                    tracing::debug!(port = conn.local_port, "vsock: guest overran its credit");
                    return self.kill(tok, true);
                }
                conn.tx_buf.extend(data);
                if conn.flush().is_err() {
                    return self.kill(tok, true);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_ctrl(tok, P_CREDIT_UPDATE),
            // A second request on a live connection, or an unknown op.
            _ => return self.kill(tok, true),
        }
        self.after_change(tok);
    }

    /// The next packet for the guest's RX queue. Its payload (at most
    /// `payload.len()` bytes; `hdr.len` says how many) is written into
    /// `payload`. `None`: nothing to deliver now.
    pub fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<Header> {
        loop {
            if let Some(h) = self.next_ctrl() {
                return Some(h);
            }
            match self.next_data(payload) {
                Data::Packet(h) => return Some(h),
                // EOF or an error queued a control packet.
                Data::Again => continue,
                Data::Nothing => return None,
            }
        }
    }

    /// Whether [`Muxer::recv_pkt`] would return a packet. (A host stream
    /// that reported data may turn out empty, so `recv_pkt` can still
    /// return `None` once; `has_rx` is false after that.)
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.ctrl_queue.is_empty() || !self.ready.is_empty()
    }

    /// An epoll fd that is readable when [`Muxer::process`] has host-side
    /// work (a new host connection, host data, a closed host stream).
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Handles host-side events without blocking; afterwards check
    /// [`Muxer::has_rx`].
    pub fn process(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "vsock: epoll_wait");
                }
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.accept(),
                TOKEN_TIMER => self.expire(),
                tok => {
                    if self.handshakes.contains_key(&tok) {
                        self.handshake_readable(tok);
                    } else {
                        self.stream_event(tok, ev.event_set());
                    }
                }
            }
        }
    }

    /// Drops every connection (host streams closed); the listener stays.
    /// Called on restore, where the device also sends the guest
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
    pub fn reset(&mut self) {
        for (_, h) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.pause_listener(false);
        self.by_ports.clear();
        self.rst_queue.clear();
        self.ctrl_queue.clear();
        self.ready.clear();
    }

    // ---- host side ----

    fn accept(&mut self) {
        for _ in 0..64 {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of descriptors or memory: stop listening (the
                    // listener would stay readable and spin the device
                    // thread) until a stream closes.
                    tracing::warn!(error = %e, "vsock: accept; pausing the listener");
                    self.pause_listener(true);
                    return;
                }
            };
            if self.handshakes.len() + self.conns.len() >= MAX_STREAMS {
                tracing::warn!("vsock: too many host connections; refusing one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let tok = self.token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, tok),
                )
                .is_err()
            {
                continue;
            }
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            self.handshakes.insert(
                tok,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline,
                },
            );
            self.arm_timer(deadline);
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (what follows it is
    /// connection data and stays in the socket).
    fn handshake_readable(&mut self, tok: u64) {
        let Some(h) = self.handshakes.get_mut(&tok) else {
            return;
        };
        let port = loop {
            let mut b = [0u8; 1];
            match h.stream.read(&mut b) {
                Ok(0) => return self.drop_handshake(tok),
                Ok(_) if b[0] == b'\n' => match parse_connect(&h.line) {
                    Some(p) => break p,
                    None => {
                        tracing::debug!(line = ?String::from_utf8_lossy(&h.line), "vsock: bad CONNECT line");
                        return self.drop_handshake(tok);
                    }
                },
                Ok(_) => {
                    h.line.push(b[0]);
                    if h.line.len() >= MAX_CONNECT_LINE {
                        return self.drop_handshake(tok);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_handshake(tok),
            }
        };
        let Some(h) = self.handshakes.remove(&tok) else {
            return;
        };
        let local = self.fresh_local_port(port);
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut conn = Conn::new(h.stream, local, port, State::Connecting { deadline });
        conn.interest = EventSet::IN; // as registered for the handshake
        self.by_ports.insert((local, port), tok);
        self.conns.insert(tok, conn);
        self.queue_ctrl(tok, P_REQUEST);
        self.arm_timer(deadline);
        self.after_change(tok);
    }

    fn drop_handshake(&mut self, tok: u64) {
        if let Some(h) = self.handshakes.remove(&tok) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.pause_listener(false);
        }
    }

    /// Takes the listener out of the epoll set (`pause`) or puts it back.
    fn pause_listener(&mut self, pause: bool) {
        if pause == self.listener_paused {
            return;
        }
        let fd = self.listener.as_raw_fd();
        let r = if pause {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
        };
        match r {
            Ok(()) => self.listener_paused = pause,
            Err(e) => tracing::warn!(error = %e, "vsock: epoll_ctl on the listener"),
        }
    }

    fn stream_event(&mut self, tok: u64, ev: EventSet) {
        let Some(conn) = self.conns.get_mut(&tok) else {
            return;
        };
        if ev.contains(EventSet::HANG_UP) {
            conn.host_hup = true;
        }
        let problem = ev.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if (ev.contains(EventSet::IN) || problem) && conn.can_read_host() && !conn.in_ready {
            conn.in_ready = true;
            self.ready.push_back(tok);
        }
        if (ev.contains(EventSet::OUT) || problem)
            && !conn.tx_buf.is_empty()
            && conn.flush().is_err()
        {
            return self.kill(tok, true);
        }
        self.after_change(tok);
    }

    // ---- guest side ----

    /// The guest connects to host port `hdr.dst_port`: forward to the Unix
    /// socket `<uds_path>_<port>` if one listens there.
    fn guest_connect(&mut self, hdr: &Header) {
        let ports = (hdr.dst_port, hdr.src_port);
        if self.handshakes.len() + self.conns.len() >= MAX_STREAMS {
            return self.queue_rst(ports);
        }
        let mut path: OsString = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = %Path::new(&path).display(), error = %e, "vsock: guest connection refused");
                return self.queue_rst(ports);
            }
        };
        let tok = self.token();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::EDGE_TRIGGERED, tok),
            )
            .is_err()
        {
            return self.queue_rst(ports);
        }
        let mut conn = Conn::new(stream, hdr.dst_port, hdr.src_port, State::Established);
        conn.interest = EventSet::EDGE_TRIGGERED;
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.by_ports.insert(ports, tok);
        self.conns.insert(tok, conn);
        self.queue_ctrl(tok, P_RESPONSE);
        self.after_change(tok);
    }

    // ---- packets for the guest ----

    fn next_ctrl(&mut self) -> Option<Header> {
        if let Some((local, peer)) = self.rst_queue.pop_front() {
            return Some(self.header(local, peer, OP_RST, 0, 0));
        }
        while let Some(tok) = self.ctrl_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&tok) else {
                continue;
            };
            if conn.pending == 0 {
                continue;
            }
            let bit = 1u8 << conn.pending.trailing_zeros();
            conn.pending &= !bit;
            if conn.pending != 0 {
                self.ctrl_queue.push_front(tok);
            }
            let (op, flags) = match bit {
                P_REQUEST => (OP_REQUEST, 0),
                P_RESPONSE => (OP_RESPONSE, 0),
                P_CREDIT_UPDATE => (OP_CREDIT_UPDATE, 0),
                P_CREDIT_REQUEST => (OP_CREDIT_REQUEST, 0),
                _ => {
                    let flags = conn.wanted_shutdown();
                    conn.sent_shutdown = flags;
                    if flags == SHUTDOWN_RCV | SHUTDOWN_SEND && conn.kill_deadline.is_none() {
                        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
                        conn.kill_deadline = Some(deadline);
                        self.arm_timer(deadline);
                    }
                    (OP_SHUTDOWN, flags)
                }
            };
            let h = self.conn_header(tok, op, flags, 0);
            if op == OP_SHUTDOWN {
                // Both sides may be done now.
                self.after_change(tok);
            }
            return Some(h);
        }
        None
    }

    fn next_data(&mut self, payload: &mut [u8]) -> Data {
        while let Some(tok) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&tok) else {
                continue;
            };
            conn.in_ready = false;
            let max = (conn.peer_credit() as usize).min(payload.len());
            if !conn.can_read_host() || max == 0 {
                self.after_change(tok);
                continue;
            }
            match conn.stream.read(&mut payload[..max]) {
                Ok(0) => {
                    conn.host_eof = true;
                    self.after_change(tok);
                    return Data::Again;
                }
                Ok(n) => {
                    conn.tx_cnt += n as u32;
                    if n == max {
                        // Probably more where that came from.
                        conn.in_ready = true;
                        self.ready.push_back(tok);
                    }
                    if conn.peer_credit() == 0 && !conn.credit_requested {
                        conn.credit_requested = true;
                        self.queue_ctrl(tok, P_CREDIT_REQUEST);
                    }
                    self.after_change(tok);
                    return Data::Packet(self.conn_header(tok, OP_RW, 0, n as u32));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.after_change(tok),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    conn.in_ready = true;
                    self.ready.push_front(tok);
                }
                Err(_) => {
                    self.kill(tok, true);
                    return Data::Again;
                }
            }
        }
        Data::Nothing
    }

    fn header(&self, local: u32, peer: u32, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local,
            dst_port: peer,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    /// A header for connection `tok`, carrying its credit; the guest now
    /// knows our `fwd_cnt`.
    fn conn_header(&mut self, tok: u64, op: u16, flags: u32, len: u32) -> Header {
        let mut h = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: 0,
            dst_port: 0,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        };
        if let Some(c) = self.conns.get_mut(&tok) {
            h.src_port = c.local_port;
            h.dst_port = c.peer_port;
            h.fwd_cnt = c.fwd_cnt.0;
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        h
    }

    // ---- bookkeeping ----

    /// Re-evaluates a connection after anything about it changed: queued
    /// credit updates and shutdowns, host half-close, the end of the
    /// connection, and its epoll registration.
    fn after_change(&mut self, tok: u64) {
        let Some(conn) = self.conns.get_mut(&tok) else {
            return;
        };
        let mut pending = 0;
        if conn.peer_credit() > 0 {
            conn.credit_requested = false;
        }
        if (conn.fwd_cnt - conn.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            pending |= P_CREDIT_UPDATE;
        }
        if conn.state == State::Established && conn.wanted_shutdown() != conn.sent_shutdown {
            pending |= P_SHUTDOWN;
        }
        if conn.tx_buf.is_empty()
            && conn.peer_shutdown & SHUTDOWN_SEND != 0
            && !conn.host_write_shut
        {
            conn.host_write_shut = true;
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
        let guest_done = conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND;
        let both_sent =
            conn.sent_shutdown & SHUTDOWN_SEND != 0 && conn.peer_shutdown & SHUTDOWN_SEND != 0;
        if conn.tx_buf.is_empty() && (guest_done || both_sent) {
            return self.kill(tok, true);
        }
        let want = conn.wanted_interest();
        if want != conn.interest {
            let fd = conn.stream.as_raw_fd();
            if self
                .epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(want, tok))
                .is_err()
            {
                return self.kill(tok, true);
            }
            if let Some(conn) = self.conns.get_mut(&tok) {
                conn.interest = want;
            }
        }
        if pending != 0 {
            self.queue_ctrl(tok, pending);
        }
    }

    fn queue_ctrl(&mut self, tok: u64, bits: u8) {
        if let Some(conn) = self.conns.get_mut(&tok) {
            if conn.pending == 0 {
                self.ctrl_queue.push_back(tok);
            }
            conn.pending |= bits;
        }
    }

    fn queue_rst(&mut self, ports: (u32, u32)) {
        if self.rst_queue.len() < MAX_RST_QUEUE {
            self.rst_queue.push_back(ports);
        } else {
            tracing::debug!(?ports, "vsock: RST queue full; dropping one");
        }
    }

    /// Ends a connection: closes its host stream and, with `rst`, tells the
    /// guest.
    fn kill(&mut self, tok: u64, rst: bool) {
        let Some(conn) = self.conns.remove(&tok) else {
            return;
        };
        let ports = (conn.local_port, conn.peer_port);
        self.by_ports.remove(&ports);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        if conn.pending != 0 {
            self.ctrl_queue.retain(|&t| t != tok);
        }
        if conn.in_ready {
            self.ready.retain(|&t| t != tok);
        }
        // A connection the guest never heard of needs no RST.
        let guest_knows =
            !(matches!(conn.state, State::Connecting { .. }) && conn.pending & P_REQUEST != 0);
        if rst && guest_knows {
            self.queue_rst(ports);
        }
        self.pause_listener(false);
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// A host port for a new host-initiated connection to guest `peer`.
    fn fresh_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = match p.checked_add(1) {
                Some(n) => n,
                None => FIRST_LOCAL_PORT,
            };
            if !self.by_ports.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    fn arm_timer(&mut self, at: Instant) {
        if self.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        let dur = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(dur, None) {
            Ok(()) => self.timer_at = Some(at),
            Err(e) => tracing::warn!(error = %e, "vsock: timerfd_settime"),
        }
    }

    /// The timer fired: ends handshakes and connections past their
    /// deadlines and re-arms for the next one.
    fn expire(&mut self) {
        self.timer_at = None;
        let _ = self.timer.clear();
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        for t in late {
            tracing::debug!("vsock: host client sent no CONNECT line in time");
            self.drop_handshake(t);
        }
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| match (c.state, c.kill_deadline) {
                (State::Connecting { deadline }, _) => deadline <= now,
                (_, Some(d)) => d <= now,
                _ => false,
            })
            .map(|(&t, _)| t)
            .collect();
        for t in late {
            tracing::debug!("vsock: guest did not answer in time");
            self.kill(t, true);
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| match c.state {
                State::Connecting { deadline } => Some(deadline),
                State::Established => c.kill_deadline,
            }))
            .min();
        if let Some(at) = next {
            self.arm_timer(at);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file unless another muxer has replaced it.
        if std::fs::metadata(&self.uds_path).is_ok_and(|m| m.ino() == self.uds_ino) {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

enum Data {
    Packet(Header),
    Again,
    Nothing,
}

/// `CONNECT <port>` (a trailing `\r` tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to a Unix stream socket without blocking: on Linux such a
/// connect completes at once or fails (EAGAIN when the backlog is full).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes and
    // outlives the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests;
