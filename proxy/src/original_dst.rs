//! The original destination of a connection that iptables redirected to one of
//! the sidecar's capture ports (`REDIRECT` in the nat table, as `serin iptables`
//! sets up): `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Where a redirected connection was going. `None` when the connection was not
/// redirected (a client that dialled the listener itself, as the loopback tests
/// and explicit-proxy setups do) or when the kernel cannot tell; the second case
/// is logged, and the caller falls back to the `Host` header.
pub fn redirected(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    match read(stream, local) {
        Ok(dst)
            if dst == local || dst.ip().to_canonical() == local.ip().to_canonical() && dst.port() == local.port() =>
        {
            None
        }
        Ok(dst) => Some(dst),
        // ENOENT: no NAT entry, i.e. the connection was not redirected.
        Err(e) if e.raw_os_error() == Some(ENOENT) => None,
        Err(e) => {
            tracing::warn!(%local, error = %e, "cannot read the original destination; routing by Host header");
            None
        }
    }
}

const ENOENT: i32 = 2;

/// Reads the original destination: IPv4 first for IPv4 sockets, IPv6 for IPv6
/// sockets (falling back to IPv4 for an IPv4-mapped peer on a dual-stack socket).
fn read(stream: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        match sock.original_dst_v6() {
            Ok(addr) => addr,
            Err(_) => sock.original_dst_v4()?,
        }
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_is_not_redirected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        assert_eq!(redirected(&server), None);
    }
}
