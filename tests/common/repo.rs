//! Test tools over repo proofs: read a real CAR into editable blocks, rewrite a block and
//! re-link every parent up to the commit, re-sign the commit, write a CAR back; and build
//! an MST from keys (for the interop fixtures). Test code: panics on misuse.

#![allow(dead_code)]

use std::collections::BTreeMap;

use atcr_verify::proof::{Car, CarLimits};
use cid::Cid;
use cid::multihash::Multihash;
use ipld_core::ipld::Ipld;
use sha2::{Digest, Sha256};

pub const DAG_CBOR: u64 = 0x71;

/// The CIDv1 (dag-cbor, sha2-256) of `bytes`.
pub fn cid_for(bytes: &[u8]) -> Cid {
    Cid::new_v1(
        DAG_CBOR,
        Multihash::<64>::wrap(0x12, &Sha256::digest(bytes)).unwrap(),
    )
}

pub fn decode(bytes: &[u8]) -> Ipld {
    serde_ipld_dagcbor::from_slice(bytes).unwrap()
}

pub fn encode(value: &Ipld) -> Vec<u8> {
    serde_ipld_dagcbor::to_vec(value).unwrap()
}

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

/// Writes a CAR v1 with the given roots and (cid, bytes) sections, in order, unchecked.
pub fn write_car(roots: &[Cid], blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    let header = Ipld::Map(BTreeMap::from([
        ("version".to_owned(), Ipld::Integer(1)),
        (
            "roots".to_owned(),
            Ipld::List(roots.iter().map(|c| Ipld::Link(*c)).collect()),
        ),
    ]));
    let header = encode(&header);
    let mut out = Vec::new();
    varint(header.len() as u64, &mut out);
    out.extend_from_slice(&header);
    for (cid, data) in blocks {
        let c = cid.to_bytes();
        varint((c.len() + data.len()) as u64, &mut out);
        out.extend_from_slice(&c);
        out.extend_from_slice(data);
    }
    out
}

/// A DAG-CBOR map encoded with its entries in exactly the given order (which may be
/// non-canonical, or repeat a key). Maps of fewer than 24 entries only.
pub fn encode_map_in_order(entries: &[(&str, Ipld)]) -> Vec<u8> {
    assert!(entries.len() < 24);
    let mut out = vec![0xa0 | entries.len() as u8];
    for (k, v) in entries {
        out.extend(serde_ipld_dagcbor::to_vec(k).unwrap());
        out.extend(encode(v));
    }
    out
}

/// The entries of a map block in canonical order.
pub fn map_entries(bytes: &[u8]) -> Vec<(String, Ipld)> {
    match decode(bytes) {
        Ipld::Map(m) => {
            let mut v: Vec<_> = m.into_iter().collect();
            v.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then(a.0.cmp(&b.0)));
            v
        }
        other => panic!("not a map: {other:?}"),
    }
}

/// A key that signs commits.
pub enum Signer {
    K256(k256::ecdsa::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl Signer {
    pub fn k256(seed: u8) -> Self {
        Signer::K256(k256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }

    pub fn p256(seed: u8) -> Self {
        Signer::P256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }

    /// Low-S compact signature over SHA-256(msg).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use k256::ecdsa::signature::Signer as _;
        match self {
            Signer::K256(k) => {
                let s: k256::ecdsa::Signature = k.sign(msg);
                s.normalize_s().unwrap_or(s).to_bytes().to_vec()
            }
            Signer::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.normalize_s().unwrap_or(s).to_bytes().to_vec()
            }
        }
    }

    /// `did:key:` of the public half.
    pub fn did_key(&self) -> String {
        self.public().to_did_key()
    }

    pub fn public(&self) -> atcr_verify::crypto::PublicKey {
        match self {
            Signer::K256(k) => atcr_verify::crypto::PublicKey::K256(*k.verifying_key()),
            Signer::P256(k) => atcr_verify::crypto::PublicKey::P256(*k.verifying_key()),
        }
    }

    /// The multibase part of the did:key (for a `Multikey` verification method).
    pub fn multikey(&self) -> String {
        self.did_key().trim_start_matches("did:key:").to_owned()
    }
}

/// Turns a compact low-S signature into its high-S twin (s' = n - s); same validity
/// under a lenient verifier.
pub fn high_s(sig: &[u8], curve: atcr_verify::crypto::KeyType) -> Vec<u8> {
    match curve {
        atcr_verify::crypto::KeyType::K256 => {
            let s = k256::ecdsa::Signature::from_slice(sig).unwrap();
            let (r, s) = s.split_scalars();
            let high = k256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
            high.to_bytes().to_vec()
        }
        atcr_verify::crypto::KeyType::P256 => {
            let s = p256::ecdsa::Signature::from_slice(sig).unwrap();
            let (r, s) = s.split_scalars();
            let high = p256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
            high.to_bytes().to_vec()
        }
    }
}

/// The blocks of a proof CAR, editable.
#[derive(Clone)]
pub struct Blocks {
    pub root: Cid,
    pub blocks: BTreeMap<Cid, Vec<u8>>,
}

impl Blocks {
    pub fn from_car(bytes: &[u8]) -> Self {
        let car = Car::read(bytes, &CarLimits::default()).unwrap();
        let blocks = car
            .cids()
            .map(|c| (*c, car.block(c).unwrap().to_vec()))
            .collect();
        Blocks {
            root: *car.root(),
            blocks,
        }
    }

