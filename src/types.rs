//! Value types parsed once at the edge and trusted everywhere after it.
//!
//! Client-chosen ids, bounded numbers and free-form JSON objects are
//! newtypes whose only constructors check them. Their `Deserialize` impls
//! call the same constructors, so a bad value in a body or a query string
//! fails deserialization, and the extractors in [`crate::extract`] report
//! it as a 422 naming the exact field. Nothing unchecked ever reaches a
//! Redis key: an [`Id`] cannot contain `:`, `*`, `{`, `}` or whitespace.

use std::fmt;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, de};
use utoipa::ToSchema;

use crate::error::ApiError;

/// Largest serialized size of a free-form object (`payload`, `metadata`, …).
pub const MAX_OBJECT_BYTES: usize = 64 * 1024;

/// Deepest nesting of a free-form object, itself the first level. Answers
/// put it a few levels deeper (`{"approvals":[{"request":{"context":…`),
/// and JSON readers have depth limits of their own (128 for serde_json,
/// this service's command line included): an object this service accepts
/// stays readable wherever it is shown.
pub const MAX_OBJECT_DEPTH: usize = 32;

/// A client-chosen identifier: `^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
#[schema(value_type = String, pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", example = "agent-1")]
pub struct Id(String);

// An optional `Id` filter in a query string, for the API description: an
// id, or empty for none. (A plain comment: a doc comment would become the
// schema's description.)
#[derive(ToSchema)]
#[schema(value_type = String, pattern = r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")]
#[expect(dead_code, reason = "only described: the value is read as an Id")]
pub struct IdFilterParam(String);

/// Debug-formats as the quoted id (`"agent-1"`), which is what error
/// messages built with `{id:?}` should show a client.
impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Longest id: agent ids, types, names.
pub const MAX_ID_LEN: usize = 128;

impl Id {
    /// Checks `value` against the id grammar.
    pub fn new(value: impl Into<String>) -> Result<Self, String> {
        let value = value.into();
        let bytes = value.as_bytes();
        if bytes.is_empty() {
            return Err("must not be empty".into());
        }
        if bytes.len() > MAX_ID_LEN {
            return Err(format!("must be at most {MAX_ID_LEN} characters"));
        }
        if !bytes[0].is_ascii_alphanumeric() {
            let first = value.chars().next().unwrap_or_default();
            return Err(format!(
                "must start with a letter or digit (found {first:?})"
            ));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "must contain only letters, digits, '.', '_' and '-' (found {bad:?})"
            ));
        }
        Ok(Self(value))
    }

    /// Parses a path or query parameter, naming it in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, ApiError> {
        Self::new(value).map_err(|msg| ApiError::invalid(field, msg))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Id> for String {
    fn from(id: Id) -> Self {
        id.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Id::new(s).map_err(de::Error::custom)
    }
}

/// An event type: `^[a-z][a-z0-9_.-]{0,63}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[schema(value_type = String, pattern = r"^[a-z][a-z0-9_.-]{0,63}$", example = "workflow.progress")]
pub struct EventType(String);

