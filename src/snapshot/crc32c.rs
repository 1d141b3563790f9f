//! CRC32C (Castagnoli, the iSCSI polynomial) of 4 KiB pages: the per-page
//! checksums of the memory file.
//!
//! On x86_64 with SSE 4.2 the `crc32` instruction computes it; one chain of
//! `crc32` instructions is latency-bound (one 8-byte step per 3 cycles), so
//! [`pages4`] runs four pages' chains side by side, which keeps the unit
//! busy every cycle (each page has its own checksum, so nothing has to be
//! combined afterwards). Elsewhere it falls back to the `crc` crate's
//! table-driven `CRC_32_ISCSI`, which gives identical values.

const PAGE: usize = 4096;
const TABLE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// CRC32C of `data` (any length), the standard iSCSI CRC (init and xor-out
/// all ones).
pub fn checksum(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE 4.2 (checked just above).
        return unsafe { hw::checksum(data) };
    }
    TABLE.checksum(data)
}

/// CRC32C of one 4 KiB page.
pub fn page(p: &[u8; PAGE]) -> u32 {
    checksum(p)
}

/// CRC32C of four 4 KiB pages at once (four interleaved chains).
pub fn pages4(p: [&[u8; PAGE]; 4]) -> [u32; 4] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE 4.2 (checked just above).
        return unsafe { hw::pages4(p) };
    }
    p.map(|x| TABLE.checksum(x))
}

fn as_page(c: &[u8]) -> &[u8; PAGE] {
    c.try_into().expect("whole pages")
}

/// Checksums of the consecutive 4 KiB pages of `data` (whose length is a
/// multiple of 4096), appended to `out`.
pub fn pages_into(data: &[u8], out: &mut Vec<u32>) {
    debug_assert!(data.len().is_multiple_of(PAGE));
    let mut groups = data.chunks_exact(4 * PAGE);
    for g in &mut groups {
        out.extend_from_slice(&pages4([
            as_page(&g[..PAGE]),
            as_page(&g[PAGE..2 * PAGE]),
            as_page(&g[2 * PAGE..3 * PAGE]),
            as_page(&g[3 * PAGE..]),
        ]));
    }
    for p in groups.remainder().chunks_exact(PAGE) {
        out.push(checksum(p));
    }
}

#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};

    #[target_feature(enable = "sse4.2")]
    pub(super) unsafe fn checksum(data: &[u8]) -> u32 {
        let mut c: u64 = 0xffff_ffff;
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            c = _mm_crc32_u64(c, u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let mut c = c as u32;
        for &b in words.remainder() {
            c = _mm_crc32_u8(c, b);
        }
        !c
    }

    #[target_feature(enable = "sse4.2")]
    pub(super) unsafe fn pages4(p: [&[u8; super::PAGE]; 4]) -> [u32; 4] {
        let mut c = [0xffff_ffffu64; 4];
        let word = |s: &[u8; super::PAGE], i: usize| {
            u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        for i in 0..super::PAGE / 8 {
            c[0] = _mm_crc32_u64(c[0], word(p[0], i));
            c[1] = _mm_crc32_u64(c[1], word(p[1], i));
            c[2] = _mm_crc32_u64(c[2], word(p[2], i));
            c[3] = _mm_crc32_u64(c[3], word(p[3], i));
        }
        c.map(|x| !(x as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference() {
        // RFC 3720 B.4 test vector: 32 bytes of zeros.
        assert_eq!(checksum(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
        let mut page = [0u8; PAGE];
        let mut pages = vec![0u8; PAGE * 7];
        for (i, b) in pages.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        page.copy_from_slice(&pages[..PAGE]);
        assert_eq!(super::page(&page), TABLE.checksum(&page));
        let mut sums = Vec::new();
        pages_into(&pages, &mut sums);
        assert_eq!(sums.len(), 7);
        for (i, s) in sums.iter().enumerate() {
            assert_eq!(
                *s,
                TABLE.checksum(&pages[i * PAGE..(i + 1) * PAGE]),
                "page {i}"
            );
        }
        for n in [0, 1, 7, 8, 9, 13, 4095, 4097, 5000] {
            assert_eq!(
                checksum(&pages[..n]),
                TABLE.checksum(&pages[..n]),
                "{n} bytes"
            );
        }
    }
}
