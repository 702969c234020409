//! A sink that counts deliveries by CloudEvent id, and the clean-up of many tests' queues.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A sink that counts deliveries by CloudEvent id.
pub struct CountingSink {
    pub url: String,
    pub got: Arc<Mutex<HashMap<String, u32>>>,
}

impl CountingSink {
    pub async fn start() -> CountingSink {
        let got = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
        let g = got.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |h: http::HeaderMap| {
                let g = g.clone();
                async move {
                    let id = h
                        .get("ce-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    *g.lock().unwrap().entry(id).or_insert(0) += 1;
                    http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CountingSink { url, got }
    }

    pub fn delivered(&self, ids: &[String]) -> usize {
        let got = self.got.lock().unwrap();
        ids.iter().filter(|i| got.contains_key(*i)).count()
    }

    /// Ids delivered that were never published (sent by nobody).
    pub fn unexpected(&self, ids: &[String]) -> Vec<String> {
        let got = self.got.lock().unwrap();
        got.keys().filter(|k| !ids.contains(k)).cloned().collect()
    }
}

/// Deletes the queues of a run's subscriptions (the process was killed, so nothing else
/// will): a few hundred idle quorum queues left behind weigh on RabbitMQ for the rest of the
/// suite.
pub async fn delete_queues(tag: &str) {
    let client = super::http();
    for name in super::management_queues().await {
        if name.contains(tag) {
            let _ = client
                .delete(format!(
                    "{}/{}",
                    super::MANAGEMENT_QUEUES,
                    name.replace('/', "%2F")
                ))
                .basic_auth("guest", Some("guest"))
                .send()
                .await;
        }
    }
}
