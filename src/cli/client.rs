//! What the client commands share: `<namespace>/<name>` targets, calls to a running weir's
//! HTTP APIs (answers and RFC 7807 problems), and the progress bar of long work.

use anyhow::{Context as _, bail};

/// `<namespace>/<name>` split in two; `what` names the second part in the error.
pub fn split<'a>(target: &'a str, what: &str) -> anyhow::Result<(&'a str, &'a str)> {
    match target.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns, name))
        }
        _ => bail!("expected <namespace>/<{what}>, got {target:?}"),
    }
}

/// Sends a request: its status and JSON body (`null` when the body is not JSON). `what` (the
/// method and URL) names the call when it cannot be made.
pub async fn send(
    rb: reqwest::RequestBuilder,
    what: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let r = rb.send().await.with_context(|| what.to_string())?;
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, body))
}

/// The error of a problem answer: its status and `detail`.
pub fn failed(status: u16, body: &serde_json::Value) -> anyhow::Error {
    anyhow::anyhow!("{status}: {}", body["detail"].as_str().unwrap_or(""))
}

/// Sends a request and returns the body of a 2xx, or the problem's `detail` as the error.
pub async fn answer(rb: reqwest::RequestBuilder, what: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = send(rb, what).await?;
    if !(200..300).contains(&status) {
        return Err(failed(status, &body));
    }
    Ok(body)
}

/// Draws `label [#####     ] done/all` on stderr, over the previous one.
pub fn bar(label: &str, done: u64, all: u64) {
    let width = 30usize;
    let filled = (done.min(all) as usize * width) / (all.max(1) as usize);
    eprint!(
        "\r{label} [{}{}] {done}/{all}",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
}
