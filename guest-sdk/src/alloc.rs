//! The component's allocator: size-class free lists in front of talc.
//!
//! A rule allocates many small, short-lived blocks per event (an alert's key,
//! title and detail; state entries). Under fuel metering every branch of a
//! general-purpose allocator costs extra, so blocks of up to
//! [`MAX_POOLED`] bytes come from one free list per power-of-two size: a
//! handful of instructions to take or return one. Larger or over-aligned
//! blocks, and the chunks the pools are cut from, come from talc.
//!
//! Components run single-threaded (`wasm32-wasip2` without atomics), which
//! is what makes the unsynchronised cell sound.

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

pub struct RuleAllocator {
    pools: UnsafeCell<Pools>,
    large: talc::wasm::WasmDynamicTalc,
}

struct Pools {
    /// Head of each class's free list; a free block holds the next pointer.
    free: [*mut u8; CLASSES],
    /// The unused rest of the current chunk.
    next: *mut u8,
    end: *mut u8,
}

// SAFETY: components are single-threaded (see the module docs and the
// `not(target_feature = "atomics")` gate where this is installed).
unsafe impl Sync for RuleAllocator {}

impl RuleAllocator {
    pub const fn new() -> Self {
        RuleAllocator {
            pools: UnsafeCell::new(Pools {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
            large: talc::wasm::new_wasm_dynamic_allocator(),
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

unsafe impl GlobalAlloc for RuleAllocator {
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
