//! `hostpids`: the host pids of a container's GPU processes, written by gpu-manager into the
//! container's state dir (`/run/vcuda/hostpids` inside it) and read by the limiter's sampler.
//!
//! NVML reports processes by their pid in the host's pid namespace, which a process in a
//! container cannot learn about itself. gpu-manager sees the host's `/proc` and the cgroups,
//! maps every NVML process to its container (the same mapping the metrics use) and publishes
//! the list, so the feedback loop can sum the container's own utilisation.
//!
//! Layout, little-endian: magic `b"GMHP"`, u32 version (1), u32 count (≤ [`MAX_PIDS`]), u32
//! FNV-1a-32 of the pid bytes, then `count` u32 pids, ascending and distinct. The file is
//! replaced atomically (temp file + rename), so a reader sees one whole version or the other.

/// The file name inside the state dir.
pub const HOSTPIDS_FILE: &str = "hostpids";
/// Format version.
pub const VERSION: u32 = 1;
/// At most this many pids are published (more GPU processes in one container are ignored).
pub const MAX_PIDS: usize = 1024;

const MAGIC: [u8; 4] = *b"GMHP";
const HEADER: usize = 16;

/// Why a `hostpids` file was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPidsError {
    /// Shorter than its header or its count says.
    Truncated { len: usize, need: usize },
    /// Not a hostpids file.
    BadMagic,
    /// A version this reader does not know.
    UnknownVersion(u32),
    /// More pids than [`MAX_PIDS`].
    TooMany(u32),
    /// The checksum does not match the pids.
    Checksum,
}

impl std::fmt::Display for HostPidsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { len, need } => write!(f, "hostpids is {len} bytes, needs {need}"),
            Self::BadMagic => f.write_str("not a hostpids file (no GMHP magic)"),
            Self::UnknownVersion(v) => write!(
                f,
                "hostpids version {v}; this reader knows version {VERSION}"
            ),
            Self::TooMany(n) => {
                write!(f, "hostpids lists {n} pids; at most {MAX_PIDS} are allowed")
            }
            Self::Checksum => f.write_str("hostpids checksum mismatch"),
        }
    }
}

impl std::error::Error for HostPidsError {}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Encode a pid list (sorted, deduplicated, zeros dropped, truncated to [`MAX_PIDS`]).
pub fn encode(pids: &[u32]) -> Vec<u8> {
    let mut v: Vec<u32> = pids.iter().copied().filter(|&p| p != 0).collect();
    v.sort_unstable();
    v.dedup();
    v.truncate(MAX_PIDS);
    let body: Vec<u8> = v.iter().flat_map(|p| p.to_le_bytes()).collect();
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decode a `hostpids` file. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Vec<u32>, HostPidsError> {
    if bytes.len() < HEADER {
        return Err(HostPidsError::Truncated {
            len: bytes.len(),
            need: HEADER,
        });
    }
    if bytes.get(..4) != Some(&MAGIC[..]) {
        return Err(HostPidsError::BadMagic);
    }
    let version = u32_at(bytes, 4).unwrap_or(0);
    if version != VERSION {
        return Err(HostPidsError::UnknownVersion(version));
    }
    let count = u32_at(bytes, 8).unwrap_or(0);
    if count as usize > MAX_PIDS {
        return Err(HostPidsError::TooMany(count));
    }
    let need = HEADER + count as usize * 4;
    let body = bytes.get(HEADER..need).ok_or(HostPidsError::Truncated {
        len: bytes.len(),
        need,
    })?;
    if u32_at(bytes, 12) != Some(fnv1a(body)) {
        return Err(HostPidsError::Checksum);
    }
    Ok(body
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_layout_is_pinned() {
        let b = encode(&[7, 3, 3, 0]);
        assert_eq!(&b[..4], b"GMHP");
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(
            &b[8..12],
            &2u32.to_le_bytes(),
            "sorted, deduplicated, zero dropped"
        );
        assert_eq!(&b[16..24], &[3, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(decode(&b), Ok(vec![3, 7]));
    }

    #[test]
    fn damaged_files_say_what_is_wrong() {
        let good = encode(&[1, 2]);
        assert_eq!(
            decode(&good[..10]),
            Err(HostPidsError::Truncated {
                len: 10,
                need: HEADER
            })
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(HostPidsError::BadMagic));
        let mut bad = good.clone();
        bad[4] = 2;
        assert!(decode(&bad).unwrap_err().to_string().contains("version 2"));
        let mut bad = good.clone();
        bad[16] ^= 1;
        assert_eq!(decode(&bad), Err(HostPidsError::Checksum));
        let mut bad = good;
        bad[8] = 3;
        assert!(matches!(decode(&bad), Err(HostPidsError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&b);
        }

        #[test]
        fn round_trip(p in proptest::collection::vec(any::<u32>(), 0..50)) {
            let mut want: Vec<u32> = p.iter().copied().filter(|&x| x != 0).collect();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(decode(&encode(&p)), Ok(want));
        }
    }
}
