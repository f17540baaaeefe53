//! Converters for small Istio value types, shared by the resource checks. Each
//! returns the snapshot form or a message naming the bad value.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::config::duration::parse_duration;
use crate::config::error::Sink;
use crate::config::model;
use crate::snapshot::{HeaderEdits, HeaderOps, StringMatch};

/// Compiles a regex the way Istio (RE2, full-string match) means it.
pub fn anchored_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or("").trim();
        format!("invalid regex {pattern:?}: {last}")
    })
}

/// `StringMatch` → snapshot form; `None` for an empty match (`{}`).
pub fn string_match(m: &model::StringMatch, lowercase: bool) -> Result<Option<StringMatch>, String> {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()].iter().filter(|x| **x).count();
    if set > 1 {
        return Err("only one of exact, prefix and regex may be set".into());
    }
    let case = |s: &String| if lowercase { s.to_lowercase() } else { s.clone() };
    Ok(if let Some(s) = &m.exact {
        Some(StringMatch::Exact(case(s)))
    } else if let Some(s) = &m.prefix {
        Some(StringMatch::Prefix(case(s)))
    } else if let Some(s) = &m.regex {
        Some(StringMatch::Regex(anchored_regex(s)?))
    } else {
        None
    })
}

/// A required `StringMatch` (uri, method, …): `{}` is an error.
pub fn required_match(m: &model::StringMatch, lowercase: bool) -> Result<StringMatch, String> {
    string_match(m, lowercase)?.ok_or_else(|| "one of exact, prefix or regex is required".to_string())
}

/// A header name, lower-cased.
pub fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| format!("invalid header name {name:?}"))
}

/// A header value.
pub fn header_value(value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("invalid header value {value:?}"))
}

/// `headers: {request, response}` → [`HeaderOps`], errors under `path`.
pub fn header_ops(headers: Option<&model::Headers>, path: &str, sink: &mut Sink<'_>) -> HeaderOps {
    let Some(h) = headers else { return HeaderOps::default() };
    HeaderOps {
        request: header_edits(h.request.as_ref(), &format!("{path}.request"), sink),
        response: header_edits(h.response.as_ref(), &format!("{path}.response"), sink),
    }
}

fn header_edits(ops: Option<&model::HeaderOperations>, path: &str, sink: &mut Sink<'_>) -> HeaderEdits {
    let Some(ops) = ops else { return HeaderEdits::default() };
    let pairs = |map: &BTreeMap<String, String>, what: &str, sink: &mut Sink<'_>| {
        let mut out = Vec::new();
        for (k, v) in map {
            let field = format!("{path}.{what}.{k}");
            let name = sink.check(&field, header_name(k));
            let value = sink.check(&field, header_value(v));
            if let (Some(name), Some(value)) = (name, value) {
                out.push((name, value));
            }
        }
        out
    };
    HeaderEdits {
        set: pairs(&ops.set, "set", sink),
        add: pairs(&ops.add, "add", sink),
        remove: ops
            .remove
            .iter()
            .enumerate()
            .filter_map(|(i, k)| sink.check(&format!("{path}.remove[{i}]"), header_name(k)))
            .collect(),
    }
}

/// A percentage in 0..=100.
pub fn percentage(value: f64) -> Result<f64, String> {
    if value.is_finite() && (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("percentage {value} is out of range (0 to 100)"))
    }
}

/// A `Percent` block or a deprecated integer `percent`; `percentage` wins (Istio).
pub fn either_percentage(
    percentage_block: Option<&model::Percent>,
    percent: Option<i64>,
    path: &str,
    sink: &mut Sink<'_>,
) -> f64 {
    if let Some(p) = percentage_block {
        sink.check(&format!("{path}.percentage.value"), percentage(p.value)).unwrap_or(0.0)
    } else if let Some(p) = percent {
        #[allow(clippy::cast_precision_loss)]
        let value = p as f64;
        sink.check(&format!("{path}.percent"), percentage(value)).unwrap_or(0.0)
    } else {
        0.0
    }
}

/// A TCP port number (1..=65535).
pub fn port(number: i64) -> Result<u16, String> {
    u16::try_from(number).ok().filter(|p| *p != 0).ok_or_else(|| format!("port {number} is out of range (1 to 65535)"))
}

/// A duration of at least `min`.
pub fn duration_at_least(text: &str, min: Duration) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < min {
        return Err(format!("duration {text:?} is too short (minimum {}ms)", min.as_millis()));
    }
    Ok(d)
}

/// A non-negative count that fits in u32.
pub fn count(value: i64) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| format!("{value} is out of range (0 to {})", u32::MAX))
}

/// Decodes standard base64 (with or without padding).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0u32;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return Err(format!("invalid base64 {text:?}")),
        };
        buffer = (buffer << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((buffer >> bits) & 0xff) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_is_anchored() {
        let re = anchored_regex("/api/v[0-9]+").expect("valid");
        assert!(re.is_match("/api/v2"));
        assert!(!re.is_match("/api/v2/x"));
        assert!(!re.is_match("x/api/v2"));
        let re = anchored_regex("a|b").expect("valid");
        assert!(re.is_match("b") && !re.is_match("ab"));
        assert!(anchored_regex("(").expect_err("invalid").contains("\"(\""));
    }

    #[test]
    fn string_match_rules() {
        let m = model::StringMatch { prefix: Some("/API".into()), ..Default::default() };
        assert!(matches!(string_match(&m, true), Ok(Some(StringMatch::Prefix(p))) if p == "/api"));
        assert!(matches!(string_match(&model::StringMatch::default(), false), Ok(None)));
        let both = model::StringMatch { exact: Some("a".into()), prefix: Some("b".into()), regex: None };
        assert!(string_match(&both, false).is_err());
        assert!(required_match(&model::StringMatch::default(), false).is_err());
    }

    #[test]
    fn small_values() {
        assert_eq!(port(8080), Ok(8080));
        assert!(port(0).is_err() && port(70000).is_err());
        assert!(percentage(100.0).is_ok() && percentage(0.1).is_ok());
        assert!(percentage(101.0).is_err() && percentage(-1.0).is_err());
        assert!(header_name("X-User").is_ok_and(|h| h.as_str() == "x-user"));
        assert!(header_name("bad name").is_err());
        assert_eq!(base64_decode("aGVsbG8="), Ok(b"hello".to_vec()));
        assert_eq!(base64_decode("aGVsbG8"), Ok(b"hello".to_vec()));
        assert!(base64_decode("a$").is_err());
    }
}
