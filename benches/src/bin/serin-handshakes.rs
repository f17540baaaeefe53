//! Full mutual-TLS handshakes per second on one core, as serin's sidecars do them:
//! mesh certificates (ECDSA P-256, SPIFFE URI SAN), client certificate required,
//! no session resumption. Client and server run in memory on one thread, so the
//! figure is pure handshake CPU (both sides together), with no network.
//!
//! `cargo run --release -p serin-benches --bin serin-handshakes -- [seconds]`

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use serin_certs::{Ca, ClientAuth, MESH_ALPN, SpiffeId, client_config, server_config};

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose().context("seconds")?.unwrap_or(5);
    let ca = Ca::generate("cluster.local")?;
    let identity = |sa: &str| -> anyhow::Result<_> {
        let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/{sa}").parse()?;
        Ok(ca.issue(&id, Duration::from_secs(3600))?.to_identity()?)
    };
    let server = server_config(&identity("payment")?, ClientAuth::Required, MESH_ALPN)?;
    let client = client_config(&identity("frontend")?, MESH_ALPN)?;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut count = 0u64;
    while Instant::now() < deadline {
        let mut c = ClientConnection::new(client.clone(), name.clone())?;
        let mut s = ServerConnection::new(server.clone())?;
        let mut rounds = 0;
        while c.is_handshaking() || s.is_handshaking() {
            pump(&mut c, &mut s)?;
            rounds += 1;
            if rounds > 20 {
                bail!("handshake did not finish");
            }
        }
        count += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{count} full mutual-TLS handshakes in {elapsed:.1} s on one thread: {:.0} handshakes/s ({:.3} ms CPU each, client + server)",
        count as f64 / elapsed,
        1000.0 * elapsed / count as f64
    );
    Ok(())
}

/// Moves every pending TLS byte from client to server and back once.
fn pump(c: &mut ClientConnection, s: &mut ServerConnection) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut buf)?;
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        s.read_tls(&mut rd)?;
        s.process_new_packets()?;
    }
    buf.clear();
    while s.wants_write() {
        s.write_tls(&mut buf)?;
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd)?;
        c.process_new_packets()?;
    }
    Ok(())
}
