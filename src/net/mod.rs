//! Sandbox networking on the host: one network namespace, one tap and one
//! veth pair per sandbox, addresses carved from `--sandbox-cidr`, and
//! nftables rules in a stasis-owned table for NAT and the SDK's egress
//! controls (`allowInternetAccess`, `network.allowOut` / `denyOut`).
//!
//! # Topology
//! Every sandbox gets a *slot*: an aligned /29 of the sandbox CIDR
//! (default `10.11.0.0/16`, so 8192 slots), used as two /30 links:
//!
//! ```text
//!  guest eth0 (virtio-net)      sandbox netns "stasis-<hex>"             uplink netns (the host)
//!  base+2/30  ───────────── tap0 base+1/30                                  
//!                               eth0 base+6/30 ══ veth ══ sv<hex> base+5/30 ── NAT ── uplink
//! ```
//!
//! `<hex>` is the slot's base address in 8 hex digits, so names never
//! collide between servers whose CIDRs do not overlap. The guest is
//! configured at boot with the kernel's `ip=` parameter ([`Slot::kernel_ip_arg`]);
//! it keeps its address across pause and resume because the slot is stored
//! with the sandbox and set up again (same addresses) on resume.
//!
//! The sandbox namespace forwards between its tap and its veth; the uplink
//! namespace (the host's own namespace in production, a test-made one in the
//! tests) routes the slot's /30 to the veth and masquerades the whole CIDR to
//! whatever interface leaves it.
//!
//! # Rules (`table inet stasis` in the uplink namespace)
//! - `forward`: packets from a sandbox veth (`sv*`) to any address inside
//!   the sandbox CIDR are dropped (sandboxes cannot reach each other), IPv6
//!   from sandboxes is dropped (guests get IPv4 only), everything else jumps
//!   through the verdict map `sandboxes` (veth name → the sandbox's chain
//!   `s_<hex>`); a veth with no entry is dropped. Unsolicited packets *to* a
//!   sandbox veth are dropped; replies (conntrack established/related) pass.
//! - `input`: a sandbox may not open connections to the host itself (the
//!   stasis API listens there); replies pass.
//! - `postrouting`: `ip saddr <cidr> oifname != "sv*" masquerade`.
//! - per sandbox: sets `a_<hex>` (allowOut) and `d_<hex>` (denyOut), and the
//!   chain `s_<hex>`: allowOut accept → denyOut drop → (allowInternetAccess
//!   false: drop) → accept. Allowed addresses take precedence over denied
//!   ones, as the SDK documents; `allowInternetAccess: false` behaves like
//!   `denyOut: ["0.0.0.0/0"]`. An update replaces sets and chain in one nft
//!   transaction, and applies to established connections too (every
//!   forwarded packet is checked).
//!
//! Rule entries are IPv4 addresses, IPv4 CIDRs or host names; a host name is
//! resolved (A records, through the host's resolver) when the rules are
//! applied, and not again until the next apply (create, resume, update).
//!
//! # Cleanup
//! Removing a sandbox deletes its namespace (which destroys its tap and both
//! veth ends, and with them its routes) and its map entry, chain and sets.
//! [`Network::sweep`] at serve start removes everything a killed server left
//! behind: namespaces named `stasis-<hex>` and `sv<hex>` links in the uplink
//! namespace for slots inside the CIDR, and the whole `inet stasis` table.
//! One stasis server with networking per uplink namespace.
//!
//! Everything here runs `ip` (iproute2) and `nft` (nftables) and blocks:
//! call it from a blocking thread, never from a tokio worker.

pub mod spec;
pub mod tap;

