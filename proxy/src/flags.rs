//! Envoy response flags (`%RESPONSE_FLAGS%`), shown in the access log and in the
//! `response_flags` metric label.

use std::fmt;

/// A set of Envoy response flags; empty prints as `-`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

macro_rules! flags {
    ($($name:ident = $bit:expr, $text:literal;)*) => {
        impl ResponseFlags {
            $(#[doc = concat!("`", $text, "`")] pub const $name: ResponseFlags = ResponseFlags(1 << $bit);)*
            const NAMES: &'static [(ResponseFlags, &'static str)] = &[$((ResponseFlags::$name, $text)),*];
        }
    };
}

flags! {
    NO_ROUTE = 0, "NR";
    NO_HEALTHY_UPSTREAM = 1, "UH";
    UPSTREAM_CONNECT_FAILURE = 2, "UF";
    UPSTREAM_OVERFLOW = 3, "UO";
    UPSTREAM_TIMEOUT = 4, "UT";
    UPSTREAM_CONNECTION_TERMINATION = 5, "UC";
    DOWNSTREAM_CONNECTION_TERMINATION = 6, "DC";
    UPSTREAM_RETRY_LIMIT_EXCEEDED = 7, "URX";
    DELAY_INJECTED = 8, "DI";
    FAULT_INJECTED = 9, "FI";
    NO_CLUSTER = 10, "NC";
    UPSTREAM_REMOTE_RESET = 11, "UR";
    DOWNSTREAM_PROTOCOL_ERROR = 12, "DPE";
    UPSTREAM_PROTOCOL_ERROR = 13, "UPE";
    RBAC_DENIED = 14, "RBAC";
    BLACK_HOLE = 15, "BlackHoleCluster";
}

impl ResponseFlags {
    /// No flag.
    pub const NONE: ResponseFlags = ResponseFlags(0);

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Adds the flags of `other`.
    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, rhs: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | rhs.0)
    }
}

impl fmt::Display for ResponseFlags {
    /// Envoy's form: comma-separated short names, `-` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.contains(*flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_envoy() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(ResponseFlags::NO_ROUTE.to_string(), "NR");
        let both = ResponseFlags::UPSTREAM_CONNECT_FAILURE | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
        assert_eq!(both.to_string(), "UF,URX");
    }
}
