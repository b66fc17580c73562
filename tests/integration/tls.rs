//! `wss://` through rustls, trusting a private CA given in `tls.ca_file`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::{wait_for_event, watchdog, write_temp};
use wirepool::simulator::{Simulator, SimulatorConfig};
use wirepool::{Config, Error, Pool, RequestOptions};

struct TestPki {
    ca_pem: String,
    server_config: Arc<rustls::ServerConfig>,
}

fn test_pki() -> TestPki {
    let (ca_pem, server_config) = support::test_pki();
    TestPki {
        ca_pem,
        server_config,
    }
}

fn tls_simulator(pki: &TestPki) -> Simulator {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 200.0,
        tls: Some(Arc::clone(&pki.server_config)),
        ..SimulatorConfig::default()
    })
    .expect("TLS simulator")
}

#[test]
fn connects_over_tls_with_a_private_ca_file() {
    let _guard = watchdog("tls", Duration::from_secs(60));
    let pki = test_pki();
    let sim = tls_simulator(&pki);
    let url = sim.url();
    assert!(url.starts_with("wss://localhost:"), "{url}");
    let ca_file = write_temp("ca.pem", &pki.ca_pem);
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": url}],
            "tls": {"ca_file": ca_file, "roots": "none"},
        })
        .to_string(),
    )
    .expect("config");
    let pool = Pool::new(config).expect("pool");
    pool.wait_ready(Duration::from_secs(10))
        .expect("ready over TLS");
    pool.subscribe("ticker.0").expect("subscribe");
    let message = pool
        .recv(Some(Duration::from_secs(10)))
        .expect("open")
        .expect("data over TLS");
    assert_eq!(&*message.channel, "ticker.0");
    let reply = pool
        .request(br#"{"over":"tls"}"#, RequestOptions::default())
        .expect("request over TLS");
    assert_eq!(reply, br#"{"echo":{"over":"tls"}}"#);
}

#[test]
fn an_untrusted_server_fails_with_a_tls_error() {
    let _guard = watchdog("tls untrusted", Duration::from_secs(60));
    let pki = test_pki();
    let sim = tls_simulator(&pki);
    // Trust the bundled web roots only: the private CA is unknown.
    let config =
        Config::from_json(&serde_json::json!({"servers": [{"url": sim.url()}]}).to_string())
            .expect("config");
    let pool = Pool::new(config).expect("pool");
    let events = wait_for_event(&pool, Duration::from_secs(10), "closed", |event| {
        event.kind == "closed"
    });
    let reason = events
        .last()
        .and_then(|event| event.message.clone())
        .unwrap_or_default();
    assert!(
        reason.starts_with("tls:"),
        "expected a TLS error, got {reason:?}"
    );
    assert!(reason.to_lowercase().contains("certificate"), "{reason}");
    assert!(matches!(
        pool.wait_ready(Duration::from_millis(100)),
        Err(Error::Timeout { .. })
    ));
}

#[test]
fn a_missing_ca_file_is_a_config_error_naming_the_key() {
    let err = Config::from_json(
        r#"{"servers":[{"url":"wss://localhost:1"}],"tls":{"ca_file":"/nonexistent/ca.pem"}}"#,
    )
    .expect_err("missing file");
    assert!(err.to_string().contains("tls.ca_file"), "{err}");
    let garbage = write_temp("not-a-cert.pem", "hello");
    let config = Config::from_json(
        &serde_json::json!({"servers": [{"url": "wss://localhost:1"}], "tls": {"ca_file": garbage}})
            .to_string(),
    )
    .expect("the file exists");
    let err = Pool::new(config).expect_err("no certificate in it");
    assert!(err.to_string().contains("tls.ca_file"), "{err}");
}
