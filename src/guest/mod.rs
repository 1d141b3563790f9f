//! The built-in test guest: its embedded ELF image, the command line that
//! selects its workload, the layout of its status page, and an independent
//! Rust model of the workload that computes the expected results.
//!
//! The guest's source is `src/guest/testguest.S` (built by `build.rs`); its
//! header comment defines the workload that [`reference`] re-implements.

use std::fmt;

/// The ELF image of the test guest, embedded in the binary.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// Guest-physical address of the status page the guest updates every round.
pub const STATUS_ADDR: u64 = 0x5000;
/// Magic the guest writes at the start of the status page ("STSTATUS").
pub const STATUS_MAGIC: u64 = 0x5355_5441_5453_5453;
/// Port the guest writes its exit code to.
pub const EXIT_PORT: u16 = 0xf4;

const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// What the test guest does: fill `mib` MiB with a seeded PRNG, run
/// `rounds` mutate-and-hash rounds over it (0 = forever), hash it all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// MiB of guest memory to fill and mutate.
    pub mib: u64,
    /// Rounds to run; 0 runs forever.
    pub rounds: u64,
    /// PRNG seed for the fill.
    pub seed: u64,
    /// Print progress every `report` rounds (0: never).
    pub report: u64,
    /// MiB of guest-physical address where the work memory starts.
    pub base_mib: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            mib: 16,
            rounds: 4,
            seed: 1,
            report: 1,
            base_mib: 16,
        }
    }
}

impl Workload {
    /// The kernel command line that selects this workload.
    pub fn cmdline(&self) -> String {
        format!(
            "stasis.mib={} stasis.rounds={} stasis.seed={} stasis.report={} stasis.base={}",
            self.mib, self.rounds, self.seed, self.report, self.base_mib
        )
    }

    /// Guest memory this workload needs when its work area lies below the
    /// MMIO gap.
    pub fn min_mem_bytes(&self) -> u64 {
        (self.base_mib + self.mib) << 20
    }
}

/// Phase of the guest's workload, as recorded on its status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading its command line.
    Parsing,
    /// Filling memory.
    Fill,
    /// Running rounds.
    Rounds,
    /// Hashing all memory for the checksum.
    FinalHash,
    /// Finished; `checksum` is valid.
    Done,
    /// A value the guest never writes.
    Unknown(u64),
}

/// The test guest's status page, read from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatus {
    /// Rounds completed.
    pub round: u64,
    /// Running hash after `round` rounds.
    pub acc: u64,
    /// Final checksum, valid once `phase` is `Done`.
    pub checksum: u64,
    /// What the guest is doing.
    pub phase: Phase,
}

impl GuestStatus {
    /// Decodes the first 40 bytes of the status page; `None` if the guest
    /// has not written its magic yet.
    pub fn parse(page: &[u8]) -> Option<GuestStatus> {
        let q = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                page.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        if q(0)? != STATUS_MAGIC {
            return None;
        }
        let phase = match q(4)? {
            1 => Phase::Parsing,
            2 => Phase::Fill,
            3 => Phase::Rounds,
            4 => Phase::FinalHash,
            5 => Phase::Done,
            n => Phase::Unknown(n),
        };
        Some(GuestStatus {
            round: q(1)?,
            acc: q(2)?,
            checksum: q(3)?,
            phase,
        })
    }
}

/// Expected results of a finite workload, computed in Rust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// `acc` after each round (index 0 = after round 1).
    pub acc_per_round: Vec<u64>,
    /// The final checksum.
    pub checksum: u64,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "checksum={:016x}", self.checksum)
    }
}

/// Computes what the guest must report for `w` (with `w.rounds > 0`),
/// independently of the guest's code: a plain model of the workload.
pub fn reference(w: &Workload) -> Expected {
    let qwords = (w.mib as usize) << 17;
    let mut mem = vec![0u64; qwords];
    let mut x = w.seed | 1;
    for q in mem.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *q = x;
    }
    let pages = qwords / 512;
    let mut acc = FNV_BASIS;
    let mut acc_per_round = Vec::with_capacity(w.rounds as usize);
    for r in 1..=w.rounds {
        for p in 0..pages {
            let j = p * 512 + ((r.wrapping_mul(7) as usize).wrapping_add(p) & 511);
            let v = mem[j].wrapping_mul(GOLDEN).wrapping_add(r);
            mem[j] = v;
            acc = (acc ^ v).wrapping_mul(FNV_PRIME);
        }
        acc_per_round.push(acc);
    }
    let mut h = acc;
    for q in &mem {
        h = (h ^ q).wrapping_mul(FNV_PRIME);
    }
    Expected {
        acc_per_round,
        checksum: h,
    }
}

/// Finds the `checksum=<hex>` line in the guest's console output.
pub fn parse_checksum(console: &str) -> Option<u64> {
    console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("checksum="))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_an_elf() {
        assert_eq!(&IMAGE[..4], b"\x7fELF");
    }

    #[test]
    fn reference_depends_on_every_parameter() {
        let w = Workload {
            mib: 1,
            rounds: 3,
            seed: 7,
            report: 0,
            base_mib: 16,
        };
        let base = reference(&w);
        assert_eq!(base.acc_per_round.len(), 3);
        assert_ne!(base, reference(&Workload { seed: 8, ..w }));
        assert_ne!(base, reference(&Workload { rounds: 2, ..w }));
        assert_ne!(base, reference(&Workload { mib: 2, ..w }));
        assert_eq!(base, reference(&w));
    }

    #[test]
    fn status_page_parses() {
        let mut page = vec![0u8; 4096];
        assert_eq!(GuestStatus::parse(&page), None);
        for (i, v) in [STATUS_MAGIC, 9, 0xabc, 0, 3].iter().enumerate() {
            page[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let s = GuestStatus::parse(&page).unwrap();
        assert_eq!((s.round, s.acc, s.phase), (9, 0xabc, Phase::Rounds));
        assert_eq!(GuestStatus::parse(&page[..16]), None);
    }

    #[test]
    fn checksum_line_parses() {
        assert_eq!(parse_checksum("x\nchecksum=00000000000000ff\n"), Some(255));
        assert_eq!(parse_checksum("checksum=zz\n"), None);
    }
}
