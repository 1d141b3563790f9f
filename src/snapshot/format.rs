//! The state-file container: a checksummed envelope around a bincode body.
//!
//! Layout (all integers little-endian):
//!
//! | offset      | size | field                                   |
//! |-------------|------|-----------------------------------------|
//! | 0           | 8    | magic `b"STASISSN"`                     |
//! | 8           | 4    | format version (`u32`)                  |
//! | 12          | 8    | body length `N` (`u64`)                 |
//! | 20          | N    | bincode body (fixint, little-endian)    |
//! | 20 + N      | 8    | CRC-64/XZ over bytes `0..20 + N` (`u64`)|
//!
//! CRC-64/XZ is the ECMA-182 polynomial, reflected, with all-ones init and
//! xor-out (`crc::CRC_64_XZ`). Decoding checks magic, version, exact length,
//! checksum and then the body, and bincode is given a size limit equal to
//! the body length, so no length field can make it allocate more than the
//! file holds. This module owns only the envelope; what goes in the body is
//! the VMM's business.
//!
//! Versions: 3 added a CRC32C per present memory page to the body's memory
//! metadata; 2 had none. A build reads only its own version: an older
//! snapshot is refused with [`Error::UnsupportedVersion`].

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Magic bytes at the start of every state file.
pub const MAGIC: [u8; 8] = *b"STASISSN";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 3;
/// Size of the fixed header (magic, version, body length).
pub const HEADER_LEN: usize = 20;
/// Size of the trailing checksum.
pub const CRC_LEN: usize = 8;
/// Largest state file read: 64 MiB for the fixed part, plus what the memory
/// metadata of the largest guest needs (a CRC32C and two bitmap bits per
/// 4 KiB page of up to 64 GiB: about 66 MiB). The length is checked
/// against it before anything is allocated, so a huge (e.g. sparse) file
/// is refused with [`Error::TooLarge`] instead of exhausting memory.
pub const MAX_STATE_LEN: u64 = (64 << 20) + ((64u64 << 30) / 4096) * 5;

/// Slice-by-16 tables: the same CRC as the byte-at-a-time default, several
/// times faster (a 1 GiB guest's state holds ~1 MB of page checksums and is
/// read on every resume).
const CRC64: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

/// Errors from encoding or decoding a state file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first 8 bytes are not [`MAGIC`].
    #[error("not a stasis snapshot: bad magic {found:02x?} at offset 0")]
    BadMagic {
        /// The bytes found where the magic should be (up to 8).
        found: Vec<u8>,
    },
    /// The version field names a version this build does not read.
    #[error(
        "unsupported snapshot format version {found} at offset 8 (this build supports {supported})"
    )]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build supports.
        supported: u32,
    },
    /// Fewer bytes than the header says.
    #[error("truncated snapshot state: expected {expected} bytes, found {found}")]
    Truncated {
        /// Bytes the header implies (saturating at `u64::MAX`).
        expected: u64,
        /// Bytes actually present.
        found: u64,
    },
    /// The file is larger than any state file this build writes.
    #[error("snapshot state is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// The file's length.
        len: u64,
        /// [`MAX_STATE_LEN`].
        max: u64,
    },
    /// More bytes than the header says.
    #[error("snapshot state has {extra} trailing bytes after offset {end}")]
    TrailingBytes {
        /// Offset where the container ends.
        end: u64,
        /// Bytes past the end.
        extra: u64,
    },
    /// The stored checksum does not match the content.
    #[error("snapshot state checksum mismatch: stored CRC-64 {stored:#018x} at offset {offset}, computed {computed:#018x}")]
    ChecksumMismatch {
        /// Offset of the stored checksum.
        offset: u64,
        /// Stored value.
        stored: u64,
        /// Value computed over the header and body.
        computed: u64,
    },
    /// The body passed the checksum but is not a valid encoding of the type.
    #[error("snapshot state body ({len} bytes at offset 20) failed to deserialise")]
    Deserialize {
        /// Body length.
        len: u64,
        /// The bincode error.
        #[source]
        source: bincode::Error,
    },
    /// The body could not be serialised.
    #[error("failed to serialise snapshot state")]
    Serialize(#[source] bincode::Error),
    /// Reading or writing the file failed.
    #[error("I/O error on snapshot state file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is invalid (wraps the reason with the file name).
    #[error("invalid snapshot state file {path}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<Error>,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

fn bincode_opts() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
}