impl EventType {
    pub fn new(value: impl Into<String>) -> Result<Self, String> {
        let value = value.into();
        let bytes = value.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 64
            && bytes[0].is_ascii_lowercase()
            && bytes.iter().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if ok {
            Ok(Self(value))
        } else {
            Err("must match ^[a-z][a-z0-9_.-]{0,63}$".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        EventType::new(String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// An integer that must lie in `MIN..=MAX` (durations, limits, counts).
/// In a JSON body it must be a JSON number, as the API description says
/// (`"30"` is a 422, like `"0.5"` for a fraction); [`Param`] is the same
/// integer in a query string, where every value arrives as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, ToSchema)]
#[schema(value_type = u64)]
pub struct Bounded<const MIN: u64, const MAX: u64, const TEXT: bool = false>(u64);

/// A [`Bounded`] query parameter: taken from text.
pub type Param<const MIN: u64, const MAX: u64> = Bounded<MIN, MAX, true>;

impl<const MIN: u64, const MAX: u64, const TEXT: bool> Bounded<MIN, MAX, TEXT> {
    pub fn new(value: u64) -> Result<Self, String> {
        if (MIN..=MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(format!("must be between {MIN} and {MAX}"))
        }
    }

    /// A constant in range, checked at compile time.
    pub const fn constant(value: u64) -> Self {
        assert!(value >= MIN && value <= MAX);
        Self(value)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl<'de, const MIN: u64, const MAX: u64, const TEXT: bool> Deserialize<'de>
    for Bounded<MIN, MAX, TEXT>
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Any number (so `-1`, `1.5` and `1e9` get the range message rather
        // than a type error), or for a query parameter a string holding one.
        struct Visit<const MIN: u64, const MAX: u64, const TEXT: bool>;
        impl<const MIN: u64, const MAX: u64, const TEXT: bool> de::Visitor<'_> for Visit<MIN, MAX, TEXT> {
            type Value = Bounded<MIN, MAX, TEXT>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer between {MIN} and {MAX}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Bounded::new(v).map_err(|_| E::custom(range_msg(MIN, MAX)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(range_msg(MIN, MAX)))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                // `30.0` is an integer to JSON Schema, and so to the API
                // description: take it as one.
                if v.fract() == 0.0 && (0.0..=MAX as f64).contains(&v) {
                    self.visit_u64(v as u64)
                } else {
                    Err(E::custom(range_msg(MIN, MAX)))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if !TEXT {
                    return Err(E::invalid_type(de::Unexpected::Str(v), &self));
                }
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| E::custom(range_msg(MIN, MAX)))
                    .and_then(|v| self.visit_u64(v))
            }
        }
        d.deserialize_any(Visit::<MIN, MAX, TEXT>)
    }
}

fn range_msg(min: u64, max: u64) -> String {
    format!("must be an integer between {min} and {max}")
}

/// A fraction in `0.0..=1.0` (progress, quality scores).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Fraction(f64);

impl utoipa::PartialSchema for Fraction {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Double)))
            .minimum(Some(0.0))
            .maximum(Some(1.0))
            .description(Some("A fraction in 0.0–1.0."))
            .into()
    }
}

impl ToSchema for Fraction {}

impl Fraction {
    pub fn new(value: f64) -> Result<Self, String> {
        if (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err("must be between 0.0 and 1.0".into())
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Fraction::new(f64::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// A free-form JSON object of at most 64 KiB serialized and 32 levels deep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
#[schema(value_type = Object)]
pub struct JsonObject(serde_json::Map<String, serde_json::Value>);

impl JsonObject {
    pub fn new(map: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        /// Counts what is written instead of keeping it.
        struct Counter(usize);
        impl std::io::Write for Counter {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0 += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut counter = Counter(0);
        let size = serde_json::to_writer(&mut counter, &map).map_or(usize::MAX, |()| counter.0);
        if size > MAX_OBJECT_BYTES {
            return Err(format!(
                "must be at most {MAX_OBJECT_BYTES} bytes serialized (got {size})"
            ));
        }
        /// Levels of objects and arrays in `value`, itself included.
        fn depth(value: &serde_json::Value) -> usize {
            match value {
                serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
                serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }
        let levels = 1 + map.values().map(depth).max().unwrap_or(0);
        if levels > MAX_OBJECT_DEPTH {
            return Err(format!(
                "must nest at most {MAX_OBJECT_DEPTH} levels of objects and arrays (got {levels})"
            ));
        }
        Ok(Self(map))
    }

    pub fn into_inner(self) -> serde_json::Map<String, serde_json::Value> {
        self.0
    }

    pub fn as_map(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        match value {
            serde_json::Value::Object(map) => JsonObject::new(map).map_err(de::Error::custom),
            _ => Err(de::Error::custom("must be a JSON object")),
        }
    }
}

/// Free text with a length bound (reasons, task descriptions, names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(value_type = String)]
pub struct Text<const MAX: usize>(String);

impl<const MAX: usize> Text<MAX> {
    pub fn new(value: String) -> Result<Self, String> {
        if value.chars().count() > MAX {
            Err(format!("must be at most {MAX} characters"))
        } else {
            Ok(Self(value))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Text<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Text::new(String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// Deserializes an optional [`Text`] that, when sent, says something: an
/// empty or blank string is refused rather than stored as a value.
pub fn optional_non_blank<'de, D: Deserializer<'de>, const MAX: usize>(
    d: D,
) -> Result<Option<Text<MAX>>, D::Error> {
    let text = Option::<Text<MAX>>::deserialize(d)?;
    if text.as_ref().is_some_and(|t| t.as_str().trim().is_empty()) {
        return Err(de::Error::custom("must not be empty"));
    }
    Ok(text)
}

/// Deserializes a struct from a JSON object only: serde's derives would
/// also take an array, its elements read as the fields in order.
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    struct ObjectVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for ObjectVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(ObjectVisitor(std::marker::PhantomData))
}

/// A `T` read by [`object`].
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        object(d).map(Object)
    }
}

/// [`object`] for an optional field (absent or `null`: none).
pub fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// [`object`] for each element of an array.
pub fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Vec::<Object<T>>::deserialize(d)?
        .into_iter()
        .map(|o| o.0)
        .collect())
}

/// `limit` of a list endpoint: 1–1000, default 100.
pub type Limit = Param<1, 1000>;

/// The default page size of list endpoints.
pub const DEFAULT_LIMIT: Limit = Limit::constant(100);

/// Formats a time as RFC 3339 UTC with milliseconds, the wire format of every timestamp.
///
/// Exactly `to_rfc3339_opts(SecondsFormat::Millis, true)`, written digit by
/// digit for years 0–9999: every heartbeat formats two timestamps (its
/// event's and its view's), and chrono's general formatter costs several
/// times more. Other years, and leap seconds, go through chrono.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    let (date, time) = (t.date_naive(), t.time());
    let Ok(year) = u32::try_from(date.year()) else {
        return t.to_rfc3339_opts(SecondsFormat::Millis, true);
    };
    if year > 9999 || time.nanosecond() >= 1_000_000_000 {
        return t.to_rfc3339_opts(SecondsFormat::Millis, true);
    }
    let mut text = String::with_capacity(24);
    let mut push = |value: u32, digits: u32, then: Option<char>| {
        for place in (0..digits).rev() {
            let digit = value / 10u32.pow(place) % 10;
            text.push(char::from_digit(digit, 10).unwrap_or('0'));
        }
        if let Some(c) = then {
            text.push(c);
        }
    };
    push(year, 4, Some('-'));
    push(date.month(), 2, Some('-'));
    push(date.day(), 2, Some('T'));
    push(time.hour(), 2, Some(':'));
    push(time.minute(), 2, Some(':'));
    push(time.second(), 2, Some('.'));
    push(time.nanosecond() / 1_000_000, 3, Some('Z'));
    text
}

/// The SHA-256 of `bytes` in lower-case hex: how the service names what a
/// client chose (idempotency keys, record ids) inside storage keys, and
/// how it fingerprints bodies, key secrets and price files.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Milliseconds since the Unix epoch to a UTC time.
pub fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Reads an optional time a client sends: RFC 3339 with its UTC offset.
/// chrono's own messages ("premature end of input") do not say what was
/// expected.
pub fn optional_client_time<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    // chrono's own reading, as before: RFC 3339 and the forms it also
    // takes (`+0000`, a space for the `T`).
    text.parse::<DateTime<Utc>>().map(Some).map_err(|e| {
        de::Error::custom(format!(
            "must be an RFC 3339 time with a UTC offset, such as \
                 2026-05-01T12:00:00Z or 2026-05-01T14:00:00+02:00 ({e})"
        ))
    })
}

/// Serde helpers that write `DateTime<Utc>` with exactly millisecond precision.
pub mod millis_time {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }

    /// The same for `Option<DateTime<Utc>>`.
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&super::super::rfc3339(*t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<DateTime<Utc>>::deserialize(d)
        }
    }
}

// A `TypeFilter` as a query parameter, for the API description: what
// `TypeFilter::parse` takes.
#[derive(ToSchema)]
#[schema(
    value_type = String,
    pattern = r"^\s*([a-z][a-z0-9_.-]{0,63}(\.\*)?\s*)?(,\s*([a-z][a-z0-9_.-]{0,63}(\.\*)?\s*)?)*$"
)]
#[expect(
    dead_code,
    reason = "only described: the value is read by TypeFilter::parse"
)]
pub struct TypeFilterParam(String);

