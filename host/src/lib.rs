//! Tocsin: a multi-tenant streaming alert engine. Tenants' rules are
//! WebAssembly components run in a sandbox ([`runtime`]); events
//! ([`event`]) are filtered and grouped into per-rule buckets ([`batch`]) and
//! evaluated batch by batch ([`pipeline`]), raising [`alert`]s. The service
//! ([`serve`]) feeds submitted batches through the [`processor`], which
//! commits to a [`store`] and publishes to a [`sink`].

pub mod alert;
pub mod aws;
pub mod backoff;
pub mod batch;
pub mod bench;
pub mod catalogue;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod event;
pub mod ingest;
pub mod pipeline;
pub mod processor;
pub mod rule_test;
pub mod runtime;
pub mod seed;
pub mod serve;
pub mod server;
pub mod sink;
pub mod source;
pub mod store;
