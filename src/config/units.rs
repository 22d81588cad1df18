//! The value types both configuration sources share: [`Size`], [`Duration`], [`YesNo`] and
//! [`Text`]. Each parses with `FromStr` (clap uses it for the flags) and deserializes from any YAML
//! scalar through the same `FromStr` after `${VAR}` substitution, so a flag and a field accept the
//! same text and refuse it with the same message.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A size in redis.conf's units (`memtoll`): a bare number is bytes; `k`, `m`, `g` are powers of
/// 1000 and `kb`, `mb`, `gb` powers of 1024, in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Parses a size in Redis's units (`1024`, `64kb`, `64mb`, `1gb`, `1k` = 1000, `1m`, `1g`).
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// The size in the largest unit that writes it exactly (`1048576` is `1mb`), as errors show it.
impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (unit, bytes) in [("gb", 1u64 << 30), ("mb", 1 << 20), ("kb", 1 << 10)] {
            if self.0 >= bytes && self.0.is_multiple_of(bytes) {
                return write!(f, "{}{unit}", self.0 / bytes);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Size, String> {
        parse_size(text).map(Size).ok_or_else(|| format!("expected a size such as 64mb or 1gb, got {text:?}"))
    }
}

/// A duration: a bare number is seconds (as redis.conf's `repl-timeout` and `timeout`), or a number
/// with `ms`, `s`, `m` or `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

/// Parses a duration (`60`, `60s`, `500ms`, `5m`, `1h`).
pub(crate) fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(split);
    let number: u64 = digits.parse().ok()?;
    Some(match unit {
        "" | "s" => std::time::Duration::from_secs(number),
        "ms" => std::time::Duration::from_millis(number),
        "m" => std::time::Duration::from_secs(number.checked_mul(60)?),
        "h" => std::time::Duration::from_secs(number.checked_mul(3600)?),
        _ => return None,
    })
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(text: &str) -> Result<Duration, String> {
        parse_duration(text)
            .map(Duration)
            .ok_or_else(|| format!("expected a duration such as 60 (seconds), 500ms, 10s, 5m or 1h, got {text:?}"))
    }
}

/// A boolean as redis.conf writes it, `yes` or `no`; `true` and `false` too (and YAML booleans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YesNo(pub bool);

impl FromStr for YesNo {
    type Err = String;
    fn from_str(text: &str) -> Result<YesNo, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "yes" | "true" => Ok(YesNo(true)),
            "no" | "false" => Ok(YesNo(false)),
            _ => Err(format!("expected yes or no, got {text:?}")),
        }
    }
}

/// A string setting, `${VAR}` already replaced from the environment. A YAML number or boolean is
/// taken as the text it was written as (`ack_replicas: 2`, `history_reset_min_key_ratio: 0.5`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl FromStr for Text {
    type Err = String;
    fn from_str(text: &str) -> Result<Text, String> {
        Ok(Text(text.to_string()))
    }
}

impl From<String> for Text {
    fn from(text: String) -> Text {
        Text(text)
    }
}

impl Text {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Replaces every `${NAME}` with the environment variable NAME; an unset variable is an error that
/// names it (a literal `${X}` in a path or a password is never what the operator meant).
pub(crate) fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(format!("unterminated ${{...}} in {text:?}"));
        };
        let name = &rest[start + 2..start + end];
        match std::env::var(name) {
            Ok(value) => out.push_str(&value),
            Err(_) => return Err(format!("environment variable {name} is not set (in {text:?})")),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Takes any YAML scalar as the text it was written as, replaces `${VAR}`, and parses it with
/// `FromStr`: the one path every leaf value of the file takes. The parse runs inside the visitor so
/// that the deserializer marks a refusal with the field's own path and line.
struct ViaFromStr<T>(std::marker::PhantomData<T>);

impl<T: FromStr<Err = String>> ViaFromStr<T> {
    fn parse<E: de::Error>(text: &str) -> Result<T, E> {
        let expanded = expand_env(text).map_err(E::custom)?;
        T::from_str(&expanded).map_err(E::custom)
    }
}

impl<T: FromStr<Err = String>> Visitor<'_> for ViaFromStr<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number or boolean")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Self::parse(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        Self::parse(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Self::parse(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Self::parse(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        Self::parse(&v.to_string())
    }
}