    /// Writes a CAR: the commit first, then the other blocks.
    pub fn to_car(&self) -> Vec<u8> {
        let mut list: Vec<(Cid, Vec<u8>)> = Vec::new();
        if let Some(b) = self.blocks.get(&self.root) {
            list.push((self.root, b.clone()));
        }
        list.extend(
            self.blocks
                .iter()
                .filter(|(c, _)| **c != self.root)
                .map(|(c, b)| (*c, b.clone())),
        );
        write_car(&[self.root], &list)
    }

    pub fn commit(&self) -> Vec<(String, Ipld)> {
        map_entries(&self.blocks[&self.root])
    }

    /// The MST root the commit points at.
    pub fn data_root(&self) -> Cid {
        match self.commit().iter().find(|(k, _)| k == "data") {
            Some((_, Ipld::Link(c))) => *c,
            other => panic!("commit without data: {other:?}"),
        }
    }

    /// The CIDs on the path to `key`: MST nodes from the root down, then the record.
    pub fn path(&self, key: &str) -> (Vec<Cid>, Cid) {
        let mut nodes = Vec::new();
        let mut cid = self.data_root();
        loop {
            nodes.push(cid);
            let node = decode(&self.blocks[&cid]);
            let Ipld::Map(node) = node else { panic!() };
            let mut next = node.get("l").cloned();
            let mut current: Vec<u8> = Vec::new();
            let Some(Ipld::List(entries)) = node.get("e") else {
                panic!()
            };
            for e in entries {
                let Ipld::Map(e) = e else { panic!() };
                let (Some(Ipld::Integer(p)), Some(Ipld::Bytes(k))) = (e.get("p"), e.get("k"))
                else {
                    panic!()
                };
                current.truncate(*p as usize);
                current.extend_from_slice(k);
                match current.as_slice().cmp(key.as_bytes()) {
                    std::cmp::Ordering::Less => next = e.get("t").cloned(),
                    std::cmp::Ordering::Equal => {
                        let Some(Ipld::Link(v)) = e.get("v") else {
                            panic!()
                        };
                        return (nodes, *v);
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            match next {
                Some(Ipld::Link(c)) => cid = c,
                _ => panic!("{key} not in repo"),
            }
        }
    }

    /// Replaces block `old` by `bytes` (hashed anew) and rewrites every block that links
    /// to it, up to the commit and the CAR root. Returns the new CID. The commit signature
    /// is left as it was (stale) unless `resign` is called.
    pub fn replace(&mut self, old: Cid, bytes: Vec<u8>) -> Cid {
        let new = cid_for(&bytes);
        self.blocks.remove(&old);
        self.blocks.insert(new, bytes);
        if self.root == old {
            self.root = new;
        }
        // Found by bytes, not by decoding: the new block may be deliberately non-canonical.
        let needle = old.to_bytes();
        let parents: Vec<Cid> = self
            .blocks
            .iter()
            .filter(|(c, b)| **c != new && c.codec() == DAG_CBOR && contains(b, &needle))
            .map(|(c, _)| *c)
            .collect();
        for parent in parents {
            let mut value = decode(&self.blocks[&parent]);
            relink(&mut value, &old, &new);
            self.replace(parent, encode(&value));
        }
        new
    }

    /// Re-signs the commit with `signer` (and re-roots the CAR on the new commit CID).
    pub fn resign(&mut self, signer: &Signer) {
        let mut entries = self.commit();
        entries.retain(|(k, _)| k != "sig");
        let unsigned = Ipld::Map(entries.iter().cloned().collect());
        let sig = signer.sign(&encode(&unsigned));
        self.set_sig(sig);
    }

    /// Replaces the commit's `sig` bytes as they are.
    pub fn set_sig(&mut self, sig: Vec<u8>) {
        let mut entries: BTreeMap<String, Ipld> = self.commit().into_iter().collect();
        entries.insert("sig".into(), Ipld::Bytes(sig));
        self.replace(self.root, encode(&Ipld::Map(entries)));
    }

    pub fn sig(&self) -> Vec<u8> {
        match self.commit().into_iter().find(|(k, _)| k == "sig") {
            Some((_, Ipld::Bytes(b))) => b,
            other => panic!("commit without sig: {other:?}"),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn relink(v: &mut Ipld, old: &Cid, new: &Cid) {
    match v {
        Ipld::Link(c) if c == old => *c = *new,
        Ipld::List(l) => l.iter_mut().for_each(|x| relink(x, old, new)),
        Ipld::Map(m) => m.values_mut().for_each(|x| relink(x, old, new)),
        _ => {}
    }
}

/// Builds an MST from (key, value) pairs, atproto's way. Returns the root CID (an empty
/// node for no keys) and every node block.
pub fn build_mst(pairs: &[(String, Cid)]) -> (Cid, BTreeMap<Cid, Vec<u8>>) {
    use atcr_verify::proof::mst::{common_prefix_len, key_height};
    let mut sorted: Vec<(Vec<u8>, Cid, u32)> = pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), *v, key_height(k.as_bytes())))
        .collect();
    sorted.sort();
    let top = sorted.iter().map(|e| e.2).max().unwrap_or(0);
    let mut blocks = BTreeMap::new();

    fn node(
        items: &[(Vec<u8>, Cid, u32)],
        layer: u32,
        blocks: &mut BTreeMap<Cid, Vec<u8>>,
    ) -> Option<Cid> {
        if items.is_empty() {
            return None;
        }
        let subtree = |range: &[(Vec<u8>, Cid, u32)], blocks: &mut BTreeMap<Cid, Vec<u8>>| {
            if range.is_empty() {
                Ipld::Null
            } else {
                assert!(layer > 0, "keys below layer 0");
                Ipld::Link(node(range, layer - 1, blocks).unwrap())
            }
        };
        let at_layer: Vec<usize> = (0..items.len()).filter(|i| items[*i].2 == layer).collect();
        let first = at_layer.first().copied().unwrap_or(items.len());
        let l = subtree(&items[..first], blocks);
        let mut entries = Vec::new();
        let mut prev: &[u8] = &[];
        for (n, &i) in at_layer.iter().enumerate() {
            let end = at_layer.get(n + 1).copied().unwrap_or(items.len());
            let t = subtree(&items[i + 1..end], blocks);
            let key = &items[i].0;
            let p = common_prefix_len(prev, key);
            entries.push(Ipld::Map(BTreeMap::from([
                ("p".to_owned(), Ipld::Integer(p as i128)),
                ("k".to_owned(), Ipld::Bytes(key[p..].to_vec())),
                ("v".to_owned(), Ipld::Link(items[i].1)),
                ("t".to_owned(), t),
            ])));
            prev = key;
        }
        let bytes = encode(&Ipld::Map(BTreeMap::from([
            ("l".to_owned(), l),
            ("e".to_owned(), Ipld::List(entries)),
        ])));
        let cid = cid_for(&bytes);
        blocks.insert(cid, bytes);
        Some(cid)
    }

    let root = node(&sorted, top, &mut blocks).unwrap_or_else(|| {
        let bytes = encode(&Ipld::Map(BTreeMap::from([
            ("l".to_owned(), Ipld::Null),
            ("e".to_owned(), Ipld::List(vec![])),
        ])));
        let cid = cid_for(&bytes);
        blocks.insert(cid, bytes);
        cid
    });
    (root, blocks)
}
