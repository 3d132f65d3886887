//! Request extractors that turn every malformed input into a problem+json
//! error naming the field.
//!
//! axum's own `Json` and `Query` rejections are plain text and name fields
//! only inside prose. [`ValidJson`] and [`ValidQuery`] deserialize through
//! `serde_path_to_error`, so `{"tokens":{"input":-1}}` becomes a 422 with
//! `field: "tokens.input"`; malformed JSON is a 400, a wrong content type
//! or a compressed body a 415 and an oversized body a 413.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, header, request::Parts};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult, FieldError};
use crate::types::MAX_OBJECT_DEPTH;

/// The header that makes a request safe to retry (creating an approval,
/// consuming from an inbox).
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

// The `Idempotency-Key` header for the API description: what
// `idempotency_key` takes. (A plain comment: a doc comment would become
// the schema's description.)
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, pattern = r"^[!-~]{1,255}$")]
#[expect(
    dead_code,
    reason = "only described: the header is read by idempotency_key"
)]
pub struct IdempotencyKeyParam(String);

/// The `Idempotency-Key` header, if sent: 1–255 visible ASCII characters,
/// once (two keys for one request could each name another request).
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> ApiResult<Option<String>> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid(IDEMPOTENCY_KEY, "must be sent once"));
    }
    let bad = || ApiError::invalid(IDEMPOTENCY_KEY, "must be 1 to 255 visible ASCII characters");
    let key = value.to_str().map_err(|_| bad())?.trim();
    if !is_idempotency_key(key) {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

/// Whether `key` is one the service takes as an `Idempotency-Key`: 1–255
/// visible ASCII characters (the command line checks its flag with it).
pub fn is_idempotency_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic())
}

/// A JSON body, deserialized with field-level errors.
///
/// An empty body (with no `Content-Type`, or a JSON one) is read as `{}`, so
/// endpoints whose fields are all optional (heartbeats) can be called with
/// a bare `POST`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ValidJson<T>(pub T);

