//! A fast, non-cryptographic hasher for node-name lookups on the request path.
//!
//! Node names come from the cluster (the scheduler and the API server), not from untrusted
//! clients, so hash flooding is not a concern; the default SipHash costs about as much as the
//! rest of the per-node decision.

use std::hash::{BuildHasher, Hasher};

/// Builds [`FastHasher`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastBuild;

impl BuildHasher for FastBuild {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(SEED)
    }
}

/// Folded-multiply hashing (a 64×64→128-bit product, halves XORed), eight bytes at a time.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastHasher(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED: u64 = 0x2d35_8dcc_aa6c_78a5;

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl FastHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = fold_mul(self.0 ^ w, K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        fold_mul(self.0, SEED)
    }
}

/// A `HashMap` keyed with [`FastBuild`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastBuild>;

/// Longest name kept inside the key itself.
const INLINE: usize = 46;

/// A node name as a hash-map key, stored inline when short (nearly every node name), so a
/// lookup compares bytes already in the table instead of following a pointer per probe.
/// Looked up with `&[u8]` (`name.as_bytes()`).
#[derive(Clone)]
pub enum NameKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl NameKey {
    pub fn new(name: &str) -> Self {
        let b = name.as_bytes();
        if b.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..b.len()].copy_from_slice(b);
            NameKey::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            NameKey::Heap(b.into())
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            NameKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            NameKey::Heap(b) => b,
        }
    }
}

impl std::fmt::Debug for NameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl PartialEq for NameKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for NameKey {}

impl std::hash::Hash for NameKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash exactly like the `[u8]` it is looked up with.
        self.as_bytes().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for NameKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn node_names_spread_over_buckets() {
        let mut low_bits = HashSet::new();
        for i in 0..5000 {
            let mut h = FastBuild.build_hasher();
            h.write(format!("node-{i:05}").as_bytes());
            low_bits.insert(h.finish() & 0x1fff);
        }
        // 5,000 names over 8,192 buckets: a uniform hash fills about 3,700 of them.
        assert!(low_bits.len() > 3300, "{}", low_bits.len());
    }

    #[test]
    fn short_and_long_names_are_found_by_their_bytes() {
        let long = "ip-10-0-12-34.us-west-2.compute.internal.example.org";
        let mut m: FastMap<NameKey, usize> = FastMap::default();
        m.insert(NameKey::new("gpu-node-1"), 1);
        m.insert(NameKey::new(long), 2);
        m.insert(NameKey::new(""), 3);
        assert!(matches!(NameKey::new(long), NameKey::Heap(_)));
        assert_eq!(m.get("gpu-node-1".as_bytes()), Some(&1));
        assert_eq!(m.get(long.as_bytes()), Some(&2));
        assert_eq!(m.get("".as_bytes()), Some(&3));
        assert_eq!(m.get("gpu-node-10".as_bytes()), None);
        assert_eq!(format!("{:?}", NameKey::new("n")), "\"n\"");
    }

    #[test]
    fn names_that_differ_only_in_length_hash_differently() {
        let hash = |s: &str| {
            let mut h = FastBuild.build_hasher();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_ne!(hash("a"), hash("a\0"));
        assert_ne!(hash("node-1"), hash("node-10"));
    }
}
