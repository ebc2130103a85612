//! Merkle Search Tree inclusion proofs (<https://atproto.com/specs/repository#mst-structure>).
//!
//! # Terminology
//! A node is `{l, e}`: `l` is the subtree of keys below the node's first entry, and each
//! entry `{p, k, v, t}` holds a key (the first `p` bytes of the previous entry's key, then
//! the bytes `k`), its value CID `v` and the subtree `t` of keys between it and the next
//! entry. Keys are `<collection>/<rkey>`, sorted bytewise. A key's *height* is the number
//! of leading zero bits of SHA-256(key) divided by 2 (fanout 4); a node holds only keys of
//! its layer, and its subtrees sit exactly one layer below.
//!
//! # Tricky bits
//! - The walk reads only the nodes on the path to the key; every one must be in the CAR.
//!   A missing block is "proof incomplete", never "not in repo": only a null pointer where
//!   the key would be proves absence.
//! - Layers are checked from the first entry of each node (one hash per node) and for the
//!   found key, so a forged tree cannot hide a key in a node of the wrong layer.
//! - Content addressing makes cycles impossible; the depth is still capped by the layers.

use cid::Cid;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::car::Car;
use super::{BlockRole, ProofError, decode_block};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Node<'a> {
    l: Option<Cid>,
    #[serde(borrow)]
    e: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry<'a> {
    p: u64,
    #[serde(with = "serde_bytes")]
    k: &'a [u8],
    v: Cid,
    t: Option<Cid>,
}

/// The height (layer) of a key: leading zero bits of SHA-256(key), divided by 2.
pub fn key_height(key: &[u8]) -> u32 {
    let hash = Sha256::digest(key);
    let mut zeros = 0;
    for byte in hash {
        if byte == 0 {
            zeros += 8;
        } else {
            zeros += byte.leading_zeros();
            break;
        }
    }
    zeros / 2
}

/// Length of the common prefix of two keys.
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Walks from `root` to `key` and returns the value CID stored under it.
pub fn find(car: &Car<'_>, root: &Cid, key: &[u8]) -> Result<Cid, ProofError> {
    let malformed = |cid: &Cid, reason: &'static str| ProofError::Mst {
        cid: cid.to_string(),
        reason,
    };
    let mut cid = *root;
    let mut layer: Option<u32> = None;
    let mut current = Vec::with_capacity(key.len() + 16);
    loop {
        let block = car.block(&cid).ok_or_else(|| ProofError::MissingBlock {
            role: BlockRole::MstNode,
            cid: cid.to_string(),
        })?;
        let node: Node = decode_block(BlockRole::MstNode, &cid, block)?;
        let mut next = node.l;
        current.clear();
        for (i, entry) in node.e.iter().enumerate() {
            let p = usize::try_from(entry.p).unwrap_or(usize::MAX);
            let Some(rest) = current.get(p..) else {
                return Err(malformed(
                    &cid,
                    "entry prefix is longer than the previous key",
                ));
            };
            if i > 0 && entry.k <= rest {
                return Err(malformed(
                    &cid,
                    "entry keys are not in strictly increasing order",
                ));
            }
            current.truncate(p);
            current.extend_from_slice(entry.k);
            if current.is_empty() {
                return Err(malformed(&cid, "entry has an empty key"));
            }
            if i == 0 {
                let height = key_height(&current);
                match layer {
                    Some(l) if l != height => {
                        return Err(malformed(
                            &cid,
                            "node's keys are not on the layer its parent implies",
                        ));
                    }
                    _ => layer = Some(height),
                }
            }
            match current.as_slice().cmp(key) {
                std::cmp::Ordering::Less => next = entry.t,
                std::cmp::Ordering::Equal => {
                    if Some(key_height(key)) != layer {
                        return Err(malformed(&cid, "key found on the wrong layer"));
                    }
                    return Ok(entry.v);
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        let Some(child) = next else {
            return Err(ProofError::RecordNotInRepo {
                key: String::from_utf8_lossy(key).into_owned(),
            });
        };
        layer = match layer {
            Some(0) => return Err(malformed(&cid, "layer-0 node points to a subtree")),
            Some(l) => Some(l - 1),
            None => None,
        };
        cid = child;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn fixture<T: for<'de> Deserialize<'de>>(name: &str) -> T {
        let path = format!(
            "{}/tests/fixtures/atproto-interop/mst/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    #[derive(Deserialize)]
    struct Height {
        key: String,
        height: u32,
    }

    #[derive(Deserialize)]
    struct Prefix {
        left: String,
        right: String,
        len: usize,
    }

    #[test]
    fn key_heights_fixture() {
        let cases: Vec<Height> = fixture("key_heights.json");
        assert!(!cases.is_empty());
        for c in cases {
            assert_eq!(key_height(c.key.as_bytes()), c.height, "{:?}", c.key);
        }
    }

    #[test]
    fn common_prefix_fixture() {
        let cases: Vec<Prefix> = fixture("common_prefix.json");
        assert!(!cases.is_empty());
        for c in cases {
            assert_eq!(
                common_prefix_len(c.left.as_bytes(), c.right.as_bytes()),
                c.len,
                "{:?} {:?}",
                c.left,
                c.right
            );
        }
    }
}
