//! Writing alert details as JSON, with a fast path for strings.
//!
//! serde_json checks a string for characters to escape one byte at a time.
//! Under fuel metering every loop iteration costs several instructions more
//! than natively, and field names and string values are most of what a rule
//! writes into a detail, so strings are checked here eight bytes at a time
//! and copied whole when, as usual, nothing needs escaping. Everything else
//! is serde_json's.

use std::cell::RefCell;
use std::io;

use serde::ser::{Serialize, Serializer};

type Json<'w> = serde_json::Serializer<Shared<'w>>;

/// Append `value` as JSON.
pub(crate) fn write_value<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), serde_json::Error> {
    let cell = RefCell::new(std::mem::take(out));
    let result = value.serialize(&mut Fast {
        json: serde_json::Serializer::new(Shared(&cell)),
        out: &cell,
    });
    *out = cell.into_inner();
    result
}

/// The output, written by serde_json and by the string fast path in turn.
struct Shared<'w>(&'w RefCell<Vec<u8>>);

impl io::Write for Shared<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        append(&mut self.0.borrow_mut(), bytes);
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        append(&mut self.0.borrow_mut(), bytes);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Append `s` as a JSON string.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        serde_json::to_writer(out, s).expect("writing a string to a Vec cannot fail");
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        append(out, s.as_bytes());
        out.push(b'"');
    }
}

/// `out.extend_from_slice(bytes)`, with short slices copied as two
/// overlapping words: in a component a `memcpy` is a `memory.copy`, which
/// the runtime serves with a call out of the sandbox, dear for a few bytes.
#[inline]
pub(crate) fn append(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len();
    if !(4..=16).contains(&n) {
        out.extend_from_slice(bytes);
        return;
    }
    out.reserve(n);
    let len = out.len();
    // SAFETY: `reserve` made room for n more bytes after `len`; the reads
    // and writes below stay within bytes[..n] and out[len..len + n], and
    // cover every one of those bytes before `set_len` exposes them.
    unsafe {
        let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr().add(len));
        if n >= 8 {
            let (head, tail) = (
                src.cast::<u64>().read_unaligned(),
                src.add(n - 8).cast::<u64>().read_unaligned(),
            );
            dst.cast::<u64>().write_unaligned(head);
            dst.add(n - 8).cast::<u64>().write_unaligned(tail);
        } else {
            let (head, tail) = (
                src.cast::<u32>().read_unaligned(),
                src.add(n - 4).cast::<u32>().read_unaligned(),
            );
            dst.cast::<u32>().write_unaligned(head);
            dst.add(n - 4).cast::<u32>().write_unaligned(tail);
        }
        out.set_len(len + n);
    }
}

/// Whether any byte is a control character, `"` or `\`.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A high bit per byte that is zero: exact for the first such byte, which
    // is all a yes-or-no needs.
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let special = |w: u64| {
        // Bytes below 0x20 (bytes of 0x80 and above never match: `!w`).
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
        control | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))
    };
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let n = bytes.len();
    match n {
        // Each byte on its own: copying a short tail into a padded word
        // would cost a `memory.copy`, dearer than this.
        0..4 => bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\'),
        // Two overlapping halves cover every byte.
        4..8 => special(u64::from(half(0)) | (u64::from(half(n - 4)) << 32)) != 0,
        _ => {
            let mut at = 0;
            while at + 8 <= n {
                if special(word(at)) != 0 {
                    return true;
                }
                at += 8;
            }
            // The last eight bytes, overlapping ones already checked.
            at < n && special(word(n - 8)) != 0
        }
    }
}

/// serde_json's serializer, but for strings at any depth a value reaches
/// without a container (a string, an `Option`, a newtype).
struct Fast<'w> {
    json: Json<'w>,
    out: &'w RefCell<Vec<u8>>,
}

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $method(self, $($arg: $ty),*) -> Result<$ret, serde_json::Error> {
            (&mut self.json).$method($($arg),*)
        })*
    };
}

