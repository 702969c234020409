//! Operator-wide defaults for the fields the CRDs leave without a `default:`, taken from Weir's
//! own values unless the `weir` process's environment overrides them. A value in a resource's
//! spec wins over both.

use std::time::Duration;

/// Defaults applied by [`crate::topology::build::build`] to fields a resource leaves unset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// `batching.maxEvents` (`EVENT_BATCH_SIZE`).
    pub batch_max_events: usize,
    /// `batching.maxDelay` (`EVENT_BATCH_TIMEOUT`, milliseconds).
    pub batch_max_delay: Duration,
    /// `ArchivePolicy.archiveAfter` (`EVENT_ARCHIVE_THRESHOLD`, days).
    pub archive_after: Duration,
    /// `CachePolicy.ttl` (`CACHE_TTL`, seconds).
    pub cache_ttl: Duration,
    /// `CachePolicy.maxItems` (`CACHE_MAX_ITEMS`).
    pub cache_max_items: u64,
    /// The database of `store: {}` (built from `DB_HOST`, `DB_PORT`, `DB_USERNAME`,
    /// `DB_PASSWORD`, `DB_DATABASE`); `None` when `DB_HOST` is unset.
    pub default_database_url: Option<String>,
    /// Whether a Kubernetes API server can authenticate service account tokens (TokenReview):
    /// true in operator mode only. Without it, `ingest.auth.mode: ServiceAccounts` is refused.
    pub token_review: bool,
    /// Whether a stream may set `broker.exchange` to a name outside its namespace's prefix
    /// `weir.<namespace>.` (`WEIR_ALLOW_CUSTOM_EXCHANGES`, or `--allow-custom-exchanges`).
    /// Off by default: one namespace must not claim an exchange another one relies on.
    pub allow_custom_exchanges: bool,
    /// What sinks may reach beyond the guard's default (`--sink-allow-cidrs`,
    /// `--allow-loopback-sinks`); set from the command line, not the environment variables
    /// read here.
    pub sinks: crate::data::delivery::SinkPolicy,
    /// The mount table ArchivePolicy `volume` destinations are checked against: in operator
    /// mode a destination must be a mounted volume that outlives the Pod. `None` (standalone
    /// `weir run`): any directory will do.
    pub archive_mounts: Option<std::sync::Arc<crate::topology::mounts::Mounts>>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            batch_max_events: 50,
            batch_max_delay: Duration::from_millis(5),
            archive_after: Duration::from_secs(90 * 86_400),
            cache_ttl: Duration::from_secs(300),
            cache_max_items: 1000,
            default_database_url: None,
            token_review: false,
            allow_custom_exchanges: false,
            sinks: Default::default(),
            archive_mounts: None,
        }
    }
}

/// A defaults environment variable that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefaultsError {
    /// The variable is set to something that does not parse.
    #[error("environment variable {var}={value:?}: {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A `DB_*` variable is set without `DB_HOST`: probably a forgotten host.
    #[error(
        "environment variable {var} is set but DB_HOST is not: set DB_HOST to use a default database"
    )]
    MissingHost { var: &'static str },
    /// The `DB_SSL*` variables ask for TLS settings that would not work as written.
    #[error("environment variables DB_SSLMODE/DB_SSLROOTCERT/DB_SSLCERT/DB_SSLKEY: {0}")]
    DatabaseTls(String),
}

/// TLS settings of the default database, as libpq names them (`PGSSLMODE`...): each becomes
/// the URL's query parameter of that name.
const DB_TLS_VARS: [(&str, &str); 4] = [
    ("DB_SSLMODE", "sslmode"),
    ("DB_SSLROOTCERT", "sslrootcert"),
    ("DB_SSLCERT", "sslcert"),
    ("DB_SSLKEY", "sslkey"),
];

