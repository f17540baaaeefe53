//! Request handlers of the admin, metrics and health servers.

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{AdminBody, config_dump, started_at};
use crate::state::Shared;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// The admin API's index, served on `/`.
const INDEX: &str = "serin admin\n\
    \n\
    GET  /config_dump        the running snapshot and the last rejected update (JSON)\n\
    GET  /clusters           per-endpoint health and counters (?format=json for JSON)\n\
    GET  /ready              200 LIVE; 503 INITIALIZING (no config from the control plane yet) or DRAINING\n\
    GET  /server_info        version, state, uptime (JSON)\n\
    GET  /stats/prometheus   Istio metrics, Prometheus text format\n\
    POST /quitquitquit       start draining\n";

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache, max-age=0"));
    response
}

fn json(value: &impl serde::Serialize) -> Response<AdminBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(StatusCode::OK, JSON, body)
        }
        Err(error) => {
            tracing::error!(%error, "admin: JSON encoding failed");
            respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "JSON encoding failed\n")
        }
    }
}

fn not_found() -> Response<AdminBody> {
    respond(StatusCode::NOT_FOUND, TEXT, "not found\n")
}

fn method_not_allowed(allow: &'static str) -> Response<AdminBody> {
    let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn is_read(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET || req.method() == Method::HEAD
}

/// The server's state, Envoy's names: `DRAINING` once the drain has started,
/// `INITIALIZING` while a sidecar subscribed to a control plane waits for its first
/// config (with the reason), else `LIVE`.
fn server_state(shared: &Shared) -> (&'static str, Option<String>) {
    if shared.drain.is_draining() {
        ("DRAINING", None)
    } else if let Some(reason) = crate::xds_client::waiting_for_first_config(shared) {
        ("INITIALIZING", Some(reason))
    } else {
        ("LIVE", None)
    }
}

/// `200 LIVE` when serving; `503 INITIALIZING: <why>` until a sidecar subscribed to a
/// control plane has applied its first config (so no traffic is sent to a proxy
/// with no routes, as pilot-agent does); `503 DRAINING` once the drain has started.
fn readiness(shared: &Shared) -> Response<AdminBody> {
    match server_state(shared) {
        ("LIVE", _) => respond(StatusCode::OK, TEXT, "LIVE\n"),
        (state, Some(reason)) => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{state}: {reason}\n")),
        (state, None) => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{state}\n")),
    }
}

fn prometheus(shared: &Shared) -> Response<AdminBody> {
    respond(StatusCode::OK, crate::metrics::CONTENT_TYPE, shared.metrics.encode())
}

fn server_info(shared: &Shared) -> serde_json::Value {
    let (since, started) = started_at();
    let uptime = format!("{}s", started.elapsed().as_secs());
    let snapshot = shared.snapshot.load();
    let local = &shared.local;
    serde_json::json!({
        "version": concat!("serin/", env!("CARGO_PKG_VERSION")),
        "state": server_state(shared).0,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "start_time": humantime::format_rfc3339_millis(since).to_string(),
        "requests_in_flight": shared.drain.in_flight(),
        "config_version": snapshot.version,
        "config_source": snapshot.source,
        "node": {
            "workload": local.workload,
            "namespace": local.namespace,
            "app": local.app,
            "version": local.version,
            "principal": local.principal,
        },
    })
}

fn wants_json(req: &Request<Incoming>) -> bool {
    req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "format=json"))
}

/// The admin server (`127.0.0.1:15000`).
pub(super) fn admin(shared: &Shared, req: &Request<Incoming>) -> Response<AdminBody> {
    let path = req.uri().path();
    if path == "/quitquitquit" {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        if !shared.drain.is_draining() {
            tracing::info!("drain requested on /quitquitquit");
        }
        shared.drain.trigger();
        return respond(StatusCode::OK, TEXT, "OK\n");
    }
    let known = matches!(path, "/" | "/config_dump" | "/clusters" | "/ready" | "/server_info" | "/stats/prometheus");
    if !known {
        return not_found();
    }
    if !is_read(req) {
        return method_not_allowed("GET, HEAD");
    }
    match path {
        "/config_dump" => json(&config_dump::config_dump(shared)),
        "/clusters" if wants_json(req) => json(&config_dump::clusters_json(shared)),
        "/clusters" => respond(StatusCode::OK, TEXT, config_dump::clusters_text(shared)),
        "/ready" => readiness(shared),
        "/server_info" => json(&server_info(shared)),
        "/stats/prometheus" => prometheus(shared),
        _ => respond(StatusCode::OK, TEXT, INDEX),
    }
}

/// The metrics server (`0.0.0.0:15090`).
pub(super) fn metrics(shared: &Shared, req: &Request<Incoming>) -> Response<AdminBody> {
    match req.uri().path() {
        "/stats/prometheus" if is_read(req) => prometheus(shared),
        "/stats/prometheus" => method_not_allowed("GET, HEAD"),
        _ => not_found(),
    }
}

/// The health server (`0.0.0.0:15021`).
pub(super) fn health(shared: &Shared, req: &Request<Incoming>) -> Response<AdminBody> {
    match req.uri().path() {
        "/healthz/ready" if is_read(req) => readiness(shared),
        "/healthz/ready" => method_not_allowed("GET, HEAD"),
        _ => not_found(),
    }
}
