//! `PageBitmap`: a compact, serialisable set of 4 KiB page indices.
//!
//! Used for "pages present in the memory file" (written by
//! [`write_memory`](super::memfile::write_memory)) and for the guest's
//! "working set" (recorded by the VMM). Bits are stored in `u64` words,
//! bit `i % 64` of word `i / 64` is page `i`. Deserialisation validates that
//! the word count matches the length and that no bit past the end is set, so
//! a bitmap read from a snapshot can be trusted to be self-consistent.

use serde::{Deserialize, Serialize};

/// A fixed-length set of page indices `0..len`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBitmap", into = "RawBitmap")]
pub struct PageBitmap {
    len: usize,
    words: Vec<u64>,
}

/// On-disk shape of a [`PageBitmap`], validated on the way in.
#[derive(Serialize, Deserialize)]
struct RawBitmap {
    len: u64,
    words: Vec<u64>,
}

impl TryFrom<RawBitmap> for PageBitmap {
    type Error = String;

    fn try_from(raw: RawBitmap) -> Result<Self, Self::Error> {
        let len = usize::try_from(raw.len)
            .map_err(|_| format!("page bitmap length {} does not fit in memory", raw.len))?;
        if raw.words.len() != len.div_ceil(64) {
            return Err(format!(
                "page bitmap of {len} pages has {} words, expected {}",
                raw.words.len(),
                len.div_ceil(64)
            ));
        }
        let bitmap = PageBitmap {
            len,
            words: raw.words,
        };
        if let Some(&last) = bitmap.words.last() {
            if last & !bitmap.last_word_mask() != 0 {
                return Err(format!(
                    "page bitmap of {len} pages has bits set past its end"
                ));
            }
        }
        Ok(bitmap)
    }
}

impl From<PageBitmap> for RawBitmap {
    fn from(b: PageBitmap) -> Self {
        RawBitmap {
            len: b.len as u64,
            words: b.words,
        }
    }
}

impl PageBitmap {
    /// An empty set over `len` pages.
    pub fn new(len: usize) -> Self {
        PageBitmap {
            len,
            words: vec![0; len.div_ceil(64)],
        }
    }

    /// Builds a bitmap from raw words; bits past `len` are cleared.
    /// Returns `None` if `words.len()` is not `len.div_ceil(64)`.
    pub fn from_words(len: usize, words: Vec<u64>) -> Option<Self> {
        if words.len() != len.div_ceil(64) {
            return None;
        }
        let mut b = PageBitmap { len, words };
        let mask = b.last_word_mask();
        if let Some(last) = b.words.last_mut() {
            *last &= mask;
        }
        Some(b)
    }

    /// Number of pages the bitmap covers (not the number of set bits).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the bitmap covers zero pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying words (bit `i % 64` of word `i / 64` is page `i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether page `page` is in the set; `false` for pages past the end.
    pub fn get(&self, page: usize) -> bool {
        page < self.len && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Adds page `page` to the set.
    ///
    /// # Panics
    /// If `page >= self.len()` (a caller bug, like slice indexing).
    pub fn set(&mut self, page: usize) {
        assert!(
            page < self.len,
            "page {page} out of bitmap of {} pages",
            self.len
        );
        self.words[page / 64] |= 1 << (page % 64);
    }

    /// Removes page `page` from the set.
    ///
    /// # Panics
    /// If `page >= self.len()`.
    pub fn clear(&mut self, page: usize) {
        assert!(
            page < self.len,
            "page {page} out of bitmap of {} pages",
            self.len
        );
        self.words[page / 64] &= !(1 << (page % 64));
    }

    /// Adds pages `start..end` to the set.
    ///
    /// # Panics
    /// If `start > end` or `end > self.len()`.
    pub fn set_range(&mut self, start: usize, end: usize) {
        assert!(start <= end && end <= self.len, "bad range {start}..{end}");
        let mut i = start;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            self.words[i / 64] |= mask_bits(bit, n);
            i += n;
        }
    }

    /// Number of pages in the set.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Number of pages in the set within `start..end` (clamped to the length).
    pub fn count_ones_in(&self, start: usize, end: usize) -> usize {
        let end = end.min(self.len);
        let mut i = start;
        let mut n = 0usize;
        while i < end {
            let bit = i % 64;
            let k = (64 - bit).min(end - i);
            n += (self.words[i / 64] & mask_bits(bit, k)).count_ones() as usize;
            i += k;
        }
        n
    }

