//! Word-at-a-time `memcmp` and `bcmp` for components.
//!
//! wasi-libc compares bytes one at a time. Under fuel metering and epoch
//! checks every loop iteration costs several extra instructions, and string
//! comparison (map keys, field names, `==` on `&str`) is what rules do most,
//! so the SDK links these instead: eight bytes per iteration.

use core::ffi::c_int;

/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> c_int {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, and the caller guarantees n readable bytes.
        let (x, y) = unsafe {
            (
                a.add(i).cast::<u64>().read_unaligned(),
                b.add(i).cast::<u64>().read_unaligned(),
            )
        };
        if x != y {
            // Little-endian: the lowest differing byte comes first in memory.
            let shift = (x ^ y).trailing_zeros() & !7;
            let (p, q) = ((x >> shift) as u8, (y >> shift) as u8);
            return c_int::from(p) - c_int::from(q);
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        let (p, q) = unsafe { (*a.add(i), *b.add(i)) };
        if p != q {
            return c_int::from(p) - c_int::from(q);
        }
        i += 1;
    }
    0
}

/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { memcmp(a, b, n) }
}
