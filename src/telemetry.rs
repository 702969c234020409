//! Logging: `RUST_LOG` filters (default `info`), `WEIR_LOG_FORMAT=json` for JSON lines.
//! Audit records (`crate::audit`) are written apart from the log, one JSON object per line,
//! unfiltered.
//!
//! Whatever `RUST_LOG` says, the third-party targets in [`QUIET`] are capped (see there for
//! which and why): they log per message, per statement or per frame, so left alone their
//! volume follows the traffic rather than what a person needs to read. A `RUST_LOG` that
//! names one of them explicitly (`RUST_LOG=info,lapin::returned_messages=trace`) gets what it
//! asks for there.

use tracing_subscriber::EnvFilter;

/// The level `RUST_LOG` starts from when it is unset or empty.
const DEFAULT_LEVEL: &str = "info";

/// Third-party log targets capped by default: (target, most verbose level kept, why).
///
/// A cap only ever lowers what `RUST_LOG` would let through, never raises it (see
/// [`directives`]).
pub const QUIET: &[(&str, Level, &str)] = &[
    // WARN with the whole message (~2.4 KB a line) for every message RabbitMQ returns as
    // unroutable (`mandatory`): every relayed event no queue takes, e.g. on a stream without
    // subscriptions or an event type no binding takes. Weir counts these
    // (`weir_relay_events_total{outcome="unroutable"}`, `weir_broker_publish_total`).
    (
        "lapin::returned_messages",
        Level::Off,
        "per returned message",
    ),
    // ERROR for every channel the broker closes, including the 404 answers to the passive
    // declares Weir makes on purpose (is this retry bucket there?). Each such failure reaches
    // Weir as the operation's result, and Weir logs the ones that matter with their context.
    (
        "lapin::channel",
        Level::Off,
        "per channel the broker closes",
    ),
    // ERROR for every delivery that arrives for a consumer whose stream Weir has dropped
    // (prefetched messages while a subscription stops or restarts); RabbitMQ delivers them
    // again once the channel closes, so nothing is lost.
    (
        "lapin::consumer",
        Level::Off,
        "per delivery to a dropped consumer",
    ),
    // DEBUG/TRACE for every frame, channel and confirm.
    ("lapin", Level::Info, "per frame"),
    // DEBUG for every statement, WARN for every statement over a second: while the database
    // is slow that is every append and every relay read. Store latency is in Weir's metrics.
    ("sqlx::query", Level::Off, "per statement"),
    // WARN for every pool acquire slower than 2 s: every request while a pool is exhausted,
    // which Weir reports as the resource's condition and the request's 503.
    ("sqlx::pool::acquire", Level::Off, "per connection acquire"),
    // INFO for every NOTICE PostgreSQL sends, e.g. "relation … already exists, skipping" for
    // each `IF NOT EXISTS` when a stream is provisioned; warnings and errors are kept.
    (
        "sqlx::postgres::notice",
        Level::Warn,
        "per NOTICE of a statement",
    ),
    // DEBUG/TRACE for every HTTP/2 frame (sinks over HTTP/2): kept out of `RUST_LOG=debug`,
    // which is for Weir's own debug lines.
    ("h2", Level::Info, "per frame"),
    // DEBUG for every connection and pooled request of the HTTP clients and servers.
    ("hyper", Level::Info, "per connection and request"),
    ("hyper_util", Level::Info, "per connection and request"),
    ("reqwest", Level::Info, "per request"),
];

/// A log level as `RUST_LOG` spells it, ordered from quietest to most verbose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "off" => Level::Off,
            "error" => Level::Error,
            "warn" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// One plain directive of `RUST_LOG`: `level`, `target` (= trace) or `target=level`.
/// Directives with span or field filters (`target[span{f=v}]=level`) apply only inside
/// those spans; they are kept in the filter but do not count as naming a target or setting
/// its level here.
struct Directive<'a> {
    target: Option<&'a str>,
    level: Level,
}

fn parse_directives(rust_log: &str) -> Vec<Directive<'_>> {
    rust_log
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('['))
        .filter_map(|d| match d.split_once('=') {
            Some((target, level)) => Some(Directive {
                target: Some(target.trim()),
                level: Level::parse(level)?,
            }),
            None => Some(match Level::parse(d) {
                Some(level) => Directive {
                    target: None,
                    level,
                },
                None => Directive {
                    target: Some(d),
                    level: Level::Trace,
                },
            }),
        })
        .collect()
}

/// True if `module` is `target` or inside it (`lapin::channel` is inside `lapin`).
fn within(module: &str, target: &str) -> bool {
    module == target
        || module
            .strip_prefix(target)
            .is_some_and(|rest| rest.starts_with("::"))
}

/// The filter directives for a `RUST_LOG` value (`None` or empty: `info`): the
/// value itself, then a cap for each [`QUIET`] target that it does not name explicitly.
///
/// A cap is `min(cap, the level RUST_LOG gives the target)`, where the level given is the
/// one of RUST_LOG's most specific directive for an enclosing target (`lapin` for
/// `lapin::channel`) or else its global level; it is added only when it lowers that level,
/// so `RUST_LOG=warn` never lets an `info` line of `h2` through and `RUST_LOG=weir=debug`
/// (nothing else enabled) gets no third-party lines at all.
pub fn directives(rust_log: Option<&str>) -> String {
    let base = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_LEVEL);
    let parsed = parse_directives(base);
    let mut out = base.to_string();
    for &(target, cap, _) in QUIET {
        if parsed.iter().any(|d| d.target == Some(target)) {
            continue; // Named explicitly: RUST_LOG decides.
        }
        let inherited = parsed
            .iter()
            .filter_map(|d| d.target.filter(|t| within(target, t)).map(|t| (t.len(), d)))
            .max_by_key(|(len, _)| *len)
            .map(|(_, d)| d.level)
            .or_else(|| {
                parsed
                    .iter()
                    .filter(|d| d.target.is_none())
                    .map(|d| d.level)
                    .next_back()
            });
        if let Some(level) = inherited
            && cap < level
        {
            out.push_str(&format!(",{target}={}", cap.as_str()));
        }
    }
    out
}

