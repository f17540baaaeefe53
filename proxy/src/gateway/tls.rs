//! Server certificates of terminating gateway servers (`SIMPLE`, `MUTUAL`), and
//! their rotation.
//!
//! Each server gets its own rustls `ServerConfig` (its certificate; for MUTUAL, a
//! client verifier over its `caCertificates`), built with `serin_certs`. The
//! server is picked by SNI before the handshake (see `super::listeners`), so two
//! hosts on one port present their own certificates, and MUTUAL and SIMPLE hosts
//! can share a port.
//!
//! Rotation: the files are re-read every [`POLL`] and compared by content; a change
//! that loads replaces the config (new handshakes use it; open connections keep
//! theirs). A change that does not load keeps the old certificate; because files
//! are replaced one after the other (certificate, then key), a failure is reported
//! (log and `/config_dump`) only when the same files still fail at the next poll.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use serin_certs::{CertError, MESH_ALPN, server_config_from_files};

use crate::config::ConfigError;
use crate::config::gateway::ServerCredentials;

/// How often certificate files are re-read.
pub const POLL: Duration = Duration::from_millis(500);

/// The TLS side of one terminating server.
pub struct ServerTls {
    credentials: ServerCredentials,
    config: ArcSwap<ServerConfig>,
    state: Mutex<WatchState>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("credentials", &self.credentials).finish_non_exhaustive()
    }
}

/// Content hashes: the files in use, and a failing set already seen once.
#[derive(Debug, Default)]
struct WatchState {
    applied: u64,
    failing: Option<u64>,
    reported: Option<u64>,
}

/// What a [`ServerTls::refresh`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// The files did not change (or a failure is being confirmed).
    Unchanged,
    /// New certificates are in use.
    Reloaded,
    /// The new files do not load; the old certificate keeps serving.
    Failed(String),
}

impl ServerTls {
    /// Loads the server's certificate (and CA): an error names the file and the
    /// Gateway field that names it.
    pub fn load(credentials: &ServerCredentials) -> Result<ServerTls, ConfigError> {
        let applied = fingerprint(credentials);
        let config = build(credentials).map_err(|e| credentials.origin.error(e.to_string()))?;
        Ok(ServerTls {
            credentials: credentials.clone(),
            config: ArcSwap::new(config),
            state: Mutex::new(WatchState { applied, ..WatchState::default() }),
        })
    }

    /// The config for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// The files this server uses.
    pub fn credentials(&self) -> &ServerCredentials {
        &self.credentials
    }

    /// Re-reads the files and swaps the config when they changed and load.
    pub fn refresh(&self) -> Refresh {
        let now = fingerprint(&self.credentials);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now == state.applied {
            state.failing = None;
            return Refresh::Unchanged;
        }
        match build(&self.credentials) {
            Ok(config) => {
                self.config.store(config);
                *state = WatchState { applied: now, ..WatchState::default() };
                Refresh::Reloaded
            }
            Err(e) if state.failing == Some(now) && state.reported != Some(now) => {
                state.reported = Some(now);
                Refresh::Failed(e.to_string())
            }
            Err(_) => {
                state.failing = Some(now);
                Refresh::Unchanged
            }
        }
    }
}

/// A rustls server config from the files: TLS 1.3 and 1.2, ALPN `h2` then
/// `http/1.1`, client certificates required for MUTUAL.
fn build(c: &ServerCredentials) -> Result<Arc<ServerConfig>, CertError> {
    server_config_from_files(&c.cert, &c.key, c.client_ca.as_deref(), MESH_ALPN)
}

/// A hash of the files' contents (a read error counts as content).
fn fingerprint(c: &ServerCredentials) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in std::iter::once(&c.cert).chain(std::iter::once(&c.key)).chain(c.client_ca.iter()) {
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().to_string().hash(&mut hasher),
        }
    }
    hasher.finish()
}
