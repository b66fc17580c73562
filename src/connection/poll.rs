//! The wait of a worker: its one socket and a wake-up, on epoll.
//!
//! A worker waits on exactly two things, its socket and a wake-up for commands, so this
//! is epoll at its simplest: both registered level-triggered once, the socket's interest
//! changed only when it changes (writable while a write is pending), and each wait one
//! `epoll_wait` with a millisecond timeout. A general poller (the `polling` crate) re-arms
//! a one-shot registration and a timerfd on every wait: three more system calls per
//! wake-up, on the path of every message when the feed is not saturated.
//!
//! Before its socket is open, once per connection, a worker waits with a plain `poll`
//! on the wake-up and whatever the step has in flight: the lookup of its server's host
//! name (its answer's eventfd), then its TCP connects.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::eventfd::EventFd;

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The socket may be ready (or has an error or hang-up to report).
    Socket,
    /// A notify, a signal or the deadline.
    Other,
}

const SOCKET: u64 = 0;
const NOTIFY: u64 = 1;

/// Bits of `Poller::interest`.
const REGISTERED: u8 = 4;
const READABLE: u8 = 1;
const WRITABLE: u8 = 2;

/// One worker's epoll set: its socket (at most one at a time) and a wake-up eventfd.
pub(crate) struct Poller {
    epoll: OwnedFd,
    wake: EventFd,
    /// A notify is pending: later ones need not write the eventfd again.
    notified: AtomicBool,
    /// The socket's registration as epoll has it (only the worker changes it).
    interest: AtomicU8,
}

