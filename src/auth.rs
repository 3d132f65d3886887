//! API keys, roles and the one reusable role check.
//!
//! Keys live in a TOML file of `[[keys]]` tables holding the SHA-256 of each
//! secret (never the secret). A request presents `Authorization: Bearer
//! <secret>` (WebSocket and SSE may use `?access_token=` instead, because
//! browsers cannot set headers on a WebSocket). The presented secret is
//! hashed and its digest looked up among the stored ones: the lookup's
//! timing depends only on that digest, which says nothing about a secret
//! and cannot be steered towards a stored digest without a preimage, so the
//! cost of a request does not grow with the number of keys.
//!
//! Handlers declare what they need in their signature: `Caller<Viewer>`,
//! `Caller<AgentWrite>`, `Caller<Decide>`, `Caller<Admin>`. The extractor
//! authenticates and checks the role before the handler runs; agent-id scope
//! checks are one call on the [`Identity`].

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::{header, request::Parts};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use wildmatch::WildMatch;

use crate::error::ApiError;
use crate::types::Id;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Writes heartbeats, signals, approvals, usage, feedback and events for
    /// the agent ids in its scope; reads agents, its own inbox and approvals.
    Agent,
    /// Everything a viewer can, plus deciding approvals.
    Approver,
    /// Reads everything and subscribes to events.
    Viewer,
    /// Everything, plus deleting agents and clearing data.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Approver => "approver",
            Self::Viewer => "viewer",
            Self::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The key's name: recorded as event `source` and approval `responder`.
    pub name: String,
    pub role: Role,
    /// Agent ids the key may act as (`None`: any).
    scope: Option<Vec<WildMatch>>,
}

impl Identity {
    /// The identity of every request when no keys file is configured.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
            scope: None,
        }
    }

    /// Whether this caller may act as (or read the private data of) `agent`.
    pub fn may_act_as(&self, agent: &Id) -> bool {
        self.scope
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(agent.as_str())))
    }

    /// 403 unless this caller may act as `agent` (writes).
    pub fn ensure_may_act_as(&self, agent: &Id, field: &str) -> Result<(), ApiError> {
        if self.may_act_as(agent) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "key {:?} may not act as agent {agent:?} ({field})",
                self.name
            )))
        }
    }

    /// Checks the optional `agent` a record is written for. A key limited
    /// to some agents writes only for those, so it must name one: a record
    /// for no agent would be outside its scope.
    pub fn ensure_may_write_for(&self, agent: Option<&Id>, field: &str) -> Result<(), ApiError> {
        match agent {
            Some(agent) => self.ensure_may_act_as(agent, field),
            None if self.is_agent() && !self.may_act_as_any() => Err(ApiError::invalid(
                field,
                "required for keys limited to some agents",
            )),
            None => Ok(()),
        }
    }

    /// Whether this caller may act as every agent id (no scope).
    pub fn may_act_as_any(&self) -> bool {
        self.scope.is_none()
    }

    /// Whether this caller is an agent key limited to its own data. Such
    /// callers get 404 (not 403) for other agents' inboxes and approvals.
    pub fn is_agent(&self) -> bool {
        self.role == Role::Agent
    }
}

/// A capability a handler requires; implemented by marker types.
pub trait Capability: Send + Sync + 'static {
    /// Describes the capability in 403 messages.
    const NAME: &'static str;
    /// Whether `?access_token=` is accepted (WebSocket and SSE only).
    const QUERY_TOKEN: bool = false;
    fn allows(role: Role) -> bool;
}

/// Any valid key.
pub struct AnyRole;
/// Read everything: viewer, approver, admin.
pub struct Viewer;
/// Subscribe to the live event stream (WebSocket/SSE): viewer and above.
pub struct Subscribe;
/// Write agent data (heartbeats, signals, approvals, usage, …): agent, admin.
pub struct AgentWrite;
/// Decide approvals: approver, admin.
pub struct Decide;
/// Administrative operations: admin.
pub struct Admin;

