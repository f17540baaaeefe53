//! Reading a TLS ClientHello without terminating TLS: the server name (SNI)
//! decides which gateway server takes the connection, and the bytes read are
//! replayed, to rustls when the server terminates TLS, or to the upstream when it
//! passes TLS through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The largest ClientHello accepted (handshake message plus record headers).
pub const MAX_HELLO: usize = 64 * 1024;

/// Why a connection's first bytes are not a usable ClientHello.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The first record is not a TLS handshake (e.g. plain HTTP to a TLS port).
    #[error("not TLS: the first record is not a handshake")]
    NotTls,
    /// A handshake record that does not hold a well-formed ClientHello.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello is larger than [`MAX_HELLO`].
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    /// The client closed the connection before the ClientHello was complete.
    #[error("connection closed before the ClientHello was complete")]
    Eof,
    /// Reading failed.
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// A ClientHello read from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// Every byte read from the connection so far (to replay).
    pub bytes: Vec<u8>,
    /// The `server_name` extension's host name, lower-case, if any.
    pub sni: Option<String>,
}

/// Reads from `io` until a whole ClientHello has arrived; returns the bytes read
/// and the server name.
pub async fn read_client_hello<IO: AsyncRead + Unpin>(io: &mut IO) -> Result<ClientHello, HelloError> {
    let mut bytes = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match parse(&bytes) {
            Ok(Some(sni)) => return Ok(ClientHello { bytes, sni }),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        if bytes.len() >= MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(HelloError::Eof);
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// Parses the records in `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some(sni))` once the ClientHello is complete.
#[allow(clippy::option_option)]
pub fn parse(buf: &[u8]) -> Result<Option<Option<String>>, HelloError> {
    // Reassemble the handshake message from as many records as it spans.
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else { return Ok(None) };
        if header[0] != 22 {
            return Err(HelloError::NotTls);
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Err(HelloError::Malformed("empty record"));
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else { return Ok(None) };
        handshake.extend_from_slice(fragment);
        at += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Err(HelloError::Malformed("first handshake message is not a ClientHello"));
            }
            let body_len =
                (usize::from(handshake[1]) << 16) | (usize::from(handshake[2]) << 8) | usize::from(handshake[3]);
            if body_len + 4 > MAX_HELLO {
                return Err(HelloError::TooLarge);
            }
            if handshake.len() >= body_len + 4 {
                return server_name(&handshake[4..4 + body_len]).map(Some);
            }
        }
    }
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()?;
        self.take(n)
    }
    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The host name of the `server_name` extension of a ClientHello body.
fn server_name(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    if r.0.is_empty() {
        return Ok(None); // No extensions.
    }
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).map_err(|_| HelloError::Malformed("server name is not UTF-8"))?;
                return Ok(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
    }
    Ok(None)
}

/// A stream that first yields bytes already read from it, then reads on.
pub struct Replay<IO> {
    prefix: Vec<u8>,
    at: usize,
    inner: IO,
    /// Dropped with the stream (e.g. a sender whose receiver learns that the
    /// connection is over).
    guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl<IO> Replay<IO> {
    /// `inner` with `prefix` put back in front of it.
    pub fn new(prefix: Vec<u8>, inner: IO) -> Replay<IO> {
        Replay { prefix, at: 0, inner, guard: None }
    }

    /// Keeps `guard` alive as long as the stream.
    pub fn with_guard(mut self, guard: impl std::any::Any + Send + Sync) -> Replay<IO> {
        self.guard = Some(Box::new(guard));
        self
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }
}

impl<IO: std::fmt::Debug> std::fmt::Debug for Replay<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").field("pending", &(self.prefix.len() - self.at)).field("inner", &self.inner).finish()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replay<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first flight of a real rustls client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(serin_certs::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("write");
        out
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let hello = client_hello("Pay.Example.com");
        assert_eq!(parse(&hello).expect("parse"), Some(Some("pay.example.com".into())));
        // Every strict prefix asks for more bytes.
        for cut in [0, 3, 5, 40, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]).expect("prefix"), None, "cut at {cut}");
        }
    }

    #[test]
    fn an_ip_address_sends_no_server_name() {
        let hello = client_hello("127.0.0.1");
        assert_eq!(parse(&hello).expect("parse"), Some(None));
    }

    #[test]
    fn a_hello_split_over_two_records_is_reassembled() {
        let hello = client_hello("pay.example.com");
        let body = &hello[5..];
        let (a, b) = body.split_at(10);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&u16::try_from(part.len()).expect("len").to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(parse(&two).expect("parse"), Some(Some("pay.example.com".into())));
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(HelloError::NotTls)));
        assert!(matches!(parse(&[22, 3, 1, 0, 0]), Err(HelloError::Malformed(_))));
        assert!(matches!(parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Err(HelloError::Malformed(_))));
        // A ClientHello whose body claims more than it has.
        let mut hello = client_hello("pay.example.com");
        hello[5 + 4 + 34] = 200; // session id length beyond the body
        let _ = parse(&hello);
        // Random bytes after a valid header never panic.
        for seed in 0u8..=255 {
            let mut junk = vec![22, 3, 1, 0, 60, 1, 0, 0, 56];
            junk.extend((0..56).map(|i: u8| i.wrapping_mul(seed).wrapping_add(seed)));
            let _ = parse(&junk);
        }
    }

    #[tokio::test]
    async fn replay_yields_the_prefix_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"world").await.expect("write");
        drop(a);
        let mut r = Replay::new(b"hello ".to_vec(), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
