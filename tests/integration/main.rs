//! The integration tests, one binary: each module is a former test target. One binary
//! links wasmtime once instead of eight times, which is most of a clean build's test
//! step. Run one area with `cargo test --release --test integration engine::`.
//!
//! `no_leaks` stays a binary of its own: it counts the process's threads and sockets.

#[path = "../support/mod.rs"]
mod support;

/// A TCP proxy that injects faults (the resilience tests).
#[path = "../support/fault_proxy.rs"]
mod fault_proxy;

mod c_abi;
mod codec_abi;
mod codec_sandbox;
mod connect_addresses;
mod daemon_cli;
mod daemon_output;
mod engine;
mod host_names;
mod hostile_input;
mod http;
mod operations;
mod passthrough;
mod pending_requests;
mod pool_races;
mod resilience;
mod session_faults;
mod slow_consumer;
mod tls;
mod worker_faults;
