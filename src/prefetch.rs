//! Prefetching for writes on the hot copies of the read path.
//!
//! The worker copies every message into buffers that went through the consumer (a
//! chunk comes back from the consumer's core) or are larger than the first-level cache
//! (a batch in the codec's input buffer). The store of each new cache line then waits
//! for the line to be fetched, and the locked reference-count update that follows each
//! frame (tungstenite's `Bytes`) waits for those stores. `PREFETCHW` a few lines ahead
//! fetches them in the exclusive state before they are written (measured: the `raw`
//! codec on one connection 8 % faster, six interleaved rounds; see the README).

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::sync::atomic::{AtomicU8, Ordering};

    /// 0: not looked yet, 1: the CPU has PREFETCHW, 2: it has not.
    static SUPPORTED: AtomicU8 = AtomicU8::new(0);

    #[cold]
    fn detect() -> bool {
        // CPUID leaf 0x8000_0001, ECX bit 8: PREFETCHW (Intel's PRFCHW, AMD's
        // 3DNowPrefetch). Leaf 0x8000_0000 says whether that leaf exists.
        // `__cpuid` is a safe function from Rust 1.94 on, unsafe before (the crate
        // builds from 1.85).
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU.
        let has = unsafe {
            std::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
                && std::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 8) != 0
        };
        SUPPORTED.store(if has { 1 } else { 2 }, Ordering::Relaxed);
        has
    }

    /// Asks for the cache line holding `address` in the exclusive state, ahead of a
    /// write to it. A hint: any address may be given, nothing is read or written.
    #[inline(always)]
    pub(crate) fn for_write(address: *const u8) {
        let supported = match SUPPORTED.load(Ordering::Relaxed) {
            1 => true,
            0 => detect(),
            _ => false,
        };
        if supported {
            // SAFETY: PREFETCHW is a hint that never faults, whatever the address
            // (the CPU has it: checked above); it changes no register or flag.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) address,
                    options(nostack, preserves_flags, readonly)
                );
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    #[inline(always)]
    pub(crate) fn for_write(_address: *const u8) {}
}

pub(crate) use imp::for_write;

/// How far ahead of the write position the lines are asked for.
pub(crate) const AHEAD_BYTES: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetching_any_address_is_harmless() {
        let buffer = [7u8; 64];
        for address in [
            buffer.as_ptr(),
            buffer.as_ptr().wrapping_add(AHEAD_BYTES),
            std::ptr::null(),
            usize::MAX as *const u8,
        ] {
            for_write(address);
        }
        assert!(buffer.iter().all(|byte| *byte == 7));
    }
}
