//! Istio / protobuf duration strings: `1s`, `0.5s`, `100ms`, `1m`, `1h`, `1h30m`.
//!
//! Istio's YAML goes through protobuf's JSON mapping, whose canonical form is
//! seconds with a fraction (`"1.5s"`); Istio's docs and users also write Go-style
//! durations (`100ms`, `1m`, `1h`). Both are accepted: one or more
//! `<number><unit>` parts, units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`.

use std::time::Duration;

/// Parses a duration string; the error names the value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {text:?}: {why}");
    let s = text.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.starts_with('-') {
        return Err(bad("must not be negative"));
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let (number, after) = rest.split_at(num_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let nanos_per_unit: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" => 1_000,
            "ns" => 1,
            "" => return Err(bad("missing unit (use h, m, s, ms, us or ns)")),
            other => return Err(bad(&format!("unknown unit {other:?}"))),
        };
        let nanos = scaled(number, nanos_per_unit).ok_or_else(|| bad("not a number"))?;
        let part = Duration::from_nanos(u64::try_from(nanos).map_err(|_| bad("too large"))?);
        total = total.checked_add(part).ok_or_else(|| bad("too large"))?;
        rest = next;
    }
    Ok(total)
}

/// `number * unit` in nanoseconds, exactly (decimal fraction, no float rounding).
fn scaled(number: &str, unit: u128) -> Option<u128> {
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut value = whole.checked_mul(unit)?;
    let mut scale = unit;
    for digit in frac.chars() {
        scale /= 10;
        let d = u128::from(digit.to_digit(10)?);
        value = value.checked_add(d * scale)?;
    }
    Some(value)
}

/// Formats a duration the way Istio prints it (`1.5s`, `100ms`).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos().is_multiple_of(1_000_000) && d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn istio_forms() {
        assert_eq!(parse_duration("1s"), Ok(ms(1000)));
        assert_eq!(parse_duration("0.5s"), Ok(ms(500)));
        assert_eq!(parse_duration(".25s"), Ok(ms(250)));
        assert_eq!(parse_duration("100ms"), Ok(ms(100)));
        assert_eq!(parse_duration("1m"), Ok(ms(60_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1h30m"), Ok(ms(5_400_000)));
        assert_eq!(parse_duration("1.001s"), Ok(ms(1001)));
        assert_eq!(parse_duration("7s"), Ok(ms(7000)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("10ns"), Ok(Duration::from_nanos(10)));
    }

    #[test]
    fn errors_name_the_value() {
        for bad in ["", "1", "1x", "s", "-1s", "1.2.3s", "abc", "1 s", "10d"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["1s", "100ms", "1.5s", "3600s"] {
            let d = parse_duration(text).expect("valid");
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
