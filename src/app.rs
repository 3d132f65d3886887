//! The HTTP application: state, routes, layers, and the server loop.
//!
//! [`build`] turns a [`Config`] into a ready [`App`] (engine connected,
//! migrations applied, key ring loaded); [`run`] serves it on an already
//! bound listener until `shutdown` completes, so tests bind `127.0.0.1:0`
//! and run exactly the production code.
//!
//! Layers, outermost first, and why in this order:
//! 1. request id — set (or keep the client's) before anything logs;
//! 2. trace span — every log line of the request carries method, route, id;
//! 3. propagate request id — echoes `x-request-id` on every response,
//!    including the ones produced by the layers below;
//! 4. CORS (only with `--allowed-origins`) — answers preflights before auth
//!    or limits see them;
//! 5. compression — only bodies of at least [`COMPRESS_FROM_BYTES`], and
//!    never `text/event-stream`, so SSE is never buffered;
//! 6. catch-panic — a panic becomes a logged 500 problem, not a dropped
//!    connection; it sits inside the span so the log names the request;
//! 7. per-route metrics and the time limit (one route layer).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::KeyRing;
use crate::config::Config;
use crate::engine::memory::MemoryEngine;
use crate::engine::redis::RedisEngine;
use crate::engine::{Engine, EngineError};
use crate::error::ApiError;
use crate::events::hub::Hub;

/// Shared state of every handler: one `Arc`, so the several clones axum
/// makes per request (one per `State` extractor and middleware) cost one
/// reference-count increment each. Fields are reached through `Deref`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    /// The storage engine.
    pub engine: Engine,
    /// In-process fan-out of the event log and long-poll wake-ups.
    pub hub: Arc<Hub>,
    /// API keys.
    pub keys: Arc<KeyRing>,
    /// Validated settings.
    pub config: Arc<Config>,
    /// Wall-clock time for domain logic (tests advance it).
    pub clock: crate::clock::Clock,
    /// The price table, the `user_id` HMAC secret and the usage retention.
    pub usage: Arc<crate::usage::UsageSettings>,
    /// Cancelled when the server starts shutting down: long polls answer,
    /// WebSockets close, background tasks stop.
    pub shutdown: CancellationToken,
}

impl FromRef<AppState> for Arc<KeyRing> {
    fn from_ref(state: &AppState) -> Self {
        state.keys.clone()
    }
}

/// A built application, ready to serve.
pub struct App {
    pub state: AppState,
    pub router: Router,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "attune-telemetry",
        description = "Telemetry and coordination for multi-agent AI systems: heartbeats and \
                       liveness, typed coordination signals, human approval gates, usage and \
                       quality feedback, and a live event stream.",
        license(name = "Apache-2.0")
    ),
    modifiers(&SecurityAddon),
    security(("bearer" = [])),
    components(schemas(crate::error::Problem, crate::error::FieldError)),
    tags(
        (name = "agents", description = "Heartbeats and liveness"),
        (name = "signals", description = "Coordination signals"),
        (name = "approvals", description = "Human approval gates"),
        (name = "events", description = "The event log and live streams"),
        (name = "usage", description = "LLM usage, cost savings and cache statistics"),
        (name = "feedback", description = "Quality feedback and template ratings"),
        (name = "operations", description = "Health, readiness, metrics and documentation"),
    )
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from the keys file."))
                    .build(),
            ),
        );
    }
}

/// Every API route, with its OpenAPI description.
fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(crate::agents::http::router())
        .merge(crate::signals::http::router())
        .merge(crate::approvals::http::router())
        .merge(crate::events::http::router())
        .merge(crate::events::live::router())
        .merge(crate::feedback::http::router())
        .merge(crate::usage::http::router())
        .merge(crate::ops::router())
}

/// The OpenAPI document the server serves (and `openapi/openapi.json` holds).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_parts().1
}

/// The API routes and their document, finished.
fn api_parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = api_router().split_for_parts();
    declare_refusals_of_the_stack(&mut doc);
    problems_as_problem_json(&mut doc);
    declare_headers(&mut doc);
    (router, doc)
}

