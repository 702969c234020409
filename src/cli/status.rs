//! `weir status`: every resource of a running weir and its Ready condition.

use std::process::ExitCode;

use anyhow::Context as _;

use super::output::Output;

pub async fn status(admin: &str, output: Output) -> anyhow::Result<ExitCode> {
    let url = format!("{}/v1/status", admin.trim_end_matches('/'));
    let body: serde_json::Value = reqwest::get(&url)
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?
        .json()
        .await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&body)?);
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
