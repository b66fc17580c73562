//! A small allocator for codec instances: [`CodecAllocator`].
//!
//! Rust's default allocator on `wasm32-unknown-unknown` (dlmalloc) leaves the free
//! memory between the module's data and the end of its initial memory unused and
//! grows the memory for its first allocation, then writes a footer at the far end of
//! the new 64 KiB. An idle codec instance so touches two pages of heap 60 KiB apart,
//! beside the page of its statics: with a thousand connections, each with its own
//! instance, that is 4 MB of memory for a few hundred bytes of state.
//!
//! This allocator starts right after the module's data (`__heap_base`) and hands out
//! blocks of power-of-two sizes (16 bytes and up), each aligned to its size (to 4 KiB
//! for larger ones), from a bump pointer that grows the memory only when it reaches its
//! end. Freed blocks go on a list per size and are reused as they are: no headers, no
//! splitting or merging, a few instructions per call. That suits a codec, whose heap
//! is a handful of long-lived buffers reused call after call; a codec that allocates
//! and frees blocks of ever-changing sizes is better served by the default.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: wirepool_sdk::alloc::CodecAllocator = wirepool_sdk::alloc::CodecAllocator::new();
//! ```
//!
//! Only for single-threaded modules (no `atomics` feature), as every codec is.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// The smallest block: 16 bytes (`2^4`).
const MIN_CLASS: u32 = 4;
/// Blocks up to 2 GiB.
const CLASSES: usize = 32;
/// Blocks of 4 KiB and more are aligned to 4 KiB only.
const MAX_BLOCK_ALIGN: usize = 4096;

/// Where the heap's memory comes from.
pub(crate) trait Memory {
    /// First address the heap may use.
    fn base(&self) -> usize;
    /// End of the memory now available.
    fn end(&self) -> usize;
    /// Makes at least `bytes` more available after `end`; false when it cannot.
    fn grow(&mut self, bytes: usize) -> bool;
}

/// The heap's state.
pub(crate) struct Heap<M> {
    memory: M,
    /// Next never-used address (0 until the first allocation).
    top: usize,
    /// Head of each size's free list (0: empty); the link is in the block's first word.
    free: [usize; CLASSES],
}

/// The size class of a layout: `2^class` bytes hold it at its alignment.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS);
    let class = size.checked_next_power_of_two()?.trailing_zeros() as usize;
    (class < CLASSES).then_some(class)
}

fn block_align(class: usize) -> usize {
    (1usize << class).min(MAX_BLOCK_ALIGN)
}

impl<M: Memory> Heap<M> {
    pub(crate) const fn new(memory: M) -> Heap<M> {
        Heap {
            memory,
            top: 0,
            free: [0; CLASSES],
        }
    }

