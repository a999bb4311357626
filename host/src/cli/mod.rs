//! The `tocsin` command's own work, apart from the library a host embeds:
//! the demo, the load benchmark, the seed's machine simulator and
//! `rule test`. Each drives the library through its public API.

pub mod bench;
pub mod demo;
pub mod rule_test;
pub mod seed;
