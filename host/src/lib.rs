//! Tocsin: a multi-tenant streaming alert engine. Tenants' rules are
//! WebAssembly components run in a sandbox ([`runtime`]). Every deployment
//! runs one [`engine`]: a [`source`] hands it batches of [`event`]s, it
//! routes them into per-rule buckets, runs the rules, commits to a
//! [`store`] and publishes [`alert`]s to a [`sink`]. Which rules run comes
//! from the [`catalogue`]: the config's, and the [`registry`]'s uploaded
//! versions, which every host follows. [`serve`] wires the backends a
//! [`config`] names, with the HTTP [`api`] in front.
//!
//! This is what a host embeds and what the tests drive. The `tocsin`
//! command's own work (demo, bench, simulate, rule test) lives in the
//! binary, not here.

pub mod alert;
pub mod api;
pub mod auth;
#[cfg(feature = "aws")]
pub mod aws;
pub(crate) mod backoff;
pub mod catalogue;
pub mod clock;
pub mod config;
pub mod engine;
pub mod event;
pub mod metrics;
pub mod quota;
pub mod registry;
pub(crate) mod rule_log;
pub mod runtime;
pub mod serve;
pub mod sink;
pub mod source;
pub mod store;
pub mod timestamp;