/// Characters percent-encoded in the user-info part of the URL: everything but RFC 3986
/// "unreserved" characters, so that `@`, `:`, `/`, `%` and friends in a password cannot change
/// how the URL parses.
fn percent_encode_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Defaults {
    /// Reads the defaults from the process environment.
    pub fn from_env() -> Result<Defaults, DefaultsError> {
        Defaults::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the defaults through `lookup` (the environment, or a map in tests). Unset and
    /// empty variables keep Weir's default; a value that does not parse is an error naming the
    /// variable and the value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Defaults, DefaultsError> {
        let get = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
        let mut d = Defaults::default();

        if let Some(v) = get("EVENT_BATCH_SIZE") {
            d.batch_max_events = parse_positive("EVENT_BATCH_SIZE", &v)?;
        }
        if let Some(v) = get("EVENT_BATCH_TIMEOUT") {
            d.batch_max_delay = Duration::from_millis(parse_u64(
                "EVENT_BATCH_TIMEOUT",
                &v,
                "expected a whole number of milliseconds",
            )?);
        }
        if let Some(v) = get("EVENT_ARCHIVE_THRESHOLD") {
            let days: u64 = parse_positive("EVENT_ARCHIVE_THRESHOLD", &v)?;
            d.archive_after = days
                .checked_mul(86_400)
                .map(Duration::from_secs)
                .ok_or_else(|| invalid("EVENT_ARCHIVE_THRESHOLD", &v, "too many days"))?;
        }
        if let Some(v) = get("CACHE_TTL") {
            d.cache_ttl = Duration::from_secs(parse_positive("CACHE_TTL", &v)?);
        }
        if let Some(v) = get("CACHE_MAX_ITEMS") {
            d.cache_max_items = parse_positive("CACHE_MAX_ITEMS", &v)?;
        }
        d.default_database_url = database_url(&get)?;
        if let Some(v) = get("WEIR_ALLOW_CUSTOM_EXCHANGES") {
            d.allow_custom_exchanges = match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(invalid(
                        "WEIR_ALLOW_CUSTOM_EXCHANGES",
                        &v,
                        "expected true or false",
                    ));
                }
            };
        }
        Ok(d)
    }
}

fn invalid(var: &'static str, value: &str, expected: &'static str) -> DefaultsError {
    DefaultsError::Invalid {
        var,
        value: value.to_string(),
        expected,
    }
}

fn parse_u64(var: &'static str, value: &str, expected: &'static str) -> Result<u64, DefaultsError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| invalid(var, value, expected))
}

/// Parses a whole number of at least 1 (zero makes no sense for any of these settings: an
/// empty batch, an immediately expiring cache...).
fn parse_positive<T: TryFrom<u64>>(var: &'static str, value: &str) -> Result<T, DefaultsError> {
    const EXPECTED: &str = "expected a whole number of at least 1";
    let n = parse_u64(var, value, EXPECTED)?;
    if n == 0 {
        return Err(invalid(var, value, EXPECTED));
    }
    T::try_from(n).map_err(|_| invalid(var, value, "the number is too large"))
}

