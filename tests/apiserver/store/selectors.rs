//! Label and field selectors of lists and watches (`labelSelector`, `fieldSelector`).

use serde_json::Value;

use super::*;

/// Label and field selectors of a list or watch.
#[derive(Default, Clone, Debug)]
pub struct Selectors {
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_of(s: &str) -> Vec<String> {
    s.trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(|v| v.trim().to_string())
        .collect()
}

impl Selectors {
    /// Parses `labelSelector` and `fieldSelector` query values.
    pub fn parse(label: Option<&str>, field: Option<&str>) -> Result<Self> {
        let mut sel = Self::default();
        for req in split_top(label.unwrap_or_default()) {
            let parsed = if let Some((k, v)) = req.split_once("!=") {
                LabelReq::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set_of(v))
            } else if let Some((k, v)) = req.split_once(" in ") {
                LabelReq::In(k.trim().into(), set_of(v))
            } else if let Some(k) = req.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else if req
                .chars()
                .all(|c| c.is_alphanumeric() || "-_./".contains(c))
            {
                LabelReq::Exists(req)
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {req}"
                )));
            };
            sel.labels.push(parsed);
        }
        for req in split_top(field.unwrap_or_default()) {
            let (k, neg, v) = if let Some((k, v)) = req.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = req.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = req.split_once('=') {
                (k, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {req}"
                )));
            };
            sel.fields.push((k.trim().into(), neg, v.trim().into()));
        }
        Ok(sel)
    }

    /// Whether `object` matches. Field selectors compare any dotted path as a string,
    /// a superset of the fields a real server allows per kind.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, neg, want)| {
                let mut v = object;
                for part in path.split('.') {
                    v = &v[part];
                }
                let got = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (got == *want) != *neg
            })
    }
}
