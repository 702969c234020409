//! Subscription filters in Knative's dialect (the CloudEvents Subscriptions API filters without
//! CESQL).
//!
//! Each filter object has exactly one operator:
//! - `exact`, `prefix`, `suffix`: a map of attribute name to string, at least one entry; every
//!   entry must hold (the attribute's value equals / starts with / ends with the string);
//! - `all`: a non-empty list of filters that must all match;
//! - `any`: a non-empty list of filters of which at least one must match;
//! - `not`: one filter that must not match.
//!
//! An attribute the event does not carry never matches (so `not` of it does). The top-level list
//! of a Subscription is ANDed, like `all`.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::topology::report::{Problem, Reason};

/// One parsed filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Every attribute equals its value.
    Exact(BTreeMap<String, String>),
    /// Every attribute starts with its value.
    Prefix(BTreeMap<String, String>),
    /// Every attribute ends with its value.
    Suffix(BTreeMap<String, String>),
    /// Every filter matches.
    All(Vec<Filter>),
    /// At least one filter matches.
    Any(Vec<Filter>),
    /// The filter does not match.
    Not(Box<Filter>),
}

impl Filter {
    /// Whether an event matches. `attr` returns the value of a context attribute or extension
    /// by its (lowercase) name, as a string, or `None` when the event does not carry it.
    pub fn matches(&self, attr: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            Filter::Exact(m) => each(m, attr, |value, want| value == want),
            Filter::Prefix(m) => each(m, attr, |value, want| value.starts_with(want)),
            Filter::Suffix(m) => each(m, attr, |value, want| value.ends_with(want)),
            Filter::All(fs) => fs.iter().all(|f| f.matches(attr)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(attr)),
            Filter::Not(f) => !f.matches(attr),
        }
    }
}

/// Whether an event matches every filter of a list (an empty list matches everything).
pub fn matches_all(filters: &[Filter], attr: &dyn Fn(&str) -> Option<String>) -> bool {
    filters.iter().all(|f| f.matches(attr))
}

fn each(
    map: &BTreeMap<String, String>,
    attr: &dyn Fn(&str) -> Option<String>,
    test: impl Fn(&str, &str) -> bool,
) -> bool {
    map.iter()
        .all(|(name, want)| attr(name).is_some_and(|value| test(&value, want)))
}

/// Parses a list of filter objects; `path` is where the list sits (e.g. `spec.filters`).
/// Reports every problem found, each with the path of the offending filter.
pub fn parse_filters(values: &[Value], path: &str) -> Result<Vec<Filter>, Vec<Problem>> {
    let mut problems = Vec::new();
    let filters = parse_list(values, path, &mut problems);
    if problems.is_empty() {
        Ok(filters)
    } else {
        Err(problems)
    }
}

fn problem(problems: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    problems.push(Problem {
        path: path.to_string(),
        message: message.into(),
        reason: Reason::InvalidSpec,
    });
}

fn parse_list(values: &[Value], path: &str, problems: &mut Vec<Problem>) -> Vec<Filter> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| parse_one(v, &format!("{path}[{i}]"), problems))
        .collect()
}

const OPERATORS: &str = "exact, prefix, suffix, all, any or not";

fn parse_one(value: &Value, path: &str, problems: &mut Vec<Problem>) -> Option<Filter> {
    let Some(obj) = value.as_object() else {
        problem(
            problems,
            path,
            format!("a filter must be an object with one of {OPERATORS}"),
        );
        return None;
    };
    let mut entries = obj.iter();
    let (op, arg) = match (entries.next(), entries.next()) {
        (Some(entry), None) => entry,
        (None, _) => {
            problem(
                problems,
                path,
                format!("empty filter: expected one of {OPERATORS}"),
            );
            return None;
        }
        (Some(_), Some(_)) => {
            let ops: Vec<&str> = obj.keys().map(String::as_str).collect();
            problem(
                problems,
                path,
                format!(
                    "a filter has exactly one operator, found {}: nest them in `all` to combine",
                    ops.join(", ")
                ),
            );
            return None;
        }
    };
    let here = format!("{path}.{op}");
    match op.as_str() {
        "exact" => parse_map(arg, &here, false, problems).map(Filter::Exact),
        "prefix" => parse_map(arg, &here, true, problems).map(Filter::Prefix),
        "suffix" => parse_map(arg, &here, true, problems).map(Filter::Suffix),
        "all" | "any" => {
            let Some(list) = arg.as_array() else {
                problem(problems, &here, format!("`{op}` takes a list of filters"));
                return None;
            };
            if list.is_empty() {
                problem(problems, &here, format!("`{op}` needs at least one filter"));
                return None;
            }
            let before = problems.len();
            let parsed = parse_list(list, &here, problems);
            if problems.len() > before {
                return None;
            }
            Some(if op == "all" {
                Filter::All(parsed)
            } else {
                Filter::Any(parsed)
            })
        }
        "not" => parse_one(arg, &here, problems).map(|f| Filter::Not(Box::new(f))),
        "cesql" => {
            problem(problems, &here, "CESQL filters are not supported");
            None
        }
        other => {
            problem(
                problems,
                path,
                format!("unknown filter operator {other:?}: expected one of {OPERATORS}"),
            );
            None
        }
    }
}

