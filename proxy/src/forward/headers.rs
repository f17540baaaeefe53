//! Header handling of a proxy hop: hop-by-hop headers (RFC 9110 §7.6.1),
//! `x-forwarded-for`, `x-request-id`, and the route's set/add/remove edits.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::request_info::Text;
use crate::snapshot::HeaderEdits;

/// Headers that describe one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// With `upgrade`, `Connection: upgrade` and `Upgrade` are kept so the upstream
/// sees the upgrade request. `TE: trailers` is kept (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these: one pass over the names (no hashing)
    // finds that, and then there is nothing to remove or add.
    if !headers.keys().any(|name| name == header::TE || HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    let upgrade_value = if upgrade { headers.get(header::UPGRADE).cloned() } else { None };
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.to_str().is_ok_and(|s| s.contains("trailers")));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(value) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
}

/// Sets `x-forwarded-for` and `x-forwarded-proto` as Envoy does. At the edge
/// (`use_remote_address`, as Istio configures its gateways; `edge_client` is the
/// client's address) the address is appended to `x-forwarded-for` and
/// `x-forwarded-proto` becomes the connection's scheme, whatever the client sent.
/// Behind the edge (sidecars) `x-forwarded-for` passes unchanged and
/// `x-forwarded-proto` is set only when absent. `tls`: the downstream connection
/// is TLS (the scheme `https`).
pub fn set_forwarded(headers: &mut HeaderMap, edge_client: Option<IpAddr>, tls: bool) {
    let scheme = HeaderValue::from_static(if tls { "https" } else { "http" });
    match edge_client {
        Some(client) => {
            append_forwarded_for(headers, client);
            headers.insert(&X_FORWARDED_PROTO, scheme);
        }
        None => {
            if !headers.contains_key(&X_FORWARDED_PROTO) {
                headers.insert(&X_FORWARDED_PROTO, scheme);
            }
        }
    }
}

/// Appends the client's address to `x-forwarded-for`.
fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let mut ip = [0u8; 64];
    let ip = format_ip(client, &mut ip);
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + ip.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
        }
        _ => HeaderValue::from_bytes(ip),
    };
    if let Ok(v) = value {
        headers.insert(&X_FORWARDED_FOR, v);
    }
}

/// Writes `ip` as `Display` does into `buf`; returns the written part. IPv4
/// by hand (the common case: no formatting machinery), IPv6 through `Display`.
fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            &buf[..n]
        }
        IpAddr::V6(_) => {
            use std::io::Write as _;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // An IPv6 address is at most 45 characters: it fits.
            let _ = write!(cursor, "{ip}");
            let n = cursor.position() as usize;
            &buf[..n]
        }
    }
}

/// Keeps a valid `x-request-id` or sets a new random (UUID v4) one; returns it
/// (sharing the header's bytes: no copy).
///
/// The value is marked sensitive, so HTTP/2 sends it as a literal that HPACK never
/// indexes: a value that never repeats would otherwise take a new entry of the
/// connection's header table on every request (on both ends), evicting the entries
/// that do repeat, and the encoder compares each new id with every id still stored.
pub fn ensure_request_id(headers: &mut HeaderMap) -> Text {
    if let Some(id) = headers.get_mut(&X_REQUEST_ID)
        && !id.is_empty()
        && let Some(text) = Text::from_header(id)
    {
        id.set_sensitive(true);
        return text;
    }
    // One allocation, shared by the header and the returned text.
    let id = bytes::Bytes::from_owner(uuid_v4());
    if let Ok(mut v) = HeaderValue::from_maybe_shared(id.clone()) {
        v.set_sensitive(true);
        headers.insert(&X_REQUEST_ID, v);
    }
    Text::try_from(id).unwrap_or_default() // always ASCII
}

/// A random UUID v4 string.
pub fn new_request_id() -> String {
    std::str::from_utf8(&uuid_v4()).map_or_else(|_| String::new(), str::to_owned) // always ASCII
}

