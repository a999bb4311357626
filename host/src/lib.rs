//! Tocsin: a multi-tenant streaming alert engine. Tenants' rules are
//! WebAssembly components run in a sandbox ([`runtime`]); events
//! ([`event`]) are filtered and grouped into per-rule buckets ([`batch`]) and
//! evaluated batch by batch ([`pipeline`]), raising [`alert`]s.

pub mod alert;
pub mod batch;
pub mod clock;
pub mod event;
pub mod pipeline;
pub mod rule_test;
pub mod runtime;
