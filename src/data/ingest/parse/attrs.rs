//! The checks of an event's attributes, shared by every content mode: the eight context
//! attributes, extension names and values, `expectedversion`, and the faults they report.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use super::MAX_EXTENSION_NAME_LEN;
use crate::data::event::{
    CloudEvent, Data, EXT_CORRELATION_ID, EXT_EXPECTED_VERSION, EXT_POSITION, EXT_PUBLISHER,
    EXT_RECORDED_TIME, EXT_VERSION, ExtValue, SPEC_VERSION,
};
use crate::data::ingest::raw::{RawEvent, Val};
use crate::data::problem::{FieldError, FieldErrors};
/// A JSON pointer to the member `name` of an event (RFC 6901 escaping).
pub(crate) fn pointer(name: &str) -> String {
    if name.contains(['~', '/']) {
        format!("/{}", name.replace('~', "~0").replace('/', "~1"))
    } else {
        format!("/{name}")
    }
}

pub(super) fn missing(index: usize, name: &str) -> FieldError {
    FieldError::new(format!("the required attribute {name} is missing"))
        .at(index)
        .pointer(pointer(name))
        .keyword("required")
}

pub(super) fn wrong_type(index: usize, name: &str, got: &Val<'_>, want: &str) -> FieldError {
    FieldError::new(format!("{name} must be {want}, got {}", got.describe()))
        .at(index)
        .pointer(pointer(name))
        .keyword("type")
}

/// Checks that an event is a JSON object and reports its duplicated members. `None` when it
/// is not an object (nothing else can be checked); otherwise the error count before the
/// duplicates, so the caller can tell whether this event added any.
pub(super) fn event_object(
    index: usize,
    raw: &RawEvent<'_>,
    errs: &mut FieldErrors,
) -> Option<usize> {
    if let Some(what) = raw.not_object {
        errs.push(
            FieldError::new(format!("an event must be a JSON object, got {what}"))
                .at(index)
                .keyword("type"),
        );
        return None;
    }
    let before = errs.total();
    report_duplicates(index, raw, errs);
    Some(before)
}

/// Reports every member that appears more than once (JSON leaves duplicates undefined, so
/// the event is refused rather than guessed at).
fn report_duplicates(index: usize, raw: &RawEvent<'_>, errs: &mut FieldErrors) {
    let duplicate = |name: &str| {
        FieldError::new(format!("the member {name} appears more than once"))
            .at(index)
            .pointer(pointer(name))
            .keyword("uniqueMembers")
    };
    if raw.duplicate_data {
        errs.push(duplicate("data"));
    }
    if raw.members.len() < 2 {
        return;
    }
    // Sorting keeps this O(n log n) even for an object with many thousands of members.
    let mut keys: Vec<&str> = raw.members.iter().map(|(k, _)| k.as_ref()).collect();
    keys.sort_unstable();
    let mut last_reported: Option<&str> = None;
    for pair in keys.windows(2) {
        if pair[0] == pair[1] && last_reported != Some(pair[0]) {
            errs.push(duplicate(pair[0]));
            last_reported = Some(pair[0]);
        }
    }
}

/// The eight context attributes as received, before their checks.
#[derive(Default)]
pub(super) struct Slots<'a> {
    pub(super) specversion: Option<Val<'a>>,
    pub(super) id: Option<Val<'a>>,
    pub(super) source: Option<Val<'a>>,
    pub(super) ty: Option<Val<'a>>,
    pub(super) datacontenttype: Option<Val<'a>>,
    pub(super) dataschema: Option<Val<'a>>,
    pub(super) subject: Option<Val<'a>>,
    pub(super) time: Option<Val<'a>>,
}

impl<'a> Slots<'a> {
    pub(super) fn slot(&mut self, name: &str) -> Option<&mut Option<Val<'a>>> {
        Some(match name {
            "specversion" => &mut self.specversion,
            "id" => &mut self.id,
            "source" => &mut self.source,
            "type" => &mut self.ty,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            "subject" => &mut self.subject,
            "time" => &mut self.time,
            _ => return None,
        })
    }
}

