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
pub mod jail;
pub mod net;
pub mod pool;
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

/// Compares two secrets (API keys, envd tokens, signatures) in time that
/// depends only on their lengths, not on where they first differ.
pub fn ct_eq(a: impl AsRef<[u8]>, b: impl AsRef<[u8]>) -> bool {
    let (a, b) = (a.as_ref(), b.as_ref());
    let mut diff = a.len() ^ b.len();
    for (x, y) in a.iter().zip(b) {
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn ct_eq_compares_secrets() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq("key-0123456789", "key-0123456789"));
        assert!(!ct_eq(b"key-0123456789", b"key-0123456788"));
        assert!(!ct_eq(b"xey-0123456789", b"key-0123456789"));
        assert!(!ct_eq(b"key", b"key-0123456789"));
        assert!(!ct_eq(b"key-0123456789", b"key"));
        assert!(!ct_eq(b"", b"k"));
    }
}
