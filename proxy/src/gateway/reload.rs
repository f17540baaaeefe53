//! The running gateway's configuration: applying a compiled [`GatewayConfig`]
//! (loading certificates, binding new ports, swapping route tables and port
//! states), and the two watch loops: the configuration folder and the
//! certificate files, both polled every 500 ms.
//!
//! An update is applied whole or not at all: a compile error, a certificate that
//! does not load or a port that cannot be bound rejects it (logged, and shown in
//! `/config_dump` as `last_rejected`), and the last good configuration keeps
//! serving. Ports added by an update are bound, ports removed stop accepting (their
//! open connections are drained).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::listeners::{self, PortState, Routes, TlsServerKind, TlsServerState};
use super::tls::{self, Refresh, ServerTls};
use crate::config::gateway::{GatewayConfig, GatewayOptions, PortConfig, RouteTable, TlsAction, compile_gateway};
use crate::config::{self, ConfigError, ConfigErrors};
use crate::forward::listener::Timeouts;
use crate::reload::{ReloadOutcome, source_label};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// Configuration poll interval.
pub const POLL: Duration = Duration::from_millis(500);

/// Where each Gateway port listens.
#[derive(Debug, Clone)]
pub struct ListenPlan {
    /// Address for ports without an override.
    pub bind: IpAddr,
    /// Gateway port → address (`--listen 443=127.0.0.1:8443`).
    pub overrides: BTreeMap<u16, SocketAddr>,
}

impl ListenPlan {
    /// The address Gateway port `port` listens on.
    pub fn addr(&self, port: u16) -> SocketAddr {
        self.overrides.get(&port).copied().unwrap_or(SocketAddr::new(self.bind, port))
    }
}

/// A running `serin gateway`: its ports, route tables and configuration source.
#[derive(Debug)]
pub struct Gateway {
    pub shared: Arc<Shared>,
    path: PathBuf,
    options: GatewayOptions,
    listen: ListenPlan,
    timeouts: Timeouts,
    inner: tokio::sync::Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    version: Option<String>,
    ports: BTreeMap<u16, RunningPort>,
    /// Route tables by name, kept across reloads.
    tables: HashMap<String, Routes>,
}

#[derive(Debug)]
struct RunningPort {
    addr: SocketAddr,
    state: Arc<ArcSwap<PortState>>,
    task: JoinHandle<()>,
}

/// An update ready to commit: port states built, new ports bound.
struct Prepared {
    states: BTreeMap<u16, PortState>,
    /// Route tables to publish.
    tables: Vec<(Routes, Snapshot)>,
    names: HashMap<String, Routes>,
    listeners: BTreeMap<u16, TcpListener>,
}

impl Gateway {
    /// A gateway serving the configuration at `path` (nothing loaded yet).
    pub fn new(
        shared: Arc<Shared>,
        path: PathBuf,
        options: GatewayOptions,
        listen: ListenPlan,
        timeouts: Timeouts,
    ) -> Arc<Gateway> {
        Arc::new(Gateway { shared, path, options, listen, timeouts, inner: Default::default() })
    }

    /// Gateway port → bound address, now.
    pub async fn ports(&self) -> BTreeMap<u16, SocketAddr> {
        self.inner.lock().await.ports.iter().map(|(p, r)| (*p, r.addr)).collect()
    }

    /// Loads, compiles and applies the configuration now (unless unchanged); on
    /// failure records the rejection and returns the errors.
    pub async fn reload_now(&self) -> Result<ReloadOutcome, ConfigErrors> {
        let source = source_label(&self.path);
        let current = self.inner.lock().await.version.clone();
        let (path, options, shared, src) =
            (self.path.clone(), self.options.clone(), self.shared.clone(), source.clone());
        let compiled = tokio::task::spawn_blocking(move || {
            let set = config::load_path(&path)?;
            if current.as_deref() == Some(set.hash.as_str()) {
                return Ok(None);
            }
            for w in &set.warnings {
                tracing::warn!("{w}");
            }
            compile_gateway(&set, &shared.registry, &src, &options).map(Some)
        })
        .await
        .unwrap_or_else(|e| {
            Err(ConfigErrors(vec![ConfigError::new(&source, "", "", format!("reload task failed: {e}"))]))
        });
        let result = match compiled {
            Ok(None) => {
                return Ok(ReloadOutcome::Unchanged(self.inner.lock().await.version.clone().unwrap_or_default()));
            }
            Ok(Some(config)) => self.apply(config).await,
            Err(e) => Err(e),
        };
        result.inspect_err(|errors| self.shared.reject(&source, errors.to_string()))
    }

    /// Applies a compiled configuration whole, or rejects it.
    async fn apply(&self, config: GatewayConfig) -> Result<ReloadOutcome, ConfigErrors> {
        let GatewayConfig { version, overview, ports, warnings } = config;
        let mut inner = self.inner.lock().await;
        let prepared = self.prepare(&inner, ports).await?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        for (routes, snapshot) in prepared.tables {
            routes.store(Arc::new(snapshot));
        }
        // Tables no longer in the config answer 404 to connections that still use them.
        for (name, routes) in &inner.tables {
            if !prepared.names.contains_key(name) {
                routes.store(Arc::new(Snapshot::empty("removed")));
            }
        }
        inner.tables = prepared.names;
        let mut listeners = prepared.listeners;
        let removed: Vec<u16> = inner.ports.keys().filter(|p| !prepared.states.contains_key(p)).copied().collect();
        for port in removed {
            if let Some(running) = inner.ports.remove(&port) {
                tracing::info!(port, addr = %running.addr, "gateway port removed: no longer accepting");
                running.task.abort();
            }
        }
        for (port, state) in prepared.states {
            if let Some(running) = inner.ports.get(&port) {
                running.state.store(Arc::new(state));
                continue;
            }
            let Some(listener) = listeners.remove(&port) else { continue };
            let addr = listener.local_addr().unwrap_or_else(|_| self.listen.addr(port));
            let state = Arc::new(ArcSwap::from_pointee(state));
            let task =
                tokio::spawn(listeners::serve_port(listener, port, state.clone(), self.shared.clone(), self.timeouts));
            tracing::info!(port, %addr, "gateway port listening");
            inner.ports.insert(port, RunningPort { addr, state, task });
        }
        inner.version = Some(version.clone());
        self.shared.apply(overview);
        Ok(ReloadOutcome::Applied(version))
    }

