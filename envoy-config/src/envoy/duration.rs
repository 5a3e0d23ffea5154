//! Protobuf-JSON durations (`"1.5s"` or `{seconds, nanos}`): sources -> **model**.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Text(String),
    Parts {
        #[serde(default)]
        seconds: i64,
        #[serde(default)]
        nanos: i32,
    },
}

/// google.protobuf.Duration's range: ±10000 years.
const MAX_SECONDS: u64 = 315_576_000_000;

fn bounded(duration: Duration) -> Result<Duration, String> {
    if duration.as_secs() > MAX_SECONDS {
        Err(format!("a duration may not exceed {MAX_SECONDS}s"))
    } else {
        Ok(duration)
    }
}

/// Parses the protobuf JSON form: decimal seconds with an `s` suffix, e.g. `"0.25s"`.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let invalid = || format!("`{text}` is not a duration (expected e.g. \"1s\", \"0.25s\")");
    let number = text.trim().strip_suffix('s').ok_or_else(invalid)?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let seconds: u64 = whole.parse().map_err(|_| invalid())?;
    let nanos = if fraction.is_empty() {
        0
    } else {
        let scale = 10u32.pow(9 - fraction.len() as u32);
        fraction.parse::<u32>().map_err(|_| invalid())? * scale
    };
    bounded(Duration::new(seconds, nanos))
}

fn from_raw(raw: RawDuration) -> Result<Duration, String> {
    match raw {
        RawDuration::Text(text) => parse(&text),
        RawDuration::Parts { seconds, nanos } => {
            let seconds =
                u64::try_from(seconds).map_err(|_| "a duration cannot be negative".to_string())?;
            let nanos = u32::try_from(nanos)
                .ok()
                .filter(|n| *n < 1_000_000_000)
                .ok_or_else(|| "nanos must be within 0..1000000000".to_string())?;
            bounded(Duration::new(seconds, nanos))
        }
    }
}

/// serde `deserialize_with` for a required/defaulted `Duration`.
pub(crate) fn required<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    from_raw(RawDuration::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

/// serde `deserialize_with` for an `Option<Duration>` (use with `#[serde(default)]`).
pub(crate) fn optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    required(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protobuf_json_durations() {
        assert_eq!(parse("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse("0.25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0.000000001s"), Ok(Duration::from_nanos(1)));
        assert!(parse("1").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("1ms").is_err());
        assert!(parse(".5s").is_err());
        assert!(parse("315576000001s").is_err());
    }
}
