//! How a connection reaches RabbitMQ: plain TCP for `amqp://`, TLS on rustls for `amqps://`.
//!
//! Trust for `amqps://` is the system's roots (read by rustls-native-certs, so `SSL_CERT_FILE`
//! and `SSL_CERT_DIR` are honoured) plus the CA bundle of `spec.broker.tls.caSecretRef`; the
//! server certificate must also name the URL's host. A client certificate
//! (`spec.broker.tls.clientCertSecretRef`) is presented when the server asks for one. Nothing
//! here ever falls back to plain text: a TLS connection that cannot be set up or verified is
//! an error naming the URL (without its password).

use lapin::tcp::{AMQPUriTcpExt, RustlsConnector, RustlsConnectorConfig, TLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::{BrokerError, classify};
use crate::topology::TlsPlan;

/// The TLS side of one connection: `None` for `amqp://`.
#[derive(Clone)]
pub(crate) struct Transport {
    tls: Option<RustlsConnector>,
}

impl Transport {
    /// The transport of `uri` with `plan`. Errors name the URL (without its password).
    ///
    /// Building reads the system's roots, so it is done once per connection owner (a
    /// [`super::link::Link`]), not once per connection attempt.
    pub(crate) fn new(uri: &AMQPUri, plan: &TlsPlan) -> Result<Transport, BrokerError> {
        if uri.scheme == AMQPScheme::AMQP {
            if !plan.is_empty() {
                // Validation refuses this too; certificates must never be silently unused.
                return Err(BrokerError::InvalidUrl(format!(
                    "{}: TLS settings given for a plain amqp:// URL; use amqps://",
                    redacted(uri)
                )));
            }
            return Ok(Transport { tls: None });
        }
        let setup = |e: String| BrokerError::Tls(format!("{}: {e}", redacted(uri)));
        let mut config = match RustlsConnectorConfig::new_with_native_certs() {
            Ok(config) => config,
            // A minimal image may have no system roots; the CA given is then the only trust.
            Err(e) if plan.ca_pem.is_some() => {
                tracing::debug!(error = %e, "no system CA certificates; trusting spec.broker.tls.caSecretRef only");
                RustlsConnectorConfig::default()
            }
            Err(e) => {
                return Err(setup(format!(
                    "no CA certificate to verify the server with (system roots: {e}); install \
                     the system's CA certificates, set SSL_CERT_FILE, or set \
                     spec.broker.tls.caSecretRef"
                )));
            }
        };
        if let Some(pem) = &plan.ca_pem {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup(format!("spec.broker.tls.caSecretRef: {e}")))?;
            config.add_parsable_certificates(certs);
        }
        let connector = match &plan.client {
            Some(client) => {
                let certs = CertificateDer::pem_slice_iter(&client.cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| setup(format!("spec.broker.tls.clientCertSecretRef: {e}")))?;
                // The error names the PEM problem, never the key's bytes.
                let key = PrivateKeyDer::from_pem_slice(&client.key_pem)
                    .map_err(|e| setup(format!("spec.broker.tls.clientCertSecretRef: {e}")))?;
                config.connector_with_single_cert(certs, key).map_err(|e| {
                    setup(format!(
                        "spec.broker.tls.clientCertSecretRef: unusable client certificate: {e}"
                    ))
                })?
            }
            None => config
                .connector_with_no_client_auth()
                .map_err(|e| setup(e.to_string()))?,
        };
        Ok(Transport {
            tls: Some(connector),
        })
    }

    /// Opens an AMQP connection to `uri` over this transport.
    pub(crate) async fn connect(
        &self,
        uri: AMQPUri,
        props: ConnectionProperties,
    ) -> Result<Connection, BrokerError> {
        let runtime = lapin::runtime::default_runtime().map_err(|e| classify("connect", &e))?;
        let tls = self.tls.clone();
        let result = Connection::connector(
            uri,
            runtime,
            async move |uri: AMQPUri, runtime| {
                let Some(tls) = &tls else {
                    return Ok(uri
                        .connect_with_config_async(TLSConfig::default(), &runtime)
                        .await?);
                };
                // TCP first (a plain-scheme copy of the URI), then the handshake with our
                // connector: lapin's own TLS set-up would build a new one each time and could
                // not start without system roots.
                let mut tcp = uri.clone();
                tcp.scheme = AMQPScheme::AMQP;
                let stream = tcp
                    .connect_with_config_async(TLSConfig::default(), &runtime)
                    .await?;
                stream
                    .into_rustls(tls, &uri.authority.host)
                    .await
                    .map_err(|e| lapin::Error::from(handshake_error(&uri, &e)))
            },
            props,
        )
        .await;
        result.map_err(|e| match e.kind() {
            lapin::ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::Other => {
                // Our handshake error: its text is complete (URL, cause, hint).
                match io
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<HandshakeFailed>())
                {
                    Some(h) => BrokerError::Tls(h.0.clone()),
                    None => classify("connect", &e),
                }
            }
            _ => classify("connect", &e),
        })
    }
}