/// The checked context attributes.
pub(super) struct Context {
    pub(super) id: String,
    pub(super) source: String,
    pub(super) ty: String,
    pub(super) datacontenttype: Option<String>,
    pub(super) dataschema: Option<String>,
    pub(super) subject: Option<String>,
    pub(super) time: Option<String>,
}

impl Context {
    pub(super) fn into_event(
        self,
        extensions: BTreeMap<String, ExtValue>,
        data: Option<Data>,
    ) -> CloudEvent {
        // JSON `data` without a `datacontenttype` is `application/json` (the CloudEvents JSON
        // format says so). Written down here, the event keeps meaning JSON once it leaves the
        // JSON format: in binary mode to a sink, as an AMQP message, in a stored row.
        let datacontenttype = match (&self.datacontenttype, &data) {
            (None, Some(Data::Json(_))) => Some("application/json".to_string()),
            _ => self.datacontenttype,
        };
        CloudEvent {
            id: self.id,
            source: self.source,
            ty: self.ty,
            datacontenttype,
            dataschema: self.dataschema,
            subject: self.subject,
            time: self.time,
            extensions,
            data,
        }
    }
}

/// A string attribute: `null` counts as absent (CloudEvents JSON format), an empty string is
/// refused (every string attribute CloudEvents defines must be non-empty when present).
pub(super) fn string_attr(
    index: usize,
    name: &str,
    val: Option<Val<'_>>,
    required: bool,
    errs: &mut FieldErrors,
) -> Option<String> {
    match val {
        None | Some(Val::Null) => {
            if required {
                errs.push(missing(index, name));
            }
            None
        }
        Some(Val::Str(s)) if s.is_empty() => {
            errs.push(
                FieldError::new(format!("{name} must not be empty"))
                    .at(index)
                    .pointer(pointer(name))
                    .keyword("minLength"),
            );
            None
        }
        Some(Val::Str(s)) if s.contains('\0') => {
            errs.push(nul(index, name));
            None
        }
        Some(Val::Str(s)) => Some(s.into_owned()),
        Some(other) => {
            errs.push(wrong_type(index, name, &other, "a string"));
            None
        }
    }
}

/// A string attribute holding U+0000. PostgreSQL text cannot hold it, so a stored event with
/// one failed its whole batch's commit (a 500 for every publisher in the batch); it is
/// refused here for every stream alike.
pub(super) fn nul(index: usize, name: &str) -> FieldError {
    FieldError::new(format!(
        "{name} must not contain the NUL character (U+0000)"
    ))
    .at(index)
    .pointer(pointer(name))
    .keyword("pattern")
}

pub(super) fn finish_context(
    index: usize,
    s: Slots<'_>,
    errs: &mut FieldErrors,
) -> Option<Context> {
    let before = errs.total();
    match s.specversion {
        Some(Val::Str(v)) if v == SPEC_VERSION => {}
        None | Some(Val::Null) => errs.push(missing(index, "specversion")),
        Some(Val::Str(v)) => errs.push(
            FieldError::new(format!(
                "specversion must be \"{SPEC_VERSION}\" (the only CloudEvents version Weir \
                 reads), got {v:?}"
            ))
            .at(index)
            .pointer("/specversion")
            .keyword("const"),
        ),
        Some(other) => errs.push(wrong_type(index, "specversion", &other, "a string")),
    }
    let id = string_attr(index, "id", s.id, true, errs);
    let source = string_attr(index, "source", s.source, true, errs);
    let ty = string_attr(index, "type", s.ty, true, errs);
    let datacontenttype = string_attr(index, "datacontenttype", s.datacontenttype, false, errs);
    let dataschema = string_attr(index, "dataschema", s.dataschema, false, errs);
    let subject = string_attr(index, "subject", s.subject, false, errs);
    let time = string_attr(index, "time", s.time, false, errs);
    if let Some(t) = &time
        && chrono::DateTime::parse_from_rfc3339(t).is_err()
    {
        errs.push(
            FieldError::new(format!(
                "time must be an RFC 3339 timestamp such as 2024-05-01T12:00:00Z, got {t:?}"
            ))
            .at(index)
            .pointer("/time")
            .keyword("format"),
        );
    }
    if errs.total() > before {
        return None;
    }
    // With no new error, the three required attributes are all present.
    Some(Context {
        id: id?,
        source: source?,
        ty: ty?,
        datacontenttype,
        dataschema,
        subject,
        time,
    })
}

