//! Protocol detection on a captured connection, from its first bytes (Envoy's
//! `tls_inspector` and `http_inspector`): a TLS ClientHello, an HTTP/1.x request
//! line, the HTTP/2 preface, or anything else (opaque TCP). Bytes are peeked,
//! never consumed.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long a connection may stay silent before it is taken as opaque TCP: a
/// server-first protocol (MySQL, SMTP) sends nothing until the server speaks.
pub const DETECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// What a connection's first bytes say it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x or HTTP/2 with prior knowledge (h2c).
    Http,
    /// A TLS handshake.
    Tls,
    /// Anything else, including a client that sent nothing in time.
    Tcp,
    /// The client closed before sending anything.
    Closed,
}

/// The longest request method taken for HTTP (`MKCALENDAR`, `VERSION-CONTROL`, …).
const MAX_METHOD: usize = 20;

/// Classifies a prefix of the stream: `None` while more bytes could change the
/// answer. An HTTP/1.x request line starts with a method token (upper-case
/// letters, `-`, `_`) and a space; the HTTP/2 preface starts with `PRI `.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    let first = *bytes.first()?;
    if first == 0x16 {
        return Some(Detected::Tls);
    }
    for (i, &b) in bytes.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b' ' if i > 0 => return Some(Detected::Http),
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            _ => return Some(Detected::Tcp),
        }
    }
    None
}

/// Peeks at `stream` until its protocol is known or [`DETECTION_TIMEOUT`] passes.
pub async fn detect(stream: &TcpStream) -> Detected {
    let deadline = tokio::time::Instant::now() + DETECTION_TIMEOUT;
    let mut buf = [0u8; 32];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(0)) => return Detected::Closed,
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Detected::Closed,
            Err(_) => return if seen == 0 { Detected::Tcp } else { classify(&buf[..seen]).unwrap_or(Detected::Tcp) },
        };
        if let Some(found) = classify(&buf[..n]) {
            return found;
        }
        if n == buf.len() {
            return Detected::Tcp;
        }
        // A partial request line: wait for the rest (peek returns at once while
        // the same bytes are pending, hence the short pause).
        seen = n;
        if tokio::time::Instant::now() >= deadline {
            return classify(&buf[..seen]).unwrap_or(Detected::Tcp);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"POST /x HTTP/1.1"), Some(Detected::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"PROPFIND /dav HTTP/1.1"), Some(Detected::Http));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Tls));
        assert_eq!(classify(b"\x00\x00\x00\x01"), Some(Detected::Tcp));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Tcp));
        assert_eq!(classify(b" GET"), Some(Detected::Tcp));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Tcp));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Some(Detected::Tcp));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"OPTIONS"), None);
        assert_eq!(classify(b""), None);
    }
}
