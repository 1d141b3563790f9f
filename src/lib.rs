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
