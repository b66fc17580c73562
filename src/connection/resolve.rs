//! Host name lookups off the worker thread.
//!
//! getaddrinfo blocks, and a resolver that does not answer (a dead DNS server: glibc
//! waits 5 s per try, two tries per server by default) would hold a worker past its
//! connect deadline and keep a close waiting: `Pool::close` joins every worker, so a
//! shutdown would wait for the resolver too. So a host name is looked up on a small
//! thread of its own (`wirepool-dns`) while the worker waits on its poller for the
//! answer (an eventfd), a command or its deadline. An IP literal needs no lookup and is
//! answered at once, on the worker.
//!
//! A worker that stops waiting (its deadline passed, a close came) drops its share of
//! the lookup. The thread finishes on its own and its answer is dropped with it: it
//! holds only the lookup (host name, answer, eventfd) and the pool's table of lookups
//! running, nothing of the connection. At most [`MAX_LOOKUPS_IN_FLIGHT`] run at once
//! per pool, so a dead resolver under a storm of reconnects costs a bounded number of
//! threads; an attempt that finds them all taken waits, within its own deadline, for
//! one of them to finish.
//!
//! glibc's `getaddrinfo_a` is no better: glibc only (not musl), it runs the lookups on
//! helper threads of its own anyway, reports completion through a signal or yet
//! another thread, and cannot cancel a lookup already running (`gai_cancel` answers
//! `EAI_NOTCANCELED`), so an abandoned lookup costs the same thread, one we neither
//! name, size nor bound.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::eventfd::EventFd;

/// The most host name lookups of one pool running at once.
///
/// Sixteen: lookups that a healthy resolver answers (a cached name in well under a
/// millisecond, an uncached one in tens) never wait long for a place, even when a pool
/// opens hundreds of connections at once; a resolver that answers nothing (glibc gives
/// up on a silent server after 10 s by default, later with more servers or search
/// domains) holds sixteen small threads per pool, however many attempts time out and
/// reconnect meanwhile. Waiting for a place, rather than failing at once, keeps a
/// burst of connections to a healthy resolver from failing (and counting against its
/// server's circuit breaker) only because sixteen others were being looked up.
pub(crate) const MAX_LOOKUPS_IN_FLIGHT: usize = 16;

/// Stack of a lookup thread. glibc 2.36's getaddrinfo touched at most 12 KB of stack
/// here (a DNS answer of 40 records; /etc/hosts, 5 KB); other NSS modules (LDAP, sssd,
/// systemd-resolved's) take more, so ten times that. Only the pages touched count.
const LOOKUP_STACK: usize = 128 * 1024;

/// A blocking lookup of a host's addresses: getaddrinfo (through std), or a test's.
pub(crate) type LookupFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

/// The address of an IP literal host, with no lookup; `None` for a name. (The same
/// test std makes before it calls getaddrinfo: a literal never reached it.)
pub(crate) fn ip_literal(host: &str, port: u16) -> Option<Vec<SocketAddr>> {
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| vec![SocketAddr::new(ip, port)])
}

/// The host name lookups of one pool.
pub(crate) struct Resolver {
    lookup: Arc<LookupFn>,
    /// The CPUs the lookup threads run on, when workers are pinned
    /// (`affinity.worker_cpus`): a thread inherits its creator's CPU, and a lookup
    /// started by a pinned worker would otherwise run on the CPU kept for its messages.
    unpinned: Option<Arc<[usize]>>,
    /// Guards the lookups running now (at most [`MAX_LOOKUPS_IN_FLIGHT`]); each
    /// lookup's thread takes it out when it ends.
    running: Arc<Mutex<Vec<Arc<Lookup>>>>,
}

/// What [`Resolver::start`] did.
pub(crate) enum Start {
    /// The lookup runs on its own thread.
    Running(Arc<Lookup>),
    /// Every place is taken: these are the lookups holding them. Wait for one to
    /// finish (each [`Lookup::done_fd`] turns readable), then ask again.
    Full(Vec<Arc<Lookup>>),
}

impl Resolver {
    /// Lookups through the system's resolver (getaddrinfo).
    pub fn system() -> Resolver {
        Resolver::new(Arc::new(|host: &str, port: u16| {
            Ok((host, port).to_socket_addrs()?.collect())
        }))
    }

    /// Lookups through `lookup`.
    pub fn new(lookup: Arc<LookupFn>) -> Resolver {
        Resolver {
            lookup,
            unpinned: None,
            running: Arc::default(),
        }
    }

