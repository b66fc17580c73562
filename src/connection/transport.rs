//! The byte stream under one WebSocket: TCP, or TLS over TCP through rustls.
//!
//! Sockets are non-blocking from the first byte: the worker waits on its own epoll set
//! (`poll.rs`) that the pool can wake, so connect, TLS and WebSocket handshakes and the
//! session itself all stay responsive to a close command.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::{TlsConfig, TlsRoots};
use crate::error::{Error, Result};

/// TCP or TLS.
pub(crate) enum Stream {
    Plain(TcpStream, ReadAhead),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream::Plain(tcp, ReadAhead::default())
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp, _) => tcp,
            Stream::Tls(tls) => &tls.sock,
        }
    }
}

/// Bytes of one read-ahead `recv`: tungstenite's own default read buffer, which the
/// plain read loop of the bench uses. Against 64 KiB: the `raw` codec on one
/// connection 9.85 / 9.78 against 9.39 / 9.16M msg/s (medians of two sets of five
/// interleaved rounds); `json` 5.00 against 4.88 (four rounds, within the noise).
const READ_AHEAD_BYTES: usize = 128 * 1024;

/// Large reads for a busy plain connection.
///
/// tungstenite reads into its own buffer, which is kept small (`read_buffer_size`
/// 4 KiB) so that a thousand idle connections stay cheap. On a busy feed that would
/// mean one `recv` per 4 KiB; once a read fills tungstenite's whole buffer, this takes
/// 128 KiB per `recv` instead and hands it out in pieces (one extra `memcpy`, 32
/// times fewer system calls). The buffer is freed when reads come back small again.
#[derive(Default)]
pub(crate) struct ReadAhead {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled what it was given: more is probably waiting.
    busy: bool,
}

