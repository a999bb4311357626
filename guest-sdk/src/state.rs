//! How a rule's state is stored, and how a new version of a rule reads the
//! state an older one left.
//!
//! A stored state is a format byte, the rule's *state schema* (a number the
//! rule raises when its `State` type changes incompatibly, see
//! [`Manifest::state_schema`](crate::Manifest::state_schema)), the
//! `name@version` of the rule that wrote it, and the state in postcard.
//! Reading it, a rule of the same schema decodes it; a rule of a newer
//! schema hands it to [`Rule::upgrade_state`](crate::Rule::upgrade_state)
//! unless its manifest declares
//! [`reset_older_state`](crate::Manifest::reset_older_state); anything
//! else is an error naming both versions, and the host keeps the bucket's
//! state and rejects the events. A state is never reset silently.

use serde::{Serialize, de::DeserializeOwned};

/// The first encoding: postcard alone, schema 1, writer unknown.
const FORMAT_POSTCARD: u8 = 1;
/// Postcard behind a header: schema (LEB128) and the writer's label.
const FORMAT_VERSIONED: u8 = 2;

/// How one rule (version) encodes and decodes its state.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    /// `name@version` of this rule.
    pub label: String,
    pub schema: u32,
    /// Start afresh from a state of an older schema.
    pub reset_older: bool,
}

/// A state written under an older state schema, as
/// [`Rule::upgrade_state`](crate::Rule::upgrade_state) receives it.
#[derive(Debug, Clone, Copy)]
pub struct OldState<'a> {
    schema: u32,
    written_by: &'a str,
    bytes: &'a [u8],
}

impl<'a> OldState<'a> {
    /// The state schema it was written under.
    pub fn schema(&self) -> u32 {
        self.schema
    }

    /// `name@version` of the rule that wrote it (`an earlier version` for
    /// states older than this header).
    pub fn written_by(&self) -> &'a str {
        self.written_by
    }

    /// Decode it as the type the older version stored.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, String> {
        postcard::from_bytes(self.bytes).map_err(|e| format!("cannot decode state: {e}"))
    }
}

/// What was stored, split into its parts.
fn split(bytes: &[u8]) -> Result<OldState<'_>, String> {
    match bytes {
        [FORMAT_POSTCARD, rest @ ..] => Ok(OldState {
            schema: 1,
            written_by: "an earlier version",
            bytes: rest,
        }),
        [FORMAT_VERSIONED, rest @ ..] => {
            let (schema, rest) = leb128(rest).ok_or("truncated state header")?;
            let (&len, rest) = rest.split_first().ok_or("truncated state header")?;
            let len = len as usize;
            if rest.len() < len {
                return Err("truncated state header".to_owned());
            }
            let written_by =
                std::str::from_utf8(&rest[..len]).map_err(|_| "unreadable state header")?;
            Ok(OldState {
                schema,
                written_by,
                bytes: &rest[len..],
            })
        }
        [format, ..] => Err(format!("unknown state format {format}")),
        [] => Err("empty state".to_owned()),
    }
}

fn leb128(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut value: u32 = 0;
    for (i, &byte) in bytes.iter().enumerate().take(5) {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

impl Codec {
    pub(crate) fn encode<S: Serialize>(&self, state: &S) -> Result<Vec<u8>, String> {
        let mut header = vec![FORMAT_VERSIONED];
        let mut schema = self.schema;
        loop {
            let byte = (schema & 0x7f) as u8;
            schema >>= 7;
            if schema == 0 {
                header.push(byte);
                break;
            }
            header.push(byte | 0x80);
        }
        // Labels are name (≤ 64) @ version: longer ones are cut.
        let label = &self.label.as_bytes()[..self.label.len().min(255)];
        header.push(label.len() as u8);
        header.extend_from_slice(label);
        let mut bytes =
            postcard::to_extend(state, header).map_err(|e| format!("cannot encode state: {e}"))?;
        bytes.shrink_to_fit();
        Ok(bytes)
    }

    /// The state, from what is stored; `upgrade` reads an older schema's.
    pub(crate) fn decode<S: DeserializeOwned + Default>(
        &self,
        bytes: Option<&[u8]>,
        upgrade: impl FnOnce(OldState<'_>) -> Result<S, String>,
    ) -> Result<S, String> {
        let Some(bytes) = bytes else {
            return Ok(S::default());
        };
        let old = split(bytes)?;
        let versions = format!(
            "state schema {} written by {} cannot be read by {} (state schema {})",
            old.schema, old.written_by, self.label, self.schema
        );
        if old.schema == self.schema {
            return old.decode().map_err(|e| format!("{versions}: {e}"));
        }
        if old.schema > self.schema {
            return Err(format!(
                "{versions}: it is newer; activate a version of schema {} or later",
                old.schema
            ));
        }
        if self.reset_older {
            return Ok(S::default());
        }
        upgrade(old).map_err(|e| {
            format!(
                "{versions}: {e}; upgrade it in `Rule::upgrade_state`, or declare `reset_older_state()` in the manifest to start its buckets afresh"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(schema: u32, reset_older: bool) -> Codec {
        Codec {
            label: format!("counter@{schema}.0.0"),
            schema,
            reset_older,
        }
    }

    fn refuse<S>(_: OldState<'_>) -> Result<S, String> {
        Err("no upgrade".to_owned())
    }

    #[test]
    fn round_trips_and_rejects_unknown_formats() {
        let codec = codec(1, false);
        let state = vec![("m1".to_owned(), true)];
        let bytes = codec.encode(&state).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSIONED);
        assert_eq!(
            codec
                .decode::<Vec<(String, bool)>>(Some(&bytes), refuse)
                .unwrap(),
            state
        );
        assert_eq!(
            codec.decode::<Vec<(String, bool)>>(None, refuse).unwrap(),
            vec![]
        );
        let err = codec
            .decode::<Vec<(String, bool)>>(Some(&[9, 0]), refuse)
            .unwrap_err();
        assert_eq!(err, "unknown state format 9");
        // What the first SDK wrote reads as schema 1.
        let legacy = postcard::to_extend(&state, vec![FORMAT_POSTCARD]).unwrap();
        assert_eq!(
            codec
                .decode::<Vec<(String, bool)>>(Some(&legacy), refuse)
                .unwrap(),
            state
        );
    }

    #[test]
    fn a_newer_schema_upgrades_resets_or_names_both_versions() {
        let v1 = codec(1, false).encode(&7u64).unwrap();
        let upgraded = codec(2, false)
            .decode::<(u64, String)>(Some(&v1), |old| {
                assert_eq!(old.written_by(), "counter@1.0.0");
                Ok((old.decode::<u64>()?, "upgraded".to_owned()))
            })
            .unwrap();
        assert_eq!(upgraded, (7, "upgraded".to_owned()));

        let reset = codec(2, true)
            .decode::<(u64, String)>(Some(&v1), refuse)
            .unwrap();
        assert_eq!(reset, (0, String::new()));

        let refused = codec(2, false)
            .decode::<(u64, String)>(Some(&v1), refuse)
            .unwrap_err();
        assert!(
            refused.starts_with(
                "state schema 1 written by counter@1.0.0 cannot be read by counter@2.0.0 (state schema 2): no upgrade"
            ),
            "{refused}"
        );

        let v300 = codec(300, false).encode(&(1u64, String::new())).unwrap();
        let newer = codec(2, true)
            .decode::<(u64, String)>(Some(&v300), refuse)
            .unwrap_err();
        assert!(newer.contains("it is newer"), "{newer}");
    }
}
