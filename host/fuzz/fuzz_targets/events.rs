//! Any bytes as a `POST /v1/events` body, a Kinesis record and a replayed
//! file: parsing never panics, every line is an event or a rejection with a
//! reason, and each event routes (filter, bucket key, event time, the
//! column table) without panicking.

#![no_main]

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::Record;
use libfuzzer_sys::fuzz_target;
use tocsin::engine::route;
use tocsin::event::Incoming;
use tocsin::runtime::{Condition, EventBatch, EventTime, Manifest, Scalar, Test};
use tocsin::source::{file::FileSource, ingest, kinesis};

fn manifest(event_time: EventTime) -> Manifest {
    Manifest {
        name: "fuzz".into(),
        version: "0.0.0".into(),
        filter: vec![Condition {
            field: "eventType".into(),
            test: Test::OneOf(vec![
                Scalar::Text("machineStatusChange".into()),
                Scalar::Integer(1),
                Scalar::Float(1.5),
                Scalar::Boolean(true),
                Scalar::Null,
            ]),
        }],
        bucket_key: vec!["machineId".into(), "obj".into()],
        fields: vec!["state".into(), "n".into(), "obj".into(), "missing".into()],
        raw_json: true,
        event_time,
        state_ttl_ms: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let limit = 4096;
    if let Ok(parsed) = ingest::parse(&text, "clientId", "fuzz", 0, limit) {
        assert_eq!(parsed.events.len(), parsed.lines.len());
        for rejected in &parsed.rejected {
            assert!(!rejected.error.is_empty());
        }
        let events: Vec<&Incoming> = parsed.events.iter().collect();
        for event in &events {
            assert!(!event.tenant.is_empty());
            assert!(event.raw.len() <= limit);
        }
        for time in [EventTime::Arrival, EventTime::Field("time".into())] {
            let manifest = manifest(time);
            let (buckets, unroutable) = route::route(&manifest, &events);
            for bucket in &buckets {
                let EventBatch { times, kinds, values, .. } = &bucket.batch;
                assert_eq!(times.len(), bucket.members.len());
                assert_eq!(kinds.len(), values.len());
                assert!(bucket.key.len() <= route::MAX_BUCKET_KEY_BYTES);
            }
            for bad in unroutable {
                assert!(!bad.reason.is_empty());
            }
        }
    }

    let record = Record::builder()
        .sequence_number("49590338271490256608559692538361571095921575989136588898")
        .partition_key("fuzz")
        .data(Blob::new(data))
        .build()
        .expect("a record");
    let (events, bad) = kinesis::events("shard-0", &record, "clientId", 0, limit);
    for letter in &bad {
        assert!(!letter.reason.is_empty() && !letter.cause.is_empty());
    }
    assert!(events.len() + bad.len() <= text.lines().count().max(1));

    let mut file = FileSource::new(data, "fuzz", "clientId", 7);
    while let Ok(Some(batch)) = file.next_batch(0) {
        assert_eq!(batch.batch.events().len(), batch.lines.len());
    }
});
