//! Word-at-a-time `memcmp` and `bcmp` for components.
//!
//! wasi-libc compares bytes one at a time. Under fuel metering and epoch
//! checks every loop iteration costs several extra instructions, and string
//! comparison (map keys, field names, `==` on `&str`) is what rules do most,
//! so the SDK links these instead: eight bytes per iteration. [`equal`] is
//! the same comparison inlined where the SDK compares field names.

use core::ffi::c_int;

/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { compare(a, b, n) }
}

/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[inline(always)]
unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> c_int {
    // SAFETY (all reads below): every offset read plus its width is at most
    // n, and the caller guarantees n readable bytes.
    let word = |p: *const u8, at: usize| unsafe { p.add(at).cast::<u64>().read_unaligned() };
    let half = |p: *const u8, at: usize| unsafe { p.add(at).cast::<u32>().read_unaligned() };
    if n >= 8 {
        let mut i = 0;
        while i + 8 <= n {
            let (x, y) = (word(a, i), word(b, i));
            if x != y {
                return first_difference(x, y);
            }
            i += 8;
        }
        if i < n {
            // The last eight bytes, overlapping ones already found equal.
            let (x, y) = (word(a, n - 8), word(b, n - 8));
            if x != y {
                return first_difference(x, y);
            }
        }
        return 0;
    }
    if n >= 4 {
        for at in [0, n - 4] {
            let (x, y) = (half(a, at), half(b, at));
            if x != y {
                return first_difference(u64::from(x), u64::from(y));
            }
        }
        return 0;
    }
    for i in 0..n {
        // SAFETY: i < n.
        let (p, q) = unsafe { (*a.add(i), *b.add(i)) };
        if p != q {
            return c_int::from(p) - c_int::from(q);
        }
    }
    0
}

/// Byte equality through [`compare`], inlined: reading a field by name is
/// the commonest thing a rule does, and a call to `bcmp` per field per event
/// costs more than the comparison under fuel metering.
#[inline(always)]
pub(crate) fn equal(a: &[u8], b: &[u8]) -> bool {
    // SAFETY: both slices hold `a.len()` bytes once the lengths match.
    a.len() == b.len() && unsafe { compare(a.as_ptr(), b.as_ptr(), a.len()) } == 0
}

/// The order of two unequal little-endian words read from memory: that of
/// their first differing byte.
fn first_difference(x: u64, y: u64) -> c_int {
    let shift = (x ^ y).trailing_zeros() & !7;
    let (p, q) = ((x >> shift) as u8, (y >> shift) as u8);
    c_int::from(p) - c_int::from(q)
}

/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { compare(a, b, n) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn equal_compares_every_byte_of_every_length() {
        let text = b"abcdefghijklmnopqrstuvwxyz0123456789";
        for n in 0..=text.len() {
            let a = &text[..n];
            assert!(super::equal(a, a), "length {n}");
            for i in 0..n {
                let mut b = a.to_vec();
                b[i] ^= 0x20;
                assert!(!super::equal(a, &b), "length {n}, byte {i} differs");
            }
            if n > 0 {
                assert!(
                    !super::equal(a, &a[..n - 1]),
                    "length {n} against {}",
                    n - 1
                );
            }
        }
    }

    #[test]
    fn orders_like_slices_for_every_length_and_difference() {
        let base: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect();
        for n in 0..=base.len() {
            let a = &base[..n];
            // SAFETY: both slices hold n bytes.
            assert_eq!(unsafe { super::compare(a.as_ptr(), a.as_ptr(), n) }, 0);
            for i in 0..n {
                for delta in [1u8, 0x80, 0xff] {
                    let mut b = a.to_vec();
                    b[i] = b[i].wrapping_add(delta);
                    // SAFETY: both slices hold n bytes.
                    let got = unsafe { super::compare(a.as_ptr(), b.as_ptr(), n) };
                    assert_eq!(got.signum(), a.cmp(&b) as i32, "length {n}, byte {i}");
                }
            }
        }
    }
}
