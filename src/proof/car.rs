//! A bounded reader for CAR v1 files (<https://ipld.io/specs/transport/car/carv1/>).
//!
//! Written here, not taken from a crate: the proof engine must recompute and check every
//! block's hash, refuse anything but CIDv1 + sha2-256, and never panic or over-allocate on
//! hostile input; the Rust CAR readers in the ATProto crates either skip the hash check or
//! panic on malformed graphs (`DESIGN.md` §5). The format is small: a varint-prefixed
//! DAG-CBOR header `{version: 1, roots: [CID]}`, then sections `varint(len) ‖ CID ‖ bytes`.

use std::collections::HashMap;

use cid::Cid;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Multicodec of DAG-CBOR blocks.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec of raw blocks.
pub const RAW: u64 = 0x55;
const SHA2_256: u64 = 0x12;

/// Size caps applied while reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarLimits {
    /// Largest whole CAR accepted, in bytes.
    pub max_total_bytes: usize,
    /// Largest single section (CID + block) accepted, in bytes.
    pub max_block_bytes: usize,
}

impl Default for CarLimits {
    /// 2 MiB for the whole file and for any one block.
    fn default() -> Self {
        CarLimits {
            max_total_bytes: 2 * 1024 * 1024,
            max_block_bytes: 2 * 1024 * 1024,
        }
    }
}

/// A CAR file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CarError {
    /// The input ends inside a varint, header or section.
    #[error("CAR is truncated: {what} at byte {offset} needs {needed} bytes, {available} remain")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the input.
        available: usize,
    },
    /// The whole input is over the cap.
    #[error("CAR is {found} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The cap.
        limit: usize,
        /// The size found.
        found: usize,
    },
    /// A header or section declares a length over the cap (or zero).
    #[error("CAR {what} at byte {offset} declares {found} bytes, outside 1..={limit}")]
    BadLength {
        /// "header" or "block".
        what: &'static str,
        /// Where it starts.
        offset: usize,
        /// The cap.
        limit: usize,
        /// The declared length.
        found: u64,
    },
    /// A varint is longer than 9 bytes or not minimally encoded.
    #[error("CAR has an invalid varint at byte {offset}")]
    Varint {
        /// Where it starts.
        offset: usize,
    },
    /// The header is not DAG-CBOR `{version, roots}`.
    #[error("CAR header is not valid DAG-CBOR {{version, roots}}: {reason}")]
    Header {
        /// The decoder's message.
        reason: String,
    },
    /// Header version other than 1 (CARv2 is not accepted).
    #[error("CAR version is {found}, expected 1")]
    Version {
        /// The version found.
        found: u64,
    },
    /// Zero roots, or more than one distinct root.
    #[error("CAR has {found} roots, expected exactly 1 (the commit)")]
    RootCount {
        /// How many roots were listed.
        found: usize,
    },
    /// The same root listed twice.
    #[error("CAR lists root {cid} more than once")]
    DuplicateRoot {
        /// The repeated root.
        cid: String,
    },
    /// A section does not start with a readable CID.
    #[error("CAR block at byte {offset} does not start with a valid CID")]
    Cid {
        /// Where the section starts.
        offset: usize,
    },
    /// A CID outside CIDv1 / dag-cbor or raw / sha2-256.
    #[error("CAR block {cid} uses {reason}; only CIDv1, dag-cbor or raw, sha2-256 are accepted")]
    UnsupportedCid {
        /// The CID.
        cid: String,
        /// Which part is unsupported.
        reason: &'static str,
    },
    /// The block's bytes do not hash to its CID.
    #[error("CAR block {cid} does not match its hash (content was altered)")]
    HashMismatch {
        /// The claimed CID.
        cid: String,
    },
}

/// A CAR whose every block was checked against its CID. Blocks borrow the input.
#[derive(Debug)]
pub struct Car<'a> {
    root: Cid,
    blocks: HashMap<Cid, &'a [u8]>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    version: u64,
    #[serde(default)]
    roots: Vec<Cid>,
}

