//! The `tocsin` command's own work, apart from the library a host embeds:
//! the demo, the load benchmark, the seed's machine simulator, `rule
//! test`, `rule new`, and the client of a host's API. Each drives the library through its public API.

pub mod bench;
pub mod client;
pub mod demo;
pub mod rule_test;
pub mod scaffold;
pub mod seed;