/// Declares, on every operation that does not already, the answers the
/// layers in front of the handlers may give it: 403 from the origin and
/// host checks (see [`RouteSettings`]), 413 for a body over the limit
/// (on every operation: one that reads no body refuses a large one too)
/// and 408 for one too slow (see [`per_route`]).
fn declare_refusals_of_the_stack(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let problem = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
    };
    for operation in operations_mut(doc) {
        let responses = &mut operation.responses.responses;
        if !responses.contains_key("403") {
            responses.insert(
                "403".into(),
                problem(
                    "Without a keys file: a request from another site, or for a host \
                     name that is not this machine's loopback",
                )
                .into(),
            );
        }
        if !responses.contains_key("413") {
            let description = if operation.request_body.is_some() {
                "The body is over `--body-limit-bytes`"
            } else {
                // Refused by its `Content-Length` before any handler runs.
                "A body was sent, declared over `--body-limit-bytes`"
            };
            responses.insert("413".into(), problem(description).into());
        }
        if operation.request_body.is_some() && !responses.contains_key("408") {
            responses.insert(
                "408".into(),
                problem("The body was still arriving at `--request-timeout-seconds`").into(),
            );
        }
    }
}

/// Every operation of `doc`.
fn operations_mut(
    doc: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    doc.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
    })
}

/// Declares every error answer with the media type it is sent with,
/// `application/problem+json` (the annotations say `body = Problem`, which
/// utoipa files under `application/json`). Modifiers cannot do this: they
/// run before the routers add their paths.
fn problems_as_problem_json(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    const PROBLEM: &str = "#/components/schemas/Problem";
    for operation in operations_mut(doc) {
        for response in operation.responses.responses.values_mut() {
            let RefOr::T(response) = response else {
                continue;
            };
            let is_problem = response.content.get("application/json").is_some_and(
                |c| matches!(&c.schema, Some(RefOr::Ref(r)) if r.ref_location == PROBLEM),
            );
            if is_problem {
                let content = response.content.shift_remove("application/json");
                response
                    .content
                    .extend(content.map(|c| ("application/problem+json".to_owned(), c)));
            }
        }
    }
}

/// Declares the headers every answer of a kind carries: `x-request-id` on
/// all, `Retry-After` on a 503, `WWW-Authenticate` on a 401 (see
/// [`crate::error::ApiError`]).
fn declare_headers(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let header = |description: &str| {
        HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::String))
            .description(Some(description))
            .build()
    };
    for operation in operations_mut(doc) {
        for (status, response) in &mut operation.responses.responses {
            let RefOr::T(response) = response else {
                continue;
            };
            response.headers.insert(
                "x-request-id".into(),
                header("The client's request id if usable, else one made for the request"),
            );
            match status.as_str() {
                "503" => {
                    response.headers.insert(
                        "Retry-After".into(),
                        header("Seconds to wait before retrying: `1`"),
                    );
                }
                "401" => {
                    response.headers.insert(
                        "WWW-Authenticate".into(),
                        header("`Bearer realm=\"attune-telemetry\"`"),
                    );
                }
                _ => {}
            }
        }
    }
}