    /// # Safety
    /// The free lists hold only blocks this heap handed out and got back.
    pub(crate) unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            return core::ptr::null_mut();
        };
        let head = self.free[class];
        if head != 0 {
            // SAFETY: a free block of this class holds the next link in its first word.
            self.free[class] = unsafe { *(head as *const usize) };
            return head as *mut u8;
        }
        self.bump(class)
    }

    unsafe fn bump(&mut self, class: usize) -> *mut u8 {
        if self.top == 0 {
            self.top = self.memory.base().next_multiple_of(1 << MIN_CLASS);
        }
        let size = 1usize << class;
        let Some(start) = self.top.checked_next_multiple_of(block_align(class)) else {
            return core::ptr::null_mut();
        };
        let Some(end) = start.checked_add(size) else {
            return core::ptr::null_mut();
        };
        if end > self.memory.end() && !self.memory.grow(end - self.memory.end()) {
            return core::ptr::null_mut();
        }
        // The gap left by the alignment becomes free blocks, each aligned to its size.
        let mut at = self.top;
        while at < start {
            let mut piece = 1usize << (at.trailing_zeros().min(CLASSES as u32 - 1));
            while at + piece > start {
                piece /= 2;
            }
            // SAFETY: [at, at + piece) is never-used memory below `start`.
            unsafe { self.push(at, piece.trailing_zeros() as usize) };
            at += piece;
        }
        self.top = end;
        start as *mut u8
    }

    unsafe fn push(&mut self, block: usize, class: usize) {
        // SAFETY: the caller gives a block of `2^class` >= 16 bytes that nothing uses.
        unsafe { *(block as *mut usize) = self.free[class] };
        self.free[class] = block;
    }

    /// # Safety
    /// `ptr` came from this heap with `layout`.
    pub(crate) unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        if let Some(class) = class_of(layout) {
            // SAFETY: the block is the caller's to give back, of this class.
            unsafe { self.push(ptr as usize, class) };
        }
    }

    /// # Safety
    /// `ptr` came from this heap with `layout`; `new_size` is not zero.
    pub(crate) unsafe fn realloc(
        &mut self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return core::ptr::null_mut();
        };
        let (Some(old), Some(new)) = (class_of(layout), class_of(new_layout)) else {
            return core::ptr::null_mut();
        };
        if old == new {
            return ptr;
        }
        let at = ptr as usize;
        // The last block grows where it is when it is aligned for its new size (a
        // growing buffer, the common case), as far as the memory can grow.
        if new > old && at + (1 << old) == self.top && at % block_align(new) == 0 {
            let end = at + (1usize << new);
            if end <= self.memory.end() || self.memory.grow(end - self.memory.end()) {
                self.top = end;
                return ptr;
            }
        }
        // SAFETY: as for `alloc` and `dealloc`; the copy stays inside both blocks.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                core::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            moved
        }
    }
}

/// The module's linear memory, from `__heap_base` on.
#[cfg(target_arch = "wasm32")]
pub struct WasmMemory;

#[cfg(target_arch = "wasm32")]
impl Memory for WasmMemory {
    fn base(&self) -> usize {
        extern "C" {
            static __heap_base: u8;
        }
        // Only the address of the linker's symbol is taken, never its value.
        core::ptr::addr_of!(__heap_base) as usize
    }

    fn end(&self) -> usize {
        core::arch::wasm32::memory_size(0) * 65536
    }

    fn grow(&mut self, bytes: usize) -> bool {
        core::arch::wasm32::memory_grow(0, bytes.div_ceil(65536)) != usize::MAX
    }
}

/// The global allocator for a codec module (see the module documentation).
#[cfg(target_arch = "wasm32")]
pub struct CodecAllocator {
    heap: UnsafeCell<Heap<WasmMemory>>,
}

// SAFETY: a wasm32 module without the `atomics` feature has one thread, and the
// allocator is never re-entered (it calls nothing that allocates).
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl Sync for CodecAllocator {}

#[cfg(target_arch = "wasm32")]
impl CodecAllocator {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> CodecAllocator {
        CodecAllocator {
            heap: UnsafeCell::new(Heap::new(WasmMemory)),
        }
    }
}