impl<'a> Car<'a> {
    /// Reads and checks a whole CAR v1 file.
    pub fn read(bytes: &'a [u8], limits: &CarLimits) -> Result<Self, CarError> {
        if bytes.len() > limits.max_total_bytes {
            return Err(CarError::TooLarge {
                limit: limits.max_total_bytes,
                found: bytes.len(),
            });
        }
        let mut r = Reader { bytes, pos: 0 };
        let header_start = r.pos;
        let header_len = r.varint()?;
        let header_bytes = r.section("header", header_start, header_len, limits.max_block_bytes)?;
        let header: Header =
            serde_ipld_dagcbor::from_slice(header_bytes).map_err(|e| CarError::Header {
                reason: crate::syntax::text::outside(&e.to_string()),
            })?;
        if header.version != 1 {
            return Err(CarError::Version {
                found: header.version,
            });
        }
        let root = match header.roots.as_slice() {
            [root] => *root,
            [first, rest @ ..] if rest.iter().all(|r| r == first) => {
                return Err(CarError::DuplicateRoot {
                    cid: first.to_string(),
                });
            }
            roots => return Err(CarError::RootCount { found: roots.len() }),
        };
        let mut blocks = HashMap::new();
        while r.pos < bytes.len() {
            let start = r.pos;
            let len = r.varint()?;
            let mut section = r.section("block", start, len, limits.max_block_bytes)?;
            let cid = Cid::read_bytes(&mut section).map_err(|_| CarError::Cid { offset: start })?;
            check_cid(&cid, section)?;
            blocks.entry(cid).or_insert(section);
        }
        Ok(Car { root, blocks })
    }

    /// The single root (the signed commit in a repo proof).
    pub fn root(&self) -> &Cid {
        &self.root
    }

    /// The bytes of a block, if the CAR holds it.
    pub fn block(&self, cid: &Cid) -> Option<&'a [u8]> {
        self.blocks.get(cid).copied()
    }

    /// How many distinct blocks the CAR holds.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when the CAR holds no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The CIDs of every block, in no particular order.
    pub fn cids(&self) -> impl Iterator<Item = &Cid> {
        self.blocks.keys()
    }
}

fn check_cid(cid: &Cid, data: &[u8]) -> Result<(), CarError> {
    let unsupported = |reason| CarError::UnsupportedCid {
        cid: cid.to_string(),
        reason,
    };
    if cid.version() != cid::Version::V1 {
        return Err(unsupported("CIDv0"));
    }
    if cid.codec() != DAG_CBOR && cid.codec() != RAW {
        return Err(unsupported("a codec other than dag-cbor or raw"));
    }
    let hash = cid.hash();
    if hash.code() != SHA2_256 || hash.size() != 32 {
        return Err(unsupported("a hash other than sha2-256"));
    }
    if *Sha256::digest(data) != *hash.digest() {
        return Err(CarError::HashMismatch {
            cid: cid.to_string(),
        });
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// An unsigned LEB128 varint, at most 9 bytes, minimally encoded (multiformats rules).
    fn varint(&mut self) -> Result<u64, CarError> {
        let start = self.pos;
        let mut value: u64 = 0;
        for i in 0..9 {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err(CarError::Truncated {
                    what: "varint",
                    offset: start,
                    needed: i + 1,
                    available: self.bytes.len() - start,
                });
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    return Err(CarError::Varint { offset: start });
                }
                return Ok(value);
            }
        }
        Err(CarError::Varint { offset: start })
    }

    fn section(
        &mut self,
        what: &'static str,
        offset: usize,
        len: u64,
        limit: usize,
    ) -> Result<&'a [u8], CarError> {
        let bad_length = CarError::BadLength {
            what,
            offset,
            limit,
            found: len,
        };
        let len = usize::try_from(len).map_err(|_| bad_length.clone())?;
        if len == 0 || len > limit {
            return Err(bad_length);
        }
        let available = self.bytes.len() - self.pos;
        let end = self.pos.saturating_add(len);
        let out = self.bytes.get(self.pos..end).ok_or(CarError::Truncated {
            what,
            offset,
            needed: len as u64,
            available,
        })?;
        self.pos = end;
        Ok(out)
    }
}