/// Connects the engine, applies migrations and loads keys.
pub async fn build(config: Config) -> Result<App, String> {
    // Install the metrics recorder before anything records.
    crate::ops::metrics_handle();
    let keys = match &config.keys_file {
        Some(path) => KeyRing::load(path)?,
        None => {
            if !config.listen.ip().is_loopback() && !config.insecure_allow_anonymous {
                return Err(format!(
                    "refusing anonymous access on non-loopback address {}: \
                     configure --keys-file or pass --insecure-allow-anonymous",
                    config.listen
                ));
            }
            tracing::warn!("no --keys-file: every request is treated as an anonymous admin");
            KeyRing::anonymous()
        }
    };
    let engine = match &config.redis_url {
        None => Engine::Memory(Arc::new(MemoryEngine::new(config.stream_max_len))),
        Some(url) => {
            let engine = connect_redis(url, &config).await?;
            let applied = crate::migrate::run(&engine)
                .await
                .map_err(|e| format!("applying migrations failed: {e}"))?;
            if !applied.is_empty() {
                tracing::info!(?applied, "keyspace migrations applied");
            }
            Engine::Redis(Arc::new(engine))
        }
    };
    let usage = crate::usage::UsageSettings::load(&config, &engine).await?;
    let shutdown = CancellationToken::new();
    let hub = Hub::new(config.subscriber_buffer, shutdown.clone());
    let state = AppState::new(Shared {
        engine,
        hub,
        keys: Arc::new(keys),
        config: Arc::new(config),
        clock: crate::clock::Clock::default(),
        usage: Arc::new(usage),
        shutdown,
    });
    let router = router(state.clone());
    Ok(App { state, router })
}

/// Connects to Redis, retrying for a few seconds so that a service started
/// together with its Redis (compose, systemd) does not fail on a race.
async fn connect_redis(url: &str, config: &Config) -> Result<RedisEngine, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RedisEngine::connect(
            url,
            &config.key_prefix,
            config.redis_timeout,
            config.stream_max_len,
        )
        .await
        {
            Ok(engine) => return Ok(engine),
            Err(err @ EngineError::Refused(_)) => {
                return Err(format!("cannot use Redis at {}: {err}", redact(url)));
            }
            Err(err) if Instant::now() >= deadline => {
                return Err(format!("cannot reach Redis at {}: {err}", redact(url)));
            }
            Err(err) => {
                tracing::warn!(error = %err, "Redis not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Hides the passwords in a Redis URL for logs: the user info's and the
/// `pass` or `password` query parameter's (Unix socket URLs take it there).
/// A URL that does not parse is not shown at all: it may hold one anywhere.
fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(a URL that does not parse)".to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if matches!(&*key, "pass" | "password") {
                    "***".into()
                } else {
                    value
                };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Builds the router with every layer.
pub fn router(state: AppState) -> Router {
    let (api, _) = api_parts();
    let x_request_id = HeaderName::from_static("x-request-id");
    let config = state.config.clone();
    api.merge(crate::ops::docs_router())
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(
            RouteSettings {
                timeout: config.request_timeout,
                body_limit: config.body_limit_bytes,
                anonymous_origins: (!state.keys.requires_keys())
                    .then(|| Arc::new(config.allowed_origins.clone())),
                loopback_hosts_only: !state.keys.requires_keys()
                    && config.listen.ip().is_loopback(),
            },
            per_route,
        ))
        // One layer made of the whole stack: the router boxes each layer it is
        // given around every route, so a chain of `.layer` calls would cost an
        // allocation and a move of the response future per layer and request.
        .layer(
            tower::ServiceBuilder::new()
                .map_request(drop_unusable_request_id)
                .layer(SetRequestIdLayer::new(
                    x_request_id.clone(),
                    MakeRequestUuidV7,
                ))
                // One line per request, when it is answered (at debug level):
                // no "started processing" line before it. 5xx answers are
                // logged where they arise (an error; a storage outage as a
                // warning), not a second time here.
                .layer(
                    TraceLayer::new_for_http()
                        .on_request(())
                        .on_failure(())
                        .make_span_with(request_span),
                )
                .layer(PropagateRequestIdLayer::new(x_request_id))
                .option_layer(cors(&config.allowed_origins))
                .layer(
                    CompressionLayer::new().compress_when(
                        SizeAbove::new(COMPRESS_FROM_BYTES)
                            .and(NotForContentType::GRPC)
                            .and(NotForContentType::IMAGES)
                            .and(NotForContentType::SSE),
                    ),
                )
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(DefaultBodyLimit::max(config.body_limit_bytes)),
        )
        .with_state(state)
}

/// Longest `x-request-id` taken from a client; a longer one is replaced by
/// a new id (it would be written into every log line of the request).
const MAX_REQUEST_ID_LEN: usize = 128;

/// Replaces (by a new id) a client's `x-request-id` that is over
/// [`MAX_REQUEST_ID_LEN`], or not visible ASCII: the logs could not show
/// it as it was echoed, and in text logs a space would let a client write
/// fields of its own into every line of the request (`id} status=500`).
fn drop_unusable_request_id(mut req: Request) -> Request {
    let headers = req.headers_mut();
    if headers.get("x-request-id").is_some_and(|id| {
        id.len() > MAX_REQUEST_ID_LEN || !id.as_bytes().iter().all(u8::is_ascii_graphic)
    }) {
        headers.remove("x-request-id");
    }
    req
}

/// The span every log line of a request carries.
fn request_span(req: &Request) -> tracing::Span {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
}

/// Smallest body the server compresses. Most HTTP clients ask for gzip by
/// default, and a heartbeat's answer (an agent view, about 250 bytes) would
/// shrink by a few dozen bytes for a compressor set up per response and a
/// chunked body: about a third of the heartbeat throughput. Pages of
/// listings, history and the OpenAPI document are well above this.
const COMPRESS_FROM_BYTES: u16 = 1024;

/// Request ids are UUIDv7, like every other server-made id.
#[derive(Clone, Copy)]
struct MakeRequestUuidV7;

impl MakeRequestId for MakeRequestUuidV7 {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        HeaderValue::from_str(uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text))
            .ok()
            .map(RequestId::new)
    }
}