fn deserialize_via_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    deserializer.deserialize_any(ViaFromStr(std::marker::PhantomData))
}

macro_rules! deserialize_from_str {
    ($($type:ty),*) => {$(
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_via_from_str(deserializer)
            }
        }
    )*};
}

deserialize_from_str!(Size, Duration, YesNo, Text);

/// A list setting: a YAML sequence, or one string of comma-separated items (as the flag takes it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct List(pub Vec<String>);

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<List, D::Error> {
        struct Items;
        impl<'de> Visitor<'de> for Items {
            type Value = List;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list, or a comma-separated string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<List, E> {
                let expanded = expand_env(v).map_err(E::custom)?;
                Ok(List(expanded.split(',').map(|s| s.trim().to_string()).collect()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<List, A::Error> {
                let mut items = Vec::new();
                while let Some(Text(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(List(items))
            }
        }
        deserializer.deserialize_any(Items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_redis_units_and_bare_numbers_are_bytes() {
        assert_eq!("64mb".parse::<Size>(), Ok(Size(64 << 20)));
        assert_eq!("1GB".parse::<Size>(), Ok(Size(1 << 30)));
        assert_eq!("1k".parse::<Size>(), Ok(Size(1000)));
        assert_eq!("2m".parse::<Size>(), Ok(Size(2_000_000)));
        assert_eq!("12".parse::<Size>(), Ok(Size(12)));
        assert!("12xb".parse::<Size>().unwrap_err().contains("12xb"));
        assert_eq!(serde_yaml_ng::from_str::<Size>("1048576").unwrap(), Size(1 << 20));
        assert_eq!(serde_yaml_ng::from_str::<Size>("64kb").unwrap(), Size(64 << 10));
    }

    #[test]
    fn durations_take_bare_seconds_as_redis_conf() {
        assert_eq!("60".parse::<Duration>(), Ok(Duration(std::time::Duration::from_secs(60))));
        assert_eq!("5m".parse::<Duration>(), Ok(Duration(std::time::Duration::from_secs(300))));
        assert_eq!("500ms".parse::<Duration>(), Ok(Duration(std::time::Duration::from_millis(500))));
        assert!("soon".parse::<Duration>().unwrap_err().contains("soon"));
        assert_eq!(serde_yaml_ng::from_str::<Duration>("60").unwrap(), Duration(std::time::Duration::from_secs(60)));
    }

    #[test]
    fn booleans_take_yes_no_true_false_in_both_forms() {
        for (text, value) in [("yes", true), ("no", false), ("true", true), ("false", false), ("YES", true)] {
            assert_eq!(text.parse::<YesNo>(), Ok(YesNo(value)), "flag {text}");
            assert_eq!(serde_yaml_ng::from_str::<YesNo>(text).unwrap(), YesNo(value), "YAML {text}");
        }
        assert!("maybe".parse::<YesNo>().unwrap_err().contains("maybe"));
    }

    #[test]
    fn env_substitution_names_an_unset_variable() {
        std::env::set_var("RELAY_UNITS_TEST_SIZE", "2mb");
        assert_eq!(serde_yaml_ng::from_str::<Size>("${RELAY_UNITS_TEST_SIZE}").unwrap(), Size(2 << 20));
        let error = serde_yaml_ng::from_str::<Text>("a${RELAY_UNITS_SURELY_UNSET}b").unwrap_err().to_string();
        assert!(error.contains("RELAY_UNITS_SURELY_UNSET"), "{error}");
    }
}
