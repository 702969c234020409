//! A stream's validation rules, compiled once per stream generation and applied to every
//! parsed request: `maxEventBytes`, `requiredExtensions`, JSON Schema per type (and per
//! `dataschema`), `allowUnknownTypes`.

use std::collections::HashMap;

use jsonschema::error::ValidationErrorKind;

use super::parse::pointer;
use crate::data::event::{CloudEvent, Data};
use crate::data::problem::{FieldError, FieldErrors, HttpProblem, ProblemKind};
use crate::topology::ValidationPlan;

/// A schema of the plan that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error("the schema for type {event_type:?}{} is not a valid JSON Schema: {message}", for_dataschema(.dataschema))]
    InvalidSchema {
        event_type: String,
        dataschema: Option<String>,
        message: String,
    },
    #[error("type {event_type:?}{} has more than one schema", for_dataschema(.dataschema))]
    DuplicateSchema {
        event_type: String,
        dataschema: Option<String>,
    },
}

fn for_dataschema(dataschema: &Option<String>) -> String {
    match dataschema {
        Some(d) => format!(" with dataschema {d:?}"),
        None => String::new(),
    }
}

/// The schemas of one event type.
#[derive(Debug, Default)]
struct TypeSchemas {
    /// The entry without `dataschema`: for events of the type that match no versioned entry.
    generic: Option<jsonschema::Validator>,
    /// Entries with a `dataschema`, by that value.
    versioned: HashMap<String, jsonschema::Validator>,
}

/// A stream's validation rules, ready to check events. Build one per stream generation and
/// share it (it is `Send + Sync`); checking never recompiles a schema.
#[derive(Debug)]
pub struct Validator {
    max_event_bytes: usize,
    required_extensions: Vec<String>,
    allow_unknown_types: bool,
    types: HashMap<String, TypeSchemas>,
}

/// Which kinds of failure a request had; decides the problem's type and status.
#[derive(Default)]
struct Seen {
    too_large: bool,
    kinds: Vec<ProblemKind>,
    failed_events: usize,
}

impl Seen {
    fn add(&mut self, kind: ProblemKind) {
        if kind == ProblemKind::EventTooLarge {
            self.too_large = true;
        } else if !self.kinds.contains(&kind) {
            self.kinds.push(kind);
        }
    }
}

impl Validator {
    /// Compiles every schema of `plan`. Fails on a schema that is not valid JSON Schema (or
    /// refers to documents outside itself, which Weir does not fetch) and on two entries for
    /// the same type and `dataschema`.
    pub fn new(plan: &ValidationPlan) -> Result<Validator, ValidatorError> {
        let mut types: HashMap<String, TypeSchemas> = HashMap::new();
        for entry in &plan.schemas {
            let compiled = jsonschema::validator_for(&entry.schema).map_err(|e| {
                ValidatorError::InvalidSchema {
                    event_type: entry.event_type.clone(),
                    dataschema: entry.dataschema.clone(),
                    message: e.to_string(),
                }
            })?;
            let schemas = types.entry(entry.event_type.clone()).or_default();
            let duplicate = || ValidatorError::DuplicateSchema {
                event_type: entry.event_type.clone(),
                dataschema: entry.dataschema.clone(),
            };
            match &entry.dataschema {
                None if schemas.generic.is_some() => return Err(duplicate()),
                None => schemas.generic = Some(compiled),
                Some(ds) if schemas.versioned.contains_key(ds) => return Err(duplicate()),
                Some(ds) => {
                    schemas.versioned.insert(ds.clone(), compiled);
                }
            }
        }
        Ok(Validator {
            max_event_bytes: plan.max_event_bytes,
            required_extensions: plan.required_extensions.clone(),
            allow_unknown_types: plan.allow_unknown_types,
            types,
        })
    }

    /// Checks every event and reports every failure of every event (each with its index), so
    /// that a publisher can fix a whole batch at once.
    ///
    /// Per event, in order: its [`CloudEvent::encoded_size`] over `maxEventBytes` is a 413 (and
    /// the event is not checked further); each missing `requiredExtensions` entry is a 422 at
    /// `/<name>` with keyword `required`; its schema is chosen (the entry for its type with a
    /// matching `dataschema`, else the entry for its type without one) and each violation is a
    /// 422 at `/data…` with the failing keyword; data that is not JSON where a schema applies
    /// is a 422; no schema for the type is a 422 at `/type` (keyword `type`) when unknown types
    /// are refused, and a type whose schemas all name other `dataschema`s is likewise a 422 at
    /// `/dataschema`.
    ///
    /// The problem is a 413 if any event was too large, else a 422 whose `type` names the one
    /// kind of failure, or `validation-failed` when there were several.
    pub fn check(&self, events: &[CloudEvent]) -> Result<(), HttpProblem> {
        let mut errs = FieldErrors::new();
        let mut seen = Seen::default();
        for (index, ev) in events.iter().enumerate() {
            let before = errs.total();
            self.check_event(index, ev, &mut errs, &mut seen);
            if errs.total() > before {
                seen.failed_events += 1;
            }
        }
        if errs.is_empty() {
            return Ok(());
        }
        let n = seen.failed_events;
        let (kind, detail) = if seen.too_large {
            (
                ProblemKind::EventTooLarge,
                format!(
                    "{n} event(s) of this request are invalid and at least one exceeds this \
                     stream's maxEventBytes of {} bytes; nothing was published",
                    self.max_event_bytes
                ),
            )
        } else {
            let kind = match seen.kinds.as_slice() {
                [one] => *one,
                _ => ProblemKind::ValidationFailed,
            };
            (
                kind,
                format!("{n} event(s) of this request failed validation; nothing was published"),
            )
        };
        Err(errs.into_problem(kind, detail))
    }