/// CORS for the configured origins; none configured, no CORS layer at all
/// (browsers on other origins are refused by their own same-origin rule).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER])
        .max_age(Duration::from_secs(600));
    Some(layer)
}

/// A path no route matches. Counted here under the route `unmatched`: the
/// per-route layer only wraps routes (a 405 on a known path goes through it).
async fn fallback(method: Method, uri: axum::http::Uri) -> ApiError {
    request_metrics(method, "unmatched", axum::http::StatusCode::NOT_FOUND)
        .0
        .increment(1);
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    metrics::counter!("attune_panics_total").increment(1);
    ApiError::Internal(format!("handler panicked: {detail}")).into_response()
}

/// What [`per_route`] needs.
#[derive(Clone)]
struct RouteSettings {
    /// `--request-timeout-seconds`.
    timeout: Duration,
    /// `--body-limit-bytes`: a body declared longer is refused before it
    /// is read (and before a client waiting on `Expect: 100-continue` is
    /// told to send it).
    body_limit: usize,
    /// Without a keys file, the origins besides the service's own from
    /// which a browser may call it (`--allowed-origins`); `None` with keys.
    anonymous_origins: Option<Arc<Vec<String>>>,
    /// Without a keys file on a loopback address: requests must name a
    /// loopback host.
    loopback_hosts_only: bool,
}

impl RouteSettings {
    /// Refuses a browser's request from another site when no keys file is
    /// loaded. Every caller is then an administrator, and a browser sends
    /// requests to a service on 127.0.0.1 from any page its user opens: a
    /// WebSocket (which no CORS rule covers) would hand the page the whole
    /// event log, and a form-like POST, which needs no CORS either, would
    /// forge heartbeats or cancel approvals. Browsers name the page's origin
    /// in `Origin` on exactly those requests; curl, SDKs and the CLI send
    /// none, and same-origin pages (the service's own `/docs`) pass.
    ///
    /// A page can also make itself the service's own origin: its site's
    /// name, pointed at 127.0.0.1 once the page is loaded (DNS rebinding),
    /// makes its requests same-origin, and its GETs carry no `Origin` at
    /// all. Such a request still names the page's site in `Host`, so on a
    /// loopback address a request must name a loopback host: `localhost`
    /// (or a name under it) or a loopback address.
    fn refuse_cross_site(&self, req: &Request) -> Option<ApiError> {
        let allowed = self.anonymous_origins.as_ref()?;
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        if self.loopback_hosts_only && !host.is_empty() && !is_loopback_host(host) {
            return Some(ApiError::Forbidden(format!(
                "host {host:?} is not this machine's loopback: without a keys file every \
                 caller is an administrator, so the service answers only requests sent to \
                 localhost or a loopback address"
            )));
        }
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return refuse_side_effects_from_other_sites(req);
        };
        let origin = origin.to_str().unwrap_or("");
        let same_origin = is_same_origin(origin, host);
        let listed = allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin));
        (!same_origin && !listed).then(|| {
            ApiError::Forbidden(format!(
                "origin {origin:?} may not call this service: without a keys file every caller \
                 is an administrator, so browsers may call only from the service's own origin \
                 or one in --allowed-origins"
            ))
        })
    }
}

