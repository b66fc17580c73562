//! Giving an idle worker's deep stack pages back to the kernel.
//!
//! A worker's deepest calls are one-off: the WebSocket handshake (tungstenite parses the
//! response with a 4 KiB header table on the stack) and the codec's instantiation reach
//! about 10 KB below the worker's main frame, while its steady state (waiting, reading a
//! batch, a codec call) stays within a few KB. The pages those one-off calls touched
//! stay resident for the life of the thread: with a thousand connections, a few MB for
//! nothing. [`StackTrim::release_below_caller`] drops them with `madvise(MADV_DONTNEED)`
//! (the kernel hands back zeroed pages if the thread ever reaches that deep again).
//! A connection that has been quiet for a while does the same before it waits, for the
//! pages its last batch, command or timer touched.

/// The calling thread's stack bounds, for trimming it.
pub(crate) struct StackTrim {
    /// Lowest address of the usable stack (above the guard page).
    floor: usize,
    /// The system's page size.
    page: usize,
}

/// The system's page size: every range given to `madvise` is made of whole pages of
/// it (the kernel would round a length up, into live memory).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|size| size.is_power_of_two())
        .unwrap_or(4096)
}

/// Stack kept below the releasing frame: its callee, glibc's `madvise` (a bare system
/// call), runs there. A signal handler that runs after the call just faults in fresh
/// pages.
const MARGIN: usize = 256;

/// The most that is released below the caller's frame; deeper pages were never touched
/// by a worker.
const SPAN: usize = 128 * 1024;

impl StackTrim {
    /// The bounds of the current thread's stack, or `None` where they cannot be read.
    pub(crate) fn for_current_thread() -> Option<StackTrim> {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: `attr` is initialised by pthread_getattr_np before it is read, and
        // destroyed once; the out-pointers point at locals.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
                return None;
            }
            let mut addr: *mut libc::c_void = std::ptr::null_mut();
            let mut size: libc::size_t = 0;
            let got = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
            let mut guard: libc::size_t = 0;
            let got_guard = libc::pthread_attr_getguardsize(&attr, &mut guard);
            libc::pthread_attr_destroy(&mut attr);
            if got != 0 || got_guard != 0 || addr.is_null() {
                return None;
            }
            // glibc reports the guard inside [addr, addr + size); stay above it.
            Some(StackTrim {
                floor: addr as usize + guard.next_multiple_of(page_size()),
                page: page_size(),
            })
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        None
    }

    /// Releases the stack pages below the caller's frame, keeping a margin below this
    /// function's own frame for the `madvise` call it makes.
    #[inline(never)]
    pub(crate) fn release_below_caller(&self) {
        let marker = 0u8;
        let here = std::hint::black_box(&marker) as *const u8 as usize;
        // This frame is below the caller's; `madvise` and its wrapper need far less
        // than the margin below it. The page holding the margin's end is kept.
        let end = here.saturating_sub(MARGIN) & !(self.page - 1);
        let start = end.saturating_sub(SPAN).max(self.floor);
        if start >= end {
            return;
        }
        // SAFETY: [start, end) lies inside this thread's own stack mapping (above its
        // guard page), entirely below the live frames: nothing there is in use, and
        // MADV_DONTNEED on private anonymous memory only makes those pages read back as
        // zeros if they are touched again.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' depths and expectations are for 4 KiB pages.
    const PAGE: usize = 4096;

    fn four_kib_pages() -> bool {
        let yes = page_size() == PAGE;
        if !yes {
            eprintln!(
                "skipped: written for 4 KiB pages, this system has {}",
                page_size()
            );
        }
        yes
    }

    /// Touches `depth` bytes of stack below the caller, and returns a value that
    /// depends on all of them (so the writes are not optimised away).
    #[inline(never)]
    fn deep(depth: usize) -> u64 {
        let mut buf = [0u8; 48 * 1024];
        let used = depth.min(buf.len());
        for (index, byte) in buf[..used].iter_mut().enumerate() {
            *byte = index as u8;
        }
        std::hint::black_box(&mut buf);
        buf[..used].iter().map(|byte| u64::from(*byte)).sum()
    }

    /// Resident pages of [start, end) according to mincore.
    fn resident_pages(start: usize, end: usize) -> usize {
        let start = start & !(PAGE - 1);
        let pages = (end - start).div_ceil(PAGE);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is mapped (this thread's stack) and `vec` has a byte per page.
        let rc =
            unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|flag| **flag & 1 == 1).count()
    }

    #[test]
    fn deep_pages_go_back_and_the_thread_carries_on() {
        if !four_kib_pages() {
            return;
        }
        let handle = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(|| {
                let trim = StackTrim::for_current_thread().expect("stack bounds on Linux/glibc");
                let marker = 0u8;
                let here = std::hint::black_box(&marker) as *const u8 as usize;
                let below = here - 40 * 1024;
                let first = deep(40 * 1024);
                let before = resident_pages(below, here - 3 * PAGE);
                trim.release_below_caller();
                let after = resident_pages(below, here - 3 * PAGE);
                // The same deep call again works (the pages come back zeroed and are
                // written afresh) and gives the same answer.
                let again = deep(40 * 1024);
                (before, after, first, again)
            })
            .expect("spawn");
        let (before, after, first, again) = handle.join().expect("the thread survives");
        assert!(before >= 8, "the deep call made pages resident ({before})");
        assert_eq!(after, 0, "every page below the margin was released");
        assert_eq!(first, again);
    }

    #[test]
    fn the_floor_is_inside_the_stack_and_below_the_caller() {
        let trim = std::thread::spawn(|| {
            let trim = StackTrim::for_current_thread().expect("stack bounds");
            let marker = 0u8;
            let here = std::hint::black_box(&marker) as *const u8 as usize;
            assert!(trim.floor < here);
            assert!(here - trim.floor < 64 << 20, "a plausible stack size");
            trim.floor
        })
        .join()
        .expect("thread");
        assert_eq!(trim % page_size(), 0);
    }
}
