//! Responses the proxy makes itself: errors with their Envoy flag (404 NR,
//! 503 UH/UF/UO/UC, 504 UT, …), fault aborts, direct responses and redirects.
//! A gRPC caller gets a gRPC error (HTTP 200 with `grpc-status`), as from Envoy.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, Uri, header};

use crate::body::{self, ProxyBody};
use crate::flags::ResponseFlags;
use crate::snapshot::{FaultAbort, Redirect};

use super::record::{ObservedBody, Recorder};

/// Answers with `status` and `text`, recording `flag`.
pub fn local_reply(
    mut rec: Recorder,
    status: StatusCode,
    flag: ResponseFlags,
    text: impl Into<Bytes>,
) -> Response<ProxyBody> {
    rec.info.flags.insert(flag);
    if rec.info.is_grpc && !status.is_success() {
        let code = grpc_code_for(status);
        return grpc_reply(rec, code, &String::from_utf8_lossy(&text.into()));
    }
    rec.info.status = status.as_u16();
    let text = text.into();
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = status;
    if !text.is_empty() {
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    resp.map(|_| body::boxed(ObservedBody::new(body::full(text), rec)))
}

/// A trailers-only gRPC error: HTTP 200 with `grpc-status` and `grpc-message`.
fn grpc_reply(mut rec: Recorder, code: u32, message: &str) -> Response<ProxyBody> {
    rec.info.status = 200;
    rec.info.grpc_status = Some(code);
    let mut resp = Response::new(body::empty());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    resp.map(|_| body::boxed(ObservedBody::new(body::empty(), rec)))
}

/// Envoy's HTTP → gRPC status mapping for local replies.
fn grpc_code_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// The reply of an injected abort (flag FI).
pub fn fault_abort(mut rec: Recorder, abort: &FaultAbort) -> Response<ProxyBody> {
    rec.info.flags.insert(ResponseFlags::FAULT_INJECTED);
    if let Some(code) = abort.grpc_status
        && rec.info.is_grpc
    {
        return grpc_reply(rec, code, "fault filter abort");
    }
    local_reply(rec, abort.status, ResponseFlags::NONE, "fault filter abort")
}

/// The reply of a `redirect` route.
pub fn redirect(rec: Recorder, r: &Redirect, uri: &Uri, authority: &str) -> Response<ProxyBody> {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let (host, _) = super::split_host_port(authority, 0);
    let host = r.authority.clone().unwrap_or_else(|| host.into_owned());
    let port = r.port.map(|p| format!(":{p}")).unwrap_or_default();
    let path = r.uri.clone().unwrap_or_else(|| uri.path_and_query().map_or("/", |p| p.as_str()).to_string());
    let location = format!("{scheme}://{host}{port}{path}");
    let mut resp = local_reply(rec, r.status, ResponseFlags::NONE, Bytes::new());
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}
