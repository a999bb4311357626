//! Where events come from besides `POST /v1/events`: a Kinesis stream
//! ([`kinesis`]) shared by many hosts through [`leases`].

pub mod kinesis;
pub mod leases;
