//! `weir status`: every resource of a running weir and its Ready condition.

use std::process::ExitCode;

use super::output::Output;

pub async fn status(admin: &str, token: Option<&str>, output: Output) -> anyhow::Result<ExitCode> {
    let url = format!("{}/v1/status", admin.trim_end_matches('/'));
    let client = super::client::http_client(token)?;
    let body = super::client::answer(client.get(&url), &format!("GET {url}")).await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    if body["details"] == false {
        // A weir whose admin API needs a token answers a summary without one.
        let s = &body["summary"];
        println!(
            "{} resources, {} ready, {} not ready (details need a token: --token-file)",
            s["resources"], s["ready"], s["notReady"]
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<14} {:<28} {:<6} MESSAGE", "KIND", "NAME", "READY");
    let empty = vec![];
    for r in body["resources"].as_array().unwrap_or(&empty) {
        let name = format!(
            "{}/{}",
            r["namespace"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or("")
        );
        let ready = r["conditions"][0]["status"].as_str().unwrap_or("Unknown");
        let msg = r["conditions"][0]["message"].as_str().unwrap_or("");
        println!(
            "{:<14} {:<28} {:<6} {}",
            r["kind"].as_str().unwrap_or(""),
            name,
            ready,
            msg
        );
    }
    for p in body["problems"].as_array().unwrap_or(&empty) {
        println!("problem: {}", p.as_str().unwrap_or(""));
    }
    Ok(ExitCode::SUCCESS)
}
