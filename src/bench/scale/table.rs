//! The scale report's table.

pub(super) fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// The scale report's own table: each figure at N beside the baseline size, the ratio, and
/// the cost per added resource.
pub fn table(details: &serde_json::Value) -> String {
    let (big, base) = (&details["scale"], &details["baseline"]);
    let (ratios, per) = (&details["ratios"], &details["per_added_resource"]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64();
    let mut out = format!(
        "\n{:<46} {:>16} {:>16} {:>9} {:>14}\n",
        "scale",
        format!("N={}", big["streams"]),
        format!("N={}", base["streams"]),
        "ratio",
        "per added res."
    );
    let rows: [(&str, &str, usize); 12] = [
        ("ready_s", "all Ready after (s)", 2),
        (
            "status_worst_ms",
            "worst /v1/status during start-up (ms)",
            1,
        ),
        (
            "pg_sessions_startup_max",
            "PostgreSQL sessions, start-up max",
            0,
        ),
        ("pg_sessions_idle", "PostgreSQL sessions, idle", 0),
        ("amqp_connections", "AMQP connections, idle", 0),
        ("amqp_channels", "AMQP channels, idle", 0),
        ("rss_idle_mb", "RSS idle (MB)", 1),
        ("idle_cpu_percent", "idle CPU (% of one core)", 2),
        ("one_more_ready_ms", "one more stream + sub → Ready (ms)", 0),
        ("one_more_load_ms", "  of which reading the folder (ms)", 2),
        (
            "one_more_build_ms",
            "  of which building the topology (ms)",
            2,
        ),
        ("one_more_apply_ms", "  of which applying it (ms)", 2),
    ];
    for (k, label, d) in rows {
        out.push_str(&format!(
            "{:<46} {:>16} {:>16} {:>9} {:>14}\n",
            label,
            opt(f(big, k), d),
            opt(f(base, k), d),
            opt(f(ratios, k), 2),
            opt(f(per, k), 4),
        ));
    }
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        "resources (streams + subscriptions)",
        big["resources"].to_string(),
        base["resources"].to_string()
    ));
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        "/v1/status polls timed out (> 5 s)",
        format!("{}/{}", big["status_timeouts"], big["status_polls"]),
        format!("{}/{}", base["status_timeouts"], base["status_polls"]),
    ));
    let delivered = |v: &serde_json::Value| {
        format!(
            "{}/{} ({} err)",
            v["delivered"], v["sent"], v["publish_errors"]
        )
    };
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        format!(
            "traffic {} ev/s × {} s: delivered/sent",
            big["rate"], big["traffic_s"]
        ),
        delivered(big),
        delivered(base),
    ));
    let lat =
        |v: &serde_json::Value| format!("{} / {}", opt(f(v, "p50_ms"), 1), opt(f(v, "p99_ms"), 1));
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        "traffic latency p50 / p99 (ms)",
        lat(big),
        lat(base)
    ));
    out
}
