//! Layout of the per-container shared region, `<state dir>/region.v1`.
//!
//! Every process of one container maps this file `MAP_SHARED` (the state dir is a read-write
//! per-container host directory that gpu-manager mounts at `/run/vcuda`). It holds, per card,
//! the compute bucket and the lock that serialises check-and-allocate, and one slot per process
//! with the bytes that process has charged on each card. Only lock-free 4- and 8-byte words
//! are shared; each is naturally aligned. The size is fixed and independent of any Rust type,
//! so a newer library never reads past the end of an older file: a header mismatch makes the
//! first process rebuild the file (under `flock`) and later ones wait for it.
//!
//! ```text
//! 0      header   magic "GMVR", version, size, ready flag                  (4 KiB)
//! 4096   cards    MAX_CARDS × CARD_STRIDE: bucket word on its own 128-byte line, then the
//!                 allocation lock, the feedback multiplier and the sampler's words
//! 12288  slots    MAX_SLOTS × SLOT_STRIDE: pid, host pid, start time, bytes per card
//! ```

/// The region's file name inside the state dir (the version is part of the name, so an
/// incompatible layout gets a new file rather than a reinterpretation of an old one).
pub const REGION_FILE: &str = "region.v1";
/// `b"GMVR"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"GMVR");
/// Layout version.
pub const VERSION: u32 = 1;
/// Cards per container (the same bound as the config).
pub const MAX_CARDS: usize = 16;
/// Process slots per container: processes beyond this many alive at once cannot allocate.
pub const MAX_SLOTS: usize = 256;

/// Header offsets.
pub mod header {
    /// u32 magic.
    pub const MAGIC: usize = 0;
    /// u32 layout version.
    pub const VERSION: usize = 4;
    /// u64 total size in bytes.
    pub const SIZE: usize = 8;
    /// u32: 1 once the region is initialised.
    pub const READY: usize = 16;
    /// u32: one past the highest slot ever registered (scans stop there).
    pub const SLOTS_HIGH: usize = 20;
}

/// Start of the per-card blocks.
pub const CARDS_OFFSET: usize = 4096;
/// Bytes per card block.
pub const CARD_STRIDE: usize = 512;

/// Offsets inside one card block.
pub mod card {
    /// u64: the compute bucket's state (see `controller`), CAS-updated at every launch. Alone on
    /// its 128-byte line so launches do not false-share with the allocation lock.
    pub const BUCKET: usize = 0;
    /// u32: pid holding the allocation lock (0 = free). A dead holder is detected and replaced.
    pub const MEM_LOCK: usize = 128;
    /// u32: the feedback loop's rate multiplier in parts per million (0 = not set yet = 1.0).
    pub const MULTIPLIER_PPM: usize = 132;
    /// u32: pid of the process that runs the NVML sampler for this card (0 = none).
    pub const SAMPLER_PID: usize = 136;
    /// u64: CLOCK_MONOTONIC ns of the sampler's last tick (a stale beat lets another take over).
    pub const SAMPLER_BEAT: usize = 144;
    /// u64: CLOCK_MONOTONIC ns of the last launch that had to wait (tells the loop demand was
    /// above the share, so raising the rate is not wind-up).
    pub const LAST_THROTTLED: usize = 152;
    /// u32: the container's utilisation of the card in per-mille, as last sampled.
    pub const OWN_UTIL: usize = 160;
    /// u32: every process's utilisation of the card in per-mille, as last sampled.
    pub const TOTAL_UTIL: usize = 164;
    /// u32: the current target in per-mille (the share, or more in soft mode).
    pub const TARGET: usize = 168;
    /// u64: the largest estimated launch cost (GPU-ns) charged since the sampler last took it.
    pub const MAX_COST: usize = 176;
}

/// Start of the process slots.
pub const SLOTS_OFFSET: usize = CARDS_OFFSET + MAX_CARDS * CARD_STRIDE;
/// Bytes per process slot.
pub const SLOT_STRIDE: usize = 256;

/// Offsets inside one process slot.
pub mod slot {
    /// u32: the process's pid in the container (0 = free slot).
    pub const PID: usize = 0;
    /// u32: the process's pid as NVML reports it (0 = not known).
    pub const HOST_PID: usize = 4;
    /// u64: the process's start time (`/proc/<pid>/stat` field 22), to tell a reused pid.
    pub const START_TIME: usize = 8;
    /// u64 × MAX_CARDS: bytes this process has charged on each card.
    pub const USED: usize = 16;
}

/// Total size of the region file.
pub const REGION_SIZE: usize = SLOTS_OFFSET + MAX_SLOTS * SLOT_STRIDE;

/// Offset of a card block's field.
pub const fn card_field(card: usize, field: usize) -> usize {
    CARDS_OFFSET + card * CARD_STRIDE + field
}

/// Offset of a slot's field.
pub const fn slot_field(slot: usize, field: usize) -> usize {
    SLOTS_OFFSET + slot * SLOT_STRIDE + field
}

/// Offset of the bytes a slot has charged on a card.
pub const fn slot_used(slot: usize, card: usize) -> usize {
    slot_field(slot, slot::USED) + card * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shared_word_is_naturally_aligned_and_inside_the_region() {
        for c in 0..MAX_CARDS {
            for (f, w) in [
                (card::BUCKET, 8),
                (card::MEM_LOCK, 4),
                (card::MULTIPLIER_PPM, 4),
                (card::SAMPLER_PID, 4),
                (card::SAMPLER_BEAT, 8),
                (card::LAST_THROTTLED, 8),
                (card::OWN_UTIL, 4),
                (card::TOTAL_UTIL, 4),
                (card::TARGET, 4),
                (card::MAX_COST, 8),
            ] {
                let off = card_field(c, f);
                assert_eq!(off % w, 0, "card {c} field {f}");
                assert!(off + w <= SLOTS_OFFSET);
            }
        }
        for s in 0..MAX_SLOTS {
            assert_eq!(slot_field(s, slot::START_TIME) % 8, 0);
            for c in 0..MAX_CARDS {
                let off = slot_used(s, c);
                assert_eq!(off % 8, 0);
                assert!(off + 8 <= slot_field(s, 0) + SLOT_STRIDE);
            }
        }
        assert!(slot_used(MAX_SLOTS - 1, MAX_CARDS - 1) + 8 <= REGION_SIZE);
    }

    const _: () = assert!(
        card::MEM_LOCK - card::BUCKET >= 128,
        "the bucket word has its own line"
    );
    const _: () = assert!(
        CARD_STRIDE.is_multiple_of(128),
        "card blocks start on a line"
    );

    #[test]
    fn the_layout_is_pinned() {
        // The library and any older copy mapped by a running process must agree; a change here
        // needs a new REGION_FILE name and VERSION.
        assert_eq!(REGION_SIZE, 77_824);
        assert_eq!(MAGIC, 0x5256_4D47);
    }
}
