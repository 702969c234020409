//! TLS of the store's connections: what a PostgreSQL URL asks for (`sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`), the stream's `spec.store.tls` applied on top, and the errors of a
//! failed handshake named after the connection.
//!
//! Every connection of a database (pool, notification session, lock session, failover
//! probes) is opened from the options built here, so none of them can skip TLS.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::topology::TlsPlan;

/// What a URL's query says about TLS (parameter names as sqlx reads them, aliases included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlTls {
    /// `sslmode`, lower-cased; `None` means sqlx's default (`prefer`).
    pub mode: Option<String>,
    /// `sslrootcert` (a file path) is set.
    pub root_cert: bool,
    /// `sslcert` (a file path) is set.
    pub cert: bool,
    /// `sslkey` (a file path) is set.
    pub key: bool,
}

impl UrlTls {
    /// Whether every connection of this URL is encrypted (no plain-text fallback).
    pub fn insists(&self) -> bool {
        matches!(
            self.mode.as_deref(),
            Some("require" | "verify-ca" | "verify-full")
        )
    }
}

/// The parameters sqlx reads, each under its aliases.
const MODE: [&str; 2] = ["sslmode", "ssl-mode"];
const ROOT_CERT: [&str; 3] = ["sslrootcert", "ssl-root-cert", "ssl-ca"];
const CERT: [&str; 2] = ["sslcert", "ssl-cert"];
const KEY: [&str; 2] = ["sslkey", "ssl-key"];

/// Reads the TLS parameters of a PostgreSQL URL, refusing what would not work as written:
/// an unknown `sslmode`, `sslmode=allow` (sqlx never encrypts with it, where libpq would when
/// the server insists), a parameter spelt in another case (sqlx would ignore it and connect
/// with `prefer`), `sslrootcert=system` (libpq's keyword; the system's roots are always
/// trusted here), half a client certificate, and certificate options with an `sslmode` that
/// ignores them. The message never contains the URL (it may hold a password).
pub fn url_tls(url: &str) -> Result<UrlTls, String> {
    let Ok(parsed) = url::Url::parse(url) else {
        // Not a URL at all: the caller's URL check says so.
        return Ok(UrlTls::default());
    };
    let mut tls = UrlTls::default();
    for (k, v) in parsed.query_pairs() {
        let known = MODE.iter().chain(&ROOT_CERT).chain(&CERT).chain(&KEY);
        if let Some(name) = known
            .clone()
            .find(|n| k.eq_ignore_ascii_case(n) && k != **n)
        {
            return Err(format!(
                "parameter {k:?} must be spelt {name:?} (lower case): as written it would be \
                 ignored and the connection would not use the TLS settings asked for"
            ));
        }
        if MODE.contains(&&*k) {
            let mode = v.to_ascii_lowercase();
            match mode.as_str() {
                "disable" | "prefer" | "require" | "verify-ca" | "verify-full" => {}
                "allow" => {
                    return Err(
                        "sslmode=allow is not supported (it would never use TLS, even \
                                with a server that requires it): use prefer, require or \
                                verify-full"
                            .to_string(),
                    );
                }
                _ => {
                    return Err(format!(
                        "sslmode={v} is not one of disable, prefer, require, verify-ca, \
                         verify-full"
                    ));
                }
            }
            tls.mode = Some(mode);
        } else if ROOT_CERT.contains(&&*k) {
            if v == "system" {
                return Err(
                    "sslrootcert=system is not supported: the system's roots are \
                            always trusted; remove it (or name a CA bundle file)"
                        .to_string(),
                );
            }
            tls.root_cert = true;
        } else if CERT.contains(&&*k) {
            tls.cert = true;
        } else if KEY.contains(&&*k) {
            tls.key = true;
        }
    }
    if tls.cert != tls.key {
        return Err(
            "sslcert and sslkey must be given together (a client certificate and its \
                    private key)"
                .to_string(),
        );
    }
    if (tls.root_cert || tls.cert) && !tls.insists() {
        return Err(format!(
            "{} is ignored with sslmode={}: use sslmode=verify-full (or require/verify-ca) \
             for certificates to be used",
            if tls.root_cert {
                "sslrootcert"
            } else {
                "sslcert"
            },
            tls.mode.as_deref().unwrap_or("prefer (the default)")
        ));
    }
    Ok(tls)
}

/// The connect options of one store URL with the stream's TLS plan applied: the CA bundle is
/// trusted in addition to the system's roots, the client certificate is presented.
///
/// `sslmode=require` with a CA (ours or the URL's `sslrootcert`) verifies the server's
/// certificate chain, as libpq does; sqlx's `require` alone never verifies, so a CA that was
/// given would be silently ignored.
pub fn connect_options(url: &str, tls: &TlsPlan) -> Result<PgConnectOptions, sqlx::Error> {
    let mut opts = PgConnectOptions::from_str(url)?;
    let mut root_cert = url_tls(url).map(|t| t.root_cert).unwrap_or(false);
    if let Some(ca) = &tls.ca_pem {
        opts = opts.ssl_root_cert_from_pem(ca.clone());
        root_cert = true;
    }
    if let Some(client) = &tls.client {
        opts = opts
            .ssl_client_cert_from_pem(&client.cert_pem)
            .ssl_client_key_from_pem(&client.key_pem);
    }
    if root_cert && matches!(opts.get_ssl_mode(), PgSslMode::Require) {
        opts = opts.ssl_mode(PgSslMode::VerifyCa);
    }
    Ok(opts)
}

