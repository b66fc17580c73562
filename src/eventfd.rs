//! A non-blocking eventfd: the wake-up a worker's epoll set and the consumer queue's
//! readiness descriptor are both made of.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec eventfd counter.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked
        // and owned exactly once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("eventfd: {err}")));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter: the fd reads as ready. A full counter (EAGAIN) leaves
    /// it ready too, so that is no error.
    pub fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd.
        let written = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if written < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Resets the counter: the fd no longer reads as ready (until the next signal).
    pub fn clear(&self) {
        let mut counter: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64 from our own non-blocking fd;
        // an empty counter (EAGAIN) leaves it untouched.
        unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