impl ReadAhead {
    fn read(&mut self, tcp: &mut TcpStream, out: &mut [u8]) -> io::Result<usize> {
        if self.start < self.end {
            let count = out.len().min(self.end - self.start);
            out[..count].copy_from_slice(&self.buffer[self.start..self.start + count]);
            self.start += count;
            return Ok(count);
        }
        if !self.busy || out.len() >= READ_AHEAD_BYTES {
            let count = tcp.read(out)?;
            self.busy = count > 0 && count == out.len();
            return Ok(count);
        }
        if self.buffer.is_empty() {
            self.buffer = vec![0; READ_AHEAD_BYTES];
        }
        let count = tcp.read(&mut self.buffer)?;
        if count < out.len() {
            // Light traffic again: back to direct reads, and the memory goes back.
            out[..count].copy_from_slice(&self.buffer[..count]);
            self.busy = false;
            self.buffer = Vec::new();
            return Ok(count);
        }
        self.start = 0;
        self.end = count;
        self.read(tcp, out)
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp, ahead) => ahead.read(tcp, buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp, _) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp, _) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// Builds the rustls client configuration of a pool from `tls`.
pub(crate) fn tls_client_config(tls: &TlsConfig) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match tls.roots {
        TlsRoots::Bundled => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        TlsRoots::System => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                let detail = found
                    .errors
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "none found".into());
                return Err(Error::Config(format!(
                    "tls.roots: \"system\" but no system root certificates could be loaded ({detail})"
                )));
            }
            let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
        }
        TlsRoots::None => {}
    }
    if let Some(ca_file) = &tls.ca_file {
        let pem = read_tls_file("tls.ca_file", ca_file)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<_, _>>()
            .map_err(|err| Error::Config(format!("tls.ca_file: {ca_file}: {err}")))?;
        if certs.is_empty() {
            return Err(Error::Config(format!(
                "tls.ca_file: {ca_file} holds no PEM certificate"
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|err| {
                Error::Config(format!(
                    "tls.ca_file: {ca_file}: unusable certificate: {err}"
                ))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Tls(format!("protocol versions: {err}")))?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert_file), Some(key_file)) => {
            let pem = read_tls_file("tls.client_cert", cert_file)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<_, _>>()
                .map_err(|err| Error::Config(format!("tls.client_cert: {cert_file}: {err}")))?;
            if chain.is_empty() {
                return Err(Error::Config(format!(
                    "tls.client_cert: {cert_file}: no PEM certificate in it"
                )));
            }
            let pem = read_tls_file("tls.client_key", key_file)?;
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|err| Error::Config(format!("tls.client_key: {key_file}: {err}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|err| {
                Error::Config(format!(
                    "tls.client_cert / tls.client_key: {cert_file} and {key_file} do not go \
                     together: {err}"
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(Error::Config(
                "tls.client_key: required when tls.client_cert is set".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(Error::Config(
                "tls.client_cert: required when tls.client_key is set".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

/// Reads the TLS file of config key `key` whole, through the bounded reader: at most
/// `MAX_TLS_FILE_BYTES`, and only a regular file. The error names the key and the file
/// (and, for one too large, the limit and the size seen).
fn read_tls_file(key: &str, path: &str) -> Result<Vec<u8>> {
    crate::file_limits::read_regular_capped(
        std::path::Path::new(path),
        crate::file_limits::MAX_TLS_FILE_BYTES,
        "TLS file",
    )
    .map_err(|err| Error::Config(format!("{key}: {path}: {err}")))
}

/// The addresses in the order Happy Eyeballs tries them (RFC 8305, section 4): the
/// resolver's first, then alternating between the address families, each family in
/// the resolver's order. A host whose IPv6 addresses all sit on a dead route so gets
/// its IPv4 address tried second, not after every IPv6 one.
pub(crate) fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let first_is_v6 = first.is_ipv6();
    let (mut same, mut other): (VecDeque<SocketAddr>, VecDeque<SocketAddr>) = addrs
        .into_iter()
        .partition(|addr| addr.is_ipv6() == first_is_v6);
    let mut ordered = Vec::with_capacity(same.len() + other.len());
    loop {
        match (same.pop_front(), other.pop_front()) {
            (None, None) => return ordered,
            (one, two) => ordered.extend(one.into_iter().chain(two)),
        }
    }
}

/// Starts a non-blocking connect; completion is signalled by writability.
pub(crate) fn start_connect(addr: SocketAddr, keepalive: Duration) -> Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|err| Error::Io(format!("creating a socket for {addr}: {err}")))?;
    socket
        .set_nonblocking(true)
        .map_err(|err| Error::Io(format!("socket for {addr}: {err}")))?;
    socket
        .set_tcp_nodelay(true)
        .map_err(|err| Error::Io(format!("socket for {addr}: {err}")))?;
    if !keepalive.is_zero() {
        let interval = (keepalive / 3).max(Duration::from_secs(1));
        let params = TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(interval)
            .with_retries(3);
        socket
            .set_tcp_keepalive(&params)
            .map_err(|err| Error::Io(format!("socket for {addr}: keepalive: {err}")))?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(err)
            if err.raw_os_error() == Some(libc::EINPROGRESS)
                || err.kind() == io::ErrorKind::WouldBlock => {}
        Err(err) => return Err(Error::Io(format!("connecting to {addr}: {err}"))),
    }
    Ok(socket.into())
}

/// After writability: did the connect succeed?
pub(crate) fn finish_connect(tcp: &TcpStream, addr: SocketAddr) -> Result<bool> {
    match SockRef::from(tcp).take_error() {
        Ok(Some(err)) => Err(Error::Io(format!("connecting to {addr}: {err}"))),
        Err(err) => Err(Error::Io(format!("connecting to {addr}: {err}"))),
        Ok(None) => match tcp.peer_addr() {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(err) => Err(Error::Io(format!("connecting to {addr}: {err}"))),
        },
    }
}

/// Wraps a connected socket in TLS (the handshake runs inside later reads/writes).
pub(crate) fn wrap_tls(
    tcp: TcpStream,
    host: &str,
    config: &Arc<rustls::ClientConfig>,
) -> Result<Stream> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|err| Error::Tls(format!("{host:?} is not a valid TLS server name: {err}")))?;
    let mut connection = rustls::ClientConnection::new(Arc::clone(config), name)
        .map_err(|err| Error::Tls(format!("starting TLS with {host}: {err}")))?;
    // Never let a full send buffer surface as Ok(0) (tungstenite reads that as a reset).
    connection.set_buffer_limit(None);
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(
        connection, tcp,
    ))))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected pair on loopback: (our end, the peer's end).
    pub(crate) fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        (ours, theirs)
    }

    /// A TLS file was read with no cap: a path naming a huge file (or a device) filled
    /// memory. Each of the three keys is read through the bounded reader, and one too
    /// large is refused naming the key, the file, the limit and the size seen.
    #[test]
    fn tls_files_past_their_limit_are_refused_naming_key_file_limit_and_size() {
        let dir = std::env::temp_dir().join(format!("wirepool-tls-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let huge = dir.join("huge.pem");
        let size = crate::file_limits::MAX_TLS_FILE_BYTES + 4096;
        // Sparse: no disk space taken.
        std::fs::File::create(&huge)
            .and_then(|file| file.set_len(size))
            .expect("a sparse file");
        let huge = huge.to_str().expect("UTF-8 temp path").to_string();
        let small = dir.join("small.pem");
        std::fs::write(&small, "not PEM").expect("written");
        let small = small.to_str().expect("UTF-8 temp path").to_string();
        let configs = [
            (
                "tls.ca_file",
                TlsConfig {
                    ca_file: Some(huge.clone()),
                    ..TlsConfig::default()
                },
            ),
            (
                "tls.client_cert",
                TlsConfig {
                    client_cert: Some(huge.clone()),
                    client_key: Some(small.clone()),
                    ..TlsConfig::default()
                },
            ),
            (
                "tls.client_key",
                TlsConfig {
                    client_cert: Some(small.clone()),
                    client_key: Some(huge.clone()),
                    ..TlsConfig::default()
                },
            ),
        ];
        for (key, config) in configs {
            // The client_key case needs a chain that parses before the key is read.
            let config = if key == "tls.client_key" {
                let key_pair = rcgen::KeyPair::generate().expect("key");
                let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                    .and_then(|params| params.self_signed(&key_pair))
                    .expect("a self-signed certificate");
                let chain = dir.join("chain.pem");
                std::fs::write(&chain, cert.pem()).expect("written");
                TlsConfig {
                    client_cert: Some(chain.to_str().expect("UTF-8").to_string()),
                    ..config
                }
            } else {
                config
            };
            let err = match tls_client_config(&config) {
                Ok(_) => panic!("{key}: a file past the limit was accepted"),
                Err(err) => err.to_string(),
            };
            assert!(
                err.contains(&format!("{key}: {huge}: too large for a TLS file"))
                    && err.contains(&format!("at least {size} bytes"))
                    && err.contains("16 MiB"),
                "{key}: expected the key, the file, the limit and the size, got {err:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn addresses_alternate_between_families_from_the_resolvers_first() {
        let v6 = |n: u16| SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, n], 443));
        let v4 = |n: u8| SocketAddr::from(([10, 0, 0, n], 443));
        assert_eq!(
            interleave_families(vec![v6(1), v6(2), v6(3), v4(1), v4(2)]),
            [v6(1), v4(1), v6(2), v4(2), v6(3)]
        );
        assert_eq!(
            interleave_families(vec![v4(1), v6(1), v6(2), v4(2)]),
            [v4(1), v6(1), v4(2), v6(2)]
        );
        assert_eq!(interleave_families(vec![v4(1), v4(2)]), [v4(1), v4(2)]);
        assert_eq!(interleave_families(Vec::new()), []);
    }

    #[test]
    fn read_ahead_hands_out_a_busy_stream_byte_exact_then_frees_its_buffer() {
        let (ours, mut theirs) = pair();
        let sent: Vec<u8> = (0..300_000u32).map(|n| (n % 251) as u8).collect();
        theirs.write_all(&sent).unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        let mut stream = Stream::plain(ours);
        let mut received = Vec::new();
        let mut piece = [0u8; 4096];
        let mut went_busy = false;
        loop {
            let count = stream.read(&mut piece).unwrap();
            if count == 0 {
                break;
            }
            received.extend_from_slice(&piece[..count]);
            if let Stream::Plain(_, ahead) = &stream {
                went_busy |= !ahead.buffer.is_empty();
            }
        }
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "bytes reordered or lost");
        assert!(
            went_busy,
            "a stream that fills every read switches to read-ahead"
        );
        let Stream::Plain(_, ahead) = &stream else {
            unreachable!()
        };
        assert!(ahead.buffer.is_empty() && !ahead.busy, "freed at the end");
    }

    #[test]
    fn read_ahead_stays_out_of_the_way_of_a_light_stream() {
        let (ours, mut theirs) = pair();
        let mut stream = Stream::plain(ours);
        let mut piece = [0u8; 4096];
        for round in 0..20u8 {
            theirs.write_all(&[round; 10]).unwrap();
            let count = stream.read(&mut piece).unwrap();
            assert_eq!(&piece[..count], &[round; 10][..count]);
            let Stream::Plain(_, ahead) = &stream else {
                unreachable!()
            };
            assert!(ahead.buffer.is_empty(), "no buffer for small reads");
            // Whatever the first read missed arrives in the next ones.
            let mut got = count;
            while got < 10 {
                got += stream.read(&mut piece[got..10]).unwrap();
            }
        }
    }
}
