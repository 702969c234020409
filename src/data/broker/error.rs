//! The broker's error type and how lapin's errors map onto it.

use lapin::protocol::AMQPErrorKind;

/// Everything that can go wrong talking to RabbitMQ.
///
/// Callers mostly need one question answered: is it worth trying again later
/// ([`BrokerError::is_transient`]), in which case the HTTP answer is 503 with `Retry-After`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The URL is not a usable `amqp://` URL. The text never repeats the URL (it holds a
    /// password).
    #[error("invalid AMQP URL: {0}")]
    InvalidUrl(String),
    /// An `amqps://` connection could not be set up or its TLS handshake failed (the server's
    /// certificate did not verify, the port does not speak TLS, the client certificate was
    /// refused). The text names the URL without its password. Never answered by falling back
    /// to plain text; retried like a connection failure, since the server side may be fixed.
    #[error("TLS to RabbitMQ failed: {0}")]
    Tls(String),
    /// RabbitMQ could not be reached, the connection or channel broke, or no confirm arrived
    /// before the deadline. Nothing can be assumed about the messages concerned.
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    /// RabbitMQ answered `basic.nack` for this many messages of the call: it refused them
    /// (e.g. a queue with `reject-publish` overflow is full). Other messages of the same
    /// call may have been taken.
    #[error("RabbitMQ refused {count} message(s) (nack)")]
    Nacked { count: usize },
    /// RabbitMQ refused the operation itself with an AMQP error, e.g. 404 (no such exchange)
    /// or 406 (a queue exists with other arguments, a message is too large).
    #[error("RabbitMQ refused the operation: {code} {text}")]
    Protocol { code: u16, text: String },
    /// A name does not fit AMQP's limits (short strings are at most 255 bytes).
    #[error("invalid {what}: {message}")]
    InvalidName { what: &'static str, message: String },
    /// A message cannot be read back as a CloudEvent: `header` is the AMQP header (or
    /// property) that is missing or malformed.
    #[error("cannot decode CloudEvent from AMQP message: {header}: {message}")]
    Decode { header: String, message: String },
}

impl BrokerError {
    /// True when the same operation may succeed later without any change on Weir's side:
    /// the broker was down or busy, or refused messages it may take later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BrokerError::Unavailable(_) | BrokerError::Nacked { .. } | BrokerError::Tls(_)
        )
    }

    pub(crate) fn unavailable(context: &str, err: impl std::fmt::Display) -> BrokerError {
        BrokerError::Unavailable(format!("{context}: {err}"))
    }
}

/// Classifies a lapin error: AMQP "soft" errors (the broker closing a channel because of
/// what was asked: 403, 404, 405, 406) are [`BrokerError::Protocol`]; everything else (I/O,
/// closed connections, `CONNECTION_FORCED` when the broker stops, missed heartbeats, state
/// errors of a channel that already broke) is [`BrokerError::Unavailable`].
pub(crate) fn classify(context: &str, err: &lapin::Error) -> BrokerError {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind()
        && let AMQPErrorKind::Soft(_) = amqp.kind()
    {
        return BrokerError::Protocol {
            code: amqp.get_id(),
            text: amqp.get_message().to_string(),
        };
    }
    BrokerError::unavailable(context, err)
}

/// Validates an AMQP URL without connecting, with an error that does not echo the URL.
pub fn validate_url(url: &str) -> Result<(), BrokerError> {
    parse_url(url).map(|_| ())
}

/// Parses an `amqp://` or `amqps://` URL (TLS is set up by [`super::tls::Transport`]).
pub(crate) fn parse_url(url: &str) -> Result<lapin::uri::AMQPUri, BrokerError> {
    url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
        // The parser sometimes quotes its input; the URL carries credentials.
        let reason = if e.contains(url) {
            "not an amqp:// or amqps:// URL".to_string()
        } else {
            e
        };
        BrokerError::InvalidUrl(reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_url_does_not_leak_credentials() {
        let err = validate_url("amqp:secret-password").unwrap_err();
        assert!(matches!(err, BrokerError::InvalidUrl(_)));
        assert!(!err.to_string().contains("secret-password"), "{err}");
        let err = validate_url("http://u:pw@host/").unwrap_err();
        assert!(!err.to_string().contains("pw@"), "{err}");
        assert!(validate_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
    }

    #[test]
    fn amqps_urls_are_accepted() {
        assert!(validate_url("amqps://guest:secret@broker.example:5671/%2f").is_ok());
    }

    #[test]
    fn transient_kinds() {
        assert!(BrokerError::Unavailable("x".into()).is_transient());
        assert!(BrokerError::Nacked { count: 1 }.is_transient());
        let protocol = BrokerError::Protocol {
            code: 404,
            text: "NOT_FOUND".into(),
        };
        assert!(!protocol.is_transient());
        assert!(!BrokerError::InvalidUrl("x".into()).is_transient());
        assert!(BrokerError::Tls("x".into()).is_transient());
    }

    #[test]
    fn io_errors_are_unavailable() {
        let err: lapin::Error =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert!(matches!(
            classify("connect", &err),
            BrokerError::Unavailable(_)
        ));
    }
}