impl Capability for AnyRole {
    const NAME: &'static str = "any role";
    fn allows(_: Role) -> bool {
        true
    }
}
impl Capability for Viewer {
    const NAME: &'static str = "viewer, approver or admin";
    fn allows(role: Role) -> bool {
        matches!(role, Role::Viewer | Role::Approver | Role::Admin)
    }
}
impl Capability for Subscribe {
    const NAME: &'static str = "viewer, approver or admin";
    const QUERY_TOKEN: bool = true;
    fn allows(role: Role) -> bool {
        Viewer::allows(role)
    }
}
impl Capability for AgentWrite {
    const NAME: &'static str = "agent or admin";
    fn allows(role: Role) -> bool {
        matches!(role, Role::Agent | Role::Admin)
    }
}
impl Capability for Decide {
    const NAME: &'static str = "approver or admin";
    fn allows(role: Role) -> bool {
        matches!(role, Role::Approver | Role::Admin)
    }
}
impl Capability for Admin {
    const NAME: &'static str = "admin";
    fn allows(role: Role) -> bool {
        role == Role::Admin
    }
}

/// The authenticated caller of a handler, checked against capability `C`.
pub struct Caller<C: Capability> {
    pub identity: Identity,
    _capability: PhantomData<C>,
}

impl<C: Capability> std::ops::Deref for Caller<C> {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.identity
    }
}

impl<S, C> FromRequestParts<S> for Caller<C>
where
    C: Capability,
    Arc<KeyRing>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ring = Arc::<KeyRing>::from_ref(state);
        let token = bearer(parts).or_else(|| {
            C::QUERY_TOKEN
                .then(|| query_token(parts.uri.query().unwrap_or("")))
                .flatten()
        });
        let identity = ring.authenticate(token.as_deref())?;
        if !C::allows(identity.role) {
            let article = if C::NAME.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            return Err(ApiError::Forbidden(format!(
                "this operation needs {article} {} key; key {:?} is {}",
                C::NAME,
                identity.name,
                identity.role.as_str()
            )));
        }
        Ok(Self {
            identity,
            _capability: PhantomData,
        })
    }
}

fn bearer(parts: &Parts) -> Option<String> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

/// One `[[keys]]` entry of the keys file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    role: Role,
    sha256: String,
    #[serde(default)]
    agents: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

/// The configured keys, or anonymous access when there is no keys file.
pub struct KeyRing {
    /// Identities by the SHA-256 of their secret.
    keys: Option<HashMap<[u8; 32], Identity>>,
}

impl std::fmt::Debug for KeyRing {
    /// Names only: hashes stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Option<std::collections::BTreeSet<&str>> = self
            .keys
            .as_ref()
            .map(|keys| keys.values().map(|k| k.name.as_str()).collect());
        f.debug_struct("KeyRing").field("keys", &names).finish()
    }
}

impl KeyRing {
    /// Every request is the anonymous admin.
    pub fn anonymous() -> Self {
        Self { keys: None }
    }

    /// Whether requests need a key.
    pub fn requires_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// Loads a keys file; the error is one line naming the problem.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read keys file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("keys file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: KeysFile =
            toml::from_str(text).map_err(|e| crate::config::toml_error(text, &e))?;
        if file.keys.is_empty() {
            return Err("no [[keys]] entries".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut keys: HashMap<[u8; 32], Identity> = HashMap::with_capacity(file.keys.len());
        for entry in file.keys {
            check_key_name(&entry.name)?;
            if !names.insert(entry.name.clone()) {
                return Err(format!("duplicate key name {:?}", entry.name));
            }
            let bytes = hex::decode(&entry.sha256)
                .ok()
                .filter(|b| b.len() == 32 && entry.sha256.bytes().all(|c| !c.is_ascii_uppercase()))
                .ok_or_else(|| {
                    format!(
                        "key {:?}: sha256 must be 64 lower-case hex characters",
                        entry.name
                    )
                })?;
            if entry.agents.is_some() && entry.role != Role::Agent {
                return Err(format!(
                    "key {:?}: `agents` applies only to keys with role agent",
                    entry.name
                ));
            }
            if let Some(patterns) = &entry.agents {
                check_agent_patterns(&entry.name, patterns)?;
            }
            let scope = entry
                .agents
                .map(|patterns| patterns.iter().map(|p| WildMatch::new(p)).collect());
            let hash: [u8; 32] = bytes.try_into().expect("length checked");
            let identity = Identity {
                name: entry.name,
                role: entry.role,
                scope,
            };
            if let Some(other) = keys.get(&hash) {
                return Err(format!(
                    "keys {:?} and {:?} have the same secret",
                    other.name, identity.name
                ));
            }
            keys.insert(hash, identity);
        }
        Ok(Self { keys: Some(keys) })
    }

    /// Finds the identity for a presented secret.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, ApiError> {
        let Some(keys) = &self.keys else {
            return Ok(Identity::anonymous());
        };
        let token = token.ok_or_else(|| {
            ApiError::Unauthorized("missing credentials: send Authorization: Bearer <key>".into())
        })?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        keys.get(&presented)
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))
    }
}

