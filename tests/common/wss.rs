//! The browser's side for tests: certificates made at test time (a test CA
//! and leaf certificates it signs), and a blocking WebSocket-over-TLS client
//! that speaks the Noise stream in binary messages, as a browser page does.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::Digest;
use switchboard::noise::{Initiator, StaticKeypair, Transport};
use switchboard::proto::{self, Frame};
use tokio_tungstenite::tungstenite::{
    self, client::IntoClientRequest, protocol::CloseFrame, protocol::WebSocketConfig, Message,
    WebSocket,
};

/// A certificate authority made for one test.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate for `127.0.0.1` and `localhost`, signed by a [`TestCa`].
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    /// base64 of the SHA-256 of its SubjectPublicKeyInfo (Chromium's
    /// `--ignore-certificate-errors-spki-list`).
    pub spki_sha256_base64: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchboard test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A fresh leaf (its own key) named `name`.
    pub fn leaf(&self, name: &str) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let spki = sha2::Sha256::digest(key.public_key_der());
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            spki_sha256_base64: base64::engine::general_purpose::STANDARD.encode(spki),
        }
    }

    /// A rustls client configuration trusting this CA (ALPN `http/1.1`).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Leaf {
    /// Writes the certificate and key PEM files (replacing them).
    pub fn write(&self, cert_path: &Path, key_path: &Path) {
        // Written aside and renamed, as an operator's tooling should, so a
        // reload never reads half a file.
        for (path, text) in [(cert_path, &self.cert_pem), (key_path, &self.key_pem)] {
            let staged = path.with_extension("new");
            std::fs::write(&staged, text).unwrap();
            std::fs::rename(&staged, path).unwrap();
        }
    }

    /// A rustls server configuration presenting this leaf (the page server
    /// of the browser test).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(self.der.clone())], key)
            .unwrap();
        Arc::new(config)
    }
}

/// A TLS client stream over a blocking socket.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes a TLS handshake with the server at `addr`
/// (named `127.0.0.1`).
pub fn tls_connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    tls_connect_from(addr, None, config)
}

/// A TCP connection to `addr` from `source` (any port), e.g. 127.0.0.2,
/// so that one test can be several browsers at different addresses.
pub fn tcp_connect_from(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let Some(source) = source else {
        return TcpStream::connect(addr);
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(source, 0)),
    )?;
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(TcpStream::from(fd))
}

/// [`tls_connect`] from `source`.
pub fn tls_connect_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let tcp = tcp_connect_from(addr, source)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// The leaf certificate a TLS stream's server presented.
pub fn peer_leaf(tls: &Tls) -> Vec<u8> {
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

/// What the browser's side saw when a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// A closing frame (code, reason).
    Closed(u16, String),
    /// The connection ended without one.
    Dropped(String),
}

/// A WebSocket client over TLS; after [`WsClient::noise`] its frames are
/// sealed with Noise and carried in binary messages.
pub struct WsClient {
    pub ws: WebSocket<Tls>,
    noise: Option<Transport>,
    /// Bytes from the server not yet opened (or, before the handshake ends,
    /// not yet read as handshake messages).
    input: BytesMut,
    /// Opened frame bytes not yet framed.
    plain: BytesMut,
    pub frame_bytes_max: u32,
}

/// What a Noise handshake over WebSocket told the client.
pub struct WsHandshake {
    pub server_key: [u8; 32],
}