/// A random UUID v4: 8-4-4-4-12 lower-case hex digits.
fn uuid_v4() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::random();
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    // Most significant first.
    let mut out = [b'-'; 36];
    let mut n = 0;
    for (i, byte) in bits.to_be_bytes().into_iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            n += 1; // the dash already there
        }
        out[n] = HEX[usize::from(byte >> 4)];
        out[n + 1] = HEX[usize::from(byte & 0xf)];
        n += 2;
    }
    out
}

/// Applies `set` (overwrite), `add` (append) and `remove`.
pub fn apply_edits(headers: &mut HeaderMap, edits: &HeaderEdits) {
    for (name, value) in &edits.set {
        headers.insert(name, value.clone());
    }
    for (name, value) in &edits.add {
        headers.append(name, value.clone());
    }
    for name in &edits.remove {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-private").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-app").is_some());
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).map(|v| v.as_bytes()), Some(&b"websocket"[..]));
        assert_eq!(h.get(header::CONNECTION).map(|v| v.as_bytes()), Some(&b"upgrade"[..]));
    }

    #[test]
    fn forwarded_for_and_request_id() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().expect("ip"));
        append_forwarded_for(&mut h, "127.0.0.1".parse().expect("ip"));
        assert_eq!(h.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()), Some(&b"10.0.0.1, 127.0.0.1"[..]));
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_eq!(ensure_request_id(&mut h), id);
        // Never indexed by HPACK: set here, and kept from the caller.
        assert!(h.get(&X_REQUEST_ID).is_some_and(HeaderValue::is_sensitive));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("from-the-client"));
        assert_eq!(&*ensure_request_id(&mut h), "from-the-client");
        assert!(h.get(&X_REQUEST_ID).is_some_and(HeaderValue::is_sensitive));
    }

    #[test]
    fn forwarded_headers_at_the_edge_and_behind_it() {
        let proto = |h: &HeaderMap| h.get(&X_FORWARDED_PROTO).map(|v| v.as_bytes().to_vec());
        let client: IpAddr = "10.0.0.7".parse().expect("ip");
        // A sidecar: the caller's x-forwarded-for and x-forwarded-proto pass unchanged.
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.2.3"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        set_forwarded(&mut h, None, false);
        assert_eq!(h.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()), Some(&b"10.1.2.3"[..]));
        assert_eq!(proto(&h), Some(b"https".to_vec()));
        // ... and none is added; x-forwarded-proto is the connection's scheme when absent.
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, None, true);
        assert!(!h.contains_key(&X_FORWARDED_FOR));
        assert_eq!(proto(&h), Some(b"https".to_vec()));
        // The edge appends the client and overrides what the client claimed.
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.2.3"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        set_forwarded(&mut h, Some(client), false);
        assert_eq!(h.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()), Some(&b"10.1.2.3, 10.0.0.7"[..]));
        assert_eq!(proto(&h), Some(b"http".to_vec()));
    }

    #[test]
    fn request_id_is_a_uuid_v4() {
        for _ in 0..100 {
            let id = new_request_id();
            let groups: Vec<&str> = id.split('-').collect();
            assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{id}");
            assert!(id.chars().all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)), "{id}");
            assert_eq!(&id[14..15], "4");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        }
    }

    #[test]
    fn formats_ips_as_display_does() {
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "127.0.0.1",
            "192.168.100.255",
            "255.255.255.255",
            "::1",
            "fe80::1:2",
            "2001:db8:85a3::8a2e:370:7334",
            "::ffff:10.0.0.1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            let mut buf = [0u8; 64];
            assert_eq!(format_ip(ip, &mut buf), ip.to_string().as_bytes());
        }
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        append_forwarded_for(&mut h, "::1".parse().expect("ip"));
        assert_eq!(h.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()), Some(&b"1.2.3.4, ::1"[..]));
    }

    #[test]
    fn nothing_to_strip_leaves_the_map_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("payment"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get(header::TE).is_none());
    }
}