/// Serialises `body` into a complete state-file image.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>> {
    let body_bytes = bincode_opts().serialize(body).map_err(Error::Serialize)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body_bytes.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&body_bytes);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks the header in `prefix` (the first bytes of a file of `total_len`
/// bytes) and returns the body length. Needs at most [`HEADER_LEN`] bytes.
fn check_header(prefix: &[u8], total_len: u64) -> Result<u64> {
    let magic_len = prefix.len().min(MAGIC.len());
    if prefix[..magic_len] != MAGIC[..magic_len] {
        return Err(Error::BadMagic {
            found: prefix[..magic_len].to_vec(),
        });
    }
    if prefix.len() < HEADER_LEN {
        return Err(Error::Truncated {
            expected: (HEADER_LEN + CRC_LEN) as u64,
            found: total_len,
        });
    }
    let version = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_len = u64::from_le_bytes(prefix[12..20].try_into().expect("8 bytes"));
    let expected = body_len.saturating_add((HEADER_LEN + CRC_LEN) as u64);
    if total_len < expected {
        return Err(Error::Truncated {
            expected,
            found: total_len,
        });
    }
    if total_len > expected {
        return Err(Error::TrailingBytes {
            end: expected,
            extra: total_len - expected,
        });
    }
    Ok(body_len)
}

/// Verifies the container (magic, version, length, checksum) without
/// deserialising the body; returns the body bytes.
pub fn verify(bytes: &[u8]) -> Result<&[u8]> {
    let body_len = check_header(&bytes[..bytes.len().min(HEADER_LEN)], bytes.len() as u64)?;
    // check_header guarantees bytes.len() == HEADER_LEN + body_len + CRC_LEN.
    let crc_off = bytes.len() - CRC_LEN;
    let stored = u64::from_le_bytes(bytes[crc_off..].try_into().expect("8 bytes"));
    let computed = CRC64.checksum(&bytes[..crc_off]);
    if stored != computed {
        return Err(Error::ChecksumMismatch {
            offset: crc_off as u64,
            stored,
            computed,
        });
    }
    debug_assert_eq!((crc_off - HEADER_LEN) as u64, body_len);
    Ok(&bytes[HEADER_LEN..crc_off])
}

/// Decodes a complete state-file image produced by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let body = verify(bytes)?;
    let len = body.len() as u64;
    bincode_opts()
        .with_limit(len)
        .deserialize(body)
        .map_err(|source| Error::Deserialize { len, source })
}

/// Writes `bytes` to a new file at `path` (truncating any existing file).
/// Does not fsync; [`TmpDir::commit`](super::TmpDir::commit) does that.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    Ok(())
}

/// Reads a state file, checking its size against [`MAX_STATE_LEN`] and its
/// header against the size before reading the rest, so pointing it at a
/// multi-GiB file fails fast without allocating.
/// The returned bytes have passed [`verify`]; pass them to [`decode`].
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let in_file = |e: Error| Error::InFile {
        path: path.to_owned(),
        source: Box::new(e),
    };
    let mut f = File::open(path).map_err(io)?;
    let total = f.metadata().map_err(io)?.len();
    if total > MAX_STATE_LEN {
        return Err(in_file(Error::TooLarge {
            len: total,
            max: MAX_STATE_LEN,
        }));
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    (&mut f)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(io)?;
    check_header(&header, total).map_err(in_file)?;
    // `total` is now known to be the exact container size; read it all.
    let cap = usize::try_from(total).map_err(|_| {
        in_file(Error::Truncated {
            expected: total,
            found: 0,
        })
    })?;
    let mut bytes = Vec::with_capacity(cap);
    bytes.extend_from_slice(&header);
    (&mut f)
        .take(total - header.len() as u64)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    verify(&bytes).map_err(in_file)?;
    Ok(bytes)
}