    /// Loads certificates and binds new ports; any failure rejects the update.
    async fn prepare(&self, inner: &Inner, ports: BTreeMap<u16, PortConfig>) -> Result<Prepared, ConfigErrors> {
        let mut errors = Vec::new();
        let mut prepared =
            Prepared { states: BTreeMap::new(), tables: Vec::new(), names: HashMap::new(), listeners: BTreeMap::new() };
        let table = |t: RouteTable, prepared: &mut Prepared| -> Routes {
            let routes = inner
                .tables
                .get(&t.name)
                .cloned()
                .unwrap_or_else(|| Arc::new(ArcSwap::from_pointee(Snapshot::empty(&t.name))));
            prepared.names.insert(t.name, routes.clone());
            prepared.tables.push((routes.clone(), t.snapshot));
            routes
        };
        let wanted: Vec<u16> = ports.keys().copied().collect();
        for (port, pc) in ports {
            let state = match pc {
                PortConfig::Http(t) => PortState::Http(table(t, &mut prepared)),
                PortConfig::Tls(servers) => {
                    let mut list = Vec::new();
                    for s in servers {
                        let kind = match s.action {
                            TlsAction::Terminate { credentials, routes } => match ServerTls::load(&credentials) {
                                Ok(tls) => TlsServerKind::Terminate {
                                    tls: Arc::new(tls),
                                    routes: table(routes, &mut prepared),
                                },
                                Err(e) => {
                                    errors.push(e);
                                    continue;
                                }
                            },
                            TlsAction::Passthrough(routes) => TlsServerKind::Passthrough(routes),
                        };
                        list.push(TlsServerState { name: s.name, sni: s.sni, kind });
                    }
                    PortState::Tls(list)
                }
            };
            prepared.states.insert(port, state);
        }
        for port in wanted.into_iter().filter(|p| !inner.ports.contains_key(p)) {
            let addr = self.listen.addr(port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    prepared.listeners.insert(port, l);
                }
                Err(e) => {
                    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                        format!(
                            " (ports below 1024 need privileges: map it, e.g. --listen {port}=0.0.0.0:{})",
                            8000 + port
                        )
                    } else {
                        String::new()
                    };
                    errors.push(ConfigError::new(
                        &source_label(&self.path),
                        "",
                        "",
                        format!("cannot listen on {addr} for Gateway port {port}: {e}{hint}"),
                    ));
                }
            }
        }
        if errors.is_empty() { Ok(prepared) } else { Err(ConfigErrors(errors)) }
    }

    /// Re-reads every terminating server's certificate files once.
    pub async fn refresh_certificates(&self) {
        let servers: Vec<(String, Arc<ServerTls>)> = {
            let inner = self.inner.lock().await;
            inner
                .ports
                .iter()
                .flat_map(|(port, running)| {
                    let state = running.state.load_full();
                    state.server_tls().map(|t| (format!("port {port}"), t.clone())).collect::<Vec<_>>()
                })
                .collect()
        };
        if servers.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (port, tls) in servers {
                let c = tls.credentials();
                match tls.refresh() {
                    Refresh::Unchanged => {}
                    Refresh::Reloaded => tracing::info!(%port, cert = %c.cert.display(), "server certificate reloaded"),
                    Refresh::Failed(error) => {
                        let source = format!("certificate {} ({} {})", c.cert.display(), c.origin.resource, c.origin.field);
                        tracing::error!(%port, %error, "new certificate files do not load; the old certificate keeps serving");
                        shared.reject(&source, error);
                    }
                }
            }
        })
        .await;
    }

    /// Every running port task, taken out (for the final drain).
    pub async fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        let mut inner = self.inner.lock().await;
        std::mem::take(&mut inner.ports).into_values().map(|r| r.task).collect()
    }

    /// Polls the configuration and the certificate files until the drain starts.
    pub fn spawn_watch(self: &Arc<Self>) -> JoinHandle<()> {
        let gateway = self.clone();
        tokio::spawn(async move {
            // None: the first tick reloads (an unchanged config is a no-op), so an
            // edit made between the initial load and this task's start is not missed.
            let mut last = None;
            let mut tick = tokio::time::interval(POLL.min(tls::POLL));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = gateway.shared.drain.signaled() => return,
                }
                let now = Some(crate::reload::fingerprint(&gateway.path));
                if now != last {
                    last = now;
                    match gateway.reload_now().await {
                        Ok(ReloadOutcome::Applied(version)) => tracing::info!(%version, "gateway config reloaded"),
                        Ok(_) => tracing::debug!("gateway config unchanged"),
                        Err(_) => {} // Shared::reject logged it.
                    }
                }
                gateway.refresh_certificates().await;
            }
        })
    }
}
