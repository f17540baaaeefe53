//! The control plane's live dashboard (`--ui`, default `127.0.0.1:15016`): one page,
//! built from assets embedded in the binary (no CDN, nothing fetched at run time),
//! showing per service each version's request rate, share, success rate and p50/p99
//! as numbers and as five-minute charts, the connected sidecars' sync state (as
//! `serin ctl status`), the canary analyses, and set-weight and rollback forms.
//!
//! The page polls `GET /api/overview` once a second (see `docs/dashboard.md`). The
//! overview is put together off the runtime threads (`spawn_blocking`) at most once per
//! [`OVERVIEW_TTL`] and window, however many pages poll: they share the answer. The two
//! write actions, `POST /api/services/{service}/weights` and
//! `POST /api/services/{service}/rollback`, need the admin token of
//! `--admin-token-file` as `Authorization: Bearer …`: without a configured token they
//! answer 403 naming the flag, with a missing or wrong token 401.
//!
//! Every answer carries a `Content-Security-Policy` allowing this origin only; the
//! API's answers are `Cache-Control: no-store`. HTTP/1.1 on hyper 1.

mod api;
mod auth;
mod backend;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use api::{
    ActionView, CanaryView, EventView, FIGURES_WINDOW, IntervalView, MAX_EVENTS, MAX_FIGURES_WINDOW, Overview,
    RollbackBody, SERIES_WINDOW, SeriesView, ServiceView, SetWeightsBody, SidecarView, TypeView, VersionView, overview,
    window_of,
};
pub use auth::{AdminToken, Refusal};
pub use backend::{ActionError, BoxFuture, DashboardBackend, ServiceConfig, fqdn, services_of};

/// The default `--ui` address: loopback only.
pub const DEFAULT_UI_ADDR: &str = "127.0.0.1:15016";
/// Largest request body accepted by the write actions.
pub const MAX_BODY: usize = 16 * 1024;
/// Time allowed for a client to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one computed overview answers every page asking for the same window.
pub const OVERVIEW_TTL: Duration = Duration::from_secs(1);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Sent with every answer: scripts, styles and fetches from this origin only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Where the dashboard listens: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UiAddr(pub Option<SocketAddr>);

impl FromStr for UiAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<UiAddr, String> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(UiAddr(None));
        }
        s.trim()
            .parse()
            .map(|a| UiAddr(Some(a)))
            .map_err(|e| format!("{s:?} is neither an address (127.0.0.1:15016) nor `off`: {e}"))
    }
}

impl std::fmt::Display for UiAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("off"),
        }
    }
}

/// The dashboard's options of `serin control-plane`.
#[derive(Debug, Clone, clap::Args)]
pub struct DashboardArgs {
    /// The dashboard (a web page: per-version figures, sidecars, canaries); `off` turns
    /// it off. Loopback only by default.
    #[arg(long = "ui", value_name = "ADDR|off", default_value = DEFAULT_UI_ADDR)]
    pub ui: UiAddr,
    /// A file holding the admin token (one word, at least 16 characters) that the
    /// dashboard's set-weight and rollback buttons need; without it they are off.
    #[arg(long = "admin-token-file", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl DashboardArgs {
    /// No dashboard (`--ui off`), no admin token: for embedders and tests.
    pub fn off() -> DashboardArgs {
        DashboardArgs { ui: UiAddr(None), admin_token_file: None }
    }
}

impl Default for DashboardArgs {
    /// The command line's defaults: on `127.0.0.1:15016`, no admin token.
    fn default() -> DashboardArgs {
        DashboardArgs { ui: UiAddr(Some(SocketAddr::from(([127, 0, 0, 1], 15016)))), admin_token_file: None }
    }
}

/// The dashboard's state: what it reads and changes, and the admin token.
pub struct Dashboard {
    backend: Arc<dyn DashboardBackend>,
    token: Option<AdminToken>,
    loopback_hosts_only: bool,
    overviews: OverviewCache,
}

/// One overview's JSON, computed once by the first page that asks and shared by the
/// pages asking while it is being computed and for [`OVERVIEW_TTL`] after.
type SharedOverview = Arc<tokio::sync::OnceCell<Bytes>>;