/// CloudEvents attribute names: lowercase ASCII letters and digits.
pub fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn parse_map(
    value: &Value,
    path: &str,
    non_empty_values: bool,
    problems: &mut Vec<Problem>,
) -> Option<BTreeMap<String, String>> {
    let Some(obj) = value.as_object() else {
        problem(
            problems,
            path,
            "expected a map of attribute name to string value",
        );
        return None;
    };
    if obj.is_empty() {
        problem(problems, path, "needs at least one attribute");
        return None;
    }
    let before = problems.len();
    let mut map = BTreeMap::new();
    for (name, v) in obj {
        if !is_attribute_name(name) {
            problem(
                problems,
                path,
                format!("attribute name {name:?} must be lowercase letters and digits"),
            );
            continue;
        }
        match v.as_str() {
            Some(s) if non_empty_values && s.is_empty() => problem(
                problems,
                &format!("{path}.{name}"),
                "must not be empty (it would match every value)",
            ),
            Some(s) => {
                map.insert(name.clone(), s.to_string());
            }
            None => problem(
                problems,
                &format!("{path}.{name}"),
                format!("expected a string, found {v} (quote it)"),
            ),
        }
    }
    (problems.len() == before).then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| m.get(name).cloned()
    }

    fn parse(v: Value) -> Vec<Filter> {
        parse_filters(v.as_array().unwrap(), "spec.filters").unwrap()
    }

    #[test]
    fn operators_match_as_knative_does() {
        let order_eu = event(&[
            ("type", "order.created"),
            ("region", "eu"),
            ("subject", "o-17"),
        ]);
        let order_us = event(&[
            ("type", "order.created"),
            ("region", "us"),
            ("subject", "o-18"),
        ]);
        let payment = event(&[("type", "payment.done"), ("subject", "p-1")]);
        // (filters, matches order_eu, matches order_us, matches payment)
        let table = [
            (json!([]), true, true, true),
            (
                json!([{"exact": {"type": "order.created"}}]),
                true,
                true,
                false,
            ),
            (json!([{"exact": {"type": "order."}}]), false, false, false),
            (
                json!([{"exact": {"type": "order.created", "region": "eu"}}]),
                true,
                false,
                false,
            ),
            (json!([{"prefix": {"type": "order."}}]), true, true, false),
            (json!([{"suffix": {"type": ".done"}}]), false, false, true),
            (json!([{"suffix": {"subject": "17"}}]), true, false, false),
            // Top-level filters are ANDed.
            (
                json!([{"prefix": {"type": "order."}}, {"exact": {"region": "eu"}}]),
                true,
                false,
                false,
            ),
            (
                json!([{"all": [{"prefix": {"type": "order."}}, {"exact": {"region": "us"}}]}]),
                false,
                true,
                false,
            ),
            (
                json!([{"any": [{"exact": {"region": "eu"}}, {"prefix": {"type": "payment."}}]}]),
                true,
                false,
                true,
            ),
            (
                json!([{"not": {"exact": {"region": "eu"}}}]),
                false,
                true,
                true,
            ),
            // A missing attribute never matches, so `not` of it does.
            (json!([{"exact": {"region": "eu"}}]), true, false, false),
            (
                json!([{"not": {"prefix": {"region": "e"}}}]),
                false,
                true,
                true,
            ),
            // Nesting.
            (
                json!([{"any": [
                    {"all": [{"prefix": {"type": "order."}}, {"not": {"exact": {"region": "eu"}}}]},
                    {"suffix": {"type": "done"}}
                ]}]),
                false,
                true,
                true,
            ),
            (
                json!([{"not": {"any": [{"exact": {"region": "eu"}}, {"exact": {"region": "us"}}]}}]),
                false,
                false,
                true,
            ),
        ];
        for (i, (filters, eu, us, pay)) in table.into_iter().enumerate() {
            let fs = parse(filters.clone());
            assert_eq!(
                matches_all(&fs, &order_eu),
                eu,
                "row {i} {filters} on order_eu"
            );
            assert_eq!(
                matches_all(&fs, &order_us),
                us,
                "row {i} {filters} on order_us"
            );
            assert_eq!(
                matches_all(&fs, &payment),
                pay,
                "row {i} {filters} on payment"
            );
        }
    }

    #[test]
    fn parses_into_the_expected_tree() {
        let fs = parse(json!([{"any": [{"exact": {"a": "1"}}, {"not": {"suffix": {"b": "x"}}}]}]));
        assert_eq!(
            fs,
            vec![Filter::Any(vec![
                Filter::Exact([("a".to_string(), "1".to_string())].into()),
                Filter::Not(Box::new(Filter::Suffix(
                    [("b".to_string(), "x".to_string())].into()
                ))),
            ])]
        );
    }

    #[test]
    fn rejects_malformed_filters_with_their_paths() {
        let cases = [
            (json!(["type"]), "spec.filters[0]", "must be an object"),
            (json!([{}]), "spec.filters[0]", "empty filter"),
            (
                json!([{"exact": {"a": "1"}, "prefix": {"b": "2"}}]),
                "spec.filters[0]",
                "exactly one operator",
            ),
            (
                json!([{"equals": {"a": "1"}}]),
                "spec.filters[0]",
                "unknown filter operator \"equals\"",
            ),
            (
                json!([{"exact": {}}]),
                "spec.filters[0].exact",
                "at least one attribute",
            ),
            (
                json!([{"exact": "type"}]),
                "spec.filters[0].exact",
                "expected a map",
            ),
            (
                json!([{"exact": {"Region": "eu"}}]),
                "spec.filters[0].exact",
                "\"Region\" must be lowercase",
            ),
            (
                json!([{"exact": {"ce-type": "x"}}]),
                "spec.filters[0].exact",
                "lowercase letters and digits",
            ),
            (
                json!([{"exact": {"weirposition": 5}}]),
                "spec.filters[0].exact.weirposition",
                "expected a string",
            ),
            (
                json!([{"prefix": {"type": ""}}]),
                "spec.filters[0].prefix.type",
                "must not be empty",
            ),
            (
                json!([{"all": []}]),
                "spec.filters[0].all",
                "at least one filter",
            ),
            (
                json!([{"any": {"exact": {"a": "b"}}}]),
                "spec.filters[0].any",
                "list of filters",
            ),
            (
                json!([{"exact": {"a": "b"}}, {"any": [{"exact": {"a": "b"}}, {"exact": {"b": 1}}]}]),
                "spec.filters[1].any[1].exact.b",
                "expected a string",
            ),
            (
                json!([{"not": {"all": [{"suffix": {}}]}}]),
                "spec.filters[0].not.all[0].suffix",
                "at least one attribute",
            ),
            (
                json!([{"cesql": "type = 'x'"}]),
                "spec.filters[0].cesql",
                "not supported",
            ),
        ];
        for (filters, path, needle) in cases {
            let problems = parse_filters(filters.as_array().unwrap(), "spec.filters")
                .expect_err(&filters.to_string());
            assert!(
                problems.iter().any(|p| p.path == path
                    && p.message.contains(needle)
                    && p.reason == Reason::InvalidSpec),
                "{filters}: expected {path}: ...{needle}..., got {problems:?}"
            );
        }
    }

    #[test]
    fn reports_every_problem() {
        let problems = parse_filters(
            json!([{"exact": {"A": "1"}}, {"prefix": {"b": ""}}, {"nope": 1}])
                .as_array()
                .unwrap(),
            "spec.filters",
        )
        .unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.filters[0].exact",
                "spec.filters[1].prefix.b",
                "spec.filters[2]"
            ]
        );
        assert_eq!(
            problems[1].to_string(),
            "spec.filters[1].prefix.b: must not be empty (it would match every value)"
        );
    }
}
