//! Queue depths from RabbitMQ's management HTTP API.
//!
//! AMQP reports only the *ready* messages of a queue (in `queue.declare-ok`); how many are
//! delivered but not yet acknowledged — by every consumer, on every replica — is known only
//! to the management plugin (`rabbitmq_management`). Weir asks it for that number when it
//! can. The API's address is `WEIR_RABBITMQ_MANAGEMENT_URL` if set (`off` turns the lookups
//! off), else `http://<AMQP host>:15672` for `amqp://` and `https://<AMQP host>:15671` (the
//! management plugin's usual TLS port) for `amqps://`; the AMQP URL's user, password and
//! vhost are used. With `amqps://` the API is only asked over HTTPS, trusting the system's
//! roots plus `spec.broker.tls.caSecretRef`: the password that is protected on the AMQP
//! connection is never sent in plain text (an `http://` override turns the lookups off, with
//! a warning). When the plugin does not answer, callers fall back to what AMQP can tell.
//!
//! The plugin refreshes its queue statistics every `collect_statistics_interval` (5 s by
//! default), so the numbers are samples a few seconds old, which is what a backlog needs.

use crate::poison::MutexExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::time::Instant;

use super::error::{BrokerError, parse_url};
use crate::topology::TlsPlan;

/// One lookup may take this long: the API is local to the broker and answers in
/// milliseconds; a firewall that drops the port must not stall a sampling loop.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed lookup the API is left alone this long (a disabled plugin answers every
/// few seconds with the same refusal; a down broker is reported by AMQP anyway).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Counts of one queue as the management API reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManagedCounts {
    pub ready: u64,
    pub unacknowledged: u64,
}

/// A client of one broker's management API.
pub struct Management {
    client: reqwest::Client,
    /// `http://host:port/api/queues/<vhost>/`.
    queues: String,
    user: String,
    password: String,
    resting_until: Mutex<Option<Instant>>,
    /// The last list of every queue of the vhost, and when it was taken: one request serves
    /// every subscription's backlog sample of this worker (a request per queue would be
    /// thousands a minute with a thousand subscriptions).
    snapshot: tokio::sync::Mutex<Option<(Instant, Arc<QueueTable>)>>,
    /// The last list failed: its trouble was said, the recovery will be.
    failing: std::sync::atomic::AtomicBool,
}

/// Counts of every queue of the vhost by name (a queue whose statistics were not collected
/// yet is absent).
pub type QueueTable = HashMap<String, ManagedCounts>;

/// A list of every queue may take this long (thousands of queues, a loaded broker); it is
/// asked at most once per [`SNAPSHOT_MAX_AGE`], so waiting costs little.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// How old a queue list may be before it is asked again. The plugin collects statistics
/// every 5 s by default, so a fresher list would only repeat the same numbers.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(2);

impl Management {
    /// The management API of the broker at `amqp_url`, or `None` when turned off (or the
    /// URLs cannot be used). `tls` is the AMQP connection's extra trust, also trusted for the
    /// API's HTTPS.
    pub fn for_amqp_url(amqp_url: &str, tls: &TlsPlan) -> Option<Management> {
        let base = match std::env::var("WEIR_RABBITMQ_MANAGEMENT_URL") {
            Ok(v) if v == "off" => return None,
            Ok(v) => Some(v.trim_end_matches('/').to_string()),
            Err(_) => None,
        };
        let uri = parse_url(amqp_url).ok()?;
        let amqps = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
        let auth = &uri.authority;
        let host = if auth.host.contains(':') {
            format!("[{}]", auth.host)
        } else {
            auth.host.clone()
        };
        let base = base.unwrap_or_else(|| {
            if amqps {
                format!("https://{host}:15671")
            } else {
                format!("http://{host}:15672")
            }
        });
        if amqps
            && !base
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            tracing::warn!(
                "WEIR_RABBITMQ_MANAGEMENT_URL is not https:// but the broker URL is amqps://: \
                 the management API is not asked (the broker password would travel in plain \
                 text); backlogs count only this worker's unacknowledged messages"
            );
            return None;
        }
        let mut client = crate::tls_provider::http_client_builder().timeout(REQUEST_TIMEOUT);
        if let Some(pem) = &tls.ca_pem {
            match reqwest::Certificate::from_pem_bundle(pem) {
                Ok(certs) => {
                    for cert in certs {
                        client = client.add_root_certificate(cert);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "spec.broker.tls.caSecretRef unusable for the management API; not asking it");
                    return None;
                }
            }
        }
        let client = client.build().ok()?;
        Some(Management {
            client,
            queues: format!(
                "{base}/api/queues/{}/",
                utf8_percent_encode(&uri.vhost, NON_ALPHANUMERIC)
            ),
            user: auth.userinfo.username.clone(),
            password: auth.userinfo.password.clone(),
            resting_until: Mutex::new(None),
            snapshot: tokio::sync::Mutex::new(None),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn resting(&self) -> bool {
        let r = self.resting_until.locked();
        r.is_some_and(|t| Instant::now() < t)
    }

    fn rest(&self) {
        let mut r = self.resting_until.locked();
        *r = Some(Instant::now() + RETRY_AFTER_FAILURE);
    }

    /// Counts of every queue of the vhost, at most [`SNAPSHOT_MAX_AGE`] old. Callers at the
    /// same moment share one request (the lock is held across it on purpose).
    pub async fn queues(&self) -> Result<Arc<QueueTable>, BrokerError> {
        let mut snap = self.snapshot.lock().await;
        if let Some((at, t)) = snap.as_ref()
            && at.elapsed() < SNAPSHOT_MAX_AGE
        {
            return Ok(t.clone());
        }
        if self.resting() {
            return Err(BrokerError::Unavailable(
                "management API resting after a failure".into(),
            ));
        }
        use std::sync::atomic::Ordering;
        match self.list().await {
            Ok(t) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(
                        "RabbitMQ management API answers again: backlogs count every replica's unacknowledged messages"
                    );
                }
                let t = Arc::new(t);
                *snap = Some((Instant::now(), t.clone()));
                Ok(t)
            }
            Err(e) => {
                // Said once per broker, not once per subscription that asked.
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "RabbitMQ management API unavailable: backlogs count only this worker's unacknowledged messages until it answers");
                }
                self.rest();
                Err(e)
            }
        }
    }

    async fn list(&self) -> Result<QueueTable, BrokerError> {
        let url = format!(
            "{}?columns=name,messages_ready,messages_unacknowledged",
            self.queues.trim_end_matches('/')
        );
        let unavailable = |e: String| BrokerError::Unavailable(format!("management API: {e}"));
        let resp = self
            .client
            .get(url)
            // The list of every queue: with thousands of queues the broker takes longer to
            // answer it than one queue's lookup.
            .timeout(LIST_TIMEOUT)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            // reqwest's error names the URL, which holds no credentials here.
            .map_err(|e| unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("answered {}", resp.status())));
        }
        let v: Vec<serde_json::Value> =
            resp.json().await.map_err(|e| unavailable(e.to_string()))?;
        Ok(v.iter()
            .filter_map(|q| {
                let name = q.get("name")?.as_str()?.to_string();
                let count = |k: &str| q.get(k).and_then(serde_json::Value::as_u64);
                Some((
                    name,
                    ManagedCounts {
                        ready: count("messages_ready")?,
                        unacknowledged: count("messages_unacknowledged")?,
                    },
                ))
            })
            .collect())
    }
}