fn check(result: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if result < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(result)
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        // SAFETY: a plain system call; its result is checked before it is used and
        // owned exactly once.
        let epoll = unsafe {
            let epoll = check(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1")?;
            OwnedFd::from_raw_fd(epoll)
        };
        let wake = EventFd::new()?;
        let poller = Poller {
            epoll,
            wake,
            notified: AtomicBool::new(false),
            interest: AtomicU8::new(0),
        };
        poller.control(
            libc::EPOLL_CTL_ADD,
            poller.wake.as_raw_fd(),
            libc::EPOLLIN as u32,
            NOTIFY,
        )?;
        Ok(poller)
    }

    fn control(&self, op: libc::c_int, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: key };
        // SAFETY: `event` is a valid epoll_event for the call's duration; the fds are
        // open (the caller's socket, our own epoll and eventfd).
        check(
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) },
            "epoll_ctl",
        )?;
        Ok(())
    }

    /// Adds the socket, with no interest yet.
    pub fn register(&self, socket: RawFd) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, socket, 0, SOCKET)?;
        self.interest.store(REGISTERED, Ordering::Relaxed);
        Ok(())
    }

    /// Removes the socket (before it is closed, or to give up on it).
    pub fn deregister(&self, socket: RawFd) {
        // Fails only if it was not registered, which is what was wanted.
        let _ = self.control(libc::EPOLL_CTL_DEL, socket, 0, SOCKET);
        self.interest.store(0, Ordering::Relaxed);
    }

    /// Wakes the worker's current or next wait.
    pub fn notify(&self) -> io::Result<()> {
        // SeqCst, with the store in `clear_notify`: a notify that skips its write relies
        // on the worker's look at its commands coming after the flag was seen set.
        if self.notified.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let signalled = self.wake.signal();
        if signalled.is_err() {
            self.notified.store(false, Ordering::Release);
        }
        signalled
    }

    /// Whether a notify is waiting to be consumed (a command may be waiting).
    pub fn notify_pending(&self) -> bool {
        self.notified.load(Ordering::Acquire)
    }

    /// Waits until the registered `socket` is readable and/or writable (as asked), a
    /// notify, or `deadline`. The caller looks at its commands after every return:
    /// a notify is consumed here, so that check is what makes it count.
    pub fn wait(
        &self,
        socket: Option<RawFd>,
        readable: bool,
        writable: bool,
        deadline: Option<Instant>,
    ) -> io::Result<Woken> {
        if let Some(socket) = socket {
            let want = REGISTERED | (readable as u8 * READABLE) | (writable as u8 * WRITABLE);
            if self.interest.load(Ordering::Relaxed) != want {
                let mut events = 0u32;
                if readable {
                    events |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
                }
                if writable {
                    events |= libc::EPOLLOUT as u32;
                }
                self.control(libc::EPOLL_CTL_MOD, socket, events, SOCKET)?;
                self.interest.store(want, Ordering::Relaxed);
            }
        }
        let timeout = match deadline {
            None => -1,
            Some(deadline) => timeout_ms(deadline.saturating_duration_since(Instant::now())),
        };
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: `ready` has room for the 2 events asked for.
        let count =
            unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ready.as_mut_ptr(), 2, timeout) };
        if count < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(Woken::Other);
            }
            return Err(io::Error::new(err.kind(), format!("epoll_wait: {err}")));
        }
        let mut woken = Woken::Other;
        for event in &ready[..count as usize] {
            match event.u64 {
                SOCKET => woken = Woken::Socket,
                _ => self.clear_notify(),
            }
        }
        Ok(woken)
    }

    /// While connecting: waits until one of `sockets` (connects in flight, none of
    /// them registered) is writable or has failed, a notify, or `deadline` (no wait
    /// once it has passed); returns the indices of those that are, in order, each
    /// with whether poll reported a hang-up or an error for it. A plain `poll`: the
    /// set changes from wait to wait, and this happens once per connection.
    pub fn wait_connecting(
        &self,
        sockets: &[RawFd],
        deadline: Instant,
    ) -> io::Result<Vec<(usize, bool)>> {
        let entries = self.poll_with_wake(sockets, libc::POLLOUT, deadline)?;
        Ok(entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.revents != 0)
            .map(|(index, entry)| {
                let over = entry.revents & (libc::POLLHUP | libc::POLLERR) != 0;
                (index, over)
            })
            .collect())
    }

    /// While resolving: waits until one of `fds` (the completion eventfds of host
    /// name lookups, none of them registered) is readable, a notify, or `deadline`
    /// (no wait once it has passed). The caller looks at its lookups and its commands
    /// after every return.
    pub fn wait_readable(&self, fds: &[RawFd], deadline: Instant) -> io::Result<()> {
        self.poll_with_wake(fds, libc::POLLIN, deadline)?;
        Ok(())
    }

    /// One `poll` on `fds` (for `events`) and the wake-up until `deadline`; the
    /// entries of `fds` with what poll reported (nothing when a signal interrupted
    /// it). A notify that ended it is consumed.
    fn poll_with_wake(
        &self,
        fds: &[RawFd],
        events: libc::c_short,
        deadline: Instant,
    ) -> io::Result<Vec<libc::pollfd>> {
        let mut entries: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        entries.push(libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let timeout = timeout_ms(deadline.saturating_duration_since(Instant::now()));
        // SAFETY: `entries` is a valid array of `entries.len()` pollfds for the call.
        let count =
            unsafe { libc::poll(entries.as_mut_ptr(), entries.len() as libc::nfds_t, timeout) };
        if count < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io::Error::new(err.kind(), format!("poll: {err}")));
            }
            for entry in &mut entries {
                entry.revents = 0;
            }
        }
        if entries.pop().is_some_and(|wake| wake.revents != 0) {
            self.clear_notify();
        }
        Ok(entries)
    }

    fn clear_notify(&self) {
        self.wake.clear();
        // Only now may the next notify write the eventfd again. The other order loses
        // wake-ups: a notify between clearing and reading writes the fd, the read
        // swallows that write, and the flag stays set, so every later notify skips
        // its write while the worker sleeps. A notify that skips its write here is
        // safe: its command was sent before it, and the worker looks at its commands
        // after this wait returns.
        self.notified.store(false, Ordering::SeqCst);
    }
}

/// Whether `socket` has something for a read: data, the peer's end of stream, or an
/// error. Never blocks, and leaves all three to the read (a peek with `recv` would
/// take a pending error, so a reset would read as a plain end of stream).
pub fn has_input(socket: RawFd) -> bool {
    let mut entry = libc::pollfd {
        fd: socket,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&mut entry, 1, 0) };
    ready > 0 && entry.revents != 0
}