/// Installs the log (and, given `otel`, the exporter of the journey spans: `crate::otel`).
pub fn init(otel: Option<crate::otel::OtelLayer>) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, invalid) = match EnvFilter::try_new(directives(rust_log.as_deref())) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(directives(None)), Some(e)),
    };
    let json = std::env::var("WEIR_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Audit records go their own way (`crate::audit::layer`): one JSON object per line in both
    // formats and whatever RUST_LOG says, so the log layer leaves them out.
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // The journey spans are for the exporter only: in the log they would only prefix lines.
    let log_filter = filter.and(tracing_subscriber::filter::filter_fn(|m| {
        !crate::audit::is_audit(m) && m.target() != crate::data::tracecontext::SPAN_TARGET
    }));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let log = if json {
        fmt.json().with_filter(log_filter).boxed()
    } else {
        fmt.with_filter(log_filter).boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(log)
        .with(crate::audit::layer())
        .try_init();
    if let Some(e) = invalid {
        tracing::warn!(error = %e, "RUST_LOG is not a valid filter; logging at the default level");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(rust_log: Option<&str>) -> Vec<String> {
        let d = directives(rust_log);
        let base = rust_log.map(str::trim).filter(|s| !s.is_empty());
        let rest = d
            .strip_prefix(base.unwrap_or(DEFAULT_LEVEL))
            .unwrap_or_default();
        rest.split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn the_default_caps_every_quiet_target() {
        let d = directives(None);
        assert!(d.starts_with("info,"), "{d}");
        for (target, cap, _) in QUIET {
            // A cap at info changes nothing under info: it is left out.
            let present = d.contains(&format!(",{target}="));
            assert_eq!(present, *cap < Level::Info, "{target} in {d}");
        }
        assert!(d.contains(",lapin::returned_messages=off"), "{d}");
        assert!(d.contains(",lapin::channel=off"), "{d}");
        assert!(d.contains(",sqlx::postgres::notice=warn"), "{d}");
        assert_eq!(directives(Some("  ")), d);
        assert!(EnvFilter::try_new(&d).is_ok(), "{d}");
    }

    #[test]
    fn rust_log_set_keeps_the_caps() {
        let d = directives(Some("info"));
        assert!(d.contains("lapin::returned_messages=off"), "{d}");
        assert!(d.contains("sqlx::query=off"), "{d}");
        assert!(
            !d.contains("h2="),
            "info already hides h2's debug lines: {d}"
        );
        let d = directives(Some("debug"));
        assert!(d.starts_with("debug,"), "{d}");
        for target in ["h2=info", "hyper=info", "reqwest=info", "lapin=info"] {
            assert!(d.contains(target), "{target} in {d}");
        }
        assert!(EnvFilter::try_new(&d).is_ok(), "{d}");
    }

    #[test]
    fn a_target_named_explicitly_is_left_to_rust_log() {
        let d = directives(Some("info,lapin::returned_messages=trace"));
        assert!(d.contains("lapin::returned_messages=trace"), "{d}");
        assert!(!d.contains("lapin::returned_messages=off"), "{d}");
        // The other caps stay.
        assert!(d.contains("lapin::channel=off"), "{d}");
        // A bare target name means trace for it.
        let d = directives(Some("warn,lapin::channel"));
        assert!(!d.contains("lapin::channel=off"), "{d}");
    }

    #[test]
    fn a_cap_never_raises_a_level() {
        // Under a global warn, h2's cap (info) would let more through: not added.
        assert_eq!(
            caps(Some("warn")),
            [
                "lapin::returned_messages=off",
                "lapin::channel=off",
                "lapin::consumer=off",
                "sqlx::query=off",
                "sqlx::pool::acquire=off",
            ]
        );
        // Nothing enabled for the third-party crates: nothing to cap.
        assert!(caps(Some("weir=debug")).is_empty());
        assert!(caps(Some("off")).is_empty());
        // An enclosing target's level is what is capped, more specific than the global one.
        let c = caps(Some("warn,lapin=debug"));
        assert!(
            c.contains(&"lapin::returned_messages=off".to_string()),
            "{c:?}"
        );
        assert!(!c.iter().any(|d| d.starts_with("lapin=")), "named: {c:?}");
        let c = caps(Some("error,sqlx=debug"));
        assert!(
            c.contains(&"sqlx::postgres::notice=warn".to_string()),
            "{c:?}"
        );
        assert!(!c.iter().any(|d| d.starts_with("h2=")), "{c:?}");
    }

    #[test]
    fn span_directives_and_odd_spellings_are_kept_as_given() {
        let d = directives(Some("info,weir[relay{stream=a}]=trace, WARN "));
        assert!(
            d.starts_with("info,weir[relay{stream=a}]=trace, WARN"),
            "{d}"
        );
        // The last global level counts (WARN): sqlx's notice cap (warn) changes nothing.
        assert!(!d.contains("sqlx::postgres::notice"), "{d}");
        assert!(d.contains("lapin::channel=off"), "{d}");
    }

    #[test]
    fn within_respects_module_boundaries() {
        assert!(within("lapin::channel", "lapin"));
        assert!(within("lapin", "lapin"));
        assert!(!within("lapinx::channel", "lapin"));
        assert!(!within("lapin", "lapin::channel"));
    }
}