    /// Lookup threads run on `cpus` (the pool's creator's CPUs), not on the pinned CPU
    /// of the worker that starts them.
    pub fn run_on(mut self, cpus: Vec<usize>) -> Resolver {
        self.unpinned = Some(cpus.into());
        self
    }

    /// Starts looking up `host` on a thread of its own, unless every place is taken.
    pub fn start(&self, host: &str, port: u16) -> Result<Start> {
        let mut running = self.running.lock();
        if running.len() >= MAX_LOOKUPS_IN_FLIGHT {
            return Ok(Start::Full(running.clone()));
        }
        let done = EventFd::new()
            .map_err(|err| Error::Io(format!("resolving {host}: creating an eventfd: {err}")))?;
        let lookup = Arc::new(Lookup {
            host: host.to_string(),
            done,
            finished: AtomicBool::new(false),
            answer: Mutex::new(None),
        });
        running.push(Arc::clone(&lookup));
        drop(running);
        let job = Job {
            lookup: Arc::clone(&lookup),
            running: Arc::clone(&self.running),
        };
        let lookup_fn = Arc::clone(&self.lookup);
        let unpinned = self.unpinned.clone();
        // Detached: nobody waits for it (that is the point). A failed spawn drops the
        // job, which gives its place back.
        std::thread::Builder::new()
            .name("wirepool-dns".into())
            .stack_size(LOOKUP_STACK)
            .spawn(move || {
                if let Some(cpus) = unpinned {
                    if let Err(err) = crate::affinity::pin_current_thread_to(&cpus) {
                        log::warn!(
                            "resolving {}: cannot leave the worker's CPU: {err}",
                            job.lookup.host
                        );
                    }
                }
                let answer = lookup_fn(&job.lookup.host, port);
                *job.lookup.answer.lock() = Some(answer);
            })
            .map_err(|err| {
                Error::Io(format!(
                    "resolving {host}: cannot start a lookup thread: {err}"
                ))
            })?;
        Ok(Start::Running(lookup))
    }

    /// How many lookups are running now.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running.lock().len()
    }
}

/// One host name lookup, shared by its thread and the worker waiting for it.
pub(crate) struct Lookup {
    host: String,
    /// Signalled once, when the lookup has finished; never read, so it stays readable
    /// for every wait on it from then on.
    done: EventFd,
    /// Set (before `done` is signalled) when the lookup has finished.
    finished: AtomicBool,
    /// Guards the answer, written once by the lookup's thread before it finishes (no
    /// answer at all if the lookup panicked).
    answer: Mutex<Option<io::Result<Vec<SocketAddr>>>>,
}

impl Lookup {
    /// Readable once the lookup has finished.
    pub fn done_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    /// The addresses, or why there are none, once the lookup has finished; `None`
    /// while it runs. The answer is taken: only the worker that started the lookup
    /// asks, once.
    pub fn answer(&self) -> Option<Result<Vec<SocketAddr>>> {
        if !self.finished.load(Ordering::Acquire) {
            return None;
        }
        let host = &self.host;
        Some(match self.answer.lock().take() {
            Some(Ok(addrs)) if addrs.is_empty() => {
                Err(Error::Io(format!("resolving {host}: no addresses")))
            }
            Some(Ok(addrs)) => Ok(addrs),
            Some(Err(err)) => Err(Error::Io(format!("resolving {host}: {err}"))),
            None => Err(Error::Internal(format!(
                "resolving {host}: the lookup ended without an answer"
            ))),
        })
    }
}

/// A lookup's thread's hold on it: however the thread ends (the lookup returned or
/// panicked, or the thread never started), the lookup gives its place back, then says
/// it has finished.
struct Job {
    lookup: Arc<Lookup>,
    running: Arc<Mutex<Vec<Arc<Lookup>>>>,
}

