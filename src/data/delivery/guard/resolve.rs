//! The connect-time half of the guard: the sinks' HTTP clients resolve names through
//! [`GuardedResolver`], which drops every refused address from the answer, so the address
//! checked is the address connected to (an answer cannot change between a check and the
//! connect, as it could if the name were resolved twice).

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{Inner, Refused};

/// Idle connections the shared client keeps per sink host: enough for the deliveries in
/// flight of the subscriptions that share a sink host (`consumers` is at most a few hundred),
/// few enough that a worker with a thousand subscriptions to one host holds a bounded
/// number of sockets.
const IDLE_PER_HOST: usize = 512;

/// One HTTP client for the sinks of the process (for sinks on the worker's own port
/// `own_port`, when given). A client per subscription carried its own TLS context (the
/// system's trusted roots parsed again) and connection pool: about half a megabyte each, most
/// of a worker's memory at a thousand subscriptions. Timeouts are set per request, so nothing
/// of a subscription's settings lives in the client.
///
/// - Redirects are not followed: a 3xx is the sink's answer (a redirect could lead anywhere,
///   the guard's checks included).
/// - No proxy from the environment (`HTTP_PROXY`...): through a proxy the guard would check the
///   proxy's address, not the sink's.
///
/// TLS: rustls on ring, trusting the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR`
/// honoured); no OpenSSL.
pub(super) fn client(inner: Arc<Inner>, own_port: Option<u16>) -> Result<reqwest::Client, String> {
    crate::tls_provider::http_client_builder()
        .pool_max_idle_per_host(IDLE_PER_HOST)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver { inner, own_port }))
        .build()
        .map_err(|e| e.to_string())
}

/// The system resolver (`getaddrinfo`: `/etc/hosts`, then DNS), minus refused addresses.
struct GuardedResolver {
    inner: Arc<Inner>,
    /// The worker's own port the sinks of this client are on.
    own_port: Option<u16>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let inner = self.inner.clone();
        let own_port = self.own_port;
        let host = name.as_str().to_string();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port on the addresses it connects to.
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (kept, refused) = filter(&inner, own_port, &host, found);
            if kept.is_empty() {
                return Err(match refused {
                    Some(r) => Box::new(r) as Box<dyn std::error::Error + Send + Sync>,
                    None => format!("{host}: no address").into(),
                });
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// The addresses of `found` the guard allows, and the first refusal (for the error when
/// nothing is left).
fn filter(
    inner: &Inner,
    own_port: Option<u16>,
    host: &str,
    found: Vec<SocketAddr>,
) -> (Vec<SocketAddr>, Option<Refused>) {
    let mut kept = Vec::with_capacity(found.len());
    let mut refused = None;
    for a in found {
        match inner.check(a.ip(), own_port) {
            Ok(()) => kept.push(a),
            Err(r) => {
                refused.get_or_insert(Refused {
                    host: Some(host.to_string()),
                    ..r
                });
            }
        }
    }
    (kept, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::delivery::guard::{SinkPolicy, Why};

    #[test]
    fn a_mixed_answer_keeps_only_the_allowed_addresses() {
        let inner = Inner {
            policy: SinkPolicy::default(),
            own_ports: vec![9090],
        };
        let found: Vec<SocketAddr> = ["127.0.0.1:0", "10.1.2.3:0", "[::1]:0", "[fd00::1]:0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let (kept, refused) = filter(&inner, None, "sink.example", found);
        assert_eq!(
            kept,
            [
                "10.1.2.3:0".parse().unwrap(),
                "[fd00::1]:0".parse().unwrap()
            ]
        );
        let r = refused.unwrap();
        assert_eq!(r.host.as_deref(), Some("sink.example"));
        assert_eq!(
            r.to_string(),
            "sink address 127.0.0.1 (resolved from sink.example) is loopback: refused (see --sink-allow-cidrs, or --allow-loopback-sinks for local development)"
        );
        // On the worker's own port, loopback stays refused even when allowed.
        let inner = Inner {
            policy: SinkPolicy {
                allow_loopback: true,
                allow: vec![],
            },
            own_ports: vec![9090],
        };
        let (kept, refused) = filter(
            &inner,
            Some(9090),
            "me",
            vec!["127.0.0.1:0".parse().unwrap()],
        );
        assert!(kept.is_empty());
        assert_eq!(refused.unwrap().why, Why::OwnPort(9090));
    }
}