use std::fmt;
use std::net::{Ipv4Addr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Errors of the networking module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host prerequisite (a tool, a kernel feature, a permission) is missing.
    #[error("networking is unavailable on this host: {0} (start with --no-network to run sandboxes without network)")]
    Unavailable(String),
    /// A command (`ip`, `nft`) failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The sandbox CIDR is not usable.
    #[error("invalid sandbox CIDR {0:?}: expected an IPv4 network like 10.11.0.0/16 with a prefix of /8../29")]
    BadCidr(String),
    /// Every slot of the CIDR is taken.
    #[error("no free network slot in {0} (every /29 is in use)")]
    Exhausted(Cidr),
    /// A slot number outside the CIDR.
    #[error("network slot {slot} is outside {cidr}")]
    BadSlot {
        /// The slot.
        slot: u32,
        /// The CIDR.
        cidr: Cidr,
    },
    /// An egress rule entry is neither an IPv4 address, CIDR nor host name.
    #[error("invalid network rule entry {0:?}: expected an IPv4 address, an IPv4 CIDR (a.b.c.d/n) or a host name")]
    BadEntry(String),
    /// A host name in a rule did not resolve to any IPv4 address.
    #[error("network rule entry {name:?} does not resolve to an IPv4 address")]
    Unresolved {
        /// The host name.
        name: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Cidr {
    /// The network mask.
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Parses "a.b.c.d/n" or a bare address (a /32). Host bits must be zero
    /// for a CIDR (like nftables and the E2B API, a typo is not silently
    /// widened).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = Ipv4Addr::from_str(a).ok()?;
        let prefix = match p {
            Some(p) if !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|&n| n <= 32)?
            }
            Some(_) => return None,
            None => 32,
        };
        let c = Cidr { addr, prefix };
        (u32::from(addr) & !c.mask() == 0).then_some(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Cidr> {
        Cidr::parse(s).ok_or_else(|| Error::BadCidr(s.to_string()))
    }
}

/// One sandbox's addresses: an aligned /29 of the sandbox CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Index of the /29 inside the CIDR.
    pub index: u32,
    /// First address of the /29.
    pub base: Ipv4Addr,
}

impl Slot {
    fn at(&self, off: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + off)
    }
    /// The guest's address (on its virtio-net device).
    pub fn guest(&self) -> Ipv4Addr {
        self.at(2)
    }
    /// The guest's gateway: the tap in the sandbox namespace.
    pub fn gateway(&self) -> Ipv4Addr {
        self.at(1)
    }
    /// The veth end in the uplink namespace.
    pub fn host_veth_addr(&self) -> Ipv4Addr {
        self.at(5)
    }
    /// The veth end inside the sandbox namespace.
    pub fn ns_veth_addr(&self) -> Ipv4Addr {
        self.at(6)
    }
    /// 8 hex digits naming this slot.
    pub fn hex(&self) -> String {
        format!("{:08x}", u32::from(self.base))
    }
    /// The sandbox namespace's name (under /run/netns).
    pub fn netns_name(&self) -> String {
        format!("stasis-{}", self.hex())
    }
    /// The veth's name in the uplink namespace.
    pub fn host_veth(&self) -> String {
        format!("sv{}", self.hex())
    }
    /// The guest's netmask (/30).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::new(255, 255, 255, 252)
    }
    /// A deterministic locally administered MAC for the guest's device.
    pub fn guest_mac(&self) -> [u8; 6] {
        let b = u32::from(self.base).to_be_bytes();
        [0x06, 0x5a, b[0], b[1], b[2], b[3] | 2]
    }
    /// The MAC of the guest's gateway (the tap), as deterministic as the
    /// guest's: the tap made again on resume keeps it, so the neighbour
    /// entry the restored guest holds stays right and its first packet
    /// after a resume goes out at once (a new random MAC would leave it
    /// sending to the old one until its neighbour entry is probed again,
    /// seconds later).
    pub fn gateway_mac(&self) -> [u8; 6] {
        let b = u32::from(self.base).to_be_bytes();
        [0x06, 0x5a, b[0], b[1], b[2], b[3] | 1]
    }
    /// The kernel command-line parameter that configures the guest's
    /// `eth0` at boot (CONFIG_IP_PNP), with `dns` as its resolver.
    pub fn kernel_ip_arg(&self, dns: Option<Ipv4Addr>) -> String {
        let mut s = format!(
            "ip={}::{}:{}::eth0:off",
            self.guest(),
            self.gateway(),
            self.netmask()
        );
        if let Some(d) = dns {
            s.push_str(&format!(":{d}"));
        }
        s
    }
}

