//! What backs guest memory on the host: 2 MiB hugetlb pages, transparent
//! huge pages, or plain 4 KiB pages, and the `auto` rule that picks one.
//!
//! - **hugetlb**: one `memfd_create(MFD_HUGETLB | MFD_HUGE_2MB)` per RAM
//!   range, mapped `MAP_SHARED`. The kernel reserves the huge pages from
//!   the pool (`/proc/sys/vm/nr_hugepages`) when the mapping is made, so a
//!   pool too small is an `mmap` error at create/resume ([`Error`] via
//!   `memory::Error::HugePoolExhausted`), never a `SIGBUS` when the guest
//!   first touches a page later. The guest size must be a multiple of
//!   2 MiB: new VMs are rounded up ([`round_up`]); a snapshot of another
//!   size cannot be restored on hugetlb (`auto` then picks THP).
//! - **thp**: private anonymous memory with `MADV_HUGEPAGE`; the kernel
//!   backs it with 2 MiB pages where it can (`enabled` = `always` or
//!   `madvise`), with no reservation and no size constraint.
//! - **4k**: private anonymous memory, `MADV_NOHUGEPAGE`.
//!
//! **auto** (the default everywhere): hugetlb if the size is a multiple of
//! 2 MiB and the pool has enough free, unreserved pages
//! (`HugePages_Free - HugePages_Rsvd` in `/proc/meminfo`); else THP if the
//! host enables it; else 4k. Two creates racing for the last pages: the
//! loser's `mmap` fails, and `auto` falls back to THP with a warning, while
//! an explicit `hugetlb` is an error.
//!
//! The snapshot format does not depend on the backing: the memory file
//! holds 4 KiB pages, zero pages are holes whatever the backing, and a
//! snapshot taken on one backing restores on any other.

use std::fmt;
use std::str::FromStr;

/// The huge page size stasis uses.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Sysctl that sizes the hugetlb pool (named in errors).
pub const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Errors of choosing a backing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not one of the known names.
    #[error("unknown memory backing {0:?}: use auto, hugetlb, thp or 4k")]
    Unknown(String),
    /// hugetlb asked for, but the host has no huge page pool.
    #[error("--memory-backing hugetlb: the host has no free 2 MiB huge pages (reserve some: echo N > {NR_HUGEPAGES})")]
    NoPool,
    /// hugetlb asked for, but the pool has too few free pages.
    #[error("--memory-backing hugetlb: the guest needs {needed} free 2 MiB huge pages, the pool has {free} (raise {NR_HUGEPAGES})")]
    PoolTooSmall {
        /// Pages needed.
        needed: u64,
        /// Free, unreserved pages.
        free: u64,
    },
    /// hugetlb asked for a size that is not a multiple of 2 MiB.
    #[error("--memory-backing hugetlb: guest memory of {0} bytes is not a multiple of 2 MiB")]
    Unaligned(u64),
}

/// How guest memory is backed: asked for (`Auto` allowed) or in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBacking {
    /// Pick by the rule in the module doc.
    #[default]
    Auto,
    /// 2 MiB hugetlb pages from the reserved pool.
    Hugetlb,
    /// Anonymous memory with `MADV_HUGEPAGE`.
    Thp,
    /// Anonymous 4 KiB pages.
    #[serde(rename = "4k")]
    Small,
}

impl MemoryBacking {
    /// The name used on the command line, in logs and in the API.
    pub fn name(self) -> &'static str {
        match self {
            MemoryBacking::Auto => "auto",
            MemoryBacking::Hugetlb => "hugetlb",
            MemoryBacking::Thp => "thp",
            MemoryBacking::Small => "4k",
        }
    }

    /// Parses a comma-separated list (`stasis bench --backing`).
    pub fn parse_list(s: &str) -> Result<Vec<MemoryBacking>, Error> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse())
            .collect()
    }

    /// The concrete backing for a guest of `mem_bytes` on this host now
    /// (see the module doc). `Auto` never fails; an explicit `Hugetlb`
    /// fails if the pool cannot hold the guest.
    pub fn resolve(self, mem_bytes: u64) -> Result<MemoryBacking, Error> {
        match self {
            MemoryBacking::Auto => {
                let pool = HugePool::read();
                if mem_bytes.is_multiple_of(HUGE_PAGE) && pool.available() >= pages(mem_bytes) {
                    Ok(MemoryBacking::Hugetlb)
                } else if thp_enabled() {
                    Ok(MemoryBacking::Thp)
                } else {
                    Ok(MemoryBacking::Small)
                }
            }
            MemoryBacking::Hugetlb => {
                if !mem_bytes.is_multiple_of(HUGE_PAGE) {
                    return Err(Error::Unaligned(mem_bytes));
                }
                let pool = HugePool::read();
                if pool.total == 0 || pool.available() == 0 {
                    return Err(Error::NoPool);
                }
                if pool.available() < pages(mem_bytes) {
                    return Err(Error::PoolTooSmall {
                        needed: pages(mem_bytes),
                        free: pool.available(),
                    });
                }
                Ok(MemoryBacking::Hugetlb)
            }
            other => Ok(other),
        }
    }
}

