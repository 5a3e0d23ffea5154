//! The global allocator of sluice's binaries (the agent, and the pingora baseline so the
//! benchmark compares proxies, not allocators): mimalloc.
//!
//! The `mimalloc` crate's `MiMalloc` asks for every block through `mi_malloc_aligned`, whose
//! fast path only covers blocks up to 1 KiB. Anything larger (a request's boxed future, a read
//! buffer) took mimalloc's over-allocating fallback: three times the instructions of a plain
//! `mi_malloc`, and `alignment - 1` bytes more. Rust's own `System` allocator makes the same
//! distinction for `malloc`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Every mimalloc block is aligned to a word: block sizes are multiples of it and pages start
/// aligned. (mimalloc's `MI_MAX_ALIGN_SIZE`, 16, only holds for blocks of at least 16 bytes.)
const PLAIN_BLOCK_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc; plain `mi_malloc` whenever its word alignment satisfies the layout.
pub struct Allocator;

fn plain(align: usize) -> bool {
    align <= PLAIN_BLOCK_ALIGN
}

// SAFETY: every block comes from mimalloc with at least the layout's alignment (plain blocks
// when the layout asks for no more than a word, the aligned API otherwise), and is released
// or resized by mimalloc, which accepts blocks from both APIs.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align()) {
            unsafe { mi::mi_malloc(layout.size()) }.cast()
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) }.cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align()) {
            unsafe { mi::mi_zalloc(layout.size()) }.cast()
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) }.cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align()) {
            unsafe { mi::mi_realloc(ptr.cast::<c_void>(), new_size) }.cast()
        } else {
            unsafe { mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()) }.cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many blocks per layout, so a size class whose blocks only sometimes meet the alignment
    /// (24-byte blocks asked for 16-byte alignment) is caught.
    const BLOCKS: usize = 64;

    #[test]
    fn every_block_meets_its_layouts_alignment_through_alloc_zeroing_and_realloc() {
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1usize, 7, 8, 24, 40, 1000, 1025, 5920, 16 * 1024, 100_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                let blocks: Vec<*mut u8> = (0..BLOCKS)
                    .map(|i| unsafe { if i % 2 == 0 { Allocator.alloc(layout) } else { Allocator.alloc_zeroed(layout) } })
                    .collect();
                for (i, &block) in blocks.iter().enumerate() {
                    assert!(!block.is_null(), "size {size} align {align}");
                    assert_eq!(block as usize % align, 0, "size {size} align {align}");
                    if i % 2 == 1 {
                        assert!(unsafe { std::slice::from_raw_parts(block, size) }.iter().all(|&byte| byte == 0));
                    }
                    unsafe { block.write_bytes(0xA5, size) };
                }
                for block in blocks {
                    let grown = unsafe { Allocator.realloc(block, layout, size * 3) };
                    assert_eq!(grown as usize % align, 0, "realloc of size {size} align {align}");
                    assert!(unsafe { std::slice::from_raw_parts(grown, size) }.iter().all(|&byte| byte == 0xA5));
                    unsafe { Allocator.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap()) };
                }
            }
        }
    }
}