/// Whether `origin` (`scheme://authority`) is the service's own, the one
/// the request names in `Host`.
pub(crate) fn is_same_origin(origin: &str, host: &str) -> bool {
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| !host.is_empty() && authority.eq_ignore_ascii_case(host))
}

/// Without a keys file, refuses a browser's request from another site that
/// carries no `Origin` and changes something. Browsers leave `Origin` off
/// the GETs of images, scripts and followed links, and one GET changes
/// state: a consuming inbox read, which a page could make in a user's
/// browser to empty an agent's inbox. `Sec-Fetch-Site` (sent by every
/// current browser, never by curl, SDKs or the CLI) tells such a request
/// apart; reads from another site stay allowed (their answers are opaque
/// to the page), so a link to the API still opens.
fn refuse_side_effects_from_other_sites(req: &Request) -> Option<ApiError> {
    let site = req.headers().get("sec-fetch-site")?.as_bytes();
    if site.eq_ignore_ascii_case(b"same-origin") || site.eq_ignore_ascii_case(b"none") {
        return None;
    }
    let safe = req.method() == Method::GET || req.method() == Method::HEAD;
    let consumes = req.uri().query().is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes())
            .any(|(k, v)| k == "consume" && v.trim().eq_ignore_ascii_case("true"))
    });
    (!safe || consumes).then(|| {
        ApiError::Forbidden(
            "a browser's request from another site may not change anything: without a keys \
             file every caller is an administrator"
                .into(),
        )
    })
}

/// Whether a `Host` value (with or without a port) names the loopback
/// interface: `localhost`, a name under it, or a loopback address.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or(bracketed, |(ip, _)| ip),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Per-route work, in one layer: the time limit, then the request counter
/// and latency histogram by matched route (timeouts included).
///
/// The time limit is `--request-timeout-seconds` plus the `wait_seconds` a
/// request asked for (long polls may wait up to 60 s by design). WebSocket
/// and SSE responses return at once, so their streams are not limited by it.
async fn per_route(State(settings): State<RouteSettings>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = metric_method(req.method());
    let started = Instant::now();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let response = if let Some(refusal) = settings.refuse_cross_site(&req) {
        refusal.into_response()
    } else if declared.is_some_and(|n| n > settings.body_limit as u64) {
        ApiError::PayloadTooLarge(format!(
            "request body is too large (limit {} bytes)",
            settings.body_limit
        ))
        .into_response()
    } else {
        let wait = req
            .uri()
            .query()
            .and_then(|q| {
                // As the handlers read it: a blank value is absent.
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, v)| k == "wait_seconds" && !v.trim().is_empty())
                    .and_then(|(_, v)| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
            .min(60);
        let limit = settings.timeout + Duration::from_secs(wait);
        let mut handled =
            std::pin::pin!(BODY.scope(std::cell::Cell::new(BodyProgress::Unread), next.run(req)));
        match tokio::time::timeout(limit, handled.as_mut()).await {
            Ok(response) => response,
            // The client's delay, not the service's: nothing to retry
            // shortly.
            Err(_)
                if handled
                    .as_mut()
                    .take_value()
                    .is_some_and(|body| body.get() == BodyProgress::Arriving) =>
            {
                ApiError::BodyTimeout(limit.as_secs()).into_response()
            }
            Err(_) => ApiError::Timeout.into_response(),
        }
    };
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let (count, duration) = request_metrics(method, route, response.status());
    count.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    response
}

tokio::task_local! {
    /// How far the handler of the request being served got reading its
    /// body (see [`BodyProgress`]).
    static BODY: std::cell::Cell<BodyProgress>;
}

/// How far a request's body has been read: a request cut by the time limit
/// while its body is still arriving is answered 408 (the client is slow to
/// send it), not 503. A body the handler never started reading, or read
/// whole before it waited on storage, leaves the 503. (A server too busy
/// to read a body that did arrive would say 408 too; its other requests
/// say 503.)
///
/// Bodies are read by [`crate::extract::ValidJson`], which marks the
/// progress in a task-local value of the request's task: no allocation,
/// nothing shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyProgress {
    Unread,
    Arriving,
    Read,
}

