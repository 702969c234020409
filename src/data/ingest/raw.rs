//! One pass over a JSON body into borrowed pieces: attribute values are typed just enough to
//! check them, `data` is kept as the exact JSON text (a [`RawValue`] borrowed from the body), so
//! nothing of the payload is decoded or re-encoded.
//!
//! Type errors (an object where a string belongs, an array element that is not an object) are
//! recorded rather than raised, so that the caller can report every one of them with its event
//! index and pointer; only JSON syntax errors abort the pass.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON string, borrowed from the body when it has no escapes.
#[derive(Debug)]
pub(crate) struct CowStr<'a>(pub Cow<'a, str>);

impl<'de> de::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// An attribute value as JSON typed it. Objects and arrays are skipped (no attribute may hold
/// one); only their kind is kept for the error message.
#[derive(Debug, PartialEq)]
pub(crate) enum Val<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    /// An integer beyond `i64` (certainly beyond CloudEvents' 32-bit Integer).
    BigInt,
    Float,
    Bool(bool),
    Null,
    Object,
    Array,
}

impl Val<'_> {
    /// "a string", "an object", … for messages.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) | Val::BigInt => "an integer",
            Val::Float => "a fractional number",
            Val::Bool(_) => "a boolean",
            Val::Null => "null",
            Val::Object => "an object",
            Val::Array => "an array",
        }
    }
}

struct ValVisitor;

impl<'de> Visitor<'de> for ValVisitor {
    type Value = Val<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Val::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Val::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Val::BigInt, Val::Int))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Val::Float)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Owned(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Val::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Val::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Val::Object)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Val::Array)
    }
}

impl<'de> de::Deserialize<'de> for Val<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValVisitor)
    }
}

/// One element of a request: a JSON object's members, `data` kept raw.
#[derive(Debug, Default)]
pub(crate) struct RawEvent<'a> {
    /// Every member but `data`, in body order (duplicates included: the caller reports them).
    pub members: Vec<(Cow<'a, str>, Val<'a>)>,
    /// The exact JSON text of `data`, leading and trailing whitespace excluded.
    pub data: Option<&'a RawValue>,
    /// `data` appeared more than once.
    pub duplicate_data: bool,
    /// Set when the element was not an object: what it was instead ("a string", …).
    pub not_object: Option<&'static str>,
}

fn read_event_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<RawEvent<'de>, A::Error> {
    let mut ev = RawEvent {
        // Typical events have 5–10 attributes: one allocation covers them.
        members: Vec::with_capacity(10),
        ..RawEvent::default()
    };
    while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
        if key == "data" {
            if ev.data.is_some() {
                ev.duplicate_data = true;
                map.next_value::<IgnoredAny>()?;
            } else {
                ev.data = Some(map.next_value::<&'de RawValue>()?);
            }
        } else {
            let val = map.next_value::<Val<'de>>()?;
            ev.members.push((key, val));
        }
    }
    Ok(ev)
}

fn not_object<'a>(what: &'static str) -> RawEvent<'a> {
    RawEvent {
        not_object: Some(what),
        ..RawEvent::default()
    }
}

/// Visits any JSON value; an object becomes a [`RawEvent`], anything else a marker naming it.
struct EventVisitor;

