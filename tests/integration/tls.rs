//! `wss://` through rustls, trusting a private CA given in `tls.ca_file`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::{last_message, wait_for_event, watchdog, write_temp};
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

fn tls_simulator(server_config: &Arc<rustls::ServerConfig>) -> Simulator {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 200.0,
        tls: Some(Arc::clone(server_config)),
        ..SimulatorConfig::default()
    })
    .expect("TLS simulator")
}

/// A config for one server at `url` that trusts only the test CA.
fn trusting_the_test_ca(url: &str, pki: &TestPki) -> Config {
    let ca_file = write_temp("ca.pem", &pki.ca_pem);
    Config::from_json(
        &serde_json::json!({
            "servers": [{"url": url}],
            "tls": {"ca_file": ca_file, "roots": "none"},
        })
        .to_string(),
    )
    .expect("config")
}

/// A pool on `config` that becomes ready and receives data on a subscription.
fn ready_and_receiving(config: Config) -> Pool {
    let pool = Pool::new(config).expect("pool");
    pool.wait_ready(Duration::from_secs(10))
        .expect("ready over TLS");
    pool.subscribe("ticker.0").expect("subscribe");
    let message = pool
        .recv(Some(Duration::from_secs(10)))
        .expect("open")
        .expect("data over TLS");
    assert_eq!(&*message.channel, "ticker.0");
    pool
}

/// Why the pool's first connection closed, from its `closed` event.
fn first_close_reason(pool: &Pool) -> String {
    let events = wait_for_event(pool, Duration::from_secs(10), "closed", |event| {
        event.kind == "closed"
    });
    last_message(&events)
}

#[test]
fn connects_over_tls_with_a_private_ca_file() {
    let _guard = watchdog("tls", Duration::from_secs(60));
    let pki = test_pki();
    let sim = tls_simulator(&pki.server_config);
    let url = sim.url();
    assert!(url.starts_with("wss://localhost:"), "{url}");
    let config = trusting_the_test_ca(&url, &pki);
    let pool = ready_and_receiving(config);
    let reply = pool
        .request(br#"{"over":"tls"}"#, RequestOptions::default())
        .expect("request over TLS");
    assert_eq!(reply, br#"{"echo":{"over":"tls"}}"#);
}

#[test]
fn an_untrusted_server_fails_with_a_tls_error() {
    let _guard = watchdog("tls untrusted", Duration::from_secs(60));
    let pki = test_pki();
    let sim = tls_simulator(&pki.server_config);
    // Trust the bundled web roots only: the private CA is unknown.
    let config =
        Config::from_json(&serde_json::json!({"servers": [{"url": sim.url()}]}).to_string())
            .expect("config");
    let pool = Pool::new(config).expect("pool");
    let reason = first_close_reason(&pool);
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

/// A venue that wants a client certificate signed by its CA (mutual TLS), and the PEM
/// files of such a certificate and its key, of a stranger's certificate, and of the CA.
struct MutualPki {
    server_config: Arc<rustls::ServerConfig>,
    ca_file: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
    other_key: std::path::PathBuf,
}

fn mutual_pki() -> MutualPki {
    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let (ca_cert, issuer) = support::test_ca("wirepool mutual TLS CA");
    let server_key = KeyPair::generate().expect("server key");
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("client key");
    let client_cert = CertificateParams::new(vec!["trader-7".to_string()])
        .expect("client params")
        .signed_by(&client_key, &issuer)
        .expect("client cert");
    let other_key = KeyPair::generate().expect("another key");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots.add(ca_cert.der().clone()).expect("CA root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        Arc::clone(&provider),
    )
    .build()
    .expect("client verifier");
    let chain: Vec<CertificateDer<'static>> =
        vec![server_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    MutualPki {
        server_config: Arc::new(server_config),
        ca_file: write_temp("mutual-ca.pem", &ca_cert.pem()),
        client_cert: write_temp("client-cert.pem", &client_cert.pem()),
        client_key: write_temp("client-key.pem", &client_key.serialize_pem()),
        other_key: write_temp("other-key.pem", &other_key.serialize_pem()),
    }
}

#[test]
fn a_venue_that_wants_a_client_certificate_gets_the_configured_one() {
    let _guard = watchdog("mutual tls", Duration::from_secs(60));
    let pki = mutual_pki();
    let sim = tls_simulator(&pki.server_config);
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": sim.url()}],
            "tls": {
                "ca_file": pki.ca_file,
                "roots": "none",
                "client_cert": pki.client_cert,
                "client_key": pki.client_key,
            },
        })
        .to_string(),
    )
    .expect("config");
    ready_and_receiving(config);
}

#[test]
fn without_its_client_certificate_the_venue_refuses_and_the_reason_says_tls() {
    let _guard = watchdog("mutual tls refused", Duration::from_secs(60));
    let pki = mutual_pki();
    let sim = tls_simulator(&pki.server_config);
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": sim.url()}],
            "tls": {"ca_file": pki.ca_file, "roots": "none"},
        })
        .to_string(),
    )
    .expect("config");
    let pool = Pool::new(config).expect("pool");
    let reason = first_close_reason(&pool);
    assert!(
        reason.starts_with("tls:") || reason.contains("handshake"),
        "expected the TLS handshake to fail, got {reason:?}"
    );
    assert!(matches!(
        pool.wait_ready(Duration::from_millis(100)),
        Err(Error::Timeout { .. })
    ));
}

#[test]
fn a_client_key_that_does_not_match_the_certificate_is_a_config_error_naming_both() {
    let pki = mutual_pki();
    let pool_with = |cert: &std::path::Path, key: &std::path::Path| {
        let config = Config::from_json(
            &serde_json::json!({
                "servers": [{"url": "wss://localhost:1"}],
                "tls": {"client_cert": cert, "client_key": key},
            })
            .to_string(),
        )
        .expect("the files exist");
        Pool::new(config).err().map(|err| err.to_string())
    };
    let err = pool_with(&pki.client_cert, &pki.other_key).expect("a key of another certificate");
    assert!(
        err.contains("tls.client_cert") && err.contains("tls.client_key"),
        "{err}"
    );
    assert!(
        err.contains("client-cert.pem") && err.contains("other-key.pem"),
        "{err}"
    );
    // A key file with no key in it, and a certificate file with no certificate.
    let err = pool_with(&pki.client_cert, &pki.client_cert).expect("no key in the key file");
    assert!(err.contains("tls.client_key"), "{err}");
    let err = pool_with(&pki.client_key, &pki.client_key).expect("no certificate");
    assert!(err.contains("tls.client_cert"), "{err}");
}

/// A TLS server that reads the upgrade request and hangs up (no close_notify): the
/// failure says so in the same words as over plain TCP.
#[test]
fn a_tls_server_that_hangs_up_during_the_upgrade_is_named() {
    let _guard = watchdog("tls_hang_up", Duration::from_secs(60));
    let pki = test_pki();
    let server_config = Arc::clone(&pki.server_config);
    let server = support::Acceptor::start(move |stream, _stop| {
        let Ok(connection) = rustls::ServerConnection::new(Arc::clone(&server_config)) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(connection, stream);
        let _ = support::read_http_head(&mut tls);
        // Dropped without close_notify: the TCP connection just ends.
    });
    let url = server.url().replace("ws://127.0.0.1", "wss://localhost");
    let config = trusting_the_test_ca(&url, &pki);
    let pool = Pool::new(config).expect("pool");
    let reason = first_close_reason(&pool);
    assert!(
        reason.contains("the server closed the connection before it finished its answer"),
        "{reason}"
    );
}
