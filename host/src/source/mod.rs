//! Where events come from, each source handing the engine batches of one
//! partition in order: HTTP ingest ([`http`], `POST /v1/events`), a Kinesis
//! stream shared by many hosts ([`shards`], reading through [`kinesis`]
//! under [`leases`]), and an NDJSON file replayed ([`file`]).

pub mod file;
pub mod http;
pub mod ingest;
pub mod kinesis;
pub mod leases;
pub mod shards;
mod timers;
