//! Parsing of the duration (`250ms`, `30s`, `5m`, `90d`) and byte-size (`256KiB`, `1MiB`)
//! strings used throughout the resources. The grammar is deliberately strict — one integer
//! and one unit, no spaces — so that a typo is an error instead of a surprise.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error(
        "invalid duration {0:?}: expected an integer and a unit (ms, s, m, h, d), e.g. \"250ms\" or \"90d\""
    )]
    Duration(String),
    #[error(
        "invalid size {0:?}: expected an integer and an optional unit (B, KiB, MiB, GiB, KB, MB, GB), e.g. \"256KiB\""
    )]
    Size(String),
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n = s[..digits].parse().ok()?;
    Some((n, &s[digits..]))
}

pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let err = || UnitError::Duration(s.to_string());
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let ms_per: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(err()),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(err)
}

pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError::Size(s.to_string());
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// RFC 1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a
/// letter or digit. Resource names and namespaces of Weir kinds must be one.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Why `name` is refused as the name of a Weir resource (an EventStream, Subscription,
/// ArchivePolicy or CachePolicy). Weir builds RabbitMQ queue and exchange names by joining
/// namespace, stream and subscription names with '.', and lane queues by appending `.p<N>`:
/// with DNS labels (no '.') that join is unambiguous, so two resources can never share a
/// queue. The same rule holds in both modes.
pub fn resource_name_problem(name: &str) -> Option<String> {
    (!is_dns_label(name)).then(|| {
        format!(
            "{name:?} is not a valid name: it must be a DNS label (lowercase letters, digits and '-', \
             starting and ending with a letter or digit, at most 63 characters; no '.', since \
             queue and exchange names are made by joining names with '.')"
        )
    })
}

/// RFC 1123 subdomain: DNS labels joined by '.', at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for ok in ["orders", "a", "a-1", "0rders", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "Orders", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("pg.credentials"));
        assert!(!is_dns_subdomain("pg..credentials"));
        assert!(!is_dns_subdomain(".pg"));
    }

    #[test]
    fn resource_names_are_dns_labels() {
        // (name, accepted): a '.' would make the '.'-joined queue names ambiguous.
        let table = [
            ("orders", true),
            ("a-b", true),
            ("x-p0", true),
            ("a.b", false),
            ("b.c", false),
            ("x.p0", false),
            ("Orders", false),
            ("", false),
        ];
        for (name, accepted) in table {
            let problem = resource_name_problem(name);
            assert_eq!(problem.is_none(), accepted, "{name:?}: {problem:?}");
            if let Some(p) = problem {
                assert!(
                    p.starts_with(&format!("{name:?} is not a valid name")),
                    "{p}"
                );
            }
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86400)));
        for bad in ["5 sec", "", "s", "1.5s", "-1s", "10", "1w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_duration("5 sec").unwrap_err().to_string(),
            "invalid duration \"5 sec\": expected an integer and a unit (ms, s, m, h, d), e.g. \"250ms\" or \"90d\""
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4KB"), Ok(4000));
        for bad in ["1 MiB", "MiB", "1mb", "1.5MiB", ""] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