impl fmt::Display for MemoryBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MemoryBacking {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(MemoryBacking::Auto),
            "hugetlb" | "hugetlbfs" | "huge" => Ok(MemoryBacking::Hugetlb),
            "thp" => Ok(MemoryBacking::Thp),
            "4k" | "4kib" | "small" => Ok(MemoryBacking::Small),
            _ => Err(Error::Unknown(s.to_owned())),
        }
    }
}

/// Huge pages a guest of `mem_bytes` needs.
pub fn pages(mem_bytes: u64) -> u64 {
    mem_bytes.div_ceil(HUGE_PAGE)
}

/// `mem_bytes` rounded up to a multiple of 2 MiB (what a new VM on
/// hugetlb gets; documented in the README).
pub fn round_up(mem_bytes: u64) -> u64 {
    mem_bytes.next_multiple_of(HUGE_PAGE)
}

/// The host's 2 MiB hugetlb pool, from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HugePool {
    /// `HugePages_Total`.
    pub total: u64,
    /// `HugePages_Free` (includes reserved but not yet faulted pages).
    pub free: u64,
    /// `HugePages_Rsvd`: promised to mappings, not yet faulted.
    pub reserved: u64,
    /// `Hugepagesize` in bytes.
    pub page_size: u64,
}

impl HugePool {
    /// Reads the pool now (all zero if `/proc/meminfo` is unreadable or the
    /// default huge page size is not 2 MiB: our memfds ask for 2 MiB pages
    /// explicitly, and only the default size is reported there).
    pub fn read() -> HugePool {
        let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
            return HugePool::default();
        };
        let pool = Self::parse(&text);
        if pool.page_size != HUGE_PAGE {
            return HugePool::default();
        }
        pool
    }

    /// Parses `/proc/meminfo` text.
    pub fn parse(text: &str) -> HugePool {
        let mut p = HugePool::default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(v) = v.parse::<u64>() else { continue };
            match k {
                "HugePages_Total:" => p.total = v,
                "HugePages_Free:" => p.free = v,
                "HugePages_Rsvd:" => p.reserved = v,
                "Hugepagesize:" => p.page_size = v * 1024,
                _ => {}
            }
        }
        p
    }

    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// Pages in use or promised (total - available).
    pub fn in_use(&self) -> u64 {
        self.total.saturating_sub(self.available())
    }
}

/// The host's THP mode (`always`, `madvise` or `never`; `never` if unknown).
pub fn thp_mode() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let a = s.find('[')?;
            let b = s[a..].find(']')?;
            Some(s[a + 1..a + b].to_owned())
        })
        .unwrap_or_else(|| "never".into())
}

/// True if `MADV_HUGEPAGE` memory gets huge pages on this host.
pub fn thp_enabled() -> bool {
    matches!(thp_mode().as_str(), "always" | "madvise")
}

/// One line about the host's huge pages (for `serve` and `bench`).
pub fn describe_host() -> String {
    let p = HugePool::read();
    format!(
        "hugetlb pool: {} x 2 MiB pages, {} free, {} in use or reserved ({}); THP: {}",
        p.total,
        p.available(),
        p.in_use(),
        NR_HUGEPAGES,
        thp_mode()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in [
            MemoryBacking::Auto,
            MemoryBacking::Hugetlb,
            MemoryBacking::Thp,
            MemoryBacking::Small,
        ] {
            assert_eq!(b.name().parse::<MemoryBacking>().unwrap(), b);
            let j = serde_json::to_string(&b).unwrap();
            assert_eq!(j, format!("\"{}\"", b.name()));
            assert_eq!(serde_json::from_str::<MemoryBacking>(&j).unwrap(), b);
        }
        assert!("huge-ish".parse::<MemoryBacking>().is_err());
        assert_eq!(
            MemoryBacking::parse_list("hugetlb, thp,4k").unwrap(),
            vec![
                MemoryBacking::Hugetlb,
                MemoryBacking::Thp,
                MemoryBacking::Small
            ]
        );
    }

    #[test]
    fn meminfo_parses() {
        let t = "MemTotal: 100 kB\nHugePages_Total:    1200\nHugePages_Free:     1000\nHugePages_Rsvd:      200\nHugePages_Surp:        0\nHugepagesize:       2048 kB\n";
        let p = HugePool::parse(t);
        assert_eq!(p.total, 1200);
        assert_eq!(p.available(), 800);
        assert_eq!(p.in_use(), 400);
        assert_eq!(p.page_size, HUGE_PAGE);
    }

    #[test]
    fn explicit_hugetlb_refuses_odd_sizes_and_rounding_is_up() {
        assert!(matches!(
            MemoryBacking::Hugetlb.resolve((64 << 20) + 4096),
            Err(Error::Unaligned(_))
        ));
        assert_eq!(round_up((64 << 20) + 4096), 66 << 20);
        assert_eq!(round_up(64 << 20), 64 << 20);
        // auto never fails, and never picks hugetlb for an odd size.
        assert_ne!(
            MemoryBacking::Auto.resolve((64 << 20) + 4096).unwrap(),
            MemoryBacking::Hugetlb
        );
    }

    #[test]
    fn error_names_the_sysctl() {
        assert!(Error::NoPool.to_string().contains("nr_hugepages"));
        assert!(!Error::NoPool.to_string().contains('\n'));
    }
}
