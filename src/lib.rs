//! stasis: a single-binary sandbox engine on KVM.
//!
//! The library owns everything the binary does: the VMM (`vmm`), the
//! built-in ring-3 test guest (`guest`), snapshots (`snapshot`) and the
//! lifecycle HTTP API (`api`) and the in-guest agent (`envd`, binary
//! `stasis-envd`). The binary in `main.rs` is a thin CLI.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

pub mod api;
pub mod bench;
pub mod envd;
pub mod guest;
pub mod snapshot;
pub mod vmm;
pub mod vsock;
pub mod worker;

/// Renders an error with its sources on one line ("a: b: c"), leaving out a
/// source whose message the line already contains.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
