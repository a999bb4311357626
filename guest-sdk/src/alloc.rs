//! The component's allocator: size-class free lists in front of talc.
//!
//! A rule allocates many small, short-lived blocks per event (an alert's key,
//! title and detail; state entries). Under fuel metering every branch of a
//! general-purpose allocator costs extra, so blocks of up to
//! [`MAX_POOLED`] bytes come from one free list per power-of-two size: a
//! handful of instructions to take or return one. Larger or over-aligned
//! blocks, and the chunks the pools are cut from, come from talc.
//!
//! The trade-off: memory freed into a pool stays with that size class. A
//! rule that once held many small blocks at the same time keeps that memory
//! for small blocks, and a later large allocation grows linear memory
//! instead (which never shrinks anyway). The memory limit still bounds the
//! total.
//!
//! Components run single-threaded (`wasm32-wasip2` without atomics), which
//! is what makes the unsynchronised cell sound. The pools are generic over
//! the allocator behind them so that tests can run them natively.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// Largest pooled block; size classes are 16, 32, …, 1024 bytes.
const MAX_POOLED: usize = 1024;
const MIN_CLASS_BITS: u32 = 4;
const CLASSES: usize = 7;
/// Alignment of every pooled block (its class size is a multiple of it).
const POOL_ALIGN: usize = 16;
/// What a pool takes from talc when it runs dry.
const CHUNK: usize = 64 * 1024;

/// The allocator a component installs.
#[cfg(target_arch = "wasm32")]
pub type RuleAllocator = Pooled<talc::wasm::WasmDynamicTalc>;

#[cfg(target_arch = "wasm32")]
impl RuleAllocator {
    pub const fn new() -> Self {
        Pooled::with_backing(talc::wasm::new_wasm_dynamic_allocator())
    }
}

/// Size-class pools in front of the `large` allocator.
pub struct Pooled<B> {
    pools: UnsafeCell<Pools>,
    large: B,
}

struct Pools {
    /// Head of each class's free list; a free block holds the next pointer.
    free: [*mut u8; CLASSES],
    /// The unused rest of the current chunk.
    next: *mut u8,
    end: *mut u8,
}

// SAFETY: components are single-threaded (see the module docs and the
// `not(target_feature = "atomics")` gate where this is installed); the
// tests use each instance from one thread.
unsafe impl<B: Sync> Sync for Pooled<B> {}

impl<B> Pooled<B> {
    pub const fn with_backing(large: B) -> Self {
        Pooled {
            pools: UnsafeCell::new(Pools {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
            large,
        }
    }
}

/// The size class of a layout, if it is pooled.
fn class(layout: Layout) -> Option<usize> {
    if layout.size() > MAX_POOLED || layout.align() > POOL_ALIGN {
        return None;
    }
    let bits = usize::BITS - (layout.size().max(1) - 1).leading_zeros();
    Some(bits.saturating_sub(MIN_CLASS_BITS) as usize)
}

fn class_size(class: usize) -> usize {
    1 << (class as u32 + MIN_CLASS_BITS)
}

unsafe impl<B: GlobalAlloc> GlobalAlloc for Pooled<B> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class(layout) else {
            // SAFETY: forwarded from the caller.
            return unsafe { self.large.alloc(layout) };
        };
        // SAFETY: single-threaded, and no reference into the pools outlives
        // this call.
        let pools = unsafe { &mut *self.pools.get() };
        let head = pools.free[class];
        if !head.is_null() {
            // SAFETY: a free block starts with the next free block's address.
            pools.free[class] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        let size = class_size(class);
        if (pools.end as usize) - (pools.next as usize) < size {
            // SAFETY: a valid, non-zero layout.
            let chunk = unsafe {
                self.large
                    .alloc(Layout::from_size_align_unchecked(CHUNK, POOL_ALIGN))
            };
            if chunk.is_null() {
                return chunk;
            }
            pools.next = chunk;
            // SAFETY: the chunk is CHUNK bytes long.
            pools.end = unsafe { chunk.add(CHUNK) };
        }
        let block = pools.next;
        // SAFETY: at least `size` bytes remain before `end`.
        pools.next = unsafe { block.add(size) };
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some(class) = class(layout) else {
            // SAFETY: forwarded from the caller.
            return unsafe { self.large.dealloc(block, layout) };
        };
        // SAFETY: single-threaded; the block is at least 16 bytes, aligned,
        // and no longer used by its owner.
        unsafe {
            let pools = &mut *self.pools.get();
            block.cast::<*mut u8>().write(pools.free[class]);
            pools.free[class] = block;
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new_layout)) {
            (Some(old), Some(new)) if old == new => block,
            // SAFETY: forwarded from the caller.
            (None, None) => unsafe { self.large.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: as `GlobalAlloc::realloc`'s default.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block handed out by the allocator, filled with a pattern of its own.
    struct Block {
        ptr: *mut u8,
        layout: Layout,
        fill: u8,
    }

    fn check(block: &Block) {
        for i in 0..block.layout.size() {
            // SAFETY: the block is live and `size` bytes long.
            let byte = unsafe { *block.ptr.add(i) };
            assert_eq!(byte, block.fill, "a live block was overwritten");
        }
    }

    fn fill(block: &Block) {
        // SAFETY: the block is live and `size` bytes long.
        unsafe { ptr::write_bytes(block.ptr, block.fill, block.layout.size()) };
    }

    #[test]
    fn blocks_of_every_class_stay_apart_through_frees_and_reallocs() {
        let allocator = Pooled::with_backing(std::alloc::System);
        let mut live: Vec<Block> = Vec::new();
        // A fixed pseudo-random sequence: sizes across and past the classes,
        // alignments up to 32, frees and reallocs interleaved.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for step in 0..20_000u32 {
            let roll = next();
            match roll % 4 {
                0 | 1 => {
                    let size = 1 + (next() % 1500) as usize;
                    let align = 1 << (next() % 6);
                    let layout = Layout::from_size_align(size, align).unwrap();
                    // SAFETY: a non-zero size.
                    let ptr = unsafe { allocator.alloc(layout) };
                    assert!(!ptr.is_null());
                    assert_eq!(ptr as usize % align, 0, "alignment {align}");
                    let block = Block {
                        ptr,
                        layout,
                        fill: step as u8,
                    };
                    fill(&block);
                    live.push(block);
                }
                2 if !live.is_empty() => {
                    let block = live.swap_remove((next() % live.len() as u64) as usize);
                    check(&block);
                    // SAFETY: allocated above with this layout, freed once.
                    unsafe { allocator.dealloc(block.ptr, block.layout) };
                }
                _ if !live.is_empty() => {
                    let index = (next() % live.len() as u64) as usize;
                    let block = &mut live[index];
                    check(block);
                    let size = 1 + (next() % 1500) as usize;
                    // SAFETY: a live block, its layout, a non-zero size.
                    let moved = unsafe { allocator.realloc(block.ptr, block.layout, size) };
                    assert!(!moved.is_null());
                    let kept = size.min(block.layout.size());
                    for i in 0..kept {
                        // SAFETY: `moved` holds at least `kept` bytes.
                        assert_eq!(
                            unsafe { *moved.add(i) },
                            block.fill,
                            "realloc kept the bytes"
                        );
                    }
                    block.ptr = moved;
                    block.layout = Layout::from_size_align(size, block.layout.align()).unwrap();
                    block.fill = step as u8;
                    fill(block);
                }
                _ => {}
            }
        }
        for block in live {
            check(&block);
            // SAFETY: allocated above with this layout, freed once.
            unsafe { allocator.dealloc(block.ptr, block.layout) };
        }
    }
}