/// Names the service gives callers itself, which no key may take: an
/// approval decided by `system` timed out, and `anonymous` is every caller
/// when no keys file is loaded.
const RESERVED_KEY_NAMES: [&str; 2] = [crate::approvals::SYSTEM, "anonymous"];

/// Refuses a key name that would pass for one of the service's own.
fn check_key_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.trim() != name || name.chars().any(char::is_control) {
        return Err(format!(
            "key name {name:?} must be visible text without spaces around it: it is \
             recorded as event source and approval responder"
        ));
    }
    if RESERVED_KEY_NAMES
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "key name {name:?} is reserved: the service uses it for itself"
        ));
    }
    Ok(())
}

/// An agent key's `agents` patterns must each be able to match an agent
/// id (1–128 letters, digits, `.`, `_`, `-`, starting with a letter or a
/// digit; patterns add `*` and `?`), and there must be one: a key that may
/// act as no agent could do nothing.
fn check_agent_patterns(name: &str, patterns: &[String]) -> Result<(), String> {
    if patterns.is_empty() {
        return Err(format!(
            "key {name:?}: `agents = []` admits no agent; leave `agents` out for every agent"
        ));
    }
    for pattern in patterns {
        // Every character but `*` stands for exactly one of the id's.
        let usable = pattern
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'?'))
            && pattern.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*' | b'?')
            })
            && pattern.bytes().filter(|&b| b != b'*').count() <= crate::types::MAX_ID_LEN;
        if !usable {
            return Err(format!(
                "key {name:?}: agents pattern {pattern:?} can match no agent id (1 to {} \
                 letters, digits, `.`, `_`, `-`, starting with a letter or a digit; with `*` \
                 and `?`)",
                crate::types::MAX_ID_LEN
            ));
        }
    }
    Ok(())
}

