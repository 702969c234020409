//! The process-wide rustls crypto provider: ring. Weir has one TLS stack (rustls on ring, no
//! OpenSSL, no aws-lc-rs) for the API server, PostgreSQL, RabbitMQ and the sinks.
//!
//! reqwest built with `rustls-no-provider` takes the installed default and panics when there
//! is none, so the provider is installed before any HTTP client is built: first thing in
//! `main`, and again (a no-op) wherever the library builds a client, for programs and tests
//! that use the library without Weir's `main`.

use std::sync::Once;

/// Installs ring as the process's default rustls provider, once; a provider installed before
/// (by the embedding program) is kept.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first; that one stays, which is what its
        // installer asked for.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A `reqwest` client builder with the provider installed: the way every HTTP client of Weir
/// (and of its tests) starts.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// `reqwest::Client::new()` with the provider installed.
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::new()
}
