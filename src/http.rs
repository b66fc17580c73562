//! The health/admin HTTP port (tiny_http, its own thread). Placeholder until the
//! operations work lands: it serves nothing yet.

use std::net::SocketAddr;

use crate::error::{Error, Result};
use crate::pool::Pool;

/// The running HTTP port.
pub(crate) struct HealthServer {
    addr: SocketAddr,
}

impl HealthServer {
    pub fn start(_pool: Pool, listen: &str, _admin_token: Option<String>) -> Result<HealthServer> {
        Err(Error::Config(format!(
            "health.listen: {listen}: the health port is not implemented yet"
        )))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(&mut self) {}
}