/// Parses a comma-separated list of type filters (`approval.*,agent.down`).
#[derive(Debug, Clone, Default)]
pub struct TypeFilter {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl TypeFilter {
    pub fn parse(field: &str, raw: Option<&str>) -> Result<Self, ApiError> {
        let mut filter = Self::default();
        for entry in raw
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if let Some(prefix) = entry.strip_suffix(".*") {
                EventType::new(prefix).map_err(|m| ApiError::invalid(field, m))?;
                filter.prefixes.push(format!("{prefix}."));
            } else {
                EventType::new(entry).map_err(|m| ApiError::invalid(field, m))?;
                filter.exact.push(entry.to_owned());
            }
        }
        Ok(filter)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    pub fn matches(&self, kind: &str) -> bool {
        self.is_empty()
            || self.exact.iter().any(|e| e == kind)
            || self.prefixes.iter().any(|p| kind.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_chrono_for_every_kind_of_instant() {
        let chrono = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut ms: i64 = -62_167_219_200_000 - 1; // just before year 0
        let mut seen = 0;
        // From before year 0 to after year 9999 (both through chrono), in
        // steps of about 92 days whose time of day and milliseconds drift,
        // so that every field takes many values.
        while ms < 253_402_300_800_000 + 86_400_000 {
            let t = from_millis(ms);
            assert_eq!(rfc3339(t), chrono(t), "at {ms} ms");
            ms += 7_919_999_999 + ms.rem_euclid(1_000);
            seen += 1;
        }
        assert!(seen > 10_000);
        for ms in [
            0,
            999,
            1_000,
            86_399_999,
            951_782_400_000,
            1_798_761_599_999,
        ] {
            let t = from_millis(ms);
            assert_eq!(rfc3339(t), chrono(t), "at {ms} ms");
        }
        let now = Utc::now();
        assert_eq!(rfc3339(now), chrono(now));
    }

    #[test]
    fn ids_debug_format_as_quoted_strings() {
        assert_eq!(format!("{:?}", Id::new("agent-1").unwrap()), "\"agent-1\"");
        // The character refused is named as sent, not as its first byte.
        let refused = Id::new("dé").unwrap_err();
        assert!(refused.ends_with("(found 'é')"), "{refused}");
    }

    #[test]
    fn ids_reject_key_syntax_and_overlong_values() {
        assert!(Id::new("agent-1.a_b").is_ok());
        for bad in ["", "a:b", "a*", "{x}", "a b", "-a", &"a".repeat(129)] {
            assert!(Id::new(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Id::new("a".repeat(128)).is_ok());
    }

    #[test]
    fn bounded_numbers_reject_out_of_range_and_fractions_and_take_integral_floats() {
        type Ttl = Bounded<1, 3600>;
        assert!(serde_json::from_str::<Ttl>("0").is_err());
        assert!(serde_json::from_str::<Ttl>("1.5").is_err());
        assert!(serde_json::from_str::<Ttl>("-3").is_err());
        assert!(serde_json::from_str::<Ttl>("3601.0").is_err());
        assert!(serde_json::from_str::<Ttl>("1e99").is_err());
        assert_eq!(serde_json::from_str::<Ttl>("3600").unwrap().get(), 3600);
        // What JSON Schema calls an integer.
        assert_eq!(serde_json::from_str::<Ttl>("30.0").unwrap().get(), 30);
        assert_eq!(serde_json::from_str::<Ttl>("3e3").unwrap().get(), 3000);
    }

    #[test]
    fn bounded_numbers_come_as_text_only_in_query_strings() {
        let err = serde_json::from_str::<Bounded<1, 3600>>(r#""30""#).unwrap_err();
        assert!(err.to_string().contains("invalid type: string"), "{err}");
        #[derive(Debug, Deserialize)]
        struct Q {
            ttl: Param<1, 3600>,
        }
        let q: Q = serde_urlencoded::from_str("ttl=30").unwrap();
        assert_eq!(q.ttl.get(), 30);
        assert!(serde_urlencoded::from_str::<Q>("ttl=0").is_err());
    }

    #[test]
    fn type_filters_match_exact_names_and_prefixes() {
        let f = TypeFilter::parse("types", Some("approval.*,agent.down")).unwrap();
        assert!(f.matches("approval.decided"));
        assert!(f.matches("agent.down"));
        assert!(!f.matches("agent.heartbeat"));
        assert!(!f.matches("approvals"));
        assert!(TypeFilter::parse("types", Some("Bad Type")).is_err());
    }

    #[test]
    fn objects_over_64_kib_are_rejected() {
        // `{"x":"…"}` is the string plus 8 bytes.
        let sized = |n: usize| serde_json::json!({ "x": "a".repeat(n) });
        assert!(serde_json::from_value::<JsonObject>(sized(MAX_OBJECT_BYTES - 8)).is_ok());
        let err = serde_json::from_value::<JsonObject>(sized(MAX_OBJECT_BYTES - 7)).unwrap_err();
        assert!(err.to_string().contains("(got 65537)"), "{err}");
        assert!(serde_json::from_value::<JsonObject>(serde_json::json!([1])).is_err());
    }

    #[test]
    fn objects_nested_past_32_levels_are_rejected() {
        let nested = |levels: usize| -> serde_json::Value {
            let text = format!("{}1{}", r#"{"a":"#.repeat(levels), "}".repeat(levels));
            serde_json::from_str(&text).unwrap()
        };
        assert!(serde_json::from_value::<JsonObject>(nested(MAX_OBJECT_DEPTH)).is_ok());
        let err = serde_json::from_value::<JsonObject>(nested(MAX_OBJECT_DEPTH + 1)).unwrap_err();
        assert!(err.to_string().contains("(got 33)"), "{err}");
        // Arrays count as levels too.
        let arrays = serde_json::json!({ "a": [[[1]]] });
        assert!(serde_json::from_value::<JsonObject>(arrays).is_ok());
        let text = format!("{{\"a\":{}1{}}}", "[".repeat(32), "]".repeat(32));
        let deep: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(serde_json::from_value::<JsonObject>(deep).is_err());
    }
}