impl WsClient {
    /// TLS and the WebSocket upgrade, nothing more.
    pub fn connect(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<WsClient, String> {
        WsClient::connect_from(addr, None, config)
    }

    /// [`WsClient::connect`] from `source`.
    pub fn connect_from(
        addr: SocketAddr,
        source: Option<IpAddr>,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<WsClient, String> {
        let tls = tls_connect_from(addr, source, config).map_err(|e| format!("tls: {e}"))?;
        let request = format!("wss://127.0.0.1:{}/", addr.port())
            .into_client_request()
            .unwrap();
        let ws_config = WebSocketConfig::default().max_message_size(Some(1 << 20));
        let (ws, _response) =
            tungstenite::client::client_with_config(request, tls, Some(ws_config))
                .map_err(|e| format!("upgrade: {e}"))?;
        Ok(WsClient {
            ws,
            noise: None,
            input: BytesMut::new(),
            plain: BytesMut::new(),
            frame_bytes_max: 16 << 20,
        })
    }

    /// Connects and runs a Noise handshake as `client` (IK to `server_key`
    /// when given, else XX), sending the intro and the first message in
    /// separate WebSocket messages, the intro itself cut in two: message
    /// boundaries carry no meaning.
    pub fn noise(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        client: &StaticKeypair,
        server_key: Option<&[u8; 32]>,
    ) -> Result<(WsClient, WsHandshake), String> {
        WsClient::noise_from(addr, None, config, client, server_key)
    }

    /// [`WsClient::noise`] from `source`.
    pub fn noise_from(
        addr: SocketAddr,
        source: Option<IpAddr>,
        config: &Arc<rustls::ClientConfig>,
        client: &StaticKeypair,
        server_key: Option<&[u8; 32]>,
    ) -> Result<(WsClient, WsHandshake), String> {
        let mut c = WsClient::connect_from(addr, source, config)?;
        let (mut initiator, opening) = match server_key {
            Some(key) => Initiator::ik(client, key, &[]),
            None => Initiator::xx(client, &[]),
        }
        .unwrap();
        for piece in [&opening[..2], &opening[2..5], &opening[5..]] {
            c.send_binary(piece).map_err(|e| format!("send: {e}"))?;
        }
        let message = c.read_noise_message()?;
        let third = initiator
            .read_message(&message)
            .map_err(|e| e.to_string())?;
        if let Some(third) = third {
            c.send_binary(&third).map_err(|e| format!("send: {e}"))?;
        }
        let handshake = WsHandshake {
            server_key: initiator.server_static().unwrap(),
        };
        c.noise = Some(initiator.into_transport().map_err(|e| e.to_string())?);
        Ok((c, handshake))
    }

    fn read_noise_message(&mut self) -> Result<Bytes, String> {
        loop {
            let next = switchboard::noise::wire::next_message(&mut self.input, 65_535)
                .map_err(|e| e.to_string())?;
            if let Some(message) = next {
                return Ok(message);
            }
            match self.next_message(Duration::from_secs(10)) {
                Ok(Message::Binary(bytes)) => self.input.extend_from_slice(&bytes),
                Ok(other) => return Err(format!("unexpected message {other:?}")),
                Err(ended) => return Err(format!("closed in the handshake: {ended:?}")),
            }
        }
    }

    /// Sends one binary message.
    pub fn send_binary(&mut self, bytes: &[u8]) -> tungstenite::Result<()> {
        self.ws.send(Message::Binary(Bytes::copy_from_slice(bytes)))
    }

    /// Sends one text message.
    pub fn send_text(&mut self, text: &str) -> tungstenite::Result<()> {
        self.ws.send(Message::text(text))
    }

    /// The next data or closing message within `timeout` (pings answered).
    pub fn next_message(&mut self, timeout: Duration) -> Result<Message, Ended> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no WebSocket message within {timeout:?}");
            self.ws.get_ref().sock.set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Close(frame)) => {
                    return Err(match frame {
                        Some(CloseFrame { code, reason }) => {
                            Ended::Closed(code.into(), reason.to_string())
                        }
                        None => Ended::Closed(1005, String::new()),
                    })
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(message) => return Ok(message),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(Ended::Dropped(e.to_string())),
            }
        }
    }

    /// Reads until the server ends the connection; what it said.
    pub fn expect_end(&mut self) -> Ended {
        loop {
            match self.next_message(Duration::from_secs(10)) {
                Ok(_) => continue,
                Err(ended) => return ended,
            }
        }
    }

    /// Writes a frame, sealed.
    pub fn send(&mut self, frame: &Frame) {
        let noise = self.noise.as_mut().expect("after the Noise handshake");
        let mut sealed = BytesMut::new();
        noise.seal(&frame.to_bytes(), &mut sealed).unwrap();
        self.send_binary(&sealed).expect("send a sealed frame");
    }

    /// The next frame, or None when the connection ends.
    pub fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) =
                proto::next_frame(&mut self.plain, self.frame_bytes_max).expect("server frame")
            {
                return Some(frame);
            }
            match self.next_message(Duration::from_secs(10)) {
                Ok(Message::Binary(bytes)) => {
                    self.input.extend_from_slice(&bytes);
                    self.noise
                        .as_mut()
                        .expect("after the Noise handshake")
                        .open(&mut self.input, &mut self.plain)
                        .expect("the server's transport messages open");
                }
                Ok(other) => panic!("unexpected message {other:?}"),
                Err(_) => return None,
            }
        }
    }

    /// The leaf certificate the server presented.
    pub fn leaf(&self) -> Vec<u8> {
        peer_leaf(self.ws.get_ref())
    }
}

/// Reads an HTTP response to the end from a TLS stream; (status, text).
pub fn read_response(tls: &mut Tls) -> (u16, String) {
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

/// Writes `bytes` to a TLS stream and flushes.
pub fn write(tls: &mut Tls, bytes: &[u8]) {
    tls.write_all(bytes).unwrap();
    tls.flush().unwrap();
}