impl<'a, 'w> Serializer for &'a mut Fast<'w> {
    type Ok = ();
    type Error = serde_json::Error;
    type SerializeSeq = <&'a mut Json<'w> as Serializer>::SerializeSeq;
    type SerializeTuple = <&'a mut Json<'w> as Serializer>::SerializeTuple;
    type SerializeTupleStruct = <&'a mut Json<'w> as Serializer>::SerializeTupleStruct;
    type SerializeTupleVariant = <&'a mut Json<'w> as Serializer>::SerializeTupleVariant;
    type SerializeMap = <&'a mut Json<'w> as Serializer>::SerializeMap;
    type SerializeStruct = <&'a mut Json<'w> as Serializer>::SerializeStruct;
    type SerializeStructVariant = <&'a mut Json<'w> as Serializer>::SerializeStructVariant;

    fn serialize_str(self, v: &str) -> Result<(), serde_json::Error> {
        write_str(&mut self.out.borrow_mut(), v);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), serde_json::Error> {
        value.serialize(self)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        (&mut self.json).serialize_newtype_variant(name, index, variant, value)
    }

    forward! {
        serialize_bool(v: bool) -> ();
        serialize_i8(v: i8) -> ();
        serialize_i16(v: i16) -> ();
        serialize_i32(v: i32) -> ();
        serialize_i64(v: i64) -> ();
        serialize_i128(v: i128) -> ();
        serialize_u8(v: u8) -> ();
        serialize_u16(v: u16) -> ();
        serialize_u32(v: u32) -> ();
        serialize_u64(v: u64) -> ();
        serialize_u128(v: u128) -> ();
        serialize_f32(v: f32) -> ();
        serialize_f64(v: f64) -> ();
        serialize_char(v: char) -> ();
        serialize_bytes(v: &[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(name: &'static str) -> ();
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str) -> ();
        serialize_seq(len: Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(len: usize) -> Self::SerializeTuple;
        serialize_tuple_struct(name: &'static str, len: usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Self::SerializeTupleVariant;
        serialize_map(len: Option<usize>) -> Self::SerializeMap;
        serialize_struct(name: &'static str, len: usize) -> Self::SerializeStruct;
        serialize_struct_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Self::SerializeStructVariant;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_exactly_what_serde_json_escapes() {
        let samples = [
            "",
            "a",
            "machine-03",
            "exactly8",
            "nine char",
            "quote\"",
            "back\\slash",
            "tab\there",
            "\u{1f}",
            "é and ü",
            "long string with no escapes at all, past 16",
            "long string with an escape at the very end\n",
        ];
        // An escape at every position of every length up to 20.
        let mut samples: Vec<String> = samples.iter().map(|s| s.to_string()).collect();
        for n in 1..=20 {
            for at in 0..n {
                for special in ['"', '\\', '\n', '\u{7f}', 'é'] {
                    let mut s: String = "x".repeat(n);
                    s.replace_range(at..at + 1, &special.to_string());
                    samples.push(s);
                }
            }
        }
        for s in &samples {
            let mut ours = Vec::new();
            write_value(&mut ours, s).unwrap();
            assert_eq!(ours, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn append_copies_every_length() {
        let source: Vec<u8> = (0..40).collect();
        for n in 0..=source.len() {
            let mut out = b"prefix".to_vec();
            append(&mut out, &source[..n]);
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(&out[6..], &source[..n], "length {n}");
        }
    }

    #[test]
    fn everything_else_is_serde_json() {
        #[derive(serde::Serialize)]
        struct Detail<'a> {
            name: &'a str,
            tags: Vec<&'a str>,
            maybe: Option<&'a str>,
            n: i64,
        }
        let detail = Detail {
            name: "m\"1",
            tags: vec!["a", "b\\"],
            maybe: Some("x"),
            n: -3,
        };
        let mut ours = Vec::new();
        write_value(&mut ours, &detail).unwrap();
        assert_eq!(ours, serde_json::to_vec(&detail).unwrap());
    }
}