pub(super) fn check_extension_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "{name:?} is not a valid attribute name: CloudEvents attribute names use only \
             lowercase letters a-z and digits 0-9"
        ));
    }
    if name.len() > MAX_EXTENSION_NAME_LEN {
        return Err(format!(
            "the attribute name {name:?} is {} characters long; Weir accepts at most \
             {MAX_EXTENSION_NAME_LEN} (CloudEvents recommends at most 20)",
            name.len()
        ));
    }
    if name == "data" {
        return Err("data is the payload and cannot be an attribute".into());
    }
    if [EXT_POSITION, EXT_VERSION, EXT_RECORDED_TIME].contains(&name) {
        return Err(format!(
            "{name} is assigned by Weir when the event is stored and cannot be published"
        ));
    }
    if name == EXT_PUBLISHER {
        return Err(format!(
            "{name} is set by Weir to the authenticated publisher and cannot be published"
        ));
    }
    Ok(())
}

/// Checks an extension attribute and adds it. `null` means unset (CloudEvents JSON format).
pub(super) fn add_extension(
    index: usize,
    name: &str,
    val: Val<'_>,
    exts: &mut BTreeMap<String, ExtValue>,
    errs: &mut FieldErrors,
) {
    if let Err(why) = check_extension_name(name) {
        errs.push(
            FieldError::new(why)
                .at(index)
                .pointer(pointer(name))
                .keyword("propertyNames"),
        );
        return;
    }
    let value = match val {
        Val::Null => return,
        // The correlation id is stored in a text column of its own (see `nul`).
        Val::Str(s) if name == EXT_CORRELATION_ID && s.contains('\0') => {
            errs.push(nul(index, name));
            return;
        }
        Val::Str(s) => ExtValue::String(s.into_owned()),
        Val::Bool(b) => ExtValue::Bool(b),
        // CloudEvents Integer is 32-bit; larger numbers would not survive other SDKs.
        Val::Int(i) if i32::try_from(i).is_ok() => ExtValue::Integer(i),
        Val::Int(_) | Val::BigInt => {
            errs.push(
                FieldError::new(format!(
                    "{name} is beyond the 32-bit range of a CloudEvents Integer; send it as \
                     a string"
                ))
                .at(index)
                .pointer(pointer(name))
                .keyword("maximum"),
            );
            return;
        }
        other => {
            errs.push(wrong_type(
                index,
                name,
                &other,
                "a string, an integer or a boolean",
            ));
            return;
        }
    };
    if let Entry::Vacant(slot) = exts.entry(name.to_owned()) {
        slot.insert(value);
    }
}

/// `expectedversion` is a version number: a string of decimal digits or a non-negative
/// integer, and it needs a subject (versions are counted per subject).
pub(super) fn check_expected_version(
    index: usize,
    exts: &BTreeMap<String, ExtValue>,
    subject: Option<&str>,
    subject_ok: bool,
    errs: &mut FieldErrors,
) {
    let Some(value) = exts.get(EXT_EXPECTED_VERSION) else {
        return;
    };
    if crate::data::ingest::version_number(value).is_none() {
        errs.push(
            FieldError::new(format!(
                "expectedversion must be a version number (decimal digits, \"0\" for a new \
                 subject), got {:?}",
                value.as_string()
            ))
            .at(index)
            .pointer("/expectedversion")
            .keyword("pattern"),
        );
    }
    if subject_ok && subject.is_none() {
        errs.push(
            FieldError::new("expectedversion needs a subject: versions are counted per subject")
                .at(index)
                .pointer("/expectedversion")
                .keyword("dependentRequired"),
        );
    }
}
