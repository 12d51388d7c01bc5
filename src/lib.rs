//! hl7-fhir-gateway: an on-premise bridge from HL7 v2 feeds to FHIR R4.
//!
//! # Data flow
//! An EMR connects over MLLP (optionally TLS). Each frame is decoded by its MSH-18
//! character set, its header checked, and its exact bytes committed to the journal in
//! SQLite before the ACK goes out. Duplicates (same sender, MSH-10 and content) get the
//! original ACK. The pipeline then converts each journaled message through the mapping
//! engine and stores the resources (current version and history, with search indexes) in
//! the same database, in arrival order; the FHIR API at `/fhir` serves them to downstream
//! apps under bearer-token auth. Operators watch `/health/*`, `/metrics` and `/admin`.
//!
//! # Layout
//! - [`hl7`]: v2 syntax (charsets, MSH, ACK builder, file splitting). Pure, a leaf.
//! - [`mllp`]: framing codec, ingest verdicts, listener, TLS, client.
//! - [`journal`]: durable inbound log with group commit and duplicate detection.
//! - [`db`]: SQLite opening, durability pragmas, migrations.
//! - [`mapping`]: the declarative v2 → FHIR R4 mapping engine. Pure, imports `hl7` and `fhir`.
//! - [`fhir`]: deterministic ids, R4 validation. A leaf.
//! - [`pipeline`]: journal → decode → map → store, one transaction per batch; requeue.
//! - [`outbox`]: durable queue of transaction Bundles and the aggregator push worker.
//! - [`store`]: resource versions, history, search parameters as data, search.
//! - [`api`]: the FHIR R4 REST API and the operator API (axum).
//! - [`auth`]: JWT bearer tokens, JWKS, SMART scopes.
//! - [`http`]: health and metrics endpoints, HTTPS serving.
//! - [`config`], [`setting`]: the YAML file, env overrides, validation.
//! - [`telemetry`]: tracing set-up and every metric.
//! - [`priority`]: the lower CPU priority of the threads behind the ACK path.
//! - [`server`]: wiring and graceful shutdown.
//! - [`commands`]: the `send`, `health`, `convert` and operator (`messages`) clients.
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod commands;
pub mod config;
pub mod db;
pub mod fhir;
pub mod hl7;
pub mod http;
pub mod journal;
pub mod mapping;
pub mod mllp;
pub mod outbox;
pub mod pipeline;
pub mod priority;
pub mod server;
pub mod setting;
pub mod store;
pub mod telemetry;
