//! Bytes charged for allocations whose size is not a single argument (arrays, pitched memory).

/// `CUarray_format` values and their element sizes in bytes. Unknown formats are charged as
/// 4 bytes per channel (the widest plain format), so a new format is never under-charged by
/// more than its width.
pub fn format_bytes(format: u32) -> u64 {
    match format {
        0x01 | 0x08 => 1,        // UNSIGNED_INT8, SIGNED_INT8
        0x02 | 0x09 | 0x10 => 2, // UNSIGNED_INT16, SIGNED_INT16, HALF
        0x03 | 0x0a | 0x20 => 4, // UNSIGNED_INT32, SIGNED_INT32, FLOAT
        _ => 4,
    }
}

/// Bytes of one array level: width × max(height,1) × max(depth,1) × channels × element bytes
/// (bytes, not bits, and a 1-D array is not zero). Saturates instead of overflowing.
pub fn array_bytes(width: u64, height: u64, depth: u64, channels: u32, format: u32) -> u64 {
    width
        .saturating_mul(height.max(1))
        .saturating_mul(depth.max(1))
        .saturating_mul(u64::from(channels.max(1)))
        .saturating_mul(format_bytes(format))
}

/// Bytes of a mipmapped array: every level, each halving every non-zero extent (at least 1).
pub fn mipmapped_bytes(
    width: u64,
    height: u64,
    depth: u64,
    channels: u32,
    format: u32,
    levels: u32,
) -> u64 {
    let (mut w, mut h, mut d) = (width, height, depth);
    let mut total = 0u64;
    for _ in 0..levels.clamp(1, 64) {
        total = total.saturating_add(array_bytes(w, h, d, channels, format));
        if w <= 1 && h <= 1 && d <= 1 {
            break;
        }
        w = (w / 2).max(1);
        h = if h == 0 { 0 } else { (h / 2).max(1) };
        d = if d == 0 { 0 } else { (d / 2).max(1) };
    }
    total
}

/// The pitch the driver will most likely choose, used to charge a pitched allocation before
/// the call: the row width rounded up to `alignment` (the real pitch is charged afterwards).
pub fn pitch_estimate(width_bytes: u64, height: u64, alignment: u64) -> u64 {
    let a = alignment.max(1);
    let pitch = width_bytes.div_ceil(a).saturating_mul(a);
    pitch.saturating_mul(height.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn arrays_are_charged_in_bytes_not_bits() {
        // 1024 × 1024 float4: 16 MiB, not 128 MiB (the bits-for-bytes over-charge).
        assert_eq!(array_bytes(1024, 1024, 0, 4, 0x20), 16 << 20);
        assert_eq!(
            array_bytes(1000, 0, 0, 1, 0x01),
            1000,
            "a 1-D array is not free"
        );
    }

    #[test]
    fn a_mipmap_chain_adds_about_a_third_in_two_dimensions() {
        let base = array_bytes(1024, 1024, 0, 1, 0x01);
        let all = mipmapped_bytes(1024, 1024, 0, 1, 0x01, 11);
        assert!(all > base && all < base * 4 / 3 + 64, "{all} vs {base}");
    }

    #[test]
    fn pitch_rounds_rows_up_to_the_alignment() {
        assert_eq!(pitch_estimate(1000, 10, 512), 1024 * 10);
        assert_eq!(pitch_estimate(1024, 10, 512), 1024 * 10);
    }

    proptest! {
        #[test]
        fn sizes_never_panic_and_never_shrink_below_the_plain_product(
            w in any::<u64>(), h in any::<u64>(), d in any::<u64>(), c in any::<u32>(), f in any::<u32>(), l in any::<u32>()
        ) {
            let one = array_bytes(w, h, d, c, f);
            prop_assert!(mipmapped_bytes(w, h, d, c, f, l) >= one);
            prop_assert!(pitch_estimate(w, h, 512) >= w.min(u64::MAX / h.max(1)) .saturating_mul(h.max(1)) || pitch_estimate(w, h, 512) == u64::MAX);
        }
    }
}
