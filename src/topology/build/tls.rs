//! `spec.broker.tls` and `spec.store.tls`: the CA bundle and client certificate of a
//! connection, read from Secrets and checked to be PEM here, so that a broken certificate is an
//! InvalidSpec naming the Secret rather than a connection that fails later for no clear reason.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::*;
use crate::api::common::TlsSpec;

/// The TLS plan of a broker connection. `tls` is only honoured with an `amqps://` URL: with
/// `amqp://` the certificates would be silently ignored, so that is refused.
pub(super) fn broker_tls(cx: &mut Cx<'_>, spec: Option<&TlsSpec>, url: &str) -> TlsPlan {
    let Some(spec) = spec else {
        return TlsPlan::default();
    };
    let plan = tls_plan(cx, spec, "spec.broker.tls");
    let amqps = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"));
    if !url.is_empty() && !amqps && !plan.is_empty() {
        cx.invalid(
            "spec.broker.tls",
            "set, but the broker URL is amqp:// (plain text): use amqps:// for TLS, or remove tls",
        );
    }
    plan
}

/// The TLS plan of the store's URLs. `tls` is only honoured by URLs that insist on TLS; with
/// `sslmode=disable|allow|prefer` (prefer is the default) a connection may run in plain text
/// and the certificates would be ignored, so that is refused.
pub(super) fn store_tls(cx: &mut Cx<'_>, spec: Option<&TlsSpec>, urls: &[&String]) -> TlsPlan {
    let Some(spec) = spec else {
        return TlsPlan::default();
    };
    let plan = tls_plan(cx, spec, "spec.store.tls");
    if plan.is_empty() {
        return plan;
    }
    for (i, url) in urls.iter().enumerate() {
        // A URL that cannot be read is reported by the URL check.
        let Ok(url_tls) = crate::data::store::tls::url_tls(url) else {
            continue;
        };
        let n = urls.len();
        if !url_tls.insists() {
            let mode = url_tls.mode.as_deref().unwrap_or("prefer (the default)");
            cx.invalid(
                "spec.store.tls",
                format!(
                    "set, but store URL {} of {n} has sslmode={mode}, which may connect in \
                     plain text: use sslmode=verify-full (or require/verify-ca) with tls",
                    i + 1
                ),
            );
        }
        // One CA and one client certificate per connection: two would leave one ignored.
        if plan.ca_pem.is_some() && url_tls.root_cert {
            cx.invalid(
                "spec.store.tls.caSecretRef",
                format!(
                    "set, and store URL {} of {n} names sslrootcert too: keep one of them",
                    i + 1
                ),
            );
        }
        if plan.client.is_some() && url_tls.cert {
            cx.invalid(
                "spec.store.tls.clientCertSecretRef",
                format!(
                    "set, and store URL {} of {n} names sslcert/sslkey too: keep one of them",
                    i + 1
                ),
            );
        }
    }
    plan
}

fn tls_plan(cx: &mut Cx<'_>, spec: &TlsSpec, path: &str) -> TlsPlan {
    let ca_pem = spec.ca_secret_ref.as_ref().and_then(|r| {
        let field = format!("{path}.caSecretRef");
        let pem = cx.secret(r, &field)?;
        match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
            Ok(certs) if !certs.is_empty() => Some(pem),
            Ok(_) => {
                let where_ = format!("Secret {} key {:?}", cx.key(&r.name), r.key);
                cx.invalid(&field, format!("{where_} holds no PEM certificate"));
                None
            }
            Err(e) => {
                let where_ = format!("Secret {} key {:?}", cx.key(&r.name), r.key);
                cx.invalid(&field, format!("{where_} is not a PEM CA bundle: {e}"));
                None
            }
        }
    });
    let client = spec.client_cert_secret_ref.as_ref().and_then(|r| {
        let field = format!("{path}.clientCertSecretRef");
        let key_of = |key: &str| api::SecretKeyRef {
            name: r.name.clone(),
            key: key.to_string(),
        };
        let cert_pem = cx.secret(&key_of("tls.crt"), &field);
        let key_pem = cx.secret(&key_of("tls.key"), &field);
        let (cert_pem, key_pem) = (cert_pem?, key_pem?);
        let secret = cx.key(&r.name);
        let mut ok = true;
        match CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>() {
            Ok(certs) if !certs.is_empty() => {}
            Ok(_) => {
                ok = false;
                cx.invalid(
                    &field,
                    format!("Secret {secret} key \"tls.crt\" holds no PEM certificate"),
                );
            }
            Err(e) => {
                ok = false;
                cx.invalid(
                    &field,
                    format!("Secret {secret} key \"tls.crt\" is not a PEM certificate chain: {e}"),
                );
            }
        }
        // The error names the PEM problem, never the key's bytes.
        if let Err(e) = PrivateKeyDer::from_pem_slice(&key_pem) {
            ok = false;
            cx.invalid(
                &field,
                format!(
                    "Secret {secret} key \"tls.key\" is not a PEM private key (PKCS#8, PKCS#1 \
                     or SEC1): {e}"
                ),
            );
        }
        ok.then_some(ClientCertPlan { cert_pem, key_pem })
    });
    TlsPlan { ca_pem, client }
}
