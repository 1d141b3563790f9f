//! Host-side sandbox networking (src/net) without a guest.
//!
//! Every test builds its own little world out of network namespaces it
//! makes and removes itself, so no packet ever leaves them:
//!
//! ```text
//!  guest ns (veth "eth0", stands in for the VM)
//!     └─ sandbox ns stasis-<hex> (made by stasis)
//!          └─ uplink ns "<tag>-up"   (stands in for the host: NAT + rules)
//!               └─ fake internet ns "<tag>-inet": HTTP servers on
//!                  203.0.113.1:8080 and 198.51.100.1:8080
//! ```
//!
//! The fake internet has no route back to the sandbox CIDR, so a reply
//! arriving at all proves the masquerade; the server also reports the peer
//! address it saw. Blocked connections are dropped, so a connect attempt
//! fails after a bounded timeout (that is the outcome asserted, never a
//! duration).
#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stasis::net::{Cidr, EgressRules, GuestLink, NetConfig, Network, SandboxNet};

static SEQ: AtomicU32 = AtomicU32::new(0);

const INET_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const INET_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

/// Root, `ip`, `nft` and namespaces: fail loudly unless STASIS_ALLOW_SKIP=1.
fn net_or_skip(test: &str) -> bool {
    let ok = Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        // SAFETY: geteuid has no preconditions.
        && unsafe { libc::geteuid() } == 0;
    if ok {
        return true;
    }
    let msg = format!("{test}: needs root and nftables (apt-get install nftables)");
    if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("\n*** SKIPPED (not passed): {msg} ***\n");
        false
    } else {
        panic!("{msg}; set STASIS_ALLOW_SKIP=1 to skip explicitly");
    }
}

fn sh(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `f` on a thread inside the named namespace.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd, this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// A tiny HTTP server: answers every request with the peer address it saw.
fn serve(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = format!("hello from the fake internet; you are {peer}");
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// The test's world; removes its namespaces when dropped.
struct World {
    tag: String,
    up: String,
    inet: String,
    guests: Vec<String>,
    net: Network,
}

impl World {
    fn new(name: &str) -> World {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("stt{}{}{}", pid % 100000, name, n);
        let up = format!("{tag}-up");
        let inet = format!("{tag}-inet");
        for ns in [&up, &inet] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "-n", &up, "link", "add", "wan0", "type", "veth", "peer", "name", "wanp",
        ]);
        sh(&["ip", "-n", &up, "link", "set", "wanp", "netns", &inet]);
        sh(&[
            "ip",
            "-n",
            &up,
            "addr",
            "add",
            "203.0.113.2/24",
            "dev",
            "wan0",
        ]);
        sh(&["ip", "-n", &up, "link", "set", "wan0", "up"]);
        sh(&[
            "ip",
            "-n",
            &up,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
        ]);
        sh(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            "203.0.113.1/24",
            "dev",
            "wanp",
        ]);
        sh(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            "198.51.100.1/32",
            "dev",
            "lo",
        ]);
        sh(&["ip", "-n", &inet, "link", "set", "wanp", "up"]);
        for a in [INET_A, INET_B] {
            let l = in_ns(&inet, move || TcpListener::bind((a, 8080)).unwrap());
            serve(l);
        }
        // A private /24 per test and process, so parallel runs never share
        // a sandbox namespace name.
        let cidr: Cidr = format!(
            "10.{}.{}.0/24",
            200 + pid % 50,
            (pid / 50 * 7 + n * 13) % 256
        )
        .parse()
        .unwrap();
        eprintln!("{tag}: sandbox CIDR {cidr}");
        // The fake internet knows a way back to the sandboxes (so the test
        // can check that unsolicited connections to a guest are refused).
        sh(&[
            "ip",
            "-n",
            &inet,
            "route",
            "add",
            &cidr.to_string(),
            "via",
            "203.0.113.2",
        ]);
        let net = Network::new(NetConfig {
            cidr,
            uplink_netns: Some(up.clone()),
            dns: None,
        })
        .unwrap();
        net.sweep().unwrap();
        World {
            tag,
            up,
            inet,
            guests: Vec::new(),
            net,
        }
    }

    /// A sandbox with a veth standing in for its VM.
    fn sandbox(&mut self, rules: &EgressRules) -> (SandboxNet, String) {
        let g = format!("{}-g{}", self.tag, self.guests.len());
        sh(&["ip", "netns", "add", &g]);
        self.guests.push(g.clone());
        let slot = self.net.allocate().unwrap();
        let t = std::time::Instant::now();
        let sb = self
            .net
            .setup(
                slot,
                &GuestLink::Veth {
                    guest_netns: g.clone(),
                },
                rules,
            )
            .unwrap();
        eprintln!(
            "MEASURE: network setup of {} took {:.1} ms",
            slot.netns_name(),
            t.elapsed().as_secs_f64() * 1e3
        );
        (sb, g)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Sandbox namespaces of this CIDR too (a failed test left them).
        let _ = self.net.sweep();
        for ns in self.guests.iter().chain([&self.up, &self.inet]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// GET / from inside `ns`; the body, or None when the connection failed.
fn get(ns: &str, to: Ipv4Addr, port: u16) -> Option<String> {
    in_ns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_millis(1500))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: files.example.test\r\n\r\n")
            .ok()?;
        let mut v = String::new();
        s.read_to_string(&mut v).ok()?;
        v.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    })
}