/// `epoll_wait`'s timeout for `left`: whole milliseconds, rounded up so a wait never
/// ends before its deadline (and so never spins on a sub-millisecond remainder).
fn timeout_ms(left: Duration) -> libc::c_int {
    let ms = left.as_nanos().div_ceil(1_000_000);
    ms.min(libc::c_int::MAX as u128) as libc::c_int
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::transport::tests::pair;
    use std::io::Write;
    use std::sync::Arc;

    #[test]
    fn a_wait_ends_on_data_on_a_notify_and_at_its_deadline() {
        let poller = Arc::new(Poller::new().unwrap());
        let (client, mut server) = pair();
        let fd = client.as_raw_fd();
        poller.register(fd).unwrap();
        // Deadline: nothing to read, no notify.
        let started = Instant::now();
        let deadline = started + Duration::from_millis(30);
        assert_eq!(
            poller.wait(Some(fd), true, false, Some(deadline)).unwrap(),
            Woken::Other
        );
        assert!(Instant::now() >= deadline, "returned before its deadline");
        // Data: level-triggered, so it stays ready until read.
        server.write_all(b"x").unwrap();
        for _ in 0..2 {
            assert_eq!(
                poller.wait(Some(fd), true, false, None).unwrap(),
                Woken::Socket
            );
        }
        // Writable interest on a socket with room: at once.
        assert_eq!(
            poller.wait(Some(fd), false, true, None).unwrap(),
            Woken::Socket
        );
        // A notify from another thread ends a wait with no deadline; several notifies
        // before a wait end one wait, and the next waits again.
        poller.deregister(fd);
        let notifier = {
            let poller = Arc::clone(&poller);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                poller.notify().unwrap();
            })
        };
        assert_eq!(poller.wait(None, false, false, None).unwrap(), Woken::Other);
        notifier.join().unwrap();
        poller.notify().unwrap();
        poller.notify().unwrap();
        assert_eq!(
            poller
                .wait(
                    None,
                    false,
                    false,
                    Some(Instant::now() + Duration::from_secs(5))
                )
                .unwrap(),
            Woken::Other
        );
        let deadline = Instant::now() + Duration::from_millis(20);
        poller.wait(None, false, false, Some(deadline)).unwrap();
        assert!(
            Instant::now() >= deadline,
            "a consumed notify woke a later wait"
        );
    }

    #[test]
    fn no_notify_is_lost_however_notifies_and_wake_ups_interleave() {
        // Two notifiers post work and notify, many times, each then waiting (within a
        // generous limit) for the waiter to take its post; the waiter takes whatever
        // is posted after each wake-up, as a worker drains its commands. A notify
        // swallowed between a wake-up and the next wait leaves the waiter asleep.
        use std::sync::atomic::AtomicU64;
        const ROUNDS: u64 = 50_000;
        let poller = Arc::new(Poller::new().unwrap());
        let posted = Arc::new(AtomicU64::new(0));
        let taken = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (poller, posted, taken, done) = (
                Arc::clone(&poller),
                Arc::clone(&posted),
                Arc::clone(&taken),
                Arc::clone(&done),
            );
            std::thread::spawn(move || {
                while !done.load(Ordering::Acquire) {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    poller.wait(None, false, false, Some(deadline)).unwrap();
                    taken.store(posted.load(Ordering::Acquire), Ordering::Release);
                }
            })
        };
        let notifiers: Vec<_> = (0..2)
            .map(|_| {
                let (poller, posted, taken) =
                    (Arc::clone(&poller), Arc::clone(&posted), Arc::clone(&taken));
                std::thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        let mine = posted.fetch_add(1, Ordering::AcqRel) + 1;
                        poller.notify().unwrap();
                        let limit = Instant::now() + Duration::from_secs(5);
                        while taken.load(Ordering::Acquire) < mine {
                            assert!(
                                Instant::now() < limit,
                                "notify of post {mine} was lost: the waiter slept on"
                            );
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let results: Vec<_> = notifiers.into_iter().map(|n| n.join()).collect();
        done.store(true, Ordering::Release);
        poller.notify().unwrap();
        waiter.join().unwrap();
        for result in results {
            if let Err(panic) = result {
                std::panic::resume_unwind(panic);
            }
        }
    }

    #[test]
    fn timeouts_round_up_to_whole_milliseconds() {
        assert_eq!(timeout_ms(Duration::ZERO), 0);
        assert_eq!(timeout_ms(Duration::from_nanos(1)), 1);
        assert_eq!(timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(timeout_ms(Duration::from_secs(u64::MAX)), libc::c_int::MAX);
    }
}