/// Reads and decodes a state file in one step.
pub fn read_and_decode<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_file(path)?;
    // read_file verified the container (header, length, CRC): decode the
    // body without checking it a second time.
    let body = &bytes[HEADER_LEN..bytes.len() - CRC_LEN];
    let len = body.len() as u64;
    bincode_opts()
        .with_limit(len)
        .deserialize(body)
        .map_err(|source| Error::InFile {
            path: path.to_owned(),
            source: Box::new(Error::Deserialize { len, source }),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Body {
        name: String,
        regs: Vec<u64>,
        flag: bool,
        nested: Option<Vec<(u32, String)>>,
    }

    fn sample() -> Body {
        Body {
            name: "vm-1".into(),
            regs: vec![1, 2, 0xdead_beef, u64::MAX],
            flag: true,
            nested: Some(vec![(7, "seven".into()), (8, String::new())]),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"STASISSN");
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            FORMAT_VERSION
        );
        let body_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
        assert_eq!(bytes.len() as u64, 20 + body_len + 8);
        let back: Body = decode(&bytes).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn every_single_byte_flip_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for pos in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[pos] ^= flip;
                assert!(
                    decode::<Body>(&b).is_err(),
                    "flip {flip:#x} at byte {pos} decoded"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            match decode::<Body>(&bytes[..len]) {
                Err(Error::Truncated { found, .. }) => assert_eq!(found, len as u64),
                other => panic!("truncation to {len} gave {other:?}"),
            }
        }
    }

    #[test]
    fn specific_errors() {
        let bytes = encode(&sample()).unwrap();

        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(decode::<Body>(&b), Err(Error::BadMagic { .. })));
        assert!(decode::<Body>(&b)
            .unwrap_err()
            .to_string()
            .contains("not a stasis snapshot"));

        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = decode::<Body>(&b).unwrap_err();
        assert!(matches!(
            e,
            Error::UnsupportedVersion { found, supported: FORMAT_VERSION } if found == FORMAT_VERSION + 1
        ));

        let mut b = bytes.clone();
        b.push(0);
        assert!(matches!(
            decode::<Body>(&b),
            Err(Error::TrailingBytes { extra: 1, .. })
        ));

        let mut b = bytes.clone();
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(matches!(
            decode::<Body>(&b),
            Err(Error::ChecksumMismatch { .. })
        ));

        // Huge body length: reported as truncated, no allocation.
        let mut b = bytes.clone();
        b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Body>(&b),
            Err(Error::Truncated {
                expected: u64::MAX,
                ..
            })
        ));
    }

    /// A body whose inner length prefix is corrupt but whose CRC is valid
    /// (a buggy writer) fails cleanly instead of allocating.
    #[test]
    fn corrupt_inner_length_with_valid_crc_fails_without_allocating() {
        let mut bytes = encode(&vec![1u8, 2, 3]).unwrap();
        // Vec<u8> length prefix is the first 8 body bytes.
        bytes[20..28].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let n = bytes.len();
        let crc = CRC64.checksum(&bytes[..n - 8]);
        bytes[n - 8..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode::<Vec<u8>>(&bytes),
            Err(Error::Deserialize { .. })
        ));
    }

    #[test]
    fn file_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.bin");
        write_file(&p, &encode(&sample()).unwrap()).unwrap();
        let back: Body = read_and_decode(&p).unwrap();
        assert_eq!(back, sample());

        // A large file that is not a snapshot is rejected from its header.
        let big = dir.path().join("big.bin");
        let f = File::create(&big).unwrap();
        f.set_len(1 << 30).unwrap();
        let e = read_file(&big).unwrap_err();
        assert!(e.to_string().contains("big.bin"), "{e}");

        let missing = dir.path().join("nope.bin");
        assert!(matches!(read_file(&missing), Err(Error::Io { .. })));
    }

    /// A sparse 200 GiB file with a valid header whose body length matches
    /// the file is refused by size, before any allocation.
    #[test]
    fn huge_sparse_state_is_refused_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.bin");
        let total: u64 = 200 << 30;
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&(total - (HEADER_LEN + CRC_LEN) as u64).to_le_bytes());
        write_file(&p, &head).unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(total)
            .unwrap();
        match read_file(&p) {
            Err(Error::InFile { source, .. }) => match *source {
                Error::TooLarge { len, max } => {
                    assert_eq!((len, max), (total, MAX_STATE_LEN));
                }
                other => panic!("expected TooLarge, got {other:?}"),
            },
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