impl BodyProgress {
    /// Records how far the current request's body has been read. Outside
    /// [`per_route`] (a router without it) there is nothing to record.
    pub(crate) fn mark(self) {
        let _ = BODY.try_with(|progress| progress.set(self));
    }
}

/// The request counter and latency histogram of one method, route and
/// status, registered on first use: a request then costs one map lookup
/// (by the borrowed route, no allocation) instead of building label sets
/// and searching the registry twice. The set is bounded: routes, methods
/// and status codes.
/// The method as the request metrics label it: a client may send any
/// token as a method (every one a new series, from anyone, even on
/// `/healthz`), so the standard methods are named and any other is `OTHER`.
fn metric_method(method: &Method) -> Method {
    static OTHER: std::sync::LazyLock<Method> =
        std::sync::LazyLock::new(|| Method::from_bytes(b"OTHER").expect("a valid token"));
    match *method {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS
        | Method::PATCH
        | Method::TRACE
        | Method::CONNECT => method.clone(),
        _ => OTHER.clone(),
    }
}

fn request_metrics(
    method: Method,
    route: &str,
    status: axum::http::StatusCode,
) -> (metrics::Counter, metrics::Histogram) {
    type Handles = (Method, u16, metrics::Counter, metrics::Histogram);
    type ByRoute = std::collections::HashMap<String, Vec<Handles>>;
    static HANDLES: std::sync::OnceLock<std::sync::RwLock<ByRoute>> = std::sync::OnceLock::new();
    let status = status.as_u16();
    let find = |handles: &[Handles]| {
        handles
            .iter()
            .find(|(m, s, ..)| *m == method && *s == status)
            .map(|(.., count, duration)| (count.clone(), duration.clone()))
    };
    let by_route = HANDLES.get_or_init(Default::default);
    if let Some(found) = by_route
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(route)
        .and_then(|handles| find(handles))
    {
        return found;
    }
    let mut by_route = by_route
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let handles = by_route.entry(route.to_owned()).or_default();
    if let Some(found) = find(handles) {
        return found;
    }
    let (name, route) = (method.to_string(), route.to_owned());
    let count = metrics::counter!("attune_http_requests_total", "method" => name.clone(), "route" => route.clone(), "status" => status.to_string());
    let duration = metrics::histogram!("attune_http_request_duration_seconds", "method" => name, "route" => route);
    handles.push((method, status, count.clone(), duration.clone()));
    (count, duration)
}

/// A running server's background work: the event tailer and the sweepers.
fn spawn_background(state: &AppState) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        state
            .hub
            .spawn_tailer(state.engine.clone(), state.shutdown.clone()),
    ];
    tasks.push(crate::agents::spawn_sweeper(state.clone()));
    tasks.push(crate::ops::spawn_metrics_upkeep(state.shutdown.clone()));
    tasks.push(crate::approvals::spawn_sweeper(state.clone()));
    tasks.extend(crate::signals::spawn_sweeper(state.clone()));
    tasks
}

