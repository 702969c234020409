//! Logging: `RUST_LOG` filters (default `info`), `WEIR_LOG_FORMAT=json` for JSON lines.

use tracing_subscriber::EnvFilter;

/// lapin logs every message RabbitMQ returns as unroutable at WARN; for Weir an unroutable
/// event is an expected outcome (counted in metrics), not a warning. lapin also logs every
/// channel the broker closes at ERROR, including the NOT_FOUND answers to the passive declares
/// Weir makes on purpose (is this retry bucket there?); each such failure reaches Weir as a
/// result, and Weir logs the ones that matter with their context.
const DEFAULT_FILTER: &str = "info,lapin::returned_messages=error,lapin::channel=off";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var("WEIR_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already set (tests): keep that one.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
