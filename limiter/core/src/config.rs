//! `vcuda.cfg`: the binary limiter config, written by gpu-manager beside `limits.json` in each
//! container's record directory (mounted read-only at `/etc/vcuda`) and read once by
//! `libvcuda.so` at its first CUDA or NVML call.
//!
//! The file has a fixed size of [`CONFIG_SIZE`] bytes, independent of any struct's `sizeof`,
//! so that a newer writer can never hand an older reader a shorter or longer file than it
//! expects. All integers are little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"GMVC"` |
//! | 4 | 4 | u32 version = [`CONFIG_VERSION`] |
//! | 8 | 4 | u32 file size = [`CONFIG_SIZE`] |
//! | 12 | 4 | u32 flags: bit 0 [`FLAG_SOFT`], bit 1 [`FLAG_INCOMPLETE`] |
//! | 16 | 4 | u32 card count, 1..=[`MAX_CARDS`] |
//! | 20 | 4 | u32 checksum: FNV-1a-32 of all 4096 bytes with this field zeroed |
//! | 24 | 8 | reserved (zero) |
//! | 32 | 64 | pod UID, UTF-8, NUL-padded |
//! | 96 | 64 | namespace, UTF-8, NUL-padded |
//! | 160 | 64 | container name, UTF-8, NUL-padded |
//! | 224 | 32 | reserved (zero) |
//! | 256 + 128·i | 128 | card record i (below) |
//!
//! Card record (at [`CARDS_OFFSET`] + [`CARD_SIZE`]·i):
//!
//! | offset | size | field |
//! |---|---|---|
//! | +0 | 4 | u32 card index on the node |
//! | +4 | 4 | u32 minor (N of `/dev/nvidiaN`) |
//! | +8 | 4 | u32 cores: share of the card's compute in percent, 1..=100 (100 = whole card) |
//! | +12 | 4 | u32 core limit: soft upper bound, cores..=100 (equals cores in hard mode) |
//! | +16 | 8 | u64 memory limit in bytes |
//! | +24 | 8 | reserved (zero) |
//! | +32 | 64 | NVML UUID, ASCII, NUL-padded |
//! | +96 | 32 | reserved (zero) |
//!
//! Every string field holds at most [`MAX_STRING`] bytes, so it is always NUL-terminated.
//! The rest of the file is zero. Readers ignore the reserved bytes (the checksum covers them).

use std::fmt;

/// File name of the binary config inside the record directory.
pub const CONFIG_FILE: &str = "vcuda.cfg";
/// Exact size of the file in bytes.
pub const CONFIG_SIZE: usize = 4096;
/// The layout version this code writes and reads.
pub const CONFIG_VERSION: u32 = 1;
/// Most cards one container may have.
pub const MAX_CARDS: usize = 16;
/// The magic number at offset 0.
pub const MAGIC: [u8; 4] = *b"GMVC";
/// Size of the header; the card records start here.
pub const CARDS_OFFSET: usize = 256;
/// Size of one card record.
pub const CARD_SIZE: usize = 128;
/// Flag bit: soft mode (a card's compute may rise to its core limit when the card is idle).
pub const FLAG_SOFT: u32 = 1;
/// Flag bit: a share whose vcuda-memory half is not allocated yet; the limiter must refuse
/// to run (the memory limit is unknown).
pub const FLAG_INCOMPLETE: u32 = 1 << 1;
/// Longest string (in bytes) a 64-byte field holds: one byte is always left for the NUL.
pub const MAX_STRING: usize = 63;

const OFF_VERSION: usize = 4;
const OFF_SIZE: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_COUNT: usize = 16;
const OFF_CHECKSUM: usize = 20;
const OFF_POD_UID: usize = 32;
const OFF_NAMESPACE: usize = 96;
const OFF_CONTAINER: usize = 160;
const FIELD: usize = 64;
const CARD_INDEX: usize = 0;
const CARD_MINOR: usize = 4;
const CARD_CORES: usize = 8;
const CARD_CORE_LIMIT: usize = 12;
const CARD_MEMORY: usize = 16;
const CARD_UUID: usize = 32;
const KNOWN_FLAGS: u32 = FLAG_SOFT | FLAG_INCOMPLETE;

