//! `weir trace <ns> <correlationid>`: a saga's events as a causation tree, from the read API
//! (`GET /v1/namespaces/{ns}/correlations/{id}/events`).

use std::process::ExitCode;

use anyhow::{Context as _, bail};

use super::output::Output;
use crate::data::trace::causation_order;

/// Prints the trace: JSON as the API returns it, or a tree (one line per event, indented under
/// the event named by its `causationid`).
pub async fn trace(
    url: &str,
    token: Option<&str>,
    output: Output,
    namespace: &str,
    correlation_id: &str,
) -> anyhow::Result<ExitCode> {
    let u = format!(
        "{}/v1/namespaces/{}/correlations/{}/events",
        url.trim_end_matches('/'),
        percent_encoding::utf8_percent_encode(namespace, percent_encoding::NON_ALPHANUMERIC),
        percent_encoding::utf8_percent_encode(correlation_id, percent_encoding::NON_ALPHANUMERIC),
    );
    let r = super::client::http_client(token)?
        .get(&u)
        .send()
        .await
        .with_context(|| format!("GET {u}"))?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["detail"].as_str().unwrap_or("no detail")
        );
    }
    if output == Output::Json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_tree(&body));
    Ok(ExitCode::SUCCESS)
}

/// The tree text of a trace answer.
pub fn render_tree(body: &serde_json::Value) -> String {
    let empty = Vec::new();
    let events = body["events"].as_array().unwrap_or(&empty);
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let mut out = String::new();
    if events.is_empty() {
        out.push_str(&format!(
            "no event carries correlationid {}\n",
            s(&body["correlationid"])
        ));
        return out;
    }
    out.push_str(&format!(
        "correlationid {} ({} events)\n",
        s(&body["correlationid"]),
        events.len()
    ));
    let links: Vec<(String, Option<String>)> = events
        .iter()
        .map(|e| (s(&e["id"]), e["causationid"].as_str().map(str::to_string)))
        .collect();
    for (depth, i) in causation_order(&links) {
        let e = &events[i];
        let indent = "   ".repeat(depth);
        let branch = if depth == 0 { "" } else { "└─ " };
        out.push_str(&format!(
            "{indent}{branch}{} {}  {}#{}  {}",
            s(&e["type"]),
            s(&e["id"]),
            s(&e["stream"]),
            e["position"],
            s(&e["recordedTime"]),
        ));
        if let Some(t) = e["traceId"].as_str() {
            out.push_str(&format!("  trace {t}"));
        }
        out.push('\n');
    }
    if body["truncated"] == true {
        out.push_str("… more events carry this correlationid (the trace is cut)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_tree_indented_by_causation() {
        let body = serde_json::json!({
            "correlationid": "saga-1",
            "truncated": false,
            "events": [
                {"stream": "orders", "position": 1, "id": "o1", "type": "order.created", "recordedTime": "t1", "traceId": "4bf92f3577b34da6a3ce929d0e0e4736"},
                {"stream": "orders", "position": 2, "id": "p1", "type": "payment.completed", "causationid": "o1", "recordedTime": "t2"},
                {"stream": "shipping", "position": 1, "id": "s1", "type": "shipment.scheduled", "causationid": "p1", "recordedTime": "t3"},
            ]
        });
        let text = render_tree(&body);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "correlationid saga-1 (3 events)");
        assert!(lines[1].starts_with("order.created o1  orders#1"), "{text}");
        assert!(
            lines[1].ends_with("  trace 4bf92f3577b34da6a3ce929d0e0e4736"),
            "{text}"
        );
        assert!(
            !lines[2].contains("trace"),
            "no trace id, none shown: {text}"
        );
        assert!(lines[2].starts_with("   └─ payment.completed p1"), "{text}");
        assert!(
            lines[3].starts_with("      └─ shipment.scheduled s1  shipping#1"),
            "{text}"
        );
    }
}
