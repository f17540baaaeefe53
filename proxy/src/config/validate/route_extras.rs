//! Per-route policies of an `http[]` entry: retries, fault, redirect, direct
//! response, rewrite and timeout.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use super::fields;
use crate::config::duration::parse_duration;
use crate::config::error::Sink;
use crate::config::model;
use crate::snapshot::{Fault, FaultAbort, Redirect, RetryOn, RetryPolicy, Rewrite};

/// The `retryOn` conditions serin implements.
pub const RETRY_ON_SUPPORTED: &str = "5xx, gateway-error, connect-failure, reset, retriable-4xx, refused-stream, unavailable, cancelled, \
     retriable-status-codes, or HTTP status codes";

/// `retries` → [`RetryPolicy`]; absent = Istio's default policy.
pub fn retry_policy(retries: Option<&model::HttpRetry>, path: &str, sink: &mut Sink<'_>) -> RetryPolicy {
    let Some(r) = retries else { return RetryPolicy::default() };
    // Istio: `attempts` absent or 0 with a `retries` block disables retries.
    let attempts = match r.attempts {
        None => 0,
        Some(n) => sink.check(&format!("{path}.attempts"), fields::count(n)).unwrap_or(0),
    };
    let mut policy = RetryPolicy { attempts, ..RetryPolicy::default() };
    if let Some(t) = &r.per_try_timeout {
        policy.per_try_timeout =
            sink.check(&format!("{path}.perTryTimeout"), fields::duration_at_least(t, Duration::from_millis(1)));
    }
    if let Some(b) = &r.backoff
        && let Some(d) = sink.check(&format!("{path}.backoff"), fields::duration_at_least(b, Duration::from_millis(1)))
    {
        policy.backoff_base = d;
    }
    if let Some(list) = &r.retry_on {
        match retry_on(list) {
            Ok((on, codes)) => {
                policy.retry_on = on;
                policy.retriable_status_codes = codes;
            }
            Err(message) => sink.push(&format!("{path}.retryOn"), message),
        }
    }
    sink.unsupported(
        r.retry_ignore_previous_hosts == Some(false),
        &format!("{path}.retryIgnorePreviousHosts"),
        "serin always retries on another endpoint when it can; only `true` is accepted",
    );
    policy
}

/// Parses a `retryOn` list: Envoy condition names and HTTP status codes.
pub fn retry_on(list: &str) -> Result<(RetryOn, Vec<u16>), String> {
    let mut on = RetryOn::default();
    let mut codes = Vec::new();
    let mut bad = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "5xx" => on.server_error_5xx = true,
            "gateway-error" => on.gateway_error = true,
            "connect-failure" => on.connect_failure = true,
            "reset" => on.reset = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "refused-stream" => on.refused_stream = true,
            "unavailable" => on.grpc_unavailable = true,
            "cancelled" => on.grpc_cancelled = true,
            "retriable-status-codes" => {}
            code if code.chars().all(|c| c.is_ascii_digit()) => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => {
                    if !codes.contains(&c) {
                        codes.push(c);
                    }
                }
                _ => bad.push(format!("{code:?} (status codes are 100 to 599)")),
            },
            other => bad.push(format!("{other:?}")),
        }
    }
    if bad.is_empty() {
        Ok((on, codes))
    } else {
        Err(format!("unsupported retryOn value {} (serin supports {RETRY_ON_SUPPORTED})", bad.join(", ")))
    }
}

/// `fault` → [`Fault`].
pub fn fault(f: &model::HttpFaultInjection, path: &str, sink: &mut Sink<'_>) -> Fault {
    let mut out = Fault::default();
    if f.delay.is_none() && f.abort.is_none() {
        sink.push(path, "fault needs delay or abort");
    }
    if let Some(d) = &f.delay {
        let dpath = format!("{path}.delay");
        sink.unsupported(d.exponential_delay.is_some(), &format!("{dpath}.exponentialDelay"), "use fixedDelay");
        let pct = fields::either_percentage(d.percentage.as_ref(), d.percent, &dpath, sink);
        match &d.fixed_delay {
            Some(t) => {
                let delay =
                    sink.check(&format!("{dpath}.fixedDelay"), fields::duration_at_least(t, Duration::from_millis(1)));
                out.delay = delay.map(|d| (d, pct));
            }
            None if d.exponential_delay.is_none() => {
                sink.push(&format!("{dpath}.fixedDelay"), "fixedDelay is required")
            }
            None => {}
        }
    }
    if let Some(a) = &f.abort {
        let apath = format!("{path}.abort");
        sink.unsupported(a.http2_error.is_some(), &format!("{apath}.http2Error"), "use httpStatus or grpcStatus");
        let pct = fields::either_percentage(a.percentage.as_ref(), a.percent, &apath, sink);
        let abort =
            match (a.http_status, &a.grpc_status) {
                (Some(_), Some(_)) => {
                    sink.push(&apath, "only one of httpStatus and grpcStatus may be set");
                    None
                }
                (Some(code), None) => sink
                    .check(&format!("{apath}.httpStatus"), status(code, 200..=599))
                    .map(|status| FaultAbort { status, grpc_status: None, percentage: pct }),
                (None, Some(name)) => sink
                    .check(&format!("{apath}.grpcStatus"), grpc_code(name))
                    .map(|code| FaultAbort { status: StatusCode::OK, grpc_status: Some(code), percentage: pct }),
                (None, None) => {
                    if a.http2_error.is_none() {
                        sink.push(&apath, "httpStatus or grpcStatus is required");
                    }
                    None
                }
            };
        out.abort = abort;
    }
    out
}