fn rules(internet: bool, allow: &[&str], deny: &[&str]) -> EgressRules {
    EgressRules {
        allow_internet: internet,
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn nat_reaches_the_fake_internet_and_hides_the_guest_address() {
    if !net_or_skip("nat") {
        return;
    }
    let mut w = World::new("nat");
    let (sb, g) = w.sandbox(&EgressRules::open());
    let body = get(&g, INET_A, 8080).expect("guest reaches the fake internet");
    assert!(
        body.ends_with(&format!("you are {UPLINK_ADDR}")),
        "the server must see the uplink's address (NAT), not {}: {body}",
        sb.slot.guest()
    );
    assert!(get(&g, INET_B, 8080).is_some());
    let t = std::time::Instant::now();
    for _ in 0..20 {
        assert!(get(&g, INET_A, 8080).is_some());
    }
    eprintln!(
        "MEASURE: HTTP request through NAT (connect+GET+close), mean of 20: {:.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / 20.0
    );
    let t = std::time::Instant::now();
    w.net.teardown(&sb);
    eprintln!(
        "MEASURE: network teardown took {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

#[test]
fn allow_internet_access_false_blocks_egress_but_allow_out_wins() {
    if !net_or_skip("no-internet") {
        return;
    }
    let mut w = World::new("noi");
    let (sb, g) = w.sandbox(&rules(false, &[], &[]));
    assert_eq!(get(&g, INET_A, 8080), None, "no egress at all");
    assert_eq!(get(&g, INET_B, 8080), None);
    // allowOut takes precedence (as the SDK documents).
    w.net
        .apply_rules(sb.slot, &rules(false, &["198.51.100.0/24"], &[]))
        .unwrap();
    assert!(get(&g, INET_B, 8080).is_some(), "allowOut passes");
    assert_eq!(get(&g, INET_A, 8080), None, "everything else still blocked");
    w.net.teardown(&sb);
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

#[test]
fn deny_out_blocks_one_cidr_and_runtime_updates_apply() {
    if !net_or_skip("deny") {
        return;
    }
    let mut w = World::new("deny");
    let (sb, g) = w.sandbox(&rules(true, &[], &["203.0.113.0/24"]));
    assert_eq!(get(&g, INET_A, 8080), None, "denied CIDR");
    assert!(get(&g, INET_B, 8080).is_some(), "other CIDR passes");
    // Runtime update: swap which one is denied.
    w.net
        .apply_rules(sb.slot, &rules(true, &[], &["198.51.100.1"]))
        .unwrap();
    assert!(get(&g, INET_A, 8080).is_some(), "no longer denied");
    assert_eq!(get(&g, INET_B, 8080), None, "newly denied");
    // Deny everything but allow one address.
    w.net
        .apply_rules(sb.slot, &rules(true, &["203.0.113.1"], &["0.0.0.0/0"]))
        .unwrap();
    assert!(get(&g, INET_A, 8080).is_some());
    assert_eq!(get(&g, INET_B, 8080), None);
    let d = w.net.describe(sb.slot).unwrap();
    assert!(d.contains("203.0.113.1"), "{d}");
    // Host names are resolved at apply time; a bad one is an error and
    // leaves the rules as they were.
    let e = w
        .net
        .apply_rules(sb.slot, &rules(true, &[], &["no-such-host.invalid"]))
        .unwrap_err();
    assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
    assert!(get(&g, INET_A, 8080).is_some());
    w.net.teardown(&sb);
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

#[test]
fn sandboxes_cannot_reach_each_other_or_the_host() {
    if !net_or_skip("isolation") {
        return;
    }
    let mut w = World::new("iso");
    let (a, ga) = w.sandbox(&EgressRules::open());
    let (b, gb) = w.sandbox(&EgressRules::open());
    assert_ne!(a.slot.guest(), b.slot.guest());
    let la = in_ns(&ga, || TcpListener::bind("0.0.0.0:8080").unwrap());
    serve(la);
    // A server on the uplink (the host) itself.
    let lu = in_ns(&w.up, || TcpListener::bind("0.0.0.0:8081").unwrap());
    serve(lu);
    assert!(
        get(&ga, a.slot.guest(), 8080).is_some(),
        "the guest reaches itself"
    );
    assert_eq!(get(&gb, a.slot.guest(), 8080), None, "b cannot reach a");
    assert_eq!(get(&gb, a.slot.gateway(), 8080), None);
    assert_eq!(get(&gb, UPLINK_ADDR, 8081), None, "b cannot reach the host");
    assert_eq!(get(&gb, b.slot.host_veth_addr(), 8081), None);
    // Nor can the fake internet open connections to a guest.
    assert_eq!(get(&w.inet.clone(), a.slot.guest(), 8080), None);
    assert!(get(&gb, INET_A, 8080).is_some(), "b still has internet");
    w.net.teardown(&a);
    w.net.teardown(&b);
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

#[test]
fn crash_leftovers_are_swept_at_the_next_start() {
    if !net_or_skip("sweep") {
        return;
    }
    let mut w = World::new("sweep");
    let (a, _) = w.sandbox(&rules(true, &[], &["198.51.100.0/24"]));
    let (_b, _) = w.sandbox(&rules(false, &[], &[]));
    let before = w.net.leftovers();
    assert!(
        before.iter().any(|l| l == &a.slot.netns_name()),
        "{before:?}"
    );
    assert!(before.len() >= 6, "{before:?}");
    // "kill -9": the server goes away without tearing anything down; a new
    // one with the same configuration starts and sweeps.
    let cfg = w.net.config().clone();
    let fresh = Network::new(cfg).unwrap();
    let removed = fresh.sweep().unwrap();
    assert!(removed >= 2, "removed {removed}");
    assert_eq!(fresh.leftovers(), Vec::<String>::new());
    assert!(!std::path::Path::new(&a.netns).exists());
    // And it works afterwards: the same slot is usable again.
    w.net = fresh;
    let g = format!("{}-g{}", w.tag, w.guests.len());
    sh(&["ip", "netns", "add", &g]);
    w.guests.push(g.clone());
    assert!(w.net.reserve(a.slot.index));
    let again = w
        .net
        .setup(
            a.slot,
            &GuestLink::Veth {
                guest_netns: g.clone(),
            },
            &EgressRules::open(),
        )
        .unwrap();
    assert!(get(&g, INET_A, 8080).is_some());
    w.net.teardown(&again);
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

#[test]
fn failed_setup_leaves_nothing_behind() {
    if !net_or_skip("failed-setup") {
        return;
    }
    let w = World::new("fail");
    let slot = w.net.allocate().unwrap();
    // The guest namespace does not exist: setup fails midway (after the
    // sandbox namespace and veths were made) and must undo all of it.
    let e = w
        .net
        .setup(
            slot,
            &GuestLink::Veth {
                guest_netns: format!("{}-missing", w.tag),
            },
            &EgressRules::open(),
        )
        .unwrap_err();
    eprintln!("expected failure: {}", stasis::error_chain(&e));
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
    // A bad rule entry also fails setup cleanly, naming the entry.
    let e = w
        .net
        .setup(slot, &GuestLink::Tap, &rules(true, &[], &["10.0.0.0/33"]))
        .unwrap_err();
    assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

#[test]
fn tap_opens_inside_the_sandbox_namespace() {
    if !net_or_skip("tap") {
        return;
    }
    let w = World::new("tap");
    let slot = w.net.allocate().unwrap();
    let sb = w
        .net
        .setup(slot, &GuestLink::Tap, &EgressRules::open())
        .unwrap();
    let tap = stasis::net::tap::open_in(&sb.netns, stasis::net::TAP_NAME).unwrap();
    // Opening it from this namespace (where no tap0 exists) must not make a
    // new one here.
    assert!(tap.as_raw_fd() >= 0);
    let out = Command::new("ip")
        .args(["-n", &slot.netns_name(), "-o", "link", "show", "tap0"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("tap0"), "{s}");
    // The tap (the guest's gateway) has the slot's MAC, and has it again
    // when made again (as on resume): a restored guest's neighbour entry
    // for its gateway stays right.
    let mac = |slot: &stasis::net::Slot| {
        slot.gateway_mac()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    assert!(s.contains(&format!("link/ether {}", mac(&slot))), "{s}");
    drop(tap);
    w.net.teardown(&sb);
    let sb = w
        .net
        .setup(slot, &GuestLink::Tap, &EgressRules::open())
        .unwrap();
    let out = Command::new("ip")
        .args(["-n", &slot.netns_name(), "-o", "link", "show", "tap0"])
        .output()
        .unwrap();
    let again = String::from_utf8_lossy(&out.stdout);
    assert!(
        again.contains(&format!("link/ether {}", mac(&slot))),
        "{again}"
    );
    w.net.teardown(&sb);
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// The API's side (fake backend, stand-in agent; no namespaces): the SDK's
// controls are validated, stored (across a kill -9), shown, updated at
// runtime and on a paused sandbox, and the proxy enforces the traffic token
// and masks the Host.

mod api_support;

use api_support::{http, Server};
use serde_json::json;

fn standin_server(data: &std::path::Path) -> Server {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/api_support/standin_envd.py"
    );
    std::fs::create_dir_all(data.join("templates")).unwrap();
    std::fs::write(
        data.join("templates/agent.json"),
        r#"{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true}"#,
    )
    .unwrap();
    Server::try_start_env(data, &[], &[("STASIS_ENVD_BIN", path)]).unwrap_or_else(|e| panic!("{e}"))
}

/// A "user process" on a host port (the stand-in agent's forwarder reaches
/// it as 127.0.0.1): answers each request with the Host it saw.
fn host_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = Vec::new();
            let mut b = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
            let text = String::from_utf8_lossy(&buf).to_string();
            let host = text
                .lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_default();
            let body = format!("host={host}");
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn api_network_controls_are_validated_stored_updated_and_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = standin_server(&data);

    // Bad entries: 400 naming the entry.
    for (body, bad) in [
        (
            json!({"templateID": "agent", "network": {"denyOut": ["10.0.0.0/33"]}}),
            "10.0.0.0/33",
        ),
        (
            json!({"templateID": "agent", "network": {"allowOut": ["1.2.3.4", "bad host"]}}),
            "bad host",
        ),
        (
            json!({"templateID": "agent", "network": {"maskRequestHost": "a/b"}}),
            "a/b",
        ),
    ] {
        let r = s.post("/sandboxes", body);
        r.assert_error(400);
        assert!(r.body.contains(bad), "{}", r.body);
    }

    let r = s.post(
        "/sandboxes",
        json!({
            "templateID": "agent",
            "allowInternetAccess": false,
            "network": {
                "allowOut": ["1.1.1.1"],
                "denyOut": ["8.8.8.0/24"],
                "allowPublicTraffic": false,
                "maskRequestHost": "${PORT}-masked.example.test"
            }
        }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let token = created["trafficAccessToken"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32);
    let d = s.info(&id).json();
    assert_eq!(d["allowInternetAccess"], false);
    assert_eq!(d["network"]["allowOut"], json!(["1.1.1.1"]));
    assert_eq!(d["network"]["denyOut"], json!(["8.8.8.0/24"]));
    assert_eq!(d["network"]["allowPublicTraffic"], false);
    assert_eq!(
        d["network"]["maskRequestHost"],
        "${PORT}-masked.example.test"
    );

    // The proxy: a user port needs the token; the sandbox sees the mask.
    let port = host_echo();
    let host = format!("{port}-{id}.example.test");
    let r = http(s.addr, "GET", "/", &[("Host", &host)], None);
    r.assert_error(403);
    let r = http(
        s.addr,
        "GET",
        "/",
        &[("Host", &host), ("E2B-Traffic-Access-Token", "wrong")],
        None,
    );
    r.assert_error(403);
    let r = http(
        s.addr,
        "GET",
        "/",
        &[("Host", &host), ("E2B-Traffic-Access-Token", &token)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, format!("host={port}-masked.example.test"));

    // Runtime update: a bad entry changes nothing; a good one is shown.
    let put = |s: &Server, id: &str, body: serde_json::Value| {
        s.req("PUT", &format!("/sandboxes/{id}/network"), Some(body))
    };
    let r = put(&s, &id, json!({"denyOut": ["9.9.9.9", "300.1.1.1"]}));
    r.assert_error(400);
    assert!(r.body.contains("300.1.1.1"), "{}", r.body);
    assert_eq!(put(&s, &id, json!({"denyOut": ["9.9.9.9"]})).status, 204);
    let d = s.info(&id).json();
    assert_eq!(d["network"]["denyOut"], json!(["9.9.9.9"]));
    assert_eq!(d["network"]["allowOut"], json!(["1.1.1.1"]), "kept");
    put(&s, "nosuchsandbox", json!({})).assert_error(404);

    // Paused: stored, shown, and still there after resume.
    assert_eq!(
        s.post(&format!("/sandboxes/{id}/pause"), json!({})).status,
        204
    );
    assert_eq!(
        put(&s, &id, json!({"allowOut": ["10.1.0.0/16"]})).status,
        204
    );
    assert_eq!(
        s.info(&id).json()["network"]["allowOut"],
        json!(["10.1.0.0/16"])
    );
    // kill -9: the settings survive a restart with the paused sandbox.
    s.kill9();
    let s = standin_server(&data);
    let r = s.post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}));
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    assert_eq!(r.json()["trafficAccessToken"], token.as_str());
    let d = s.info(&id).json();
    assert_eq!(d["network"]["allowOut"], json!(["10.1.0.0/16"]));
    assert_eq!(d["network"]["denyOut"], json!(["9.9.9.9"]));
    let r = http(
        s.addr,
        "GET",
        "/",
        &[("Host", &host), ("e2b-traffic-access-token", &token)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        s.req("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
}

/// `stasis serve` with the real VMM needs `ip`, `nft` and namespaces: a host
/// without nftables gets a clear error at start naming it, and
/// `--no-network` starts anyway.
#[test]
fn serve_refuses_to_start_without_nftables_unless_no_network() {
    let tmp = tempfile::tempdir().unwrap();
    // A PATH with every tool but nft.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["ip", "nsenter", "sh"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found"));
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }
    let path = bin.to_str().unwrap();
    let data = tmp.path().join("data");
    let e = match Server::try_start_env(&data, &["--backend", "vm"], &[("PATH", path)]) {
        Ok(_) => panic!("serve started without nft"),
        Err(e) => e,
    };
    assert!(e.contains("`nft` not found"), "{e}");
    assert!(e.contains("nftables"), "{e}");
    assert!(e.contains("--no-network"), "{e}");
    let s = Server::try_start_env(
        &data,
        &["--backend", "vm", "--no-network"],
        &[("PATH", path)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.get("/health").status, 200);
}

/// The same controls through the real novita-sandbox SDK
/// (`tests/sdk/test_network.py`, via `tests/sdk/run.sh`, fake backend).
#[test]
fn sdk_network_controls() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("test_network.py")
        .env("STASIS_BIN", env!("CARGO_BIN_EXE_stasis"))
        .env("STASIS_BACKEND", "fake")
        .output()
        .expect("run tests/sdk/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "SDK network test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(!stdout.contains(" skipped"), "{stdout}");
}

/// The virtio-net device through a real VM (the built-in test guest, which
/// does not drive it): boot with the device on a sandbox's tap, pause to a
/// snapshot that records it, tear the namespace down, set it up again (same
/// slot) and restore onto the new tap; the workload finishes with the
/// model's checksum. A snapshot with the device and no namespace is a clear
/// error.
#[test]
fn vm_with_a_network_device_snapshots_and_restores_onto_a_new_tap() {
    use stasis::guest::{self, Workload};
    use stasis::vmm::virtio::DeviceKind;
    use stasis::vmm::{Console, Kernel, NetAttach, RestoreMode, RestorePaths, Vm, VmConfig};
    if !net_or_skip("vm-net") {
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        let msg = "vm_with_a_network_device...: /dev/kvm is not usable";
        if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("\n*** SKIPPED (not passed): {msg} ***\n");
            return;
        }
        panic!("{msg}; set STASIS_ALLOW_SKIP=1 to skip explicitly");
    }
    let w = World::new("vm");
    let slot = w.net.allocate().unwrap();
    let sb = w
        .net
        .setup(slot, &GuestLink::Tap, &EgressRules::open())
        .unwrap();
    // Long enough that the guest is still running when the test pauses it
    // at round 2 (200 rounds could end first on an idle machine).
    let work = Workload {
        mib: 8,
        rounds: 2000,
        seed: 11,
        report: 0,
        base_mib: 16,
    };
    let attach = NetAttach {
        netns: sb.netns.clone(),
        mac: slot.guest_mac(),
    };
    let mut vm = Vm::boot_with_net(
        VmConfig {
            kernel: Kernel::TestGuest,
            cmdline: work.cmdline(),
            mem_bytes: 64 << 20,
            console: Console::Sink,
            ..VmConfig::default()
        },
        Some(&attach),
    )
    .expect("boot with a network device");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !(vm.exited().is_some() || vm.guest_status().is_some_and(|s| s.round >= 2)) {
        assert!(std::time::Instant::now() < deadline, "no guest progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(vm.exited().is_none(), "{:?}", vm.exited());
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    vm.pause().unwrap();
    vm.snapshot(&snap).unwrap();
    drop(vm);
    let st: stasis::vmm::VmState = stasis::snapshot::SnapshotDir::open(&snap)
        .unwrap()
        .load_state()
        .unwrap();
    assert!(
        st.virtio.devices.iter().any(|d| d.kind
            == DeviceKind::Net {
                mac: slot.guest_mac()
            }),
        "{:?}",
        st.virtio.devices
    );
    // "A fresh process": the namespace goes and comes back.
    w.net.teardown(&sb);
    let e = Vm::restore_with(
        &snap,
        RestoreMode::Eager,
        Console::Sink,
        None,
        RestorePaths::default(),
    )
    .err()
    .expect("a network device needs a tap");
    assert!(
        stasis::error_chain(&e).contains("a tap must be given"),
        "{}",
        stasis::error_chain(&e)
    );
    let sb = w
        .net
        .setup(slot, &GuestLink::Tap, &EgressRules::open())
        .unwrap();
    let (vm, _) = Vm::restore_with(
        &snap,
        RestoreMode::Lazy,
        Console::Sink,
        None,
        RestorePaths {
            netns: Some(&sb.netns),
            ..Default::default()
        },
    )
    .expect("restore onto the new tap");
    let r = vm.wait(Some(Duration::from_secs(300))).expect("guest ends");
    assert!(r.is_clean(), "{r}");
    assert_eq!(
        vm.guest_status().unwrap().checksum,
        guest::reference(&work).checksum
    );
    drop(vm);
    w.net.teardown(&sb);
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
}

/// Through `stasis serve` with the real VMM and networking (its uplink in
/// the test's namespace): a create that fails after the sandbox's network
/// was made (its "agent" template runs the test guest, which never
/// answers) leaves nothing behind; a server killed with `kill -9` while a
/// sandbox's network exists leaves it, and the next start sweeps it.
#[test]
fn serve_cleans_up_failed_creates_and_after_kill9() {
    if !net_or_skip("serve-net") || !std::path::Path::new("/dev/kvm").exists() {
        if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
            return;
        }
        panic!("serve_cleans_up_failed_creates_and_after_kill9 needs /dev/kvm");
    }
    let w = World::new("srv");
    let cidr = w.net.config().cidr.to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("templates")).unwrap();
    std::fs::write(
        data.join("templates/agentvm.json"),
        r#"{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true}"#,
    )
    .unwrap();
    let args = |timeout: &'static str| {
        vec![
            "--backend".to_string(),
            "vm".into(),
            "--sandbox-cidr".into(),
            cidr.clone(),
            "--sandbox-uplink-netns".into(),
            w.up.clone(),
            "--agent-timeout".into(),
            timeout.into(),
        ]
    };
    let start = |timeout: &'static str| {
        let a = args(timeout);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        Server::try_start_env(&data, &a, &[]).unwrap_or_else(|e| panic!("{e}"))
    };
    let s = start("1");
    let r = s.post("/sandboxes", json!({"templateID": "agentvm"}));
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("agent never answered"), "{}", r.body);
    assert!(
        s.log().contains("sandbox network set up"),
        "the network was made: {}",
        s.log()
    );
    assert_eq!(w.net.leftovers(), Vec::<String>::new());
    drop(s);

    // kill -9 while a sandbox's network exists.
    let mut s = start("120");
    let addr = s.addr;
    std::thread::spawn(move || {
        // Ends with an error when the server is killed.
        let _ = std::panic::catch_unwind(|| {
            http(
                addr,
                "POST",
                "/sandboxes",
                &[("Content-Type", "application/json")],
                Some(r#"{"templateID": "agentvm"}"#),
            )
        });
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while w.net.leftovers().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no sandbox network appeared: {}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill9();
    let left = w.net.leftovers();
    assert!(!left.is_empty());
    eprintln!("left by kill -9: {left:?}");
    let s = start("1");
    assert_eq!(w.net.leftovers(), Vec::<String>::new(), "{}", s.log());
}
