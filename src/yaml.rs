//! YAML as Weir reads it, in one place: YAML 1.2's core schema, as the manifests were read
//! before (with `serde_yaml`): only `true`/`false` are booleans (`y`, `yes`, `on` and `no`
//! stay strings; a Subscription whose sink `ref.name` is `y` means the Service `y`), and
//! numbers with leading zeros or underscores stay strings when the type is inferred.

use serde::de::DeserializeOwned;

pub use serde_saphyr::Error;

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

/// One document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options())
}

/// One document, from bytes (UTF-8).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_saphyr::from_slice_with_options(bytes, options())
}

/// Every non-empty document of a stream (for tests and tools; the manifest loader cuts files
/// itself to number every document, see `source::yaml`).
pub fn from_multiple<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, Error> {
    serde_saphyr::from_multiple_with_options(text, options())
}

/// The message of an error without the source snippet the parser may append (a manifest
/// problem names its own file and line).
pub fn short_message(e: &Error) -> String {
    e.without_snippet()
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn yaml_1_1_booleans_and_odd_numbers_stay_strings() {
        let v: Value =
            from_str("a: y\nb: yes\nc: on\nd: no\ne: true\nf: 0755\ng: 1_000\nh: 7\n").unwrap();
        assert_eq!(
            v,
            json!({"a": "y", "b": "yes", "c": "on", "d": "no", "e": true,
                   "f": "0755", "g": "1_000", "h": 7})
        );
    }
}