/// Serves `app` on `listener` until `shutdown` completes; then stops
/// accepting, tells long polls and WebSockets, and waits up to
/// `--shutdown-grace-seconds` for in-flight requests.
pub async fn serve(
    app: App,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let App { state, router } = app;
    let tasks = spawn_background(&state);
    let token = state.shutdown.clone();
    let grace = state.config.shutdown_grace;
    let signal = {
        let token = token.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            token.cancel();
        }
    };
    let server = serve_connections(listener, router, state.config.header_read_timeout, signal);
    // WebSockets are upgraded connections, which the server no longer
    // tracks: it would return while sockets still have their close frame
    // (and where to resume) to send, and the process would end without
    // them. So serving ends when the server is done and every WebSocket and
    // SSE client has been sent its end, within the same grace period.
    let hub = state.hub.clone();
    let server = async move {
        server.await;
        hub.clients_gone().await;
        Ok(())
    };
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
            Ok(())
        }
    };
    token.cancel();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    result
}

/// Accepts connections and serves `router` on each until `signal`
/// completes; then stops accepting, lets every connection finish its
/// request in flight, and returns when all have closed.
///
/// This is `axum::serve` with one difference: hyper is given a timer, and
/// so a time limit on reading each request's head (`header_read_timeout`,
/// counted from when the connection is ready for its next request). Without
/// one a client could hold connections open without end by sending a
/// head a byte at a time, or nothing at all (a file descriptor each, and
/// no key needed).
async fn serve_connections(
    mut listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::sync::watch;
    use tower::ServiceExt;

    // Dropped when `signal` completes: each connection then shuts down
    // gracefully.
    let (stop_tx, stop_rx) = watch::channel(());
    tokio::spawn(async move {
        signal.await;
        drop(stop_rx);
    });
    // Every connection holds a receiver; all gone, serving is done.
    let (open_tx, open_rx) = watch::channel(());
    // Errors accepting (too many open files, a connection reset before it
    // was taken) are logged and waited out by axum's listener.
    loop {
        let (tcp, _) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = stop_tx.closed() => break,
        };
        // Small writes (WebSocket frames, SSE events) go out at once:
        // without TCP_NODELAY, Nagle holds each frame until the previous
        // one is acked, and delayed ACKs turn that into tens of ms.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let service = hyper_util::service::TowerToHyperService::new(router.clone().map_request(
            |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
        ));
        let stop = stop_tx.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::trace!(error = %err, "connection ended with an error");
                    }
                }
                () = stop.closed() => {
                    connection.as_mut().graceful_shutdown();
                    if let Err(err) = connection.await {
                        tracing::trace!(error = %err, "connection ended with an error");
                    }
                }
            }
            drop(open);
        });
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
}

/// Builds and serves in one call: what `attune-telemetry serve` does.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let app = build(config).await?;
    serve(app, listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::{panic_response, redact};
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    use tower_http::catch_panic::CatchPanicLayer;

    #[tokio::test]
    async fn a_panicking_handler_becomes_a_500_problem() {
        let app = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    panic!("kaboom");
                    #[allow(unreachable_code)]
                    ""
                }),
            )
            .layer(CatchPanicLayer::custom(panic_response));
        let resp = app
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            !text.contains("kaboom"),
            "panic detail stays server-side: {text}"
        );
    }

    #[test]
    fn redis_passwords_are_redacted() {
        assert_eq!(
            redact("redis://:secret@host:6379"),
            "redis://:***@host:6379"
        );
        assert_eq!(redact("redis://user:secret@host"), "redis://user:***@host");
        assert_eq!(redact("redis://default:pa:ss@h"), "redis://default:***@h");
        assert_eq!(redact("redis://:p@ss@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("redis://user@host"), "redis://user@host");
        assert_eq!(
            redact("redis+unix:///run/r.sock?db=2&pass=secret"),
            "redis+unix:///run/r.sock?db=2&pass=***"
        );
        assert_eq!(
            redact("redis+unix:///r.sock?password=a@b"),
            "redis+unix:///r.sock?password=***"
        );
        assert!(!redact("redis://:p w@h").contains("p w"));
    }
}