    fn check_event(&self, index: usize, ev: &CloudEvent, errs: &mut FieldErrors, seen: &mut Seen) {
        let size = ev.encoded_size();
        if size > self.max_event_bytes {
            errs.push(
                FieldError::new(format!(
                    "the event is {size} bytes, more than this stream's maxEventBytes of {} \
                     bytes",
                    self.max_event_bytes
                ))
                .at(index)
                .keyword("maxEventBytes"),
            );
            seen.add(ProblemKind::EventTooLarge);
            return;
        }
        for name in &self.required_extensions {
            if !has_attribute(ev, name) {
                errs.push(
                    FieldError::new(format!(
                        "this stream requires the attribute {name}, which the event lacks"
                    ))
                    .at(index)
                    .pointer(pointer(name))
                    .keyword("required"),
                );
                seen.add(ProblemKind::MissingExtension);
            }
        }
        let Some(schemas) = self.types.get(&ev.ty) else {
            if !self.allow_unknown_types {
                errs.push(
                    FieldError::new(format!(
                        "type {:?} has no schema on this stream, and the stream does not allow \
                         unknown types",
                        ev.ty
                    ))
                    .at(index)
                    .pointer("/type")
                    .keyword("type"),
                );
                seen.add(ProblemKind::UnknownType);
            }
            return;
        };
        let schema = ev
            .dataschema
            .as_ref()
            .and_then(|d| schemas.versioned.get(d))
            .or(schemas.generic.as_ref());
        match schema {
            Some(schema) => check_data(index, ev, schema, errs, seen),
            None if !self.allow_unknown_types => {
                let mut known: Vec<&str> = schemas.versioned.keys().map(String::as_str).collect();
                known.sort_unstable();
                errs.push(
                    FieldError::new(format!(
                        "type {:?} has schemas for dataschema {}, none for {}, and the stream \
                         does not allow unknown types",
                        ev.ty,
                        known.join(", "),
                        ev.dataschema.as_deref().map_or_else(
                            || "an event without dataschema".into(),
                            |d| format!("{d:?}")
                        )
                    ))
                    .at(index)
                    .pointer("/dataschema")
                    .keyword("dataschema"),
                );
                seen.add(ProblemKind::UnknownType);
            }
            None => {}
        }
    }
}

/// Whether the event has the attribute (context or extension), without building its value.
fn has_attribute(ev: &CloudEvent, name: &str) -> bool {
    match name {
        "specversion" | "id" | "source" | "type" => true,
        "datacontenttype" => ev.datacontenttype.is_some(),
        "dataschema" => ev.dataschema.is_some(),
        "subject" => ev.subject.is_some(),
        "time" => ev.time.is_some(),
        other => ev.extensions.contains_key(other),
    }
}

fn check_data(
    index: usize,
    ev: &CloudEvent,
    schema: &jsonschema::Validator,
    errs: &mut FieldErrors,
    seen: &mut Seen,
) {
    let not_json = |message: String| {
        FieldError::new(message)
            .at(index)
            .pointer("/data")
            .keyword("contentMediaType")
    };
    let instance: serde_json::Value = match &ev.data {
        // No data is validated as `null`: a schema that wants an object then says so.
        None => serde_json::Value::Null,
        Some(Data::Json(bytes)) => match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                errs.push(not_json(format!("data is not valid JSON: {e}")));
                seen.add(ProblemKind::SchemaViolation);
                return;
            }
        },
        Some(Data::Text(_) | Data::Binary(_)) => {
            errs.push(not_json(format!(
                "type {:?} has a JSON Schema, so its data must be JSON; this event's data is {}",
                ev.ty,
                ev.datacontenttype
                    .as_deref()
                    .map_or_else(|| "binary".to_string(), |ct| format!("{ct:?}"))
            )));
            seen.add(ProblemKind::SchemaViolation);
            return;
        }
    };
    // The cheap yes/no pass first: most events are valid and need no error list.
    if schema.is_valid(&instance) {
        return;
    }
    for error in schema.iter_errors(&instance) {
        let mut at = String::from("/data");
        at.push_str(error.instance_path().as_str());
        // `required` fails at the object; point at the missing member itself.
        if let ValidationErrorKind::Required { property } = error.kind()
            && let Some(name) = property.as_str()
        {
            at.push_str(&pointer(name));
        }
        errs.push(
            FieldError::new(error.to_string())
                .at(index)
                .pointer(at)
                .keyword(error.kind().keyword()),
        );
        seen.add(ProblemKind::SchemaViolation);
    }
}
