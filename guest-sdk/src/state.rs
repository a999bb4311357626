//! How a rule's state is stored: a format byte, then the state in postcard.
//!
//! The format byte lets a later SDK change the encoding and still read what
//! an older one wrote.

use serde::{Serialize, de::DeserializeOwned};

/// The only encoding so far: postcard (compact, varint integers).
const FORMAT_POSTCARD: u8 = 1;

pub(crate) fn encode<S: Serialize>(state: &S) -> Result<Vec<u8>, String> {
    let mut bytes = postcard::to_extend(state, vec![FORMAT_POSTCARD])
        .map_err(|e| format!("cannot encode state: {e}"))?;
    bytes.shrink_to_fit();
    Ok(bytes)
}

pub(crate) fn decode<S: DeserializeOwned + Default>(bytes: Option<&[u8]>) -> Result<S, String> {
    match bytes {
        None => Ok(S::default()),
        Some([FORMAT_POSTCARD, rest @ ..]) => {
            postcard::from_bytes(rest).map_err(|e| format!("cannot decode state: {e}"))
        }
        Some([format, ..]) => Err(format!("unknown state format {format}")),
        Some([]) => Err("empty state".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown_formats() {
        let state = vec![("m1".to_owned(), true)];
        let bytes = encode(&state).unwrap();
        assert_eq!(bytes[0], FORMAT_POSTCARD);
        assert_eq!(decode::<Vec<(String, bool)>>(Some(&bytes)).unwrap(), state);
        assert_eq!(decode::<Vec<(String, bool)>>(None).unwrap(), vec![]);
        let err = decode::<Vec<(String, bool)>>(Some(&[9, 0])).unwrap_err();
        assert_eq!(err, "unknown state format 9");
    }
}