/// How the compute share is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// At most `cores` percent of each card, always.
    Hard,
    /// `cores` percent guaranteed; up to `core_limit` percent while the card has idle time.
    Soft,
}

/// The limits on one card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardLimit {
    /// Card index on the node (position after sorting by PCI bus ID).
    pub index: u32,
    /// N of `/dev/nvidiaN`.
    pub minor: u32,
    /// NVML UUID (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
    pub uuid: String,
    /// Share of the card's compute in percent, 1..=100 (100 = the whole card).
    pub cores: u32,
    /// Soft upper bound in percent, `cores..=100`; equals `cores` in hard mode.
    pub core_limit: u32,
    /// Device memory the container may allocate on this card, in bytes (0 while
    /// [`Config::incomplete`]).
    pub memory_limit: u64,
}

/// One container's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// The share's vcuda-memory half is not allocated yet: refuse to run.
    pub incomplete: bool,
    /// Empty when unknown (standalone mode).
    pub pod_uid: String,
    /// Empty when unknown.
    pub namespace: String,
    /// Empty when unknown.
    pub container: String,
    /// 1..=[`MAX_CARDS`] cards, distinct indices and UUIDs.
    pub cards: Vec<CardLimit>,
}

/// Why a config cannot be encoded or a file cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The first four bytes are not `GMVC`.
    BadMagic { found: Vec<u8> },
    /// A layout version this code does not know.
    UnknownVersion { version: u32 },
    /// The file (or the size field) is not [`CONFIG_SIZE`] bytes.
    WrongSize { size: usize, what: &'static str },
    /// The checksum field does not match the content.
    ChecksumMismatch { stored: u32, computed: u32 },
    /// Flag bits this version does not define.
    UnknownFlags { flags: u32 },
    /// The card count is 0 or more than [`MAX_CARDS`].
    CardCount { count: usize },
    /// A card's cores are outside 1..=100.
    Cores { card: u32, cores: u32 },
    /// A card's core limit is outside cores..=100.
    CoreLimit {
        card: u32,
        cores: u32,
        core_limit: u32,
    },
    /// Hard mode with a core limit other than the cores.
    HardCoreLimit {
        card: u32,
        cores: u32,
        core_limit: u32,
    },
    /// Two cards with the same index or UUID.
    DuplicateCard { card: u32, uuid: String },
    /// A string longer than [`MAX_STRING`] bytes.
    StringTooLong { field: String, len: usize },
    /// A string with a NUL inside, or a field whose padding is not all NUL.
    BadPadding { field: String },
    /// A string field that is not UTF-8.
    NotUtf8 { field: String },
    /// A UUID that is not ASCII.
    UuidNotAscii { card: u32 },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::BadMagic { found } => write!(
                f,
                "not a vcuda.cfg file: it starts with {found:02x?}, a vcuda.cfg file starts with \"GMVC\""
            ),
            ConfigError::UnknownVersion { version } => write!(
                f,
                "vcuda.cfg version {version}; this library reads version {CONFIG_VERSION} (gpu-manager and libvcuda.so are from different releases)"
            ),
            ConfigError::WrongSize { size, what } => write!(
                f,
                "vcuda.cfg {what} is {size} bytes; a vcuda.cfg file is exactly {CONFIG_SIZE} bytes"
            ),
            ConfigError::ChecksumMismatch { stored, computed } => write!(
                f,
                "vcuda.cfg checksum mismatch: the file says {stored:#010x}, its content gives {computed:#010x} (the file is corrupt)"
            ),
            ConfigError::UnknownFlags { flags } => write!(
                f,
                "vcuda.cfg flags {flags:#x} have unknown bits; this library knows bit 0 (soft) and bit 1 (incomplete)"
            ),
            ConfigError::CardCount { count } => write!(
                f,
                "vcuda.cfg card count {count}; allowed 1 to {MAX_CARDS}"
            ),
            ConfigError::Cores { card, cores } => write!(
                f,
                "card {card}: cores {cores}; allowed 1 to 100 (percent of the card)"
            ),
            ConfigError::CoreLimit {
                card,
                cores,
                core_limit,
            } => write!(
                f,
                "card {card}: core limit {core_limit}; allowed {cores} (its cores) to 100"
            ),
            ConfigError::HardCoreLimit {
                card,
                cores,
                core_limit,
            } => write!(
                f,
                "card {card}: core limit {core_limit} in hard mode; hard mode needs the core limit equal to the cores ({cores})"
            ),
            ConfigError::DuplicateCard { card, uuid } => write!(
                f,
                "card {card} ({uuid}) is listed twice; each card index and UUID may appear once"
            ),
            ConfigError::StringTooLong { field, len } => write!(
                f,
                "{field} is {len} bytes; at most {MAX_STRING} bytes fit"
            ),
            ConfigError::BadPadding { field } => write!(
                f,
                "{field} contains a NUL byte inside the text or non-NUL bytes after it; the field must be text followed by NUL bytes only"
            ),
            ConfigError::NotUtf8 { field } => write!(f, "{field} is not UTF-8"),
            ConfigError::UuidNotAscii { card } => write!(
                f,
                "card {card}: the UUID is not ASCII; use NVML's form GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// FNV-1a, 32 bits.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The checksum of a file: FNV-1a-32 with the checksum field taken as zero.
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for (i, &b) in bytes.iter().enumerate() {
        let b = if (OFF_CHECKSUM..OFF_CHECKSUM + 4).contains(&i) {
            0
        } else {
            b
        };
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// `bytes` must hold `off + 4` bytes (the caller checked the size).
fn get_u32(bytes: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(off..off + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn get_u64(bytes: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(off..off + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

fn check_string(field: &str, s: &str) -> Result<(), ConfigError> {
    if s.len() > MAX_STRING {
        return Err(ConfigError::StringTooLong {
            field: field.to_string(),
            len: s.len(),
        });
    }
    if s.as_bytes().contains(&0) {
        return Err(ConfigError::BadPadding {
            field: field.to_string(),
        });
    }
    Ok(())
}

fn put_string(buf: &mut [u8], off: usize, s: &str) {
    buf[off..off + s.len()].copy_from_slice(s.as_bytes());
}

fn get_string(bytes: &[u8], off: usize, field: &str) -> Result<String, ConfigError> {
    let raw = bytes.get(off..off + FIELD).unwrap_or(&[]);
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    if len > MAX_STRING {
        return Err(ConfigError::StringTooLong {
            field: field.to_string(),
            len,
        });
    }
    if raw[len..].iter().any(|&b| b != 0) {
        return Err(ConfigError::BadPadding {
            field: field.to_string(),
        });
    }
    std::str::from_utf8(&raw[..len])
        .map(str::to_string)
        .map_err(|_| ConfigError::NotUtf8 {
            field: field.to_string(),
        })
}

impl Config {
    /// Check everything the encoder and the decoder require.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_string("pod uid", &self.pod_uid)?;
        check_string("namespace", &self.namespace)?;
        check_string("container name", &self.container)?;
        if self.cards.is_empty() || self.cards.len() > MAX_CARDS {
            return Err(ConfigError::CardCount {
                count: self.cards.len(),
            });
        }
        for (i, c) in self.cards.iter().enumerate() {
            if !c.uuid.is_ascii() {
                return Err(ConfigError::UuidNotAscii { card: c.index });
            }
            check_string(&format!("card {} uuid", c.index), &c.uuid)?;
            if !(1..=100).contains(&c.cores) {
                return Err(ConfigError::Cores {
                    card: c.index,
                    cores: c.cores,
                });
            }
            if !(c.cores..=100).contains(&c.core_limit) {
                return Err(ConfigError::CoreLimit {
                    card: c.index,
                    cores: c.cores,
                    core_limit: c.core_limit,
                });
            }
            if self.mode == Mode::Hard && c.core_limit != c.cores {
                return Err(ConfigError::HardCoreLimit {
                    card: c.index,
                    cores: c.cores,
                    core_limit: c.core_limit,
                });
            }
            if self.cards[..i]
                .iter()
                .any(|o| o.index == c.index || o.uuid == c.uuid)
            {
                return Err(ConfigError::DuplicateCard {
                    card: c.index,
                    uuid: c.uuid.clone(),
                });
            }
        }
        Ok(())
    }

    /// The file's bytes (exactly [`CONFIG_SIZE`]).
    pub fn encode(&self) -> Result<Vec<u8>, ConfigError> {
        self.validate()?;
        let mut buf = vec![0u8; CONFIG_SIZE];
        buf[..4].copy_from_slice(&MAGIC);
        put_u32(&mut buf, OFF_VERSION, CONFIG_VERSION);
        put_u32(&mut buf, OFF_SIZE, CONFIG_SIZE as u32);
        let mut flags = 0;
        if self.mode == Mode::Soft {
            flags |= FLAG_SOFT;
        }
        if self.incomplete {
            flags |= FLAG_INCOMPLETE;
        }
        put_u32(&mut buf, OFF_FLAGS, flags);
        put_u32(&mut buf, OFF_COUNT, self.cards.len() as u32);
        put_string(&mut buf, OFF_POD_UID, &self.pod_uid);
        put_string(&mut buf, OFF_NAMESPACE, &self.namespace);
        put_string(&mut buf, OFF_CONTAINER, &self.container);
        for (i, c) in self.cards.iter().enumerate() {
            let base = CARDS_OFFSET + i * CARD_SIZE;
            put_u32(&mut buf, base + CARD_INDEX, c.index);
            put_u32(&mut buf, base + CARD_MINOR, c.minor);
            put_u32(&mut buf, base + CARD_CORES, c.cores);
            put_u32(&mut buf, base + CARD_CORE_LIMIT, c.core_limit);
            put_u64(&mut buf, base + CARD_MEMORY, c.memory_limit);
            put_string(&mut buf, base + CARD_UUID, &c.uuid);
        }
        let sum = checksum(&buf);
        put_u32(&mut buf, OFF_CHECKSUM, sum);
        Ok(buf)
    }

    /// Read a file's bytes. Never panics; every refusal says what is wrong and what is allowed.
    pub fn decode(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.len() < 4 || bytes[..4] != MAGIC {
            return Err(ConfigError::BadMagic {
                found: bytes.iter().take(4).copied().collect(),
            });
        }
        if bytes.len() >= OFF_VERSION + 4 {
            let version = get_u32(bytes, OFF_VERSION);
            if version != CONFIG_VERSION {
                return Err(ConfigError::UnknownVersion { version });
            }
        }
        if bytes.len() != CONFIG_SIZE {
            return Err(ConfigError::WrongSize {
                size: bytes.len(),
                what: "file",
            });
        }
        let size = get_u32(bytes, OFF_SIZE);
        if size as usize != CONFIG_SIZE {
            return Err(ConfigError::WrongSize {
                size: size as usize,
                what: "size field",
            });
        }
        let stored = get_u32(bytes, OFF_CHECKSUM);
        let computed = checksum(bytes);
        if stored != computed {
            return Err(ConfigError::ChecksumMismatch { stored, computed });
        }
        let flags = get_u32(bytes, OFF_FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ConfigError::UnknownFlags { flags });
        }
        let count = get_u32(bytes, OFF_COUNT) as usize;
        if count == 0 || count > MAX_CARDS {
            return Err(ConfigError::CardCount { count });
        }
        let mut cards = Vec::with_capacity(count);
        for i in 0..count {
            let base = CARDS_OFFSET + i * CARD_SIZE;
            let index = get_u32(bytes, base + CARD_INDEX);
            let raw_uuid = bytes.get(base + CARD_UUID..base + CARD_UUID + FIELD);
            if raw_uuid.is_some_and(|u| !u.is_ascii()) {
                return Err(ConfigError::UuidNotAscii { card: index });
            }
            cards.push(CardLimit {
                index,
                minor: get_u32(bytes, base + CARD_MINOR),
                uuid: get_string(bytes, base + CARD_UUID, &format!("card {index} uuid"))?,
                cores: get_u32(bytes, base + CARD_CORES),
                core_limit: get_u32(bytes, base + CARD_CORE_LIMIT),
                memory_limit: get_u64(bytes, base + CARD_MEMORY),
            });
        }
        let config = Config {
            mode: if flags & FLAG_SOFT != 0 {
                Mode::Soft
            } else {
                Mode::Hard
            },
            incomplete: flags & FLAG_INCOMPLETE != 0,
            pod_uid: get_string(bytes, OFF_POD_UID, "pod uid")?,
            namespace: get_string(bytes, OFF_NAMESPACE, "namespace")?,
            container: get_string(bytes, OFF_CONTAINER, "container name")?,
            cards,
        };
        config.validate()?;
        Ok(config)
    }

    /// The limits of the card with this NVML UUID.
    pub fn card_by_uuid(&self, uuid: &str) -> Option<&CardLimit> {
        self.cards.iter().find(|c| c.uuid == uuid)
    }

    /// The limits of the card with this node index.
    pub fn card_by_index(&self, index: u32) -> Option<&CardLimit> {
        self.cards.iter().find(|c| c.index == index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID0: &str = "GPU-36f675cc-81e7-4ef5-a8e2-5d940ed90475";
    const UUID1: &str = "GPU-6513270e-269e-4d37-b2a7-4de452e6b438";

    fn share() -> Config {
        Config {
            mode: Mode::Hard,
            incomplete: false,
            pod_uid: "5b7c1d2e-0000-4000-8000-000000000001".into(),
            namespace: "ml".into(),
            container: "main".into(),
            cards: vec![CardLimit {
                index: 3,
                minor: 7,
                uuid: UUID0.into(),
                cores: 30,
                core_limit: 30,
                memory_limit: 5 << 30,
            }],
        }
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Put a valid checksum on hand-edited bytes.
    fn reseal(b: &mut [u8]) {
        let sum = checksum(b);
        b[20..24].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn the_header_sits_at_its_documented_offsets() {
        let mut cfg = share();
        cfg.mode = Mode::Soft;
        cfg.cards[0].core_limit = 80;
        let b = cfg.encode().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..4], b"GMVC");
        assert_eq!(u32_at(&b, 4), 1);
        assert_eq!(u32_at(&b, 8), 4096);
        assert_eq!(u32_at(&b, 12), 1, "soft, complete");
        assert_eq!(u32_at(&b, 16), 1);
        assert!(b[24..32].iter().all(|&x| x == 0));
        assert_eq!(&b[32..32 + 36], b"5b7c1d2e-0000-4000-8000-000000000001");
        assert!(b[32 + 36..96].iter().all(|&x| x == 0));
        assert_eq!(&b[96..98], b"ml");
        assert!(b[98..160].iter().all(|&x| x == 0));
        assert_eq!(&b[160..164], b"main");
        assert!(b[164..256].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_card_record_sits_at_its_documented_offsets() {
        let mut cfg = share();
        cfg.cards.push(CardLimit {
            index: 5,
            minor: 9,
            uuid: UUID1.into(),
            cores: 30,
            core_limit: 30,
            memory_limit: 0x0102_0304_0506_0708,
        });
        let b = cfg.encode().unwrap();
        assert_eq!(u32_at(&b, 16), 2);
        let c0 = 256;
        assert_eq!(u32_at(&b, c0), 3);
        assert_eq!(u32_at(&b, c0 + 4), 7);
        assert_eq!(u32_at(&b, c0 + 8), 30);
        assert_eq!(u32_at(&b, c0 + 12), 30);
        assert_eq!(&b[c0 + 16..c0 + 24], &(5u64 << 30).to_le_bytes());
        assert!(b[c0 + 24..c0 + 32].iter().all(|&x| x == 0));
        assert_eq!(&b[c0 + 32..c0 + 32 + 40], UUID0.as_bytes());
        assert!(b[c0 + 72..c0 + 128].iter().all(|&x| x == 0));
        let c1 = 256 + 128;
        assert_eq!(u32_at(&b, c1), 5);
        assert_eq!(u32_at(&b, c1 + 4), 9);
        assert_eq!(
            &b[c1 + 16..c1 + 24],
            &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]
        );
        assert_eq!(&b[c1 + 32..c1 + 72], UUID1.as_bytes());
        assert!(b[c1 + 128..].iter().all(|&x| x == 0), "the rest is zero");
    }

    #[test]
    fn the_checksum_is_fnv1a_over_the_file_with_the_field_zeroed() {
        // Published FNV-1a-32 test vectors.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
        let b = share().encode().unwrap();
        let mut zeroed = b.clone();
        zeroed[20..24].fill(0);
        assert_eq!(u32_at(&b, 20), fnv1a32(&zeroed));
    }

    #[test]
    fn hand_written_bytes_decode() {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(b"GMVC");
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&4096u32.to_le_bytes());
        b[12..16].copy_from_slice(&2u32.to_le_bytes()); // incomplete, hard
        b[16..20].copy_from_slice(&1u32.to_le_bytes());
        b[96..98].copy_from_slice(b"ns");
        b[256..260].copy_from_slice(&1u32.to_le_bytes());
        b[260..264].copy_from_slice(&4u32.to_le_bytes());
        b[264..268].copy_from_slice(&50u32.to_le_bytes());
        b[268..272].copy_from_slice(&50u32.to_le_bytes());
        b[288..288 + 40].copy_from_slice(UUID1.as_bytes());
        reseal(&mut b);
        let cfg = Config::decode(&b).unwrap();
        assert_eq!(cfg.mode, Mode::Hard);
        assert!(cfg.incomplete);
        assert_eq!((cfg.pod_uid.as_str(), cfg.namespace.as_str()), ("", "ns"));
        assert_eq!(cfg.container, "");
        let c = cfg.card_by_uuid(UUID1).unwrap();
        assert_eq!((c.index, c.minor, c.cores, c.core_limit), (1, 4, 50, 50));
        assert_eq!(c.memory_limit, 0);
        assert_eq!(cfg.card_by_index(1), Some(c));
        assert!(cfg.card_by_uuid(UUID0).is_none());
        assert_eq!(cfg.encode().unwrap(), b, "re-encoding gives the same bytes");
    }

    fn refused(b: &[u8]) -> String {
        Config::decode(b).unwrap_err().to_string()
    }

    #[test]
    fn refusals_name_the_problem_and_what_is_allowed() {
        let good = share().encode().unwrap();
        assert!(refused(b"").contains("not a vcuda.cfg file"));
        assert!(refused(b"{\"version\": 1}").contains("not a vcuda.cfg file"));

        let mut b = good.clone();
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(
            refused(&b).contains("version 7; this library reads version 1"),
            "{}",
            refused(&b)
        );
        // A future version is reported as such even if its size differs.
        assert!(refused(&b[..100]).contains("version 7"));

        let e = refused(&good[..4000]);
        assert!(
            e.contains("4000 bytes") && e.contains("exactly 4096"),
            "{e}"
        );
        let mut long = good.clone();
        long.push(0);
        assert!(refused(&long).contains("4097 bytes"));

        let mut b = good.clone();
        b[8..12].copy_from_slice(&8192u32.to_le_bytes());
        assert!(refused(&b).contains("size field is 8192 bytes"));

        let mut b = good.clone();
        b[300] ^= 1;
        assert!(refused(&b).contains("checksum mismatch"));

        let mut b = good.clone();
        b[12..16].copy_from_slice(&4u32.to_le_bytes());
        reseal(&mut b);
        assert!(refused(&b).contains("unknown bits"));

        for count in [0u32, 17, u32::MAX] {
            let mut b = good.clone();
            b[16..20].copy_from_slice(&count.to_le_bytes());
            reseal(&mut b);
            let e = refused(&b);
            assert!(
                e.contains(&format!("card count {count}; allowed 1 to 16")),
                "{e}"
            );
        }

        let mut b = good.clone();
        b[264..268].copy_from_slice(&0u32.to_le_bytes());
        reseal(&mut b);
        assert!(refused(&b).contains("card 3: cores 0; allowed 1 to 100"));

        let mut b = good.clone();
        b[268..272].copy_from_slice(&101u32.to_le_bytes());
        reseal(&mut b);
        assert!(refused(&b).contains("core limit 101; allowed 30 (its cores) to 100"));

        let mut b = good.clone();
        b[268..272].copy_from_slice(&60u32.to_le_bytes());
        reseal(&mut b);
        assert!(refused(&b).contains("hard mode needs the core limit equal to the cores"));

        let mut b = good.clone();
        b[96..160].fill(b'x');
        reseal(&mut b);
        assert!(refused(&b).contains("namespace is 64 bytes; at most 63"));

        let mut b = good.clone();
        b[100] = b'x'; // after the NUL that ends "ml"
        reseal(&mut b);
        assert!(refused(&b).contains("namespace contains a NUL byte"));

        let mut b = good.clone();
        b[160] = 0xff;
        reseal(&mut b);
        assert_eq!(refused(&b), "container name is not UTF-8");

        let mut b = good.clone();
        b[256 + 32] = 0xc3;
        reseal(&mut b);
        assert!(refused(&b).contains("card 3: the UUID is not ASCII"));
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would() {
        let mut c = share();
        c.cards.clear();
        assert_eq!(c.encode(), Err(ConfigError::CardCount { count: 0 }));
        let mut c = share();
        c.cards = (0..17)
            .map(|i| CardLimit {
                index: i,
                uuid: format!("GPU-{i}"),
                ..share().cards[0].clone()
            })
            .collect();
        assert_eq!(c.encode(), Err(ConfigError::CardCount { count: 17 }));
        let mut c = share();
        c.namespace = "n".repeat(64);
        assert!(matches!(
            c.encode(),
            Err(ConfigError::StringTooLong { len: 64, .. })
        ));
        c.namespace = "n".repeat(63);
        assert!(c.encode().is_ok(), "63 bytes fit");
        let mut c = share();
        c.container = "a\0b".into();
        assert!(matches!(c.encode(), Err(ConfigError::BadPadding { .. })));
        let mut c = share();
        c.cards[0].uuid = "GPU-é".into();
        assert_eq!(c.encode(), Err(ConfigError::UuidNotAscii { card: 3 }));
        let mut c = share();
        c.cards.push(c.cards[0].clone());
        let e = c.encode().unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        let mut c = share();
        c.cards[0].core_limit = 29;
        assert!(matches!(c.encode(), Err(ConfigError::CoreLimit { .. })));
        c.mode = Mode::Soft;
        c.cards[0].core_limit = 100;
        assert!(c.encode().is_ok());
    }

    fn card_strategy() -> impl Strategy<Value = (u32, u32, u32, u64, String)> {
        (
            any::<u32>(),
            1u32..=100,
            0u32..=100,
            any::<u64>(),
            "[ -~]{0,63}",
        )
            .prop_map(|(minor, cores, extra, mem, uuid)| {
                (minor, cores, (cores + extra).min(100), mem, uuid)
            })
    }

    fn config_strategy() -> impl Strategy<Value = Config> {
        (
            any::<bool>(),
            any::<bool>(),
            "\\PC{0,15}",
            "[a-z0-9-]{0,63}",
            "[a-z0-9-]{0,63}",
            proptest::collection::vec(card_strategy(), 1..=MAX_CARDS),
        )
            .prop_map(|(soft, incomplete, uid, ns, ctr, cards)| Config {
                mode: if soft { Mode::Soft } else { Mode::Hard },
                incomplete,
                pod_uid: uid.replace('\0', ""),
                namespace: ns,
                container: ctr,
                cards: cards
                    .into_iter()
                    .enumerate()
                    .map(|(i, (minor, cores, limit, mem, uuid))| CardLimit {
                        index: i as u32,
                        minor,
                        // Distinct UUIDs: a prefix that no other card shares.
                        uuid: format!("{i:02}{}", &uuid[..uuid.len().min(61)]),
                        cores,
                        core_limit: if soft { limit } else { cores },
                        memory_limit: mem,
                    })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_gives_the_config_back(cfg in config_strategy()) {
            let bytes = cfg.encode().unwrap();
            prop_assert_eq!(bytes.len(), CONFIG_SIZE);
            prop_assert_eq!(Config::decode(&bytes).unwrap(), cfg);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Config::decode(&b);
        }

        #[test]
        fn decoding_arbitrary_bytes_behind_a_valid_header_never_panics(
            rest in proptest::collection::vec(any::<u8>(), CONFIG_SIZE - 12),
        ) {
            let mut b = b"GMVC\x01\0\0\0\0\x10\0\0".to_vec();
            b.extend_from_slice(&rest);
            reseal(&mut b);
            if let Ok(back) = Config::decode(&b) {
                prop_assert!(back.encode().is_ok());
            }
        }

        #[test]
        fn decoding_a_corrupted_file_never_panics(
            cfg in config_strategy(),
            edits in proptest::collection::vec((0usize..CONFIG_SIZE, any::<u8>()), 1..8),
            seal in any::<bool>(),
        ) {
            let mut b = cfg.encode().unwrap();
            for (at, v) in edits {
                b[at] = v;
            }
            if seal {
                reseal(&mut b);
            }
            if let Ok(back) = Config::decode(&b) {
                // Whatever decodes is itself valid and encodes again.
                prop_assert!(back.encode().is_ok());
            }
        }
    }
}
