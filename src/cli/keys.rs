//! `weir forget` and `weir keys rotate`: the personal-data operations (`spec.pii`) through a
//! running `weir`'s admin API, like `weir archive`. Both are audited by the worker.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;

use super::client::{bar, failed, send, split};
use super::output::Output;

#[derive(Subcommand, Debug)]
pub enum KeysAction {
    /// Re-wrap every subject key of the stream with the newest key id of its
    /// `spec.pii.keySecretRef` (no event is rewritten), with a progress bar. Older key ids
    /// can be removed from the Secret afterwards.
    Rotate {
        /// `<namespace>/<stream>`.
        target: String,
    },
}

/// Keys re-wrapped per request: a request takes well under a second, so the bar moves.
const CHUNK: u64 = 500;

/// Percent-encodes a path segment (subjects may hold `/`, spaces, …).
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub async fn forget(
    admin: &str,
    token: Option<&str>,
    output: Output,
    target: &str,
    subject: &str,
) -> anyhow::Result<ExitCode> {
    let client = super::client::http_client(token)?;
    let admin = admin.trim_end_matches('/');
    let (ns, name) = split(target, "stream")?;
    let url = format!(
        "{admin}/v1/namespaces/{ns}/streams/{name}/subjects/{}/key",
        segment(subject)
    );
    let (status, body) = send(client.delete(&url), &format!("DELETE {url}")).await?;
    if !(200..300).contains(&status) {
        bail!(failed(status, &body));
    }
    if output == Output::Json {
        println!("{body}");
    } else if body["forgotten"].as_bool() == Some(true) {
        println!(
            "subject {subject:?} of {target} forgotten: its personal-data fields read as \
             \"weir:pii:forgotten\" (on every worker within {}s)",
            body["otherWorkersWithinSeconds"].as_u64().unwrap_or(0)
        );
    } else {
        println!("subject {subject:?} of {target} had no data key (nothing to forget)");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn keys(
    admin: &str,
    token: Option<&str>,
    output: Output,
    action: KeysAction,
) -> anyhow::Result<ExitCode> {
    let client = super::client::http_client(token)?;
    let admin = admin.trim_end_matches('/');
    match action {
        KeysAction::Rotate { target } => {
            let (ns, name) = split(&target, "stream")?;
            let url =
                format!("{admin}/v1/namespaces/{ns}/streams/{name}/keys/rotate?limit={CHUNK}");
            let mut done = 0u64;
            let mut total = None::<u64>;
            let mut key_id: String;
            loop {
                let (status, body) = send(client.post(&url), &format!("POST {url}")).await?;
                if !(200..300).contains(&status) {
                    if output == Output::Table && done > 0 {
                        eprintln!();
                    }
                    bail!(failed(status, &body));
                }
                let n = body["rewrapped"].as_u64().unwrap_or(0);
                let remaining = body["remaining"].as_u64().unwrap_or(0);
                key_id = body["keyId"].as_str().unwrap_or_default().to_string();
                done += n;
                let all = *total.get_or_insert(done + remaining);
                if output == Output::Table {
                    bar("re-wrapping", done, all);
                }
                // Nothing moved although keys remain: another rotation or a forget races
                // with this one; the next request sees the new state. Stop rather than spin.
                if remaining == 0 || n == 0 {
                    if remaining > 0 {
                        bail!("{remaining} subject keys could not be re-wrapped; run again");
                    }
                    break;
                }
            }
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"keyId": key_id, "rewrapped": done})
                );
            } else {
                eprintln!();
                println!("re-wrapped {done} subject keys of {target} with key id {key_id:?}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