/// The overviews computed lately, by window (seconds).
#[derive(Default)]
struct OverviewCache(Mutex<HashMap<u64, (Instant, SharedOverview)>>);

impl OverviewCache {
    /// The entry of `window`: the current one if it is fresh, else a new (empty) one.
    fn entry(&self, window: u64) -> SharedOverview {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some((at, shared)) = map.get(&window)
            && now.duration_since(*at) < OVERVIEW_TTL
        {
            return Arc::clone(shared);
        }
        map.retain(|_, (at, _)| now.duration_since(*at) < OVERVIEW_TTL);
        let shared = SharedOverview::default();
        map.insert(window, (now, Arc::clone(&shared)));
        shared
    }

    /// Forgets every overview (after a change the next page must see).
    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").field("writes_enabled", &self.token.is_some()).finish_non_exhaustive()
    }
}

impl Dashboard {
    /// A dashboard over `backend`; set-weight and rollback act only with a `token`.
    pub fn new(backend: Arc<dyn DashboardBackend>, token: Option<AdminToken>) -> Dashboard {
        Dashboard { backend, token, loopback_hosts_only: false, overviews: OverviewCache::default() }
    }

    /// The same dashboard answering only requests whose `Host` is a loopback address or
    /// `localhost` (421 otherwise): for a dashboard bound to loopback, so that a web
    /// page whose name was re-pointed at 127.0.0.1 (DNS rebinding) cannot read it.
    pub fn loopback_hosts_only(mut self, on: bool) -> Dashboard {
        self.loopback_hosts_only = on;
        self
    }

    /// Answers one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_string();
        let read = req.method() == Method::GET || req.method() == Method::HEAD;
        if self.loopback_hosts_only && !loopback_host(req.headers().get(http::header::HOST)) {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                "the dashboard listens on loopback and answers only to a loopback Host (127.0.0.1, [::1], localhost)",
            );
        }
        match path.as_str() {
            "/" | "/index.html" | "/app.js" | "/style.css" if read => asset(&path),
            "/" | "/index.html" | "/app.js" | "/style.css" => method_not_allowed("GET, HEAD", false),
            "/api/overview" if read => match api::window_of(req.uri().query()) {
                Ok(window) => self.overview(window).await,
                Err(e) => error(e.status, e.message),
            },
            "/api/overview" => method_not_allowed("GET, HEAD", true),
            _ => match action_path(&path) {
                Some((service, action)) if req.method() == Method::POST => self.act(req, service, action).await,
                Some(_) => method_not_allowed("POST", true),
                None if path.starts_with("/api/") => error(StatusCode::NOT_FOUND, format!("no API at {path}")),
                None => not_found(),
            },
        }
    }

    /// `GET /api/overview`: the shared overview of `window`, computed off the runtime
    /// threads when none is fresh.
    async fn overview(&self, window: Duration) -> Response<Full<Bytes>> {
        let shared = self.overviews.entry(window.as_secs());
        let backend = Arc::clone(&self.backend);
        let writes_enabled = self.token.is_some();
        let computed = shared
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    serde_json::to_vec(&api::overview(backend.as_ref(), writes_enabled, window)).map(Bytes::from)
                })
                .await
                .map_err(|e| format!("the overview was not computed: {e}"))?
                .map_err(|e| format!("JSON encoding failed: {e}"))
            })
            .await;
        match computed {
            Ok(body) => respond(StatusCode::OK, "application/json", body.clone(), true),
            Err(e) => {
                tracing::error!(error = %e, "dashboard: overview");
                error(StatusCode::INTERNAL_SERVER_ERROR, e)
            }
        }
    }

    async fn act<B>(&self, req: Request<B>, service: String, action: Action) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Err(refusal) = auth::check(self.token.as_ref(), req.headers()) {
            tracing::warn!(service, action = action.name(), status = refusal.status().as_u16(), "dashboard: refused");
            let mut response = error(refusal.status(), refusal.message());
            if refusal.status() == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return response;
        }
        if !api::valid_service_name(&service) {
            return error(StatusCode::BAD_REQUEST, format!("{service:?} is not a service name"));
        }
        let body = match read_body(req).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let result = match action {
            Action::Weights => match api::parse_body::<SetWeightsBody>(&body, false) {
                Ok(parsed) => self.backend.set_weights(service.clone(), parsed.weights).await,
                Err(e) => Err(e),
            },
            Action::Rollback => match api::parse_body::<RollbackBody>(&body, true) {
                Ok(_) => self.backend.rollback(service.clone()).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(result) => {
                // The next overview shows the change.
                self.overviews.clear();
                let view = api::action_view(&service, action.name(), result);
                tracing::info!(service, action = action.name(), message = %view.message, "dashboard: done");
                json(StatusCode::OK, &view)
            }
            Err(e) => {
                tracing::info!(service, action = action.name(), status = e.status.as_u16(), error = %e.message, "dashboard: refused");
                error(e.status, e.message)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Weights,
    Rollback,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Weights => "set-weight",
            Action::Rollback => "rollback",
        }
    }
}