/// A fresh secret and the `[[keys]]` entry that admits it.
pub fn new_key(name: &str, role: Role, agents: &[String]) -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let secret = format!("atk_{}", hex::encode(bytes));
    let hash = crate::types::sha256_hex(&secret);
    let mut entry = format!(
        "[[keys]]\nname = {}\nrole = \"{}\"\nsha256 = \"{hash}\"\n",
        toml_string(name),
        role.as_str()
    );
    if !agents.is_empty() {
        let list: Vec<String> = agents.iter().map(|a| toml_string(a)).collect();
        entry.push_str(&format!("agents = [{}]\n", list.join(", ")));
    }
    (secret, entry)
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_authenticates_with_its_role_and_scope() {
        let (secret, entry) = new_key("ci", Role::Agent, &["ci-*".into()]);
        let ring = KeyRing::parse(&entry).unwrap();
        let id = ring.authenticate(Some(&secret)).unwrap();
        assert_eq!(id.name, "ci");
        assert_eq!(id.role, Role::Agent);
        assert!(id.may_act_as(&Id::new("ci-7").unwrap()));
        assert!(!id.may_act_as(&Id::new("prod-1").unwrap()));
        assert!(ring.authenticate(Some("wrong")).is_err());
        assert!(ring.authenticate(None).is_err());
    }

    #[test]
    fn any_of_many_keys_authenticates_and_a_shared_secret_is_refused() {
        let keys: Vec<(String, String)> = (0..300)
            .map(|i| new_key(&format!("k{i}"), Role::Agent, &[]))
            .collect();
        let file: String = keys.iter().map(|(_, entry)| entry.as_str()).collect();
        let ring = KeyRing::parse(&file).unwrap();
        for (i, (secret, _)) in keys.iter().enumerate() {
            assert_eq!(
                ring.authenticate(Some(secret)).unwrap().name,
                format!("k{i}")
            );
        }
        let hash = &keys[7].1[keys[7].1.find("sha256").unwrap()..];
        let twin = format!(
            "{}[[keys]]\nname = \"twin\"\nrole = \"viewer\"\n{hash}",
            keys[0].1
        );
        let err = KeyRing::parse(&format!("{twin}{}", keys[7].1)).unwrap_err();
        assert!(err.contains("same secret"), "{err}");
    }

    #[test]
    fn malformed_keys_files_are_refused_with_a_reason() {
        assert!(KeyRing::parse("").unwrap_err().contains("no [[keys]]"));
        let bad_hash = "[[keys]]\nname='a'\nrole='admin'\nsha256='ABC'\n";
        assert!(KeyRing::parse(bad_hash).unwrap_err().contains("sha256"));
        let bad_role = format!(
            "[[keys]]\nname='a'\nrole='root'\nsha256='{}'\n",
            "0".repeat(64)
        );
        // Where the mistake is, and what it is, on one line.
        let err = KeyRing::parse(&bad_role).unwrap_err();
        assert!(err.starts_with("line 3: unknown variant `root`"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let scoped_admin = format!(
            "[[keys]]\nname='a'\nrole='admin'\nsha256='{}'\nagents=['x']\n",
            "0".repeat(64)
        );
        assert!(
            KeyRing::parse(&scoped_admin)
                .unwrap_err()
                .contains("agents")
        );
        for name in ["system", "anonymous", "System", "ANONYMOUS"] {
            let (_, entry) = new_key(name, Role::Approver, &[]);
            let err = KeyRing::parse(&entry).unwrap_err();
            assert!(err.contains("reserved"), "{name}: {err}");
        }
        for name in ["", " ", "system ", " ops", "a\nb"] {
            let (_, entry) = new_key(name, Role::Approver, &[]);
            let err = KeyRing::parse(&entry).unwrap_err();
            assert!(err.contains("visible text"), "{name:?}: {err}");
        }
    }

    /// Keys that could never act for any agent are refused, not loaded
    /// silently.
    #[test]
    fn agent_patterns_must_be_able_to_match_an_agent() {
        let with = |agents: &str| {
            KeyRing::parse(&format!(
                "[[keys]]\nname='a'\nrole='agent'\nsha256='{}'\nagents={agents}\n",
                "0".repeat(64)
            ))
        };
        assert!(with("[]").unwrap_err().contains("admits no agent"));
        let long = format!("['{}']", "a".repeat(129));
        for bad in [
            "['']", "['a b']", "['ci:*']", "['-*']", "['_x']", "['.*']", &long,
        ] {
            assert!(
                with(bad).unwrap_err().contains("can match no agent id"),
                "{bad}"
            );
        }
        assert!(with("['ci-*', 'agent-?', 'x.y_z', '*-x', '?.x']").is_ok());
        assert!(with(&format!("['{}*']", "a".repeat(128))).is_ok());
    }

    #[test]
    fn roles_grant_exactly_the_matrix() {
        assert!(AgentWrite::allows(Role::Agent) && !AgentWrite::allows(Role::Viewer));
        assert!(Decide::allows(Role::Approver) && !Decide::allows(Role::Agent));
        assert!(Viewer::allows(Role::Approver) && !Viewer::allows(Role::Agent));
        assert!(Admin::allows(Role::Admin) && !Admin::allows(Role::Approver));
    }
}
