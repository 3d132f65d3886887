//! attune-telemetry: telemetry and coordination for multi-agent AI systems.
//!
//! Agents send heartbeats, exchange typed signals, ask people for approval
//! and record what their LLM calls cost, over plain HTTP; people and
//! dashboards watch everything live over WebSocket or SSE.
//!
//! # How a request flows
//!
//! `main.rs` parses the command line ([`config`]) and either runs a client
//! command ([`cli`]) or calls [`app::run`]. The [`app`] builds the router:
//! tower-http layers (request id, tracing, CORS, compression, catch-panic,
//! time limit), then one handler per operation. A handler extracts the
//! caller with the role it needs ([`auth::Caller`]), parses its input into
//! checked types ([`extract`], [`types`]), and calls a domain-named engine
//! operation. The [`engine`] is the memory engine or Redis; each operation
//! changes state *and* appends to the event log in one atomic step. Errors
//! of every kind become problem+json ([`error`]).
//!
//! Live delivery runs the other way: one tailer per process reads the event
//! log and fans out in-process ([`events::hub`]) to WebSocket/SSE
//! subscribers and to long-poll waiters (signal inboxes, approval waits).
//!
//! # Modules
//!
//! - [`agents`] — heartbeats, liveness states, the down sweeper, runs.
//! - [`signals`] — typed signals, targeted or broadcast, with TTLs.
//! - [`approvals`] — human approval gates and their state machine.
//! - [`events`] — the event log, history, WebSocket and SSE streams.
//! - [`usage`] — LLM usage records, cost savings, cache statistics.
//! - [`feedback`] — quality feedback, tier recommendations, templates.
//! - [`app`], [`auth`], [`clock`], [`config`], [`error`], [`extract`], [`types`],
//!   [`engine`], [`migrate`], [`ops`], [`sweeper`] — the cross-cutting pieces.
//! - [`cli`] — the client commands of the same binary.

pub mod agents;
pub mod app;
pub mod approvals;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod extract;
pub mod feedback;
pub mod migrate;
pub mod ops;
pub mod signals;
pub mod sweeper;
pub mod types;
pub mod usage;