impl<T, S> FromRequest<S> for ValidJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // A compressed body would otherwise read as malformed JSON.
        if let Some(encoding) = req.headers().get(header::CONTENT_ENCODING) {
            let encoding = encoding.to_str().unwrap_or("?").trim();
            if !encoding.eq_ignore_ascii_case("identity") {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "Content-Encoding {encoding:?} is not supported: send the body uncompressed"
                )));
            }
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_owned());
        crate::app::BodyProgress::Arriving.mark();
        let bytes = Bytes::from_request(req, state).await;
        crate::app::BodyProgress::Read.mark();
        let bytes = bytes.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("request body is too large".into())
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })?;
        let body: &[u8] = match content_type {
            // No body at all, with or without a JSON content type.
            _ if bytes.is_empty() => b"{}",
            None => {
                return Err(ApiError::UnsupportedMediaType(
                    "expected Content-Type: application/json".into(),
                ));
            }
            Some(ct) if is_json(&ct) => &bytes,
            Some(ct) => {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "expected Content-Type: application/json, got {ct:?}"
                )));
            }
        };
        // Every body is an object; serde's derives would also take an
        // array, its elements as the fields in declaration order.
        if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(match serde_json::from_slice::<serde_json::Value>(body) {
                Err(err) if !parses_as_json(body) => {
                    ApiError::BadRequest(format!("malformed JSON: {err}"))
                }
                _ => ApiError::invalid("body", "must be a JSON object, not an array"),
            });
        }
        parse_json(body).map(ValidJson)
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Whether `body` is JSON whose text is valid (UTF-8, no lone surrogate
/// in an escape): a number beyond a double is JSON all the same (the
/// grammar sets no range), but text that is not text makes the body
/// malformed, whichever field it is in.
fn parses_as_json(body: &[u8]) -> bool {
    if std::str::from_utf8(body).is_err() {
        return false;
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(_) => true,
        Err(err) => {
            err.to_string().starts_with("number out of range")
                && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
        }
    }
}

/// Deserializes `body`, mapping syntax errors to 400 and data errors to 422.
///
/// Valid bodies take the plain deserializer; only a body that fails is
/// parsed again with path tracking, which names the field in the error
/// (tracking costs an allocation per key, on every request otherwise).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        // Nested past the parser, yet JSON (skipping a value has no depth
        // limit): too deep, not malformed.
        if err
            .inner()
            .to_string()
            .starts_with("recursion limit exceeded")
            && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
        {
            return too_deep(err.path());
        }
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => data_error(&path, &inner.to_string()),
            // serde_json calls some values of the wrong kind syntax errors
            // (a number where a status name goes, a number too large for
            // a double); a body that parses as JSON is not malformed.
            serde_json::error::Category::Syntax if parses_as_json(body) => {
                let message = inner.to_string();
                let message = if message.starts_with("expected value") {
                    "is not an accepted value here"
                } else {
                    &message
                };
                data_error(&path, message)
            }
            _ => ApiError::BadRequest(format!("malformed JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// The 422 for a body nested deeper than the parser goes (128 levels of
/// objects and arrays, the body itself included), naming the body's field
/// the nesting is in: the parser stops long before the nesting ends, and
/// that field's value is at least 127 levels deep.
fn too_deep(path: &serde_path_to_error::Path) -> ApiError {
    let field = path
        .iter()
        .next()
        .map_or_else(|| "body".to_owned(), ToString::to_string);
    ApiError::invalid(
        field,
        format!(
            "must nest at most {MAX_OBJECT_DEPTH} levels of objects and arrays (got at least 127)"
        ),
    )
}

/// Builds the 422 for a deserialization error at `path`.
fn data_error(path: &str, message: &str) -> ApiError {
    // serde_json appends " at line L column C"; the field name says more.
    let message = json_words(
        message
            .rsplit_once(" at line ")
            .map_or(message, |(head, _)| head),
    );
    let path = if path == "." { "" } else { path };
    // A missing or repeated field is reported at its parent; name the
    // field itself.
    let field = match named_field(&message) {
        Some(name) if path.is_empty() => name.to_owned(),
        Some(name) => format!("{path}.{name}"),
        None if path.is_empty() => "body".to_owned(),
        None => path.to_owned(),
    };
    ApiError::Validation(vec![FieldError::new(field, message)])
}

/// A serde message with the Rust types it names (`expected struct
/// HeartbeatRequest`, `expected f64`) said as the JSON that goes there.
fn json_words(message: &str) -> String {
    if let Some(at) = message.find("expected struct ") {
        return format!("{}expected a JSON object", &message[..at]);
    }
    for (rust, json) in [
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
    ] {
        if let Some(head) = message.strip_suffix(rust) {
            return format!("{head}{json}");
        }
    }
    message.to_owned()
}

/// The field a serde error about a missing or repeated field names.
fn named_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("duplicate field `"))
        .and_then(|rest| rest.split('`').next())
}

/// Path parameters. axum's own rejection is plain text; a parameter that
/// is not UTF-8 once percent-decoded (`/v1/agents/%FF`) is a 422 naming it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ValidPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ValidPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::Path;
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ValidPath(value)),
            Err(PathRejection::FailedToDeserializePathParams(err)) => match err.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } => {
                    Err(ApiError::invalid(key.as_str(), "is not valid UTF-8"))
                }
                _ => Err(ApiError::BadRequest(err.body_text())),
            },
            Err(other) => Err(ApiError::BadRequest(other.body_text())),
        }
    }
}

/// Query parameters, deserialized with field-level errors.
#[derive(Debug, Clone, Copy, Default)]
pub struct ValidQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ValidQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(ValidQuery)
    }
}