/// True for a `Host` header naming a loopback address or `localhost` (any port).
fn loopback_host(host: Option<&HeaderValue>) -> bool {
    let Some(host) = host.and_then(|h| h.to_str().ok()) else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `/api/services/{service}/weights` or `/rollback`.
fn action_path(path: &str) -> Option<(String, Action)> {
    let rest = path.strip_prefix("/api/services/")?;
    let (service, action) = rest.rsplit_once('/')?;
    if service.is_empty() || service.contains('/') {
        return None;
    }
    let action = match action {
        "weights" => Action::Weights,
        "rollback" => Action::Rollback,
        _ => return None,
    };
    Some((service.to_string(), action))
}

/// Reads a body of at most [`MAX_BODY`] bytes; 413 beyond.
async fn read_body<B>(req: Request<B>) -> Result<Bytes, Response<Full<Bytes>>>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {MAX_BODY} bytes"));
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, format!("reading the body failed: {e}"))),
    }
}

fn with_headers(mut response: Response<Full<Bytes>>, content_type: &'static str, api: bool) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    let cache = if api { "no-store" } else { "no-cache" };
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>, api: bool) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    with_headers(response, content_type, api)
}

fn asset(path: &str) -> Response<Full<Bytes>> {
    match path {
        "/app.js" => respond(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS, false),
        "/style.css" => respond(StatusCode::OK, "text/css; charset=utf-8", STYLE_CSS, false),
        _ => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML, false),
    }
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", body, true),
        Err(e) => {
            tracing::error!(error = %e, "dashboard: JSON encoding failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "JSON encoding failed")
        }
    }
}

/// `{"error": "…"}` with `status`.
fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message.into(), "status": status.as_u16() });
    respond(status, "application/json", body.to_string(), true)
}

fn not_found() -> Response<Full<Bytes>> {
    respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n", false)
}

fn method_not_allowed(allow: &'static str, api: bool) -> Response<Full<Bytes>> {
    let mut response = if api {
        error(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; use {allow}"))
    } else {
        respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "method not allowed\n", false)
    };
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// Reads `--admin-token-file` when given.
pub fn load_token(args: &DashboardArgs) -> anyhow::Result<Option<AdminToken>> {
    args.admin_token_file.as_deref().map(AdminToken::load).transpose()
}

/// Serves the dashboard on `listener` until `stop` flips (or its sender is gone);
/// connections then finish the request in flight and close.
pub async fn serve(listener: TcpListener, dashboard: Arc<Dashboard>, mut stop: watch::Receiver<bool>) {
    let (close_tx, close_rx) = watch::channel(false);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        tokio::spawn(serve_connection(stream, dashboard.clone(), close_rx.clone()));
    }
    drop(listener);
    close_tx.send_replace(true);
}

