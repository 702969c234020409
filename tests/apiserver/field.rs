//! Field errors as the real API server reports them (`k8s.io/apimachinery` `field.Error`):
//! the cause types, the `field: Type: value: detail` text, and the metadata name rules.

use serde_json::{Value, json};

/// A cause type (`metav1.CauseType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    Required,
    Invalid,
    TypeInvalid,
    NotSupported,
    Forbidden,
    Duplicate,
    TooLong,
    TooMany,
}

impl ErrorType {
    /// The cause `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorType::Required => "FieldValueRequired",
            ErrorType::Invalid => "FieldValueInvalid",
            ErrorType::TypeInvalid => "FieldValueTypeInvalid",
            ErrorType::NotSupported => "FieldValueNotSupported",
            ErrorType::Forbidden => "FieldValueForbidden",
            ErrorType::Duplicate => "FieldValueDuplicate",
            ErrorType::TooLong => "FieldValueTooLong",
            ErrorType::TooMany => "FieldValueTooMany",
        }
    }

    fn text(self) -> &'static str {
        match self {
            ErrorType::Required => "Required value",
            ErrorType::Invalid | ErrorType::TypeInvalid => "Invalid value",
            ErrorType::NotSupported => "Unsupported value",
            ErrorType::Forbidden => "Forbidden",
            ErrorType::Duplicate => "Duplicate value",
            ErrorType::TooLong => "Too long",
            ErrorType::TooMany => "Too many",
        }
    }

    /// Whether the text shows the bad value (the others name only the problem).
    fn shows_value(self) -> bool {
        !matches!(
            self,
            ErrorType::Required | ErrorType::Forbidden | ErrorType::TooLong
        )
    }
}

/// One invalid field.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub type_: ErrorType,
    /// `spec.ingest.auth`, `status.conditions[0].type`, `metadata.name`; `<nil>` for none.
    pub field: String,
    pub value: Value,
    pub detail: String,
}

impl FieldError {
    pub fn new(type_: ErrorType, field: &str, value: Value, detail: impl Into<String>) -> Self {
        Self {
            type_,
            field: if field.is_empty() {
                "<nil>".into()
            } else {
                field.into()
            },
            value,
            detail: detail.into(),
        }
    }

    pub fn invalid(field: &str, value: Value, detail: impl Into<String>) -> Self {
        Self::new(ErrorType::Invalid, field, value, detail)
    }

    pub fn required(field: &str, detail: impl Into<String>) -> Self {
        Self::new(ErrorType::Required, field, Value::Null, detail)
    }

    /// The message without the field (a cause's `message`).
    pub fn body(&self) -> String {
        let mut s = self.type_.text().to_string();
        if self.type_.shows_value() {
            s.push_str(": ");
            s.push_str(&go_value(&self.value));
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }

    /// `field: body`, as in the Status message.
    pub fn text(&self) -> String {
        format!("{}: {}", self.field, self.body())
    }

    /// The `details.causes[]` entry.
    pub fn cause(&self) -> Value {
        json!({"reason": self.type_.reason(), "message": self.body(), "field": self.field})
    }
}

/// The errors joined as Go's error aggregate prints them: one alone, several (duplicates
/// dropped) in brackets.
pub fn aggregate(errors: &[FieldError]) -> String {
    let mut seen: Vec<String> = Vec::new();
    for e in errors {
        let t = e.text();
        if !seen.contains(&t) {
            seen.push(t);
        }
    }
    if seen.len() == 1 {
        seen.swap_remove(0)
    } else {
        format!("[{}]", seen.join(", "))
    }
}

/// A bad value as `field.Error` prints it: numbers and booleans plain, strings (and nil, as
/// `"null"`) quoted, anything else as JSON.
pub fn go_value(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (None, None, Some(f)) => go_float(f),
            _ => n.to_string(),
        },
        Value::Bool(b) => b.to_string(),
        // Go renders a nil bad value as the string "null".
        Value::Null => "\"null\"".into(),
        // JSON string quoting matches Go's %q for the printable text errors carry.
        Value::String(s) => Value::String(s.clone()).to_string(),
        other => other.to_string(),
    }
}

/// A float as Go's `%v` prints it (`%g`, shortest): exponent form from 1e+06 up or below
/// 1e-4, e.g. 4294967295 as `4.294967295e+09`.
pub fn go_float(f: f64) -> String {
    if f == 0.0 {
        return "0".into();
    }
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    let exp = f.abs().log10().floor() as i32;
    if !(-4..6).contains(&exp) {
        // Rust's `{:e}` is shortest too: `4.294967295e9`; Go writes the exponent signed
        // with at least two digits.
        let s = format!("{f:e}");
        let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        let sign = if e < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", e.abs())
    } else {
        format!("{f}")
    }
}

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1035_LABEL: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";

/// The `regex used for validation` message of apimachinery's `RegexError`.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let mut s = format!("{msg} (e.g. ");
    for (i, e) in examples.iter().enumerate() {
        if i > 0 {
            s.push_str(" or ");
        }
        s.push_str(&format!("'{e}', "));
    }
    s.push_str(&format!("regex used for validation is '{fmt}')"));
    s
}

fn full_match(pattern: &str, s: &str) -> bool {
    regex::Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|r| r.is_match(s))
}

/// Which naming rule a kind's `metadata.name` follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// Most kinds, custom resources included (`NameIsDNSSubdomain`).
    Subdomain,
    /// Namespaces (`NameIsDNSLabel`).
    Label,
    /// Services (`NameIsDNS1035Label`).
    Dns1035,
}

/// The problems of `name` under `rule` (apimachinery's `IsDNS1123Subdomain` and friends).
/// `prefix`: a `generateName`, which may end in `-` (a suffix follows).
pub fn name_problems(rule: NameRule, name: &str, prefix: bool) -> Vec<String> {
    let checked = if prefix {
        // As `maskTrailingDash`: a trailing dash is fine before the generated suffix.
        match name.strip_suffix('-') {
            Some(s) if name.len() > 1 => format!("{s}a"),
            _ => name.to_string(),
        }
    } else {
        name.to_string()
    };
    let mut out = Vec::new();
    match rule {
        NameRule::Subdomain => {
            if checked.len() > 253 {
                out.push("must be no more than 253 characters".to_string());
            }
            if !full_match(DNS1123_SUBDOMAIN, &checked) {
                out.push(regex_error(
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                    DNS1123_SUBDOMAIN,
                    &["example.com"],
                ));
            }
        }
        NameRule::Label => {
            if checked.len() > 63 {
                out.push("must be no more than 63 characters".to_string());
            }
            if !full_match(DNS1123_LABEL, &checked) {
                out.push(regex_error(
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                    DNS1123_LABEL,
                    &["my-name", "123-abc"],
                ));
            }
        }
        NameRule::Dns1035 => {
            if checked.len() > 63 {
                out.push("must be no more than 63 characters".to_string());
            }
            if !full_match(DNS1035_LABEL, &checked) {
                out.push(regex_error(
                    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
                    DNS1035_LABEL,
                    &["my-name", "abc-123"],
                ));
            }
        }
    }
    out
}