/// Name of the tap device inside every sandbox namespace.
pub const TAP_NAME: &str = "tap0";
/// Name of the nftables table (family inet) in the uplink namespace.
pub const TABLE: &str = "stasis";

/// Egress controls of one sandbox, as the SDK sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRules {
    /// `allowInternetAccess` (default true). False: only `allow_out` passes.
    pub allow_internet: bool,
    /// `network.allowOut` entries (addresses, CIDRs, host names).
    pub allow_out: Vec<String>,
    /// `network.denyOut` entries.
    pub deny_out: Vec<String>,
}

impl EgressRules {
    /// Everything allowed.
    pub fn open() -> EgressRules {
        EgressRules {
            allow_internet: true,
            ..Default::default()
        }
    }

    /// Checks every entry's syntax (no resolution): the first bad entry is
    /// the error.
    pub fn validate(&self) -> Result<()> {
        for e in self.allow_out.iter().chain(&self.deny_out) {
            parse_entry(e)?;
        }
        Ok(())
    }
}

/// One parsed rule entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An address or network.
    Net(Cidr),
    /// A host name, resolved when applied.
    Host(String),
}

/// Parses one allowOut/denyOut entry.
pub fn parse_entry(s: &str) -> Result<Entry> {
    let bad = || Error::BadEntry(s.to_string());
    if s.is_empty() || s.len() > 253 {
        return Err(bad());
    }
    if let Some(c) = Cidr::parse(s) {
        return Ok(Entry::Net(c));
    }
    // Anything that looks like an address or CIDR but did not parse is bad,
    // not a host name.
    if s.contains('/') || s.contains(':') || s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.split('.').all(ok_label) {
        Ok(Entry::Host(name.to_ascii_lowercase()))
    } else {
        Err(bad())
    }
}

/// Resolves entries to CIDRs (host names through the host's resolver).
pub fn resolve_entries(entries: &[String]) -> Result<Vec<Cidr>> {
    let mut out = Vec::new();
    for e in entries {
        match parse_entry(e)? {
            Entry::Net(c) => out.push(c),
            Entry::Host(h) => {
                let addrs = (h.as_str(), 0u16)
                    .to_socket_addrs()
                    .map_err(|_| Error::Unresolved { name: h.clone() })?;
                let mut any = false;
                for a in addrs {
                    if let std::net::IpAddr::V4(v4) = a.ip() {
                        out.push(Cidr {
                            addr: v4,
                            prefix: 32,
                        });
                        any = true;
                    }
                }
                if !any {
                    return Err(Error::Unresolved { name: h });
                }
            }
        }
    }
    Ok(out)
}

/// How the guest end is attached inside the sandbox namespace.
#[derive(Debug, Clone)]
pub enum GuestLink {
    /// A persistent tap (`tap0`, vnet header) that the VMM opens.
    Tap,
    /// A veth whose far end (`eth0`, the guest's address, default route via
    /// the gateway) is moved into the given namespace: a stand-in for a VM
    /// in tests that need no guest.
    Veth {
        /// Name (under /run/netns) of the namespace standing in for the guest.
        guest_netns: String,
    },
}

/// Host-side networking settings of a server.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses for sandboxes.
    pub cidr: Cidr,
    /// Name (under /run/netns) of the namespace holding the uplink (NAT,
    /// rules, host veth ends); `None`: this process's own namespace (the
    /// host).
    pub uplink_netns: Option<String>,
    /// The resolver given to guests (kernel `ip=`), if any.
    pub dns: Option<Ipv4Addr>,
}

impl NetConfig {
    /// The default sandbox CIDR.
    pub const DEFAULT_CIDR: &'static str = "10.11.0.0/16";

    /// The host's first non-loopback IPv4 resolver from /etc/resolv.conf
    /// (guests reach it through NAT); None when there is none.
    pub fn host_resolver() -> Option<Ipv4Addr> {
        let s = std::fs::read_to_string("/etc/resolv.conf").ok()?;
        s.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .find(|a| !a.is_loopback())
    }
}

/// A server's networking: the slot allocator and the uplink's rules.
pub struct Network {
    cfg: NetConfig,
    used: Mutex<Vec<bool>>,
    /// Held while checking for and installing the table.
    table: Mutex<()>,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network").field("cfg", &self.cfg).finish()
    }
}

