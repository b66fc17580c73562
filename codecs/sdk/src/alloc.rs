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

#[cfg(target_arch = "wasm32")]
use core::alloc::GlobalAlloc;
use core::alloc::Layout;
#[cfg(target_arch = "wasm32")]
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
        // A free block is aligned to its size up to 4 KiB; a layout aligned beyond
        // that takes a fresh block unless the head happens to suit it.
        if head != 0 && head % layout.align() == 0 {
            // SAFETY: a free block of this class holds the next link in its first word.
            self.free[class] = unsafe { *(head as *const usize) };
            return head as *mut u8;
        }
        self.bump(class, layout.align())
    }

    unsafe fn bump(&mut self, class: usize, align: usize) -> *mut u8 {
        if self.top == 0 {
            self.top = self.memory.base().next_multiple_of(1 << MIN_CLASS);
        }
        let size = 1usize << class;
        let Some(start) = self
            .top
            .checked_next_multiple_of(block_align(class).max(align))
        else {
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
        if new < old {
            // Shrinks where it is: the block keeps its front half as often as needed,
            // and each half it lets go is a free block of its own size, aligned to it
            // (the block was aligned to its old size, up to 4 KiB).
            for class in new..old {
                // SAFETY: [at + 2^class, at + 2^(class + 1)) is the caller's, and
                // unused from now on.
                unsafe { self.push(at + (1usize << class), class) };
            }
            return ptr;
        }
        // The last block grows where it is when it is aligned for its new size (a
        // growing buffer, the common case), as far as the memory can grow.
        if at + (1 << old) == self.top && at % block_align(new) == 0 {
            // Checked: above 2 GiB on wasm32 the end of a 2 GiB block wraps.
            if let Some(end) = at.checked_add(1usize << new) {
                if end <= self.memory.end() || self.memory.grow(end - self.memory.end()) {
                    self.top = end;
                    return ptr;
                }
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
        // 65536 pages (4 GiB) would wrap to 0 on wasm32.
        core::arch::wasm32::memory_size(0).saturating_mul(65536)
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
// use), are at least as large as asked and aligned to their size up to 4 KiB; a
// layout aligned beyond that takes a free block only if it happens to be aligned
// enough, else a fresh one bumped to its alignment.
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

    /// Every block on a free list: aligned for its class, inside the heap, and disjoint
    /// from every other free block and from `live` (start, class).
    fn check_free_lists<M: Memory>(heap: &Heap<M>, live: &[(usize, usize)]) {
        let mut blocks: Vec<(usize, usize)> = live.to_vec();
        for (class, head) in heap.free.iter().enumerate() {
            let mut at = *head;
            while at != 0 {
                assert_eq!(
                    at % block_align(class),
                    0,
                    "free block {at:#x} of class {class} misaligned"
                );
                assert!(at + (1 << class) <= heap.top, "free block above top");
                blocks.push((at, class));
                at = unsafe { *(at as *const usize) };
            }
        }
        blocks.sort();
        for pair in blocks.windows(2) {
            assert!(
                pair[0].0 + (1 << pair[0].1) <= pair[1].0,
                "blocks overlap: {pair:?}"
            );
        }
    }

    /// Passes: random alloc / realloc (in place, moved, shrunk) / dealloc with the layout
    /// realloc returned, alignments up to 4096, in a memory that runs out now and then.
    #[test]
    fn random_reallocs_keep_blocks_disjoint_aligned_and_their_bytes() {
        let mut heap = Heap::new(Region::new(2 << 20, 1000));
        let mut live: Vec<(usize, Layout, u8)> = Vec::new();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let check = |ptr: usize, l: Layout, fill: u8| {
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, l.size()) };
            assert!(
                bytes.iter().all(|b| *b == fill),
                "bytes lost at {ptr:#x} {l:?}"
            );
        };
        let (mut nulls, mut in_place) = (0, 0);
        for round in 0..30_000u32 {
            let fill = round as u8;
            let roll = next() % 8;
            let size = if next() % 4 == 0 {
                1 + (next() % 200_000) as usize
            } else {
                1 + (next() % 2000) as usize
            };
            if !live.is_empty() && roll < 3 {
                let i = next() as usize % live.len();
                let (ptr, l, old_fill) = live[i];
                check(ptr, l, old_fill);
                let moved = unsafe { heap.realloc(ptr as *mut u8, l, size) } as usize;
                if moved == 0 {
                    nulls += 1;
                    check(ptr, l, old_fill);
                    continue;
                }
                if moved == ptr && class_of(l) != class_of(layout(size, l.align())) {
                    in_place += 1;
                }
                let nl = layout(size, l.align());
                assert_eq!(moved % nl.align(), 0);
                check(moved, layout(size.min(l.size()), 1), old_fill);
                unsafe { std::ptr::write_bytes(moved as *mut u8, fill, size) };
                live[i] = (moved, nl, fill);
            } else if !live.is_empty() && (roll < 6 || live.len() > 200) {
                let (ptr, l, f) = live.swap_remove(next() as usize % live.len());
                check(ptr, l, f);
                unsafe { heap.dealloc(ptr as *mut u8, l) };
            } else {
                let l = layout(size, 1 << (next() % 13));
                let ptr = unsafe { heap.alloc(l) } as usize;
                if ptr == 0 {
                    nulls += 1;
                    continue;
                }
                assert_eq!(ptr % l.align(), 0);
                unsafe { std::ptr::write_bytes(ptr as *mut u8, fill, size) };
                live.push((ptr, l, fill));
            }
            if round % 500 == 0 {
                let blocks: Vec<_> = live
                    .iter()
                    .map(|(p, l, _)| (*p, class_of(*l).unwrap()))
                    .collect();
                check_free_lists(&heap, &blocks);
            }
        }
        assert!(
            nulls > 0 && in_place > 0,
            "exercised out-of-memory ({nulls}) and in-place growth ({in_place})"
        );
    }

    /// A layout aligned beyond 4 KiB gets a block aligned as asked, from the bump
    /// pointer and from the free list alike (blocks are aligned to 4 KiB at most).
    #[test]
    fn alignments_above_4096_are_honoured() {
        let mut heap = Heap::new(Region::new(1 << 20, 4096));
        unsafe {
            // top = start + 4096: aligned to 4096 but not to 8192.
            let p = heap.alloc(layout(8192, 8192)) as usize;
            assert!(p == 0 || p % 8192 == 0, "bump gave {p:#x} for align 8192");
            // A class-13 block aligned to 4096 only, given back, must not serve align 8192.
            let mut heap = Heap::new(Region::new(1 << 20, 4096));
            let q = heap.alloc(layout(8192, 4096)) as usize;
            assert_eq!(q % 8192, 4096);
            heap.dealloc(q as *mut u8, layout(8192, 4096));
            let r = heap.alloc(layout(100, 8192)) as usize;
            assert!(
                r == 0 || r % 8192 == 0,
                "free list gave {r:#x} for align 8192"
            );
        }
    }

    /// A memory high in the address space that is never read or written: only the
    /// arithmetic of the bump pointer and of realloc in place runs.
    struct HighMemory {
        base: usize,
        end: usize,
    }

    impl Memory for HighMemory {
        fn base(&self) -> usize {
            self.base
        }
        fn end(&self) -> usize {
            self.end
        }
        fn grow(&mut self, _: usize) -> bool {
            false
        }
    }

    /// The same arithmetic as on wasm32 with a heap above 2 GiB, where `at + 2^31`
    /// would wrap, `top` drop near 0 and realloc claim a 2 GiB block in place.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn realloc_in_place_near_the_end_of_the_address_space_does_not_wrap() {
        let mut heap = Heap::new(HighMemory {
            base: usize::MAX - (1 << 30) + 1,
            end: usize::MAX & !0xffff,
        });
        unsafe {
            let a = heap.alloc(layout(4096, 1));
            assert!(!a.is_null());
            let top = heap.top;
            let grown = heap.realloc(a, layout(4096, 1), 3 << 29);
            assert!(grown.is_null(), "no room for 1.5 GiB");
            assert_eq!(heap.top, top);
        }
    }
}