/// An HTTP status in `range`.
pub fn status(code: i64, range: std::ops::RangeInclusive<u16>) -> Result<StatusCode, String> {
    u16::try_from(code)
        .ok()
        .filter(|c| range.contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("status {code} is out of range ({} to {})", range.start(), range.end()))
}

/// A gRPC status by name (`UNAVAILABLE`) or number (`14`).
pub fn grpc_code(name: &str) -> Result<u32, String> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    if let Ok(n) = name.parse::<u32>()
        && (n as usize) < CODES.len()
    {
        return Ok(n);
    }
    CODES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| format!("unknown gRPC status {name:?}"))
}

/// `redirect` → [`Redirect`].
pub fn redirect(r: &model::HttpRedirect, path: &str, sink: &mut Sink<'_>) -> Redirect {
    sink.unsupported(r.derive_port.is_some(), &format!("{path}.derivePort"), "set port explicitly");
    sink.unsupported(r.prefix_rewrite.is_some(), &format!("{path}.prefixRewrite"), "");
    let code = r.redirect_code.unwrap_or(301);
    let status = match code {
        301 | 302 | 303 | 307 | 308 => sink.check(&format!("{path}.redirectCode"), status(code, 300..=399)),
        _ => {
            sink.push(
                &format!("{path}.redirectCode"),
                format!("redirect code {code} must be 301, 302, 303, 307 or 308"),
            );
            None
        }
    };
    let port = r.port.and_then(|p| sink.check(&format!("{path}.port"), fields::port(p)));
    if let Some(scheme) = &r.scheme
        && scheme != "http"
        && scheme != "https"
    {
        sink.push(&format!("{path}.scheme"), format!("scheme {scheme:?} must be http or https"));
    }
    Redirect {
        uri: r.uri.clone(),
        authority: r.authority.clone(),
        scheme: r.scheme.clone(),
        port,
        status: status.unwrap_or(StatusCode::MOVED_PERMANENTLY),
    }
}

/// `directResponse` → status and body.
pub fn direct_response(d: &model::HttpDirectResponse, path: &str, sink: &mut Sink<'_>) -> (StatusCode, Bytes) {
    let status = sink.check(&format!("{path}.status"), status(d.status, 200..=599)).unwrap_or(StatusCode::OK);
    let body = match &d.body {
        None => Bytes::new(),
        Some(b) => match (&b.string, &b.bytes) {
            (Some(_), Some(_)) => {
                sink.push(&format!("{path}.body"), "only one of string and bytes may be set");
                Bytes::new()
            }
            (Some(s), None) => Bytes::from(s.clone()),
            (None, Some(b64)) => sink
                .check(&format!("{path}.body.bytes"), fields::base64_decode(b64))
                .map(Bytes::from)
                .unwrap_or_default(),
            (None, None) => Bytes::new(),
        },
    };
    (status, body)
}

/// `rewrite` → [`Rewrite`].
pub fn rewrite(r: &model::HttpRewrite, path: &str, sink: &mut Sink<'_>) -> Rewrite {
    sink.unsupported(r.uri_regex_rewrite.is_some(), &format!("{path}.uriRegexRewrite"), "use rewrite.uri");
    Rewrite { uri: r.uri.clone(), authority: r.authority.clone() }
}

/// `timeout`: `0s` means none, like Istio.
pub fn timeout(t: Option<&String>, path: &str, sink: &mut Sink<'_>) -> Option<Duration> {
    let d = sink.check(path, parse_duration(t?))?;
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_names_and_codes() {
        let (on, codes) = retry_on("5xx, gateway-error,connect-failure,503,retriable-status-codes").expect("valid");
        assert!(on.server_error_5xx && on.gateway_error && on.connect_failure && !on.reset);
        assert_eq!(codes, vec![503]);
        let (on, _) = retry_on("reset,retriable-4xx,refused-stream,unavailable,cancelled").expect("valid");
        assert!(on.reset && on.retriable_4xx && on.refused_stream && on.grpc_unavailable && on.grpc_cancelled);
        let err = retry_on("5xx,envoy-ratelimited,700").expect_err("invalid");
        assert!(err.contains("\"envoy-ratelimited\"") && err.contains("\"700\""), "{err}");
    }

    #[test]
    fn grpc_codes() {
        assert_eq!(grpc_code("UNAVAILABLE"), Ok(14));
        assert_eq!(grpc_code("14"), Ok(14));
        assert!(grpc_code("NOPE").is_err());
    }
}