fn cmd_line(prog: &str, args: &[&str]) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs a command, returning stdout; a non-zero exit is an error with
/// stderr.
fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let cmd = cmd_line(prog, args);
    let mut c = Command::new(prog);
    c.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = c.spawn().map_err(|source| Error::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if let Some(input) = stdin {
        if let Some(mut w) = child.stdin.take() {
            w.write_all(input.as_bytes())
                .map_err(|source| Error::Spawn {
                    cmd: cmd.clone(),
                    source,
                })?;
        }
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip` in the uplink namespace (or this one).
fn ip_up(ns: &Option<String>, args: &[&str]) -> Result<String> {
    in_up(ns, "ip", args, None)
}

/// A command in the uplink namespace.
fn in_up(ns: &Option<String>, prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    match ns {
        None => run(prog, args, stdin),
        Some(name) => {
            let mut w = vec![
                format!("--net={}", netns_path(name).display()),
                prog.to_string(),
            ];
            w.extend(args.iter().map(|s| s.to_string()));
            let wr: Vec<&str> = w.iter().map(|s| s.as_str()).collect();
            run("nsenter", &wr, stdin)
        }
    }
}

/// `ip -n <ns> ...` for a named namespace.
fn ip_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["-n", ns];
    v.extend_from_slice(args);
    run("ip", &v, None)
}

fn sysctl_in(ns: Option<&Path>, key_path: &str, val: &str) -> Result<()> {
    let cmd = format!("echo {val} > /proc/sys/{key_path}");
    match ns {
        None => {
            std::fs::write(format!("/proc/sys/{key_path}"), val)
                .map_err(|source| Error::Spawn { cmd, source })?;
            Ok(())
        }
        Some(p) => {
            run(
                "nsenter",
                &[
                    &format!("--net={}", p.display()),
                    "sh",
                    "-c",
                    &format!("echo {val} > /proc/sys/{key_path}"),
                ],
                None,
            )?;
            Ok(())
        }
    }
}

/// The path of a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

impl Network {
    /// Checks the host's prerequisites (`ip`, `nft`, permission to create
    /// namespaces and nftables tables) and returns a server's networking.
    /// Does not touch existing state: call [`Network::sweep`] next.
    pub fn new(cfg: NetConfig) -> Result<Network> {
        if cfg.cidr.prefix > 29 || cfg.cidr.prefix < 8 {
            return Err(Error::BadCidr(cfg.cidr.to_string()));
        }
        for (tool, pkg) in [
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("nsenter", "util-linux"),
        ] {
            if run(tool, &["--version"], None).is_err() && run(tool, &["-V"], None).is_err() {
                return Err(Error::Unavailable(format!(
                    "`{tool}` not found (install the Debian package {pkg})"
                )));
            }
        }
        // Can we make a namespace and list nftables rules in the uplink?
        let probe = format!("stasis-probe-{}", std::process::id());
        run("ip", &["netns", "add", &probe], None)
            .map_err(|e| Error::Unavailable(format!("cannot create a network namespace: {e}")))?;
        let _ = run("ip", &["netns", "del", &probe], None);
        in_up(&cfg.uplink_netns, "nft", &["list", "tables"], None)
            .map_err(|e| Error::Unavailable(format!("cannot use nftables: {e}")))?;
        let slots = 1usize << (29 - cfg.cidr.prefix);
        Ok(Network {
            cfg,
            used: Mutex::new(vec![false; slots]),
            table: Mutex::new(()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The slot with this index.
    pub fn slot(&self, index: u32) -> Result<Slot> {
        let n = 1u64 << (29 - self.cfg.cidr.prefix);
        if u64::from(index) >= n {
            return Err(Error::BadSlot {
                slot: index,
                cidr: self.cfg.cidr,
            });
        }
        Ok(Slot {
            index,
            base: Ipv4Addr::from(u32::from(self.cfg.cidr.addr) + index * 8),
        })
    }

    /// Takes a free slot (slot 0 is never used: its first address is the
    /// network address of the CIDR).
    pub fn allocate(&self) -> Result<Slot> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let i = (1..used.len())
            .find(|&i| !used[i])
            .ok_or(Error::Exhausted(self.cfg.cidr))?;
        used[i] = true;
        drop(used);
        self.slot(i as u32)
    }

    /// Marks a known slot (a stored sandbox's) as taken; false if it already
    /// was or is out of range.
    pub fn reserve(&self, index: u32) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        match used.get_mut(index as usize) {
            Some(u) if !*u && index != 0 => {
                *u = true;
                true
            }
            _ => false,
        }
    }

    /// Returns a slot to the pool.
    pub fn release(&self, index: u32) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = used.get_mut(index as usize) {
            *u = false;
        }
    }

    /// Removes everything a previous server (killed or crashed) left:
    /// sandbox namespaces of this CIDR, `sv*` links in the uplink and the
    /// `inet stasis` table (the next [`Network::setup`] installs a fresh
    /// one, so a server that never sets up a sandbox network leaves the
    /// host's nftables and forwarding alone). Returns how many namespaces
    /// and links were removed.
    pub fn sweep(&self) -> Result<usize> {
        let mut removed = 0;
        for name in stale_netns(&self.cfg.cidr) {
            if run("ip", &["netns", "del", &name], None).is_ok() {
                removed += 1;
            }
        }
        let links = ip_up(&self.cfg.uplink_netns, &["-o", "link", "show"])?;
        for line in links.lines() {
            // "12: sv0a0b0008@if3: <...>"
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if self.owns_link(name) && ip_up(&self.cfg.uplink_netns, &["link", "del", name]).is_ok()
            {
                removed += 1;
            }
        }
        let _ = in_up(
            &self.cfg.uplink_netns,
            "nft",
            &["delete", "table", "inet", TABLE],
            None,
        );
        Ok(removed)
    }

    /// Whether `name` is a host veth (`sv<hex>`) of a slot in this CIDR.
    fn owns_link(&self, name: &str) -> bool {
        name.len() == 10
            && name.starts_with("sv")
            && u32::from_str_radix(&name[2..], 16)
                .is_ok_and(|a| self.cfg.cidr.contains(Ipv4Addr::from(a)))
    }

    fn nft(&self, script: &str) -> Result<()> {
        in_up(&self.cfg.uplink_netns, "nft", &["-f", "-"], Some(script)).map(|_| ())
    }

    fn install_table(&self) -> Result<()> {
        let up = self.cfg.uplink_netns.as_ref().map(|n| netns_path(n));
        sysctl_in(up.as_deref(), "net/ipv4/ip_forward", "1")?;
        let c = self.cfg.cidr;
        let script = format!(
            "add table inet {TABLE}\n\
             add map inet {TABLE} sandboxes {{ type ifname : verdict; }}\n\
             add chain inet {TABLE} forward {{ type filter hook forward priority 0; policy accept; }}\n\
             add rule inet {TABLE} forward iifname \"sv*\" ip daddr {c} drop\n\
             add rule inet {TABLE} forward iifname \"sv*\" meta nfproto ipv6 drop\n\
             add rule inet {TABLE} forward iifname \"sv*\" iifname vmap @sandboxes\n\
             add rule inet {TABLE} forward iifname \"sv*\" drop\n\
             add rule inet {TABLE} forward oifname \"sv*\" ct state established,related accept\n\
             add rule inet {TABLE} forward oifname \"sv*\" drop\n\
             add chain inet {TABLE} input {{ type filter hook input priority 0; policy accept; }}\n\
             add rule inet {TABLE} input iifname \"sv*\" ct state established,related accept\n\
             add rule inet {TABLE} input iifname \"sv*\" drop\n\
             add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             add rule inet {TABLE} postrouting ip saddr {c} oifname != \"sv*\" masquerade\n"
        );
        self.nft(&script)
    }

    /// Creates a sandbox's namespace, guest link, veth pair, routes and
    /// rules. On failure everything made so far is removed again.
    pub fn setup(&self, slot: Slot, link: &GuestLink, rules: &EgressRules) -> Result<SandboxNet> {
        let net = SandboxNet {
            slot,
            netns: netns_path(&slot.netns_name()),
        };
        match self.setup_inner(&net, link, rules) {
            Ok(()) => Ok(net),
            Err(e) => {
                self.teardown(&net);
                Err(e)
            }
        }
    }

    fn setup_inner(&self, net: &SandboxNet, link: &GuestLink, rules: &EgressRules) -> Result<()> {
        let guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let installed = in_up(
            &self.cfg.uplink_netns,
            "nft",
            &["list", "table", "inet", TABLE],
            None,
        )
        .is_ok();
        if !installed {
            self.install_table()?;
        }
        drop(guard);
        let s = net.slot;
        let ns = s.netns_name();
        let hv = s.host_veth();
        let p30 = |a: Ipv4Addr| format!("{a}/30");
        run("ip", &["netns", "add", &ns], None)?;
        ip_ns(&ns, &["link", "set", "lo", "up"])?;
        sysctl_in(Some(&net.netns), "net/ipv4/ip_forward", "1")?;
        // veth: created inside the sandbox namespace, host end moved out.
        ip_ns(
            &ns,
            &["link", "add", "eth0", "type", "veth", "peer", "name", &hv],
        )?;
        match &self.cfg.uplink_netns {
            None => ip_ns(&ns, &["link", "set", &hv, "netns", "1"])?,
            Some(p) => ip_ns(&ns, &["link", "set", &hv, "netns", p])?,
        };
        ip_ns(&ns, &["addr", "add", &p30(s.ns_veth_addr()), "dev", "eth0"])?;
        ip_ns(&ns, &["link", "set", "eth0", "up"])?;
        ip_ns(
            &ns,
            &[
                "route",
                "add",
                "default",
                "via",
                &s.host_veth_addr().to_string(),
            ],
        )?;
        let up = &self.cfg.uplink_netns;
        ip_up(up, &["addr", "add", &p30(s.host_veth_addr()), "dev", &hv])?;
        ip_up(up, &["link", "set", &hv, "up"])?;
        ip_up(
            up,
            &[
                "route",
                "add",
                &p30(s.base),
                "via",
                &s.ns_veth_addr().to_string(),
                "dev",
                &hv,
            ],
        )?;
        // The guest's link.
        match link {
            GuestLink::Tap => {
                ip_ns(
                    &ns,
                    &["tuntap", "add", "dev", TAP_NAME, "mode", "tap", "vnet_hdr"],
                )?;
                let mac = s
                    .gateway_mac()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
                ip_ns(&ns, &["link", "set", TAP_NAME, "address", &mac])?;
                ip_ns(&ns, &["addr", "add", &p30(s.gateway()), "dev", TAP_NAME])?;
                ip_ns(&ns, &["link", "set", TAP_NAME, "up"])?;
            }
            GuestLink::Veth { guest_netns } => {
                ip_ns(
                    &ns,
                    &["link", "add", "gw0", "type", "veth", "peer", "name", "geth"],
                )?;
                ip_ns(&ns, &["link", "set", "geth", "netns", guest_netns])?;
                ip_ns(&ns, &["addr", "add", &p30(s.gateway()), "dev", "gw0"])?;
                ip_ns(&ns, &["link", "set", "gw0", "up"])?;
                let g = Some(guest_netns.clone());
                ip_up(&g, &["link", "set", "geth", "name", "eth0"])?;
                ip_up(&g, &["addr", "add", &p30(s.guest()), "dev", "eth0"])?;
                ip_up(&g, &["link", "set", "eth0", "up"])?;
                ip_up(&g, &["link", "set", "lo", "up"])?;
                ip_up(
                    &g,
                    &["route", "add", "default", "via", &s.gateway().to_string()],
                )?;
            }
        }
        self.apply_rules_inner(s, rules, true)
    }

    /// Replaces a running sandbox's egress rules (one nft transaction).
    pub fn apply_rules(&self, slot: Slot, rules: &EgressRules) -> Result<()> {
        self.apply_rules_inner(slot, rules, false)
    }

    fn apply_rules_inner(&self, slot: Slot, rules: &EgressRules, create: bool) -> Result<()> {
        let allow = resolve_entries(&rules.allow_out)?;
        let deny = resolve_entries(&rules.deny_out)?;
        let h = slot.hex();
        let hv = slot.host_veth();
        let mut s = String::new();
        let set_decl = "{ type ipv4_addr; flags interval; auto-merge; }";
        if create {
            s += &format!("add set inet {TABLE} a_{h} {set_decl}\n");
            s += &format!("add set inet {TABLE} d_{h} {set_decl}\n");
            s += &format!("add chain inet {TABLE} s_{h}\n");
            s += &format!("add element inet {TABLE} sandboxes {{ \"{hv}\" : jump s_{h} }}\n");
        }
        s += &format!("flush chain inet {TABLE} s_{h}\n");
        s += &format!("flush set inet {TABLE} a_{h}\n");
        s += &format!("flush set inet {TABLE} d_{h}\n");
        let elems = |v: &[Cidr]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !allow.is_empty() {
            s += &format!("add element inet {TABLE} a_{h} {{ {} }}\n", elems(&allow));
        }
        if !deny.is_empty() {
            s += &format!("add element inet {TABLE} d_{h} {{ {} }}\n", elems(&deny));
        }
        s += &format!("add rule inet {TABLE} s_{h} ip daddr @a_{h} accept\n");
        s += &format!("add rule inet {TABLE} s_{h} ip daddr @d_{h} drop\n");
        let last = if rules.allow_internet {
            "accept"
        } else {
            "drop"
        };
        s += &format!("add rule inet {TABLE} s_{h} {last}\n");
        self.nft(&s)
    }

    /// Removes a sandbox's namespace (tap, veths, routes) and its rules.
    /// Idempotent; errors are ignored (a sweep at the next start catches
    /// what remains).
    pub fn teardown(&self, net: &SandboxNet) {
        let ns = net.slot.netns_name();
        let _ = run("ip", &["netns", "del", &ns], None);
        // The host veth goes with its peer; delete it explicitly in case the
        // namespace was already gone.
        let _ = ip_up(
            &self.cfg.uplink_netns,
            &["link", "del", &net.slot.host_veth()],
        );
        let h = net.slot.hex();
        let hv = net.slot.host_veth();
        // Separate transactions: one missing piece must not keep the others.
        let _ = self.nft(&format!(
            "delete element inet {TABLE} sandboxes {{ \"{hv}\" }}\n"
        ));
        let _ = self.nft(&format!("delete chain inet {TABLE} s_{h}\n"));
        let _ = self.nft(&format!("delete set inet {TABLE} a_{h}\n"));
        let _ = self.nft(&format!("delete set inet {TABLE} d_{h}\n"));
    }

    /// The rules currently installed for a slot, as `nft` prints them (for
    /// diagnostics and tests).
    pub fn describe(&self, slot: Slot) -> Result<String> {
        let h = slot.hex();
        let mut out = in_up(
            &self.cfg.uplink_netns,
            "nft",
            &["list", "chain", "inet", TABLE, &format!("s_{h}")],
            None,
        )?;
        for set in ["a", "d"] {
            out += &in_up(
                &self.cfg.uplink_netns,
                "nft",
                &["list", "set", "inet", TABLE, &format!("{set}_{h}")],
                None,
            )?;
        }
        Ok(out)
    }

    /// Names of everything this server's CIDR has on the host right now:
    /// sandbox namespaces, `sv*` links in the uplink, and per-sandbox nft
    /// objects. Empty when nothing leaked.
    pub fn leftovers(&self) -> Vec<String> {
        let mut v = stale_netns(&self.cfg.cidr);
        if let Ok(links) = ip_up(&self.cfg.uplink_netns, &["-o", "link", "show"]) {
            for line in links.lines() {
                if let Some(name) = line.split(": ").nth(1) {
                    let name = name.split('@').next().unwrap_or(name);
                    if self.owns_link(name) {
                        v.push(format!("link {name}"));
                    }
                }
            }
        }
        if let Ok(t) = in_up(
            &self.cfg.uplink_netns,
            "nft",
            &["list", "table", "inet", TABLE],
            None,
        ) {
            for line in t.lines() {
                let l = line.trim();
                if l.starts_with("chain s_") || l.starts_with("set a_") || l.starts_with("set d_") {
                    v.push(format!("nft {l}"));
                }
                if l.contains("\"sv") && l.contains("jump") {
                    v.push(format!("nft map entry {l}"));
                }
            }
        }
        v
    }
}

/// Namespaces named `stasis-<hex>` whose address is inside `cidr`.
fn stale_netns(cidr: &Cidr) -> Vec<String> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return v;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_prefix("stasis-") else {
            continue;
        };
        if hex.len() != 8 {
            continue;
        }
        if let Ok(a) = u32::from_str_radix(hex, 16) {
            if cidr.contains(Ipv4Addr::from(a)) {
                v.push(name);
            }
        }
    }
    v
}

/// One sandbox's network on the host.
#[derive(Debug, Clone)]
pub struct SandboxNet {
    /// Its addresses.
    pub slot: Slot,
    /// Path of its namespace (`/run/netns/stasis-<hex>`): the worker opens
    /// the tap inside it (or is started inside it).
    pub netns: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse() {
        assert_eq!(
            Cidr::parse("10.11.0.0/16"),
            Some(Cidr {
                addr: Ipv4Addr::new(10, 11, 0, 0),
                prefix: 16
            })
        );
        assert_eq!(Cidr::parse("1.2.3.4").map(|c| c.prefix), Some(32));
        assert_eq!(Cidr::parse("0.0.0.0/0").map(|c| c.prefix), Some(0));
        for bad in [
            "10.11.0.1/16",
            "10.11.0.0/33",
            "10.11.0.0/",
            "10.11.0/16",
            "x/8",
            "1.2.3.4/+8",
            "::1/128",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
        let c = Cidr::parse("10.11.0.0/16").unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 11, 255, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 12, 0, 1)));
    }

    #[test]
    fn entries() {
        assert_eq!(
            parse_entry("8.8.8.0/24").unwrap(),
            Entry::Net(Cidr::parse("8.8.8.0/24").unwrap())
        );
        assert_eq!(
            parse_entry("Files.Example.test.").unwrap(),
            Entry::Host("files.example.test".into())
        );
        for bad in [
            "",
            "8.8.8.8/40",
            "1.2.3",
            "a..b",
            "-a.com",
            "a b",
            "::1",
            "1.2.3.4/24",
            "x/y",
        ] {
            match parse_entry(bad) {
                Err(Error::BadEntry(e)) => assert_eq!(e, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let r = EgressRules {
            allow_internet: true,
            allow_out: vec!["1.1.1.1".into()],
            deny_out: vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
        };
        assert!(matches!(r.validate(), Err(Error::BadEntry(e)) if e == "10.0.0.0/33"));
        assert_eq!(
            resolve_entries(&["localhost".into(), "1.2.3.0/24".into()]).unwrap(),
            vec![
                Cidr::parse("127.0.0.1").unwrap(),
                Cidr::parse("1.2.3.0/24").unwrap()
            ]
        );
    }

    #[test]
    fn slot_addresses() {
        let s = Slot {
            index: 1,
            base: Ipv4Addr::new(10, 11, 0, 8),
        };
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 11, 0, 9));
        assert_eq!(s.guest(), Ipv4Addr::new(10, 11, 0, 10));
        assert_eq!(s.host_veth_addr(), Ipv4Addr::new(10, 11, 0, 13));
        assert_eq!(s.ns_veth_addr(), Ipv4Addr::new(10, 11, 0, 14));
        assert_eq!(s.netns_name(), "stasis-0a0b0008");
        assert_eq!(s.guest_mac(), [0x06, 0x5a, 10, 11, 0, 10]);
        assert_eq!(s.gateway_mac(), [0x06, 0x5a, 10, 11, 0, 9]);
        assert_eq!(s.host_veth(), "sv0a0b0008");
        assert_eq!(
            s.kernel_ip_arg(Some(Ipv4Addr::new(10, 0, 0, 2))),
            "ip=10.11.0.10::10.11.0.9:255.255.255.252::eth0:off:10.0.0.2"
        );
    }
}
