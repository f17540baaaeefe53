//! Retry decisions (`retries.retryOn`, Envoy's conditions) and the backoff between
//! tries (exponential from a 25 ms base, capped at 10× the base, full jitter).

use std::time::Duration;

use crate::snapshot::RetryPolicy;

/// Whether a response with `status` (and gRPC status, if any) may be retried.
pub fn retriable_response(policy: &RetryPolicy, status: u16, grpc: Option<u32>) -> bool {
    let on = &policy.retry_on;
    (on.server_error_5xx && status >= 500)
        || (on.gateway_error && matches!(status, 502..=504))
        || (on.retriable_4xx && status == 409)
        || policy.retriable_status_codes.contains(&status)
        || (on.grpc_unavailable && grpc == Some(14))
        || (on.grpc_cancelled && grpc == Some(1))
}

/// Whether a per-try timeout may be retried: Envoy resets the try's stream and
/// retries it on `5xx`, `gateway-error` and `reset`.
pub fn retriable_timeout(policy: &RetryPolicy) -> bool {
    policy.retry_on.server_error_5xx || policy.retry_on.gateway_error || policy.retry_on.reset
}

/// Whether a connection failure may be retried (`connect-failure`, or `5xx` and
/// `gateway-error`, which include it in Envoy).
pub fn retriable_connect_failure(policy: &RetryPolicy) -> bool {
    let on = &policy.retry_on;
    on.connect_failure || on.server_error_5xx || on.gateway_error || on.reset
}

/// Whether a reset stream may be retried; `refused` = the upstream refused it
/// before processing (REFUSED_STREAM).
pub fn retriable_reset(policy: &RetryPolicy, refused: bool) -> bool {
    let on = &policy.retry_on;
    on.reset || on.server_error_5xx || on.gateway_error || (refused && on.refused_stream)
}

/// The pause before retry number `retry` (1-based).
pub fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let base = policy.backoff_base.as_millis().max(1) as u64;
    let ceiling = (base << retry.min(10)).min(base * 10);
    Duration::from_millis(rand::random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::RetryOn;

    #[test]
    fn conditions() {
        let mut p =
            RetryPolicy { retry_on: RetryOn { gateway_error: true, ..Default::default() }, ..Default::default() };
        assert!(retriable_response(&p, 503, None));
        assert!(!retriable_response(&p, 500, None));
        p.retry_on.server_error_5xx = true;
        assert!(retriable_response(&p, 500, None));
        p.retriable_status_codes = vec![429];
        assert!(retriable_response(&p, 429, None));
        assert!(!retriable_response(&p, 404, None));
        let default = RetryPolicy::default();
        assert!(!retriable_response(&default, 503, None));
        assert!(retriable_response(&default, 200, Some(14)));
        assert!(retriable_connect_failure(&default));
        assert!(!retriable_reset(&default, false));
        assert!(retriable_reset(&default, true));
        assert!(backoff(&default, 3) <= Duration::from_millis(250));
        assert!(!retriable_timeout(&default));
        let reset = RetryPolicy { retry_on: RetryOn { reset: true, ..Default::default() }, ..Default::default() };
        assert!(retriable_timeout(&reset), "a per-try timeout is a local reset");
    }
}