/// The connection as a user may see it: `postgres://user@host:port/database?sslmode=...`,
/// never the password.
pub fn connection_name(opts: &PgConnectOptions) -> String {
    let mode = match opts.get_ssl_mode() {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    };
    format!(
        "postgres://{}@{}:{}/{}?sslmode={mode}",
        opts.get_username(),
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("postgres")
    )
}

/// A failed TLS handshake as a status message that names the connection and says what
/// failed, or `None` when `e` is not a TLS failure.
pub fn tls_failure(
    opts: &PgConnectOptions,
    e: &(dyn std::error::Error + 'static),
) -> Option<String> {
    let name = connection_name(opts);
    if let Some(r) = rustls_error(e) {
        return Some(match r {
            rustls::Error::InvalidCertificate(why) => {
                use rustls::CertificateError as C;
                let what = match why {
                    C::NotValidForName | C::NotValidForNameContext { .. } => {
                        "the server's certificate does not name this host"
                    }
                    C::UnknownIssuer => {
                        "the server's certificate is not signed by a trusted CA (the system's \
                         roots or spec.store.tls.caSecretRef)"
                    }
                    C::Expired | C::ExpiredContext { .. } => "the server's certificate expired",
                    _ => "the server's certificate was refused",
                };
                format!(
                    "connection to {name}: TLS certificate verification failed: {what} \
                     ({why:?})"
                )
            }
            other => format!("connection to {name}: TLS handshake failed: {other}"),
        });
    }
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(sqlx::Error::Tls(inner)) = err.downcast_ref::<sqlx::Error>() {
            return Some(format!("connection to {name}: TLS failed: {inner}"));
        }
        cur = err.source();
    }
    None
}

/// The rustls error somewhere in `e`'s chain. The handshake's I/O wraps it in an
/// `io::Error`, whose `source()` skips it, so those are opened by hand.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ClientCertPlan, TlsPlan};

    #[test]
    fn url_parameters_are_read_and_checked() {
        let ok = |u: &str| url_tls(u).unwrap_or_else(|e| panic!("{u}: {e}"));
        assert_eq!(ok("postgres://u@h/db"), UrlTls::default());
        assert!(ok("postgres://u@h/db?sslmode=Verify-Full").insists());
        assert!(!ok("postgres://u@h/db?sslmode=prefer").insists());
        let t = ok("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/ca.pem&sslcert=/c&sslkey=/k");
        assert!(t.root_cert && t.cert && t.key);
        assert!(ok("postgres://u@h/db?ssl-mode=require&ssl-ca=/ca.pem").root_cert);
        for (url, says) in [
            ("postgres://u@h/db?sslmode=allow", "allow"),
            ("postgres://u@h/db?sslmode=verify_full", "not one of"),
            ("postgres://u@h/db?SSLMode=verify-full", "lower case"),
            (
                "postgres://u@h/db?sslmode=require&sslrootcert=system",
                "system",
            ),
            ("postgres://u@h/db?sslmode=require&sslcert=/c", "together"),
            (
                "postgres://u@h/db?sslrootcert=/ca.pem",
                "ignored with sslmode=prefer",
            ),
            (
                "postgres://u@h/db?sslmode=disable&sslcert=/c&sslkey=/k",
                "ignored",
            ),
        ] {
            let e = url_tls(url).expect_err(url);
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn require_with_a_ca_verifies_the_chain() {
        let ca = TlsPlan {
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----\n".to_vec()),
            client: None,
        };
        let mode = |url: &str, tls: &TlsPlan| connect_options(url, tls).unwrap().get_ssl_mode();
        let url = "postgres://u:secret@h:6432/db?sslmode=require";
        assert!(matches!(mode(url, &TlsPlan::default()), PgSslMode::Require));
        assert!(matches!(mode(url, &ca), PgSslMode::VerifyCa));
        assert!(matches!(
            mode(&format!("{url}&sslrootcert=/ca.pem"), &TlsPlan::default()),
            PgSslMode::VerifyCa
        ));
        let full = "postgres://u@h/db?sslmode=verify-full";
        assert!(matches!(mode(full, &ca), PgSslMode::VerifyFull));
        let client = TlsPlan {
            ca_pem: None,
            client: Some(ClientCertPlan {
                cert_pem: b"c".to_vec(),
                key_pem: b"k".to_vec(),
            }),
        };
        assert!(matches!(mode(url, &client), PgSslMode::Require));
        let name = connection_name(&connect_options(url, &ca).unwrap());
        assert_eq!(name, "postgres://u@h:6432/db?sslmode=verify-ca");
    }

    #[test]
    fn certificate_errors_are_named_through_io_errors() {
        let opts = connect_options(
            "postgres://u:pw@db:5432/x?sslmode=verify-full",
            &TlsPlan::default(),
        )
        .unwrap();
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = super::super::StoreError::Unavailable(sqlx::Error::Io(io));
        let msg = tls_failure(&opts, &e).expect("a TLS failure");
        assert!(
            msg.starts_with("connection to postgres://u@db:5432/x?sslmode=verify-full: TLS certificate verification failed"),
            "{msg}"
        );
        assert!(
            msg.contains("UnknownIssuer") && !msg.contains("pw"),
            "{msg}"
        );
        let refused = super::super::StoreError::Unavailable(sqlx::Error::Io(
            std::io::ErrorKind::ConnectionRefused.into(),
        ));
        assert_eq!(tls_failure(&opts, &refused), None);
    }
}
