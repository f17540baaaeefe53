//! Command line of `serin-load` (see `benches/README.md`), and the logging set-up
//! every bench binary shares.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::load::{LoadConfig, Protocol, Rate};

/// serin-load: an HTTP load generator (open or closed loop) with HdrHistogram
/// latencies and per-version shares.
#[derive(Debug, Clone, Parser)]
#[command(name = "serin-load", version, about)]
pub struct LoadArgs {
    /// URL to send to, e.g. http://127.0.0.1:15001/pay (http only: HTTP/1.1 or h2c).
    #[arg(long)]
    pub url: String,
    /// Host header / :authority to send (what the proxy routes by) [default: the URL's host:port].
    #[arg(long)]
    pub host: Option<String>,
    /// Requests per second in total (open loop), or `max` (closed loop).
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub rate: Rate,
    /// Concurrent request slots; in HTTP/1.1 one keep-alive connection each.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Stop after this long, e.g. 10s [default: 10s unless --requests is given].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// HTTP/2 connections the slots share [default: one per 32 slots].
    #[arg(long)]
    pub h2_connections: Option<usize>,
    /// Extra request header, `name: value`; repeatable.
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request method (requests carry no body).
    #[arg(long, default_value = "GET")]
    pub method: Method,
    /// Bound on one request (connect + send + whole answer).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why the command line does not make a load run.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// The URL does not parse.
    #[error("invalid --url {url:?}")]
    Url {
        /// What was given.
        url: String,
        /// The parse error.
        source: http::uri::InvalidUri,
    },
    /// The URL is not `http://host[:port]/…`.
    #[error("--url {0:?}: only http://HOST[:PORT]/PATH URLs are supported (HTTP/1.1 or h2c)")]
    Scheme(String),
    /// The host does not resolve.
    #[error("--url {url:?}: cannot resolve {host}")]
    Resolve {
        /// What was given.
        url: String,
        /// The host part.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The host resolves to nothing.
    #[error("--url {url:?}: {host} resolves to no address")]
    NoAddress {
        /// What was given.
        url: String,
        /// The host part.
        host: String,
    },
}

/// Parses `--rate`: a positive integer or `max`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<u32>() {
        Ok(0) => Err("the rate must be above 0 (or `max`)".to_owned()),
        Ok(r) => Ok(Rate::PerSecond(r)),
        Err(e) => Err(format!("expected requests per second or `max`: {e}")),
    }
}

/// Parses `--header 'name: value'`.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = s.split_once(':').ok_or_else(|| format!("expected `name: value`, got {s:?}"))?;
    let name = HeaderName::try_from(name.trim()).map_err(|e| format!("header name {name:?}: {e}"))?;
    let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("header value {value:?}: {e}"))?;
    Ok((name, value))
}

impl LoadArgs {
    /// The load run these arguments describe (resolves the URL's host).
    pub async fn to_config(&self) -> Result<LoadConfig, ArgsError> {
        let uri: Uri = self.url.parse().map_err(|source| ArgsError::Url { url: self.url.clone(), source })?;
        if uri.scheme_str() != Some("http") {
            return Err(ArgsError::Scheme(self.url.clone()));
        }
        let authority = uri.authority().ok_or_else(|| ArgsError::Scheme(self.url.clone()))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = authority.port_u16().unwrap_or(80);
        let resolved = tokio::net::lookup_host((host.as_str(), port)).await.map(|mut addrs| addrs.next());
        let target: SocketAddr = match resolved {
            Ok(Some(addr)) => addr,
            Ok(None) => return Err(ArgsError::NoAddress { url: self.url.clone(), host }),
            Err(source) => return Err(ArgsError::Resolve { url: self.url.clone(), host, source }),
        };
        let mut cfg = LoadConfig::new(target, self.host.clone().unwrap_or_else(|| authority.as_str().to_owned()));
        cfg.path = uri.path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
        cfg.method = self.method.clone();
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        cfg.headers = headers;
        cfg.protocol = if self.http2 { Protocol::Http2 } else { Protocol::Http1 };
        cfg.connections = self.connections;
        cfg.h2_connections = self.h2_connections;
        cfg.rate = self.rate;
        cfg.max_requests = self.requests;
        cfg.duration = match (self.duration, self.requests) {
            (None, None) => Some(Duration::from_secs(10)),
            (d, _) => d,
        };
        cfg.timeout = self.timeout;
        Ok(cfg)
    }
}

/// Logs to stderr (stdout carries the report) at `default_level`, or as
/// `RUST_LOG` says.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_command_line() {
        let args = LoadArgs::try_parse_from([
            "serin-load",
            "--url",
            "http://127.0.0.1:15001/pay?x=1",
            "--host",
            "payment",
            "--rate",
            "1000",
            "--connections",
            "8",
            "--duration",
            "2s",
            "--http2",
            "--header",
            "x-a: 1",
            "-H",
            "x-a:2",
            "--json",
        ])
        .unwrap();
        let cfg = args.to_config().await.unwrap();
        assert_eq!(cfg.target, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(cfg.authority, "payment");
        assert_eq!(cfg.path, "/pay?x=1");
        assert_eq!(cfg.rate, Rate::PerSecond(1000));
        assert_eq!(cfg.protocol, Protocol::Http2);
        assert_eq!(cfg.duration, Some(Duration::from_secs(2)));
        assert_eq!(cfg.headers.get_all("x-a").iter().count(), 2);
        assert!(args.json);
    }

    #[tokio::test]
    async fn defaults_and_errors() {
        let args = LoadArgs::try_parse_from(["serin-load", "--url", "http://localhost:9080"]).unwrap();
        let cfg = args.to_config().await.unwrap();
        assert_eq!(cfg.authority, "localhost:9080");
        assert_eq!(cfg.path, "/");
        assert_eq!(cfg.rate, Rate::Max);
        assert_eq!(cfg.duration, Some(Duration::from_secs(10)));
        let args = LoadArgs::try_parse_from(["serin-load", "--url", "http://127.0.0.1:1/", "--requests", "5"]).unwrap();
        assert_eq!(args.to_config().await.unwrap().duration, None);
        let args = LoadArgs::try_parse_from(["serin-load", "--url", "https://127.0.0.1/"]).unwrap();
        assert!(matches!(args.to_config().await, Err(ArgsError::Scheme(_))));
        assert!(LoadArgs::try_parse_from(["serin-load", "--url", "http://a/", "--rate", "0"]).is_err());
        assert!(LoadArgs::try_parse_from(["serin-load", "--url", "http://a/", "--header", "nocolon"]).is_err());
    }
}