async fn serve_connection(stream: TcpStream, dashboard: Arc<Dashboard>, mut close: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req: Request<Incoming>| {
        let dashboard = dashboard.clone();
        async move { Ok::<_, Infallible>(dashboard.handle(req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let closed = async move {
        let _ = close.wait_for(|c| *c).await;
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closed => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "dashboard connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ui_addresses_parse_and_off_turns_it_off() {
        assert_eq!("off".parse::<UiAddr>(), Ok(UiAddr(None)));
        assert_eq!("127.0.0.1:0".parse::<UiAddr>().map(|u| u.to_string()), Ok("127.0.0.1:0".to_string()));
        assert!("localhost".parse::<UiAddr>().unwrap_err().contains("neither an address"));
    }

    #[test]
    fn only_loopback_hosts_pass_the_host_check() {
        let ok = |h: &str| loopback_host(Some(&HeaderValue::from_str(h).expect("header")));
        assert!(ok("127.0.0.1:15016") && ok("localhost:15016") && ok("LOCALHOST") && ok("[::1]:15016"));
        assert!(ok("127.0.0.2"));
        assert!(!ok("evil.example:15016") && !ok("10.0.0.1:15016") && !ok("[2001:db8::1]:80"));
        assert!(!loopback_host(None));
    }

    /// A backend that counts the overviews put together.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl DashboardBackend for Counting {
        fn status(&self) -> serin_control_api::pb::Status {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Default::default()
        }
        fn load(&self, _: Duration, _: bool) -> serin_control_api::pb::LoadFigures {
            Default::default()
        }
        fn canaries(&self) -> serin_control_api::pb::CanaryList {
            Default::default()
        }
        fn services(&self) -> Vec<ServiceConfig> {
            Vec::new()
        }
        fn set_weights(
            &self,
            _: String,
            _: std::collections::BTreeMap<String, u32>,
        ) -> BoxFuture<'_, Result<serin_control_api::pb::ChangeResult, ActionError>> {
            Box::pin(async { Ok(Default::default()) })
        }
        fn rollback(&self, _: String) -> BoxFuture<'_, Result<serin_control_api::pb::ChangeResult, ActionError>> {
            Box::pin(async { Ok(Default::default()) })
        }
    }

    #[tokio::test]
    async fn pages_polling_together_share_one_overview_and_a_change_refreshes_it() {
        let backend = Arc::new(Counting::default());
        let dashboard = Dashboard::new(backend.clone(), Some(AdminToken::new("0123456789abcdef").expect("token")));
        let get = |uri: &str| Request::get(uri).body(Full::new(Bytes::new())).expect("request");
        let computed = || backend.0.load(std::sync::atomic::Ordering::SeqCst);
        let answers = futures_util::future::join_all((0..8).map(|_| dashboard.handle(get("/api/overview")))).await;
        assert!(answers.iter().all(|a| a.status() == StatusCode::OK));
        assert_eq!(computed(), 1, "eight pages, one computation");
        dashboard.handle(get("/api/overview")).await;
        assert_eq!(computed(), 1, "still fresh");
        dashboard.handle(get("/api/overview?window=300")).await;
        assert_eq!(computed(), 2, "another window is another overview");
        let rollback = Request::post("/api/services/payment/rollback")
            .header(http::header::AUTHORIZATION, "Bearer 0123456789abcdef")
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(dashboard.handle(rollback).await.status(), StatusCode::OK);
        dashboard.handle(get("/api/overview")).await;
        assert_eq!(computed(), 3, "a change is seen at once");
        tokio::time::sleep(OVERVIEW_TTL + Duration::from_millis(50)).await;
        dashboard.handle(get("/api/overview?window=300")).await;
        assert_eq!(computed(), 4, "a stale overview is computed again");
    }

    #[test]
    fn action_paths_name_the_service_and_the_action() {
        assert!(matches!(action_path("/api/services/payment/weights"), Some((s, Action::Weights)) if s == "payment"));
        assert!(matches!(action_path("/api/services/payment/rollback"), Some((_, Action::Rollback))));
        assert!(action_path("/api/services/payment/promote").is_none());
        assert!(action_path("/api/services//rollback").is_none());
        assert!(action_path("/api/services/a/b/rollback").is_none());
    }
}