impl<'de> Visitor<'de> for EventVisitor {
    type Value = RawEvent<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        read_event_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(not_object("an array"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(not_object("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(not_object("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(not_object("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(not_object("a number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(not_object("a string"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(not_object("null"))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(not_object("null"))
    }
}

impl<'de> de::Deserialize<'de> for RawEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(EventVisitor)
    }
}

/// The top level of a JSON body.
#[derive(Debug)]
pub(crate) enum Top<'a> {
    One(RawEvent<'a>),
    Many(Vec<RawEvent<'a>>),
    /// Neither an object nor an array: what it was.
    Other(&'static str),
}

/// Reads the top level; while inside a top-level array it records the index of the element
/// being read, so that a syntax error can name the event it is in.
struct TopSeed<'c> {
    at: &'c Cell<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = Top<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = Top<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object or an array")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        read_event_map(map).map(Top::One)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events = Vec::new();
        loop {
            self.at.set(Some(events.len()));
            match seq.next_element::<RawEvent<'de>>()? {
                Some(ev) => events.push(ev),
                None => break,
            }
        }
        self.at.set(None);
        Ok(Top::Many(events))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Top::Other("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Top::Other("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Top::Other("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Top::Other("a number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Top::Other("a string"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Top::Other("null"))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Top::Other("null"))
    }
}

/// Parses a whole body. On a syntax error, returns it with the index of the array element it
/// occurred in (when the top level is an array).
pub(crate) fn parse_top(body: &[u8]) -> Result<Top<'_>, (serde_json::Error, Option<usize>)> {
    let at = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = TopSeed { at: &at }
        .deserialize(&mut de)
        .and_then(|top| de.end().map(|()| top));
    top.map_err(|e| (e, at.get()))
}

/// Decodes a JSON string literal (the text of a [`RawValue`] that starts with `"`), borrowing
/// from `raw` when it has no escapes.
pub(crate) fn json_string(raw: &str) -> Result<Cow<'_, str>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let CowStr(s) = de::Deserialize::deserialize(&mut de)?;
    de.end()?;
    Ok(s)
}

/// Checks that `bytes` is one JSON value, without building it.
pub(crate) fn check_json(bytes: &[u8]) -> Result<(), serde_json::Error> {
    // JSON is UTF-8 (RFC 8259), and skipping a value does not look inside its strings: the
    // bytes are checked first. Invalid UTF-8 taken as JSON data could not be written out as
    // JSON again, and the structured mode (reads, sinks) left such data out without a word.
    let text = std::str::from_utf8(bytes).map_err(|e| {
        <serde_json::Error as de::Error>::custom(format!(
            "invalid UTF-8 at byte {}",
            e.valid_up_to()
        ))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    (&mut de).deserialize_ignored_any(IgnoredAny)?;
    de.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_borrowed_verbatim_and_members_are_typed() {
        let body = br#"{"id":"a\"b","n":-3,"big":18446744073709551615,"f":1.0,"t":true,"z":null,
            "o":{"x":[1]},"a":[1,{}],"data" :  { "b" : 1,"a":[ 2 ] }  }"#;
        let Ok(Top::One(ev)) = parse_top(body) else {
            panic!("expected one event")
        };
        assert_eq!(ev.data.unwrap().get(), r#"{ "b" : 1,"a":[ 2 ] }"#);
        let vals: Vec<_> = ev.members.iter().map(|(k, v)| (k.as_ref(), v)).collect();
        assert_eq!(
            vals,
            vec![
                ("id", &Val::Str(Cow::Borrowed("a\"b"))),
                ("n", &Val::Int(-3)),
                ("big", &Val::BigInt),
                ("f", &Val::Float),
                ("t", &Val::Bool(true)),
                ("z", &Val::Null),
                ("o", &Val::Object),
                ("a", &Val::Array),
            ]
        );
    }

    #[test]
    fn unescaped_strings_are_borrowed() {
        let body = br#"{"id":"plain"}"#;
        let Ok(Top::One(ev)) = parse_top(body) else {
            panic!()
        };
        assert!(matches!(ev.members[0].1, Val::Str(Cow::Borrowed("plain"))));
    }

    #[test]
    fn array_elements_that_are_not_objects_are_marked() {
        let Ok(Top::Many(evs)) = parse_top(br#"[{"a":1}, "x", [1], 3, null]"#) else {
            panic!()
        };
        let marks: Vec<_> = evs.iter().map(|e| e.not_object).collect();
        assert_eq!(
            marks,
            vec![
                None,
                Some("a string"),
                Some("an array"),
                Some("a number"),
                Some("null")
            ]
        );
    }

    #[test]
    fn syntax_errors_name_the_element() {
        let (err, at) = parse_top(b"[{\"a\":1},\n{\"b\":}]").unwrap_err();
        assert_eq!(at, Some(1));
        assert_eq!(err.line(), 2);
        let (_, at) = parse_top(b"{\"a\":}").unwrap_err();
        assert_eq!(at, None);
        let (_, at) = parse_top(b"[] x").unwrap_err();
        assert_eq!(at, None);
        assert!(matches!(parse_top(b" 3 "), Ok(Top::Other("a number"))));
    }

    #[test]
    fn duplicate_data_is_flagged() {
        let Ok(Top::One(ev)) = parse_top(br#"{"data":1,"data":2}"#) else {
            panic!()
        };
        assert!(ev.duplicate_data);
        assert_eq!(ev.data.unwrap().get(), "1");
    }

    #[test]
    fn json_string_decodes_escapes() {
        assert_eq!(json_string(r#""a\nb""#).unwrap(), "a\nb");
        assert!(matches!(
            json_string(r#""ab""#).unwrap(),
            Cow::Borrowed("ab")
        ));
        assert!(json_string(r#""\ud800""#).is_err());
        assert!(check_json(b" {\"a\": [1, 2]} ").is_ok());
        assert!(check_json(b"{\"a\": ").is_err());
        assert!(check_json(b"1 2").is_err());
    }
}