/// Deserializes a query string; every error is a 422 naming the parameter.
///
/// A parameter with an empty value (`?type=&limit=`, as forms and URL
/// templates send fields left blank) is taken as absent: its default, or a
/// 422 naming it where it is required.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let pairs = form_urlencoded::parse(query.as_bytes());
    let filled: String;
    let query = if pairs.clone().any(|(_, value)| value.is_empty()) {
        filled = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.filter(|(_, value)| !value.is_empty()))
            .finish();
        &filled
    } else {
        query
    };
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        let field = match named_field(&message) {
            Some(name) => name.to_owned(),
            None if path == "." => "query".to_owned(),
            None => path,
        };
        ApiError::invalid(field, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Bounded, Id};
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Tokens {
        input: Bounded<0, 10>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Body {
        name: Id,
        tokens: Tokens,
    }

    fn field_of(err: ApiError) -> String {
        match err {
            ApiError::Validation(errors) => errors[0].field.clone(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn nested_data_errors_name_the_full_path() {
        let err = parse_json::<Body>(br#"{"name":"a","tokens":{"input":-1}}"#).unwrap_err();
        assert_eq!(field_of(err), "tokens.input");
        let err = parse_json::<Body>(br#"{"name":"a:b","tokens":{"input":1}}"#).unwrap_err();
        assert_eq!(field_of(err), "name");
    }

    /// Messages say what JSON goes there, not which Rust type takes it.
    #[test]
    fn data_errors_name_json_kinds_not_rust_types() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Beat {
            progress: Option<f64>,
            ttl: Option<u64>,
        }
        let message = |body: &[u8]| match parse_json::<Beat>(body).unwrap_err() {
            ApiError::Validation(errors) => errors[0].message.clone(),
            other => panic!("expected a validation error, got {other:?}"),
        };
        assert_eq!(
            message(br#""x""#),
            r#"invalid type: string "x", expected a JSON object"#
        );
        assert_eq!(
            message(br#"{"progress":"NaN"}"#),
            r#"invalid type: string "NaN", expected a number"#
        );
        assert_eq!(
            message(br#"{"ttl":"3"}"#),
            r#"invalid type: string "3", expected a whole number"#
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let err = parse_json::<Body>(br#"{"tokens":{"input":1}}"#).unwrap_err();
        assert_eq!(field_of(err), "name");
        let err = parse_json::<Body>(br#"{"name":"a","tokens":{}}"#).unwrap_err();
        assert_eq!(field_of(err), "tokens.input");
    }

    #[test]
    fn syntax_errors_are_bad_requests() {
        assert!(matches!(
            parse_json::<Body>(b"{not json"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(br#"{"name":"a","tokens":{"input":1}} trailing"#),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Status {
        Running,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Beat {
        status: Option<Status>,
        progress: Option<f64>,
        metadata: Option<serde_json::Value>,
    }

    /// serde_json reports these as syntax errors; the body parses, so the
    /// value is what is wrong, and its field is named.
    #[test]
    fn values_of_the_wrong_kind_are_named() {
        for body in [
            br#"{"status":5}"#.as_slice(),
            br#"{"status":true}"#,
            br#"{"status":[]}"#,
        ] {
            let err = parse_json::<Beat>(body).unwrap_err();
            assert_eq!(field_of(err), "status", "{}", String::from_utf8_lossy(body));
        }
        let err = parse_json::<Beat>(br#"{"progress":1e400}"#).unwrap_err();
        assert_eq!(field_of(err), "progress");
        let err = parse_json::<Beat>(br#"{"metadata":{"a":[1e400]}}"#).unwrap_err();
        assert_eq!(field_of(err), "metadata.a[0]");
        // Still malformed: a number cut short, text that is not text.
        for body in [
            br#"{"status":-}"#.as_slice(),
            br#"{"metadata":{"\ud800":1}}"#,
            b"{\"metadata\":{\"a\":\"\xff\"}}",
        ] {
            assert!(
                matches!(parse_json::<Beat>(body), Err(ApiError::BadRequest(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn repeated_fields_are_named() {
        let err =
            parse_json::<Body>(br#"{"name":"a","name":"b","tokens":{"input":1}}"#).unwrap_err();
        assert_eq!(field_of(err), "name");
        let err =
            parse_json::<Body>(br#"{"name":"a","tokens":{"input":1,"input":2}}"#).unwrap_err();
        assert_eq!(field_of(err), "tokens.input");
        assert_eq!(
            field_of(parse_query::<Q>("limit=5&limit=6").unwrap_err()),
            "limit"
        );
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Q {
        limit: Option<crate::types::Param<1, 1000>>,
        flag: Option<bool>,
    }

    #[test]
    fn query_numbers_are_range_checked() {
        let q: Q = parse_query("limit=5&flag=true").unwrap();
        assert_eq!(q.limit.unwrap().get(), 5);
        assert_eq!(field_of(parse_query::<Q>("limit=0").unwrap_err()), "limit");
        assert_eq!(
            field_of(parse_query::<Q>("limit=abc").unwrap_err()),
            "limit"
        );
        assert_eq!(
            field_of(parse_query::<Q>("flag=maybe").unwrap_err()),
            "flag"
        );
    }
}