/// `postgres://user:password@host:port/database` from the `DB_*` variables, or `None` when
/// none is set.
fn database_url(get: &impl Fn(&str) -> Option<String>) -> Result<Option<String>, DefaultsError> {
    let Some(host) = get("DB_HOST") else {
        let tls_vars = DB_TLS_VARS.iter().map(|(var, _)| *var);
        for var in ["DB_PORT", "DB_USERNAME", "DB_PASSWORD", "DB_DATABASE"]
            .into_iter()
            .chain(tls_vars)
        {
            if get(var).is_some() {
                return Err(DefaultsError::MissingHost { var });
            }
        }
        return Ok(None);
    };
    let host = host.trim();
    if host
        .chars()
        .any(|c| c.is_whitespace() || "/@?#".contains(c))
    {
        return Err(invalid("DB_HOST", host, "expected a host name or address"));
    }
    // A bare IPv6 address needs brackets in a URL.
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let port = match get("DB_PORT") {
        Some(p) => {
            let port: u16 = p
                .trim()
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("DB_PORT", &p, "expected a port number 1-65535"))?;
            port
        }
        None => 5432,
    };
    let user = get("DB_USERNAME").unwrap_or_else(|| "postgres".to_string());
    let mut userinfo = percent_encode_userinfo(&user);
    // The password is used as is (not trimmed): spaces may be part of it.
    if let Some(password) = get("DB_PASSWORD") {
        userinfo.push(':');
        userinfo.push_str(&percent_encode_userinfo(&password));
    }
    let database = get("DB_DATABASE").unwrap_or_else(|| "postgres".to_string());
    let mut url = format!(
        "postgres://{userinfo}@{host}:{port}/{}",
        percent_encode_userinfo(&database)
    );
    let mut sep = '?';
    for (var, param) in DB_TLS_VARS {
        if let Some(v) = get(var) {
            url.push(sep);
            url.push_str(param);
            url.push('=');
            url.push_str(&percent_encode_userinfo(v.trim()));
            sep = '&';
        }
    }
    crate::data::store::tls::url_tls(&url).map_err(DefaultsError::DatabaseTls)?;
    Ok(Some(url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Defaults, DefaultsError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Defaults::from_lookup(|k| env.get(k).cloned())
    }

    #[test]
    fn weir_defaults_without_env() {
        assert_eq!(from(&[]), Ok(Defaults::default()));
        let d = Defaults::default();
        assert_eq!(d.batch_max_events, 50);
        assert_eq!(d.batch_max_delay, Duration::from_millis(5));
        assert_eq!(d.archive_after, Duration::from_secs(90 * 86_400));
        assert_eq!(d.cache_ttl, Duration::from_secs(300));
        assert_eq!(d.cache_max_items, 1000);
        assert_eq!(d.default_database_url, None);
    }

    #[test]
    fn env_overrides() {
        let d = from(&[
            ("EVENT_BATCH_SIZE", "200"),
            ("EVENT_BATCH_TIMEOUT", "20"),
            ("EVENT_ARCHIVE_THRESHOLD", "30"),
            ("CACHE_TTL", "60"),
            ("CACHE_MAX_ITEMS", "5000"),
        ])
        .unwrap();
        assert_eq!(d.batch_max_events, 200);
        assert_eq!(d.batch_max_delay, Duration::from_millis(20));
        assert_eq!(d.archive_after, Duration::from_secs(30 * 86_400));
        assert_eq!(d.cache_ttl, Duration::from_secs(60));
        assert_eq!(d.cache_max_items, 5000);
        // An empty variable is as good as unset.
        assert_eq!(
            from(&[("EVENT_BATCH_SIZE", "")]).unwrap().batch_max_events,
            50
        );
    }

    #[test]
    fn bad_values_name_variable_and_value() {
        let err = from(&[("EVENT_BATCH_TIMEOUT", "5ms")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable EVENT_BATCH_TIMEOUT=\"5ms\": expected a whole number of milliseconds"
        );
        for (var, value) in [
            ("EVENT_BATCH_SIZE", "0"),
            ("EVENT_BATCH_SIZE", "-3"),
            ("CACHE_TTL", "5m"),
            ("CACHE_MAX_ITEMS", "lots"),
            ("EVENT_ARCHIVE_THRESHOLD", "99999999999999999"),
            ("DB_PORT", "70000"),
        ] {
            let mut pairs = vec![(var, value)];
            if var == "DB_PORT" {
                pairs.push(("DB_HOST", "db"));
            }
            let err = from(&pairs).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains(value), "{err}");
        }
    }

    #[test]
    fn database_url_is_built_and_encoded() {
        let d = from(&[
            ("DB_HOST", "pg.shop.svc"),
            ("DB_PORT", "6432"),
            ("DB_USERNAME", "weir@shop"),
            ("DB_PASSWORD", "p@ss:w/rd%"),
            ("DB_DATABASE", "events"),
        ])
        .unwrap();
        assert_eq!(
            d.default_database_url.as_deref(),
            Some("postgres://weir%40shop:p%40ss%3Aw%2Frd%25@pg.shop.svc:6432/events")
        );
        let d = from(&[("DB_HOST", "::1")]).unwrap();
        assert_eq!(
            d.default_database_url.as_deref(),
            Some("postgres://postgres@[::1]:5432/postgres")
        );
        assert_eq!(
            from(&[("DB_PASSWORD", "x")]),
            Err(DefaultsError::MissingHost { var: "DB_PASSWORD" })
        );
    }

    #[test]
    fn database_tls_variables_become_url_parameters() {
        let d = from(&[
            ("DB_HOST", "pg"),
            ("DB_SSLMODE", "verify-full"),
            ("DB_SSLROOTCERT", "/etc/weir/db/ca.crt"),
        ])
        .unwrap();
        assert_eq!(
            d.default_database_url.as_deref(),
            Some(
                "postgres://postgres@pg:5432/postgres?sslmode=verify-full&sslrootcert=%2Fetc%2Fweir%2Fdb%2Fca.crt"
            )
        );
        let err = from(&[("DB_HOST", "pg"), ("DB_SSLROOTCERT", "/ca.crt")]).unwrap_err();
        assert!(
            err.to_string().contains("ignored with sslmode=prefer"),
            "{err}"
        );
        assert!(matches!(
            from(&[("DB_HOST", "pg"), ("DB_SSLMODE", "allow")]),
            Err(DefaultsError::DatabaseTls(_))
        ));
        assert_eq!(
            from(&[("DB_SSLMODE", "require")]),
            Err(DefaultsError::MissingHost { var: "DB_SSLMODE" })
        );
    }
}