/// The CIDv1 of `data` under `codec`, with a SHA-256 multihash.
pub(crate) fn cid_of(codec: u64, data: &[u8]) -> Cid {
    // A 32-byte digest always fits the 64-byte multihash.
    let hash =
        cid::multihash::Multihash::<64>::wrap(SHA2_256, &Sha256::digest(data)).unwrap_or_default();
    Cid::new_v1(codec, hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cid::multihash::Multihash;

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn header(roots: &[Cid]) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct H<'a> {
            version: u64,
            roots: &'a [Cid],
        }
        serde_ipld_dagcbor::to_vec(&H { version: 1, roots }).unwrap()
    }

    fn car(roots: &[Cid], blocks: &[(Cid, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let h = header(roots);
        varint(h.len() as u64, &mut out);
        out.extend_from_slice(&h);
        for (cid, data) in blocks {
            let c = cid.to_bytes();
            varint((c.len() + data.len()) as u64, &mut out);
            out.extend_from_slice(&c);
            out.extend_from_slice(data);
        }
        out
    }

    fn sample() -> (Cid, Vec<u8>) {
        let block = serde_ipld_dagcbor::to_vec(&"hello").unwrap();
        let cid = cid_of(DAG_CBOR, &block);
        (cid, car(&[cid], &[(cid, &block)]))
    }

    #[test]
    fn reads_blocks_and_root() {
        let (cid, bytes) = sample();
        let car = Car::read(&bytes, &CarLimits::default()).unwrap();
        assert_eq!(car.root(), &cid);
        assert_eq!(car.len(), 1);
        assert!(car.block(&cid).is_some());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (_, bytes) = sample();
        for cut in 0..bytes.len() {
            let err = match Car::read(&bytes[..cut], &CarLimits::default()) {
                // Cut exactly after the header: a CAR with no blocks, which the proof layer
                // reports as an incomplete proof.
                Ok(car) => {
                    assert!(car.is_empty(), "cut at {cut}");
                    continue;
                }
                Err(e) => e,
            };
            assert!(
                matches!(
                    err,
                    CarError::Truncated { .. }
                        | CarError::Cid { .. }
                        | CarError::HashMismatch { .. }
                        | CarError::Header { .. }
                ),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn flipped_block_byte_is_hash_mismatch() {
        let (_, mut bytes) = sample();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            Car::read(&bytes, &CarLimits::default()),
            Err(CarError::HashMismatch { .. })
        ));
    }

    #[test]
    fn caps_are_enforced() {
        let (_, bytes) = sample();
        let tight = CarLimits {
            max_total_bytes: bytes.len() - 1,
            max_block_bytes: 1024,
        };
        assert!(matches!(
            Car::read(&bytes, &tight),
            Err(CarError::TooLarge { .. })
        ));
        let tiny_block = CarLimits {
            max_total_bytes: 1024,
            max_block_bytes: 8,
        };
        assert!(matches!(
            Car::read(&bytes, &tiny_block),
            Err(CarError::BadLength { .. })
        ));
        // A section that declares 2^40 bytes is refused before anything is allocated.
        let mut huge = Vec::new();
        let h = header(&[sample().0]);
        varint(h.len() as u64, &mut huge);
        huge.extend_from_slice(&h);
        varint(1 << 40, &mut huge);
        assert!(matches!(
            Car::read(&huge, &CarLimits::default()),
            Err(CarError::BadLength { .. })
        ));
    }

    #[test]
    fn trailing_garbage_and_garbage_are_errors() {
        let (_, mut bytes) = sample();
        bytes.extend_from_slice(b"\x05garbage");
        assert!(Car::read(&bytes, &CarLimits::default()).is_err());
        assert!(Car::read(b"", &CarLimits::default()).is_err());
        assert!(
            Car::read(
                b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                &CarLimits::default()
            )
            .is_err()
        );
        assert!(matches!(
            Car::read(b"\x80\x00", &CarLimits::default()),
            Err(CarError::Varint { .. })
        ));
    }

    #[test]
    fn roots_must_be_exactly_one() {
        let (cid, _) = sample();
        let block = serde_ipld_dagcbor::to_vec(&"hello").unwrap();
        let other = cid_of(RAW, b"x");
        let dup = car(&[cid, cid], &[(cid, &block)]);
        assert_eq!(
            Car::read(&dup, &CarLimits::default()).unwrap_err(),
            CarError::DuplicateRoot {
                cid: cid.to_string()
            }
        );
        let two = car(&[cid, other], &[(cid, &block)]);
        assert_eq!(
            Car::read(&two, &CarLimits::default()).unwrap_err(),
            CarError::RootCount { found: 2 }
        );
        let none = car(&[], &[(cid, &block)]);
        assert_eq!(
            Car::read(&none, &CarLimits::default()).unwrap_err(),
            CarError::RootCount { found: 0 }
        );
    }

    #[test]
    fn unsupported_cids_are_refused() {
        let data = b"raw bytes";
        // sha2-512 multihash
        let mh = Multihash::<64>::wrap(0x13, &[0u8; 64]).unwrap();
        let cid = Cid::new_v1(RAW, mh);
        let bytes = car(&[cid], &[(cid, data)]);
        assert!(matches!(
            Car::read(&bytes, &CarLimits::default()),
            Err(CarError::UnsupportedCid { .. })
        ));
        // dag-pb codec
        let pb = cid_of(0x70, data);
        let bytes = car(&[pb], &[(pb, data)]);
        assert!(matches!(
            Car::read(&bytes, &CarLimits::default()),
            Err(CarError::UnsupportedCid { .. })
        ));
    }
}
