//! What the client commands share: `<namespace>/<name>` targets, calls to a running weir's
//! HTTP APIs (answers and RFC 7807 problems), and the progress bar of long work.

use anyhow::{Context as _, bail};

/// The token in `--token-file` (surrounding whitespace removed), if one was given.
pub fn read_token(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    Ok(path.map(crate::admin::auth::read_token_file).transpose()?)
}

/// An HTTP client that sends `Authorization: Bearer <token>` with every request when a token
/// is given (the admin API's protected endpoints need one, see docs/security-admin.md).
pub fn http_client(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token contains characters an HTTP header cannot carry")?;
        // Kept out of debug output of the request.
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    crate::tls_provider::http_client_builder()
        .default_headers(headers)
        .build()
        .context("building the HTTP client")
}

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
