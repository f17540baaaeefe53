//! One JSON access-log line per request on stdout, with Envoy's default fields.
//! Placeholder API; filled in by the access-log work.

use crate::request_info::RequestInfo;

/// The access log; disabled, it writes nothing.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    enabled: bool,
}

impl AccessLog {
    /// A log that writes when `enabled`.
    pub fn new(enabled: bool) -> AccessLog {
        AccessLog { enabled }
    }

    /// Writes the line for one finished request.
    pub fn log(&self, info: &RequestInfo) {
        if self.enabled {
            let _ = info;
        }
    }
}