    /// The first set page at or after `from`, if any.
    pub fn next_one(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let mut wi = from / 64;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let i = wi * 64 + w.trailing_zeros() as usize;
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    /// The first page at or after `from` that is *not* set (or `len` if none).
    pub fn next_zero(&self, from: usize) -> usize {
        if from >= self.len {
            return self.len;
        }
        let mut wi = from / 64;
        let mut w = !self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                return (wi * 64 + w.trailing_zeros() as usize).min(self.len);
            }
            wi += 1;
            if wi >= self.words.len() {
                return self.len;
            }
            w = !self.words[wi];
        }
    }

    /// Iterates over set pages in increasing order.
    pub fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }

    /// Iterates over maximal runs `start..end` of set pages, in order.
    pub fn iter_runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let start = self.next_one(pos)?;
            let end = self.next_zero(start);
            pos = end;
            Some((start, end))
        })
    }

    /// The set intersection with `other` (lengths must match, else `None`).
    pub fn and(&self, other: &PageBitmap) -> Option<PageBitmap> {
        self.combine(other, |a, b| a & b)
    }

    /// The set union with `other` (lengths must match, else `None`).
    pub fn or(&self, other: &PageBitmap) -> Option<PageBitmap> {
        self.combine(other, |a, b| a | b)
    }

    fn combine(&self, other: &PageBitmap, f: impl Fn(u64, u64) -> u64) -> Option<PageBitmap> {
        (self.len == other.len).then(|| PageBitmap {
            len: self.len,
            words: self
                .words
                .iter()
                .zip(&other.words)
                .map(|(a, b)| f(*a, *b))
                .collect(),
        })
    }

    fn last_word_mask(&self) -> u64 {
        match self.len % 64 {
            0 => !0,
            r => (1u64 << r) - 1,
        }
    }
}

/// `n` bits starting at bit `bit` (`bit + n <= 64`, `n >= 1`).
fn mask_bits(bit: usize, n: usize) -> u64 {
    let m = if n >= 64 { !0u64 } else { (1u64 << n) - 1 };
    m << bit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count_iter() {
        let mut b = PageBitmap::new(200);
        for i in [0, 1, 63, 64, 65, 127, 128, 199] {
            b.set(i);
        }
        assert!(b.get(63) && b.get(199) && !b.get(2) && !b.get(500));
        assert_eq!(b.count_ones(), 8);
        assert_eq!(
            b.iter_ones().collect::<Vec<_>>(),
            vec![0, 1, 63, 64, 65, 127, 128, 199]
        );
        assert_eq!(
            b.iter_runs().collect::<Vec<_>>(),
            vec![(0, 2), (63, 66), (127, 129), (199, 200)]
        );
        assert_eq!(b.count_ones_in(1, 128), 5);
        b.clear(64);
        assert!(!b.get(64));
        assert_eq!(b.next_one(64), Some(65));
        assert_eq!(b.next_zero(63), 64);
    }

    #[test]
    fn set_range_matches_single_sets() {
        for (s, e) in [
            (0, 0),
            (0, 1),
            (3, 64),
            (3, 65),
            (63, 129),
            (0, 200),
            (70, 190),
        ] {
            let mut a = PageBitmap::new(200);
            a.set_range(s, e);
            let mut b = PageBitmap::new(200);
            (s..e).for_each(|i| b.set(i));
            assert_eq!(a, b, "{s}..{e}");
            assert_eq!(a.count_ones_in(0, 200), e - s);
        }
    }

    #[test]
    fn serde_validates() {
        let mut b = PageBitmap::new(70);
        b.set(69);
        let bytes = bincode::serialize(&b).unwrap();
        let back: PageBitmap = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, b);

        let bad = RawBitmap {
            len: 70,
            words: vec![0, 1 << 10],
        };
        let bytes = bincode::serialize(&bad).unwrap();
        assert!(bincode::deserialize::<PageBitmap>(&bytes).is_err());
        let bad = RawBitmap {
            len: 70,
            words: vec![0],
        };
        let bytes = bincode::serialize(&bad).unwrap();
        assert!(bincode::deserialize::<PageBitmap>(&bytes).is_err());
    }
}