/// A failed TLS handshake, already described for the user.
#[derive(Debug)]
struct HandshakeFailed(String);

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeFailed {}

/// Describes a failed handshake with what usually causes it.
fn handshake_error(uri: &AMQPUri, e: &std::io::Error) -> std::io::Error {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as Tls};
    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<Tls>());
    let hint = match tls {
        Some(Tls::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        )) => {
            "certificate verification failed: the server's certificate does not name the URL's host"
        }
        Some(Tls::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature)) => {
            "certificate verification failed: the server's certificate is not signed by a \
             trusted CA (the system's roots and spec.broker.tls.caSecretRef)"
        }
        Some(Tls::InvalidCertificate(_)) => "certificate verification failed",
        Some(Tls::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        )) => {
            "the server refused the client certificate (spec.broker.tls.clientCertSecretRef), \
             or requires one"
        }
        Some(Tls::InvalidMessage(_)) => {
            "the server does not speak TLS here: is this a plain amqp:// port (5672) rather \
             than an amqps:// one (5671)?"
        }
        None if matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ) =>
        {
            "the server closed the connection during the TLS handshake: is this a plain \
             amqp:// port rather than an amqps:// one?"
        }
        _ => "TLS handshake failed",
    };
    std::io::Error::other(HandshakeFailed(format!("{}: {hint}: {e}", redacted(uri))))
}

/// The URL without its password, to name a connection in errors and logs.
pub(crate) fn redacted(uri: &AMQPUri) -> String {
    let scheme = match uri.scheme {
        AMQPScheme::AMQP => "amqp",
        AMQPScheme::AMQPS => "amqps",
    };
    let user = &uri.authority.userinfo.username;
    let host = &uri.authority.host;
    let at = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    // An IPv6 address needs its brackets back.
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let vhost =
        percent_encoding::utf8_percent_encode(&uri.vhost, percent_encoding::NON_ALPHANUMERIC);
    format!("{scheme}://{at}{host}:{}/{vhost}", uri.authority.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_no_password() {
        let uri: AMQPUri = "amqps://weir:s3cret@broker.example:5671/prod"
            .parse()
            .unwrap();
        assert_eq!(redacted(&uri), "amqps://weir@broker.example:5671/prod");
        let uri: AMQPUri = "amqp://guest:guest@127.0.0.1:5672/%2f".parse().unwrap();
        assert_eq!(redacted(&uri), "amqp://guest@127.0.0.1:5672/%2F");
    }

    #[test]
    fn tls_settings_on_plain_urls_are_refused() {
        let uri: AMQPUri = "amqp://guest:pw@127.0.0.1:5672/%2f".parse().unwrap();
        let plan = TlsPlan {
            ca_pem: Some(b"unused".to_vec()),
            client: None,
        };
        let err = Transport::new(&uri, &plan).err().unwrap();
        assert!(err.to_string().contains("use amqps://"), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
        assert!(Transport::new(&uri, &TlsPlan::default()).is_ok());
    }
}