#[cfg(target_arch = "wasm32")]
// SAFETY: blocks are never handed out twice (each is on at most one free list or in
// use), are at least as large as asked and aligned to their size (up to 4 KiB, and
// a layout aligned beyond that gets a block class of that size, so bumps align it).
unsafe impl GlobalAlloc for CodecAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded and not re-entered (see `Sync`).
        unsafe { (*self.heap.get()).alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; the caller's contract is GlobalAlloc's.
        unsafe { (*self.heap.get()).dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        unsafe { (*self.heap.get()).realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region of host memory standing in for linear memory: `base` as a wasm module
    /// would have it (not aligned), growing in 64 KiB steps up to the region's size.
    struct Region {
        start: usize,
        base: usize,
        end: usize,
        limit: usize,
    }

    impl Region {
        fn new(size: usize, base_offset: usize) -> Region {
            let layout = Layout::from_size_align(size, 65536).unwrap();
            // SAFETY: non-zero size; leaked on purpose (tests only).
            let start = unsafe { std::alloc::alloc_zeroed(layout) } as usize;
            assert_ne!(start, 0);
            Region {
                start,
                base: start + base_offset,
                end: start + 65536,
                limit: start + size,
            }
        }
    }

    impl Memory for Region {
        fn base(&self) -> usize {
            self.base
        }
        fn end(&self) -> usize {
            self.end
        }
        fn grow(&mut self, bytes: usize) -> bool {
            let grown = self.end + bytes.div_ceil(65536) * 65536;
            if grown > self.limit {
                return false;
            }
            self.end = grown;
            true
        }
    }

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn the_first_blocks_start_right_after_the_data_without_growing() {
        let mut heap = Heap::new(Region::new(1 << 20, 4080));
        let base = heap.memory.base;
        let first = unsafe { heap.alloc(layout(10, 1)) } as usize;
        assert_eq!(first, base.next_multiple_of(16));
        let second = unsafe { heap.alloc(layout(100, 8)) } as usize;
        assert!(second >= first + 16 && second % 128 == 0);
        assert!(second - base < 4096 + 128, "packed near the data");
        assert_eq!(heap.memory.end, heap.memory.start + 65536, "no growth yet");
    }

    #[test]
    fn blocks_are_aligned_disjoint_reused_and_keep_their_bytes() {
        let mut heap = Heap::new(Region::new(8 << 20, 1000));
        let mut live: Vec<(usize, Layout, u8)> = Vec::new();
        let mut seed = 12345u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000u32 {
            let roll = next();
            if !live.is_empty() && (roll % 2 == 0 || live.len() >= 300) {
                let (ptr, layout, fill) = live.swap_remove((roll as usize / 2) % live.len());
                let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, layout.size()) };
                assert!(bytes.iter().all(|b| *b == fill), "a block was overwritten");
                unsafe { heap.dealloc(ptr as *mut u8, layout) };
                continue;
            }
            let size = 1 + (next() % 3000) as usize;
            let align = 1usize << (next() % 7);
            let layout = layout(size, align);
            let ptr = unsafe { heap.alloc(layout) } as usize;
            assert_ne!(ptr, 0);
            assert_eq!(ptr % align, 0, "misaligned for {layout:?}");
            for (other, other_layout, _) in &live {
                assert!(
                    ptr + size <= *other || other + other_layout.size() <= ptr,
                    "overlap"
                );
            }
            let fill = round as u8;
            unsafe { std::ptr::write_bytes(ptr as *mut u8, fill, size) };
            live.push((ptr, layout, fill));
        }
        // Freed blocks are reused: some 10 000 blocks of up to 4 KiB came and went,
        // at most 300 at a time, in a heap of a few MiB.
        assert!(heap.memory.end - heap.memory.start <= 4 << 20);
    }

    #[test]
    fn realloc_grows_the_last_block_in_place_and_moves_others_with_their_bytes() {
        let mut heap = Heap::new(Region::new(4 << 20, 64));
        unsafe {
            let a = heap.alloc(layout(4096, 1));
            std::ptr::write_bytes(a, 7, 4096);
            let grown = heap.realloc(a, layout(4096, 1), 16384);
            assert_eq!(grown, a, "the last block grows where it is");
            let b = heap.alloc(layout(32, 8));
            std::ptr::write_bytes(b, 9, 32);
            let moved = heap.realloc(grown, layout(16384, 1), 100_000);
            assert_ne!(moved, grown);
            let bytes = std::slice::from_raw_parts(moved, 4096);
            assert!(bytes.iter().all(|x| *x == 7));
            assert!(std::slice::from_raw_parts(b, 32).iter().all(|x| *x == 9));
            // Same class: nothing moves.
            assert_eq!(heap.realloc(b, layout(32, 8), 20), b);
        }
    }

    #[test]
    fn out_of_memory_is_a_null_pointer_not_a_crash() {
        let mut heap = Heap::new(Region::new(1 << 20, 0));
        unsafe {
            assert!(heap.alloc(layout(2 << 20, 1)).is_null());
            assert!(heap.alloc(layout(usize::MAX / 2, 1)).is_null());
            // And it still works afterwards.
            assert!(!heap.alloc(layout(1000, 8)).is_null());
        }
    }
}