impl Drop for Job {
    fn drop(&mut self) {
        // The place first: a worker woken by `done` while waiting for a place finds it.
        self.running
            .lock()
            .retain(|other| !Arc::ptr_eq(other, &self.lookup));
        self.lookup.finished.store(true, Ordering::Release);
        // A failed signal would leave a waiter to its deadline; eventfd writes fail
        // only when the counter is full, which one write a lookup never fills.
        let _ = self.lookup.done.signal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{wait_for, GatedLookup};
    use std::sync::Weak;
    use std::time::Duration;

    #[test]
    fn ip_literals_are_answered_without_a_lookup_and_names_are_not() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[::1]:443".parse().unwrap();
        assert_eq!(ip_literal("127.0.0.1", 80), Some(vec![v4]));
        // The URL parser hands IPv6 hosts over without their brackets.
        assert_eq!(ip_literal("::1", 443), Some(vec![v6]));
        assert_eq!(ip_literal("localhost", 80), None);
        assert_eq!(ip_literal("venue.test", 80), None);
    }

    fn finished(lookup: &Lookup) -> bool {
        lookup.finished.load(Ordering::Acquire)
    }

    fn started(start: Start) -> Arc<Lookup> {
        match start {
            Start::Running(lookup) => lookup,
            Start::Full(_) => panic!("expected a lookup to start, found every place taken"),
        }
    }

    #[test]
    fn at_most_sixteen_lookups_run_and_an_abandoned_one_ends_on_its_own() {
        let gate = GatedLookup::new();
        let resolver = gate.resolver();
        let _open = gate.open_on_drop();
        let mut lookups: Vec<Arc<Lookup>> = (0..MAX_LOOKUPS_IN_FLIGHT)
            .map(|_| started(resolver.start("venue.test", 80).unwrap()))
            .collect();
        gate.wait_started(MAX_LOOKUPS_IN_FLIGHT, Duration::from_secs(30));
        let Start::Full(running) = resolver.start("venue.test", 80).unwrap() else {
            panic!("a 17th lookup started while 16 were blocked");
        };
        assert_eq!(running.len(), MAX_LOOKUPS_IN_FLIGHT);
        drop(running);
        assert!(lookups.iter().all(|lookup| lookup.answer().is_none()));
        // Half of them abandoned by their workers: their threads go on alone, and
        // nothing of theirs outlives them.
        let abandoned: Vec<Weak<Lookup>> = lookups
            .split_off(MAX_LOOKUPS_IN_FLIGHT / 2)
            .iter()
            .map(Arc::downgrade)
            .collect();
        gate.open();
        wait_for(
            "every lookup to finish and give its place back",
            Duration::from_secs(30),
            || resolver.running() == 0 && lookups.iter().all(|lookup| finished(lookup)),
        );
        wait_for(
            "the abandoned lookups to be freed with their threads",
            Duration::from_secs(30),
            || abandoned.iter().all(|lookup| lookup.strong_count() == 0),
        );
        for lookup in &lookups {
            assert!(
                crate::connection::poll::has_input(lookup.done_fd()),
                "a finished lookup's eventfd is readable"
            );
            assert_eq!(
                lookup.answer().expect("finished").expect("addresses"),
                [SocketAddr::from(([127, 0, 0, 1], 80))]
            );
        }
        let lookup = started(resolver.start("venue.test", 80).unwrap());
        wait_for("the next lookup to answer", Duration::from_secs(30), || {
            finished(&lookup)
        });
        assert!(lookup.answer().expect("finished").is_ok());
    }

    #[test]
    fn a_lookup_that_panics_gives_its_place_back_and_answers_an_error() {
        let resolver = Resolver::new(Arc::new(|_host: &str, _port: u16| -> io::Result<_> {
            panic!("a lookup function that panics (expected by this test)")
        }));
        let lookup = started(resolver.start("venue.test", 80).unwrap());
        wait_for("the lookup to finish", Duration::from_secs(30), || {
            resolver.running() == 0 && finished(&lookup)
        });
        let err = lookup.answer().expect("finished").unwrap_err();
        assert!(
            err.to_string().contains("resolving venue.test"),
            "the error names the host: {err}"
        );
    }

    #[test]
    fn a_failed_or_empty_lookup_says_which_host() {
        let resolver = Resolver::new(Arc::new(|host: &str, _port: u16| match host {
            "empty.test" => Ok(Vec::new()),
            _ => Err(io::Error::other("no such host")),
        }));
        for (host, expected) in [
            ("empty.test", "io: resolving empty.test: no addresses"),
            ("gone.test", "io: resolving gone.test: no such host"),
        ] {
            let lookup = started(resolver.start(host, 80).unwrap());
            wait_for("the lookup to finish", Duration::from_secs(30), || {
                resolver.running() == 0 && finished(&lookup)
            });
            let err = lookup.answer().expect("finished").unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
    }
}
