//! Opening and closing pools leaves nothing behind: every thread joined, every socket
//! closed. Alone in its own test binary so no other test's threads are counted.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{last_error, open_pool, watchdog};
use wirepool::ffi::*;
use wirepool::simulator::{Simulator, SimulatorConfig};

/// Waits (bounded) for the simulator's side of closed connections to wind down.
fn settle(sim: &Simulator, threads_before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && (sim.stats().connections_open > 0 || support::thread_count() > threads_before)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn twenty_pools_opened_and_closed_leave_no_thread_or_socket_behind() {
    let _guard = watchdog("twenty pools", Duration::from_secs(120));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 100.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    // Warm up once so lazily created process-wide resources are not counted.
    let warm = open_pool(&sim.url());
    // SAFETY: a live handle, freed once.
    unsafe {
        assert_eq!(
            wirepool_pool_wait_ready(warm, 10_000),
            wirepool_result::WIREPOOL_OK
        );
        wirepool_pool_free(warm);
    }
    settle(&sim, usize::MAX);
    let threads_before = support::thread_count();
    let fds_before = support::fd_count();
    for round in 0..20 {
        let pool = open_pool(&sim.url());
        // SAFETY: a live handle, freed once.
        unsafe {
            assert_eq!(
                wirepool_pool_wait_ready(pool, 10_000),
                wirepool_result::WIREPOOL_OK,
                "round {round}: {}",
                last_error()
            );
            assert_eq!(
                wirepool_pool_subscribe(pool, c"ticker.0".as_ptr()),
                wirepool_result::WIREPOOL_OK
            );
            wirepool_pool_free(pool);
        }
    }
    settle(&sim, threads_before);
    let threads_after = support::thread_count();
    let fds_after = support::fd_count();
    assert_eq!(threads_after, threads_before, "threads left behind");
    assert_eq!(fds_after, fds_before, "file descriptors left behind");
}
