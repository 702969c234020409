//! The store disappears and comes back (a TCP proxy in front of PostgreSQL is cut and
//! restored): publishes answer 503 with Retry-After meanwhile, the process keeps running and
//! recovers by itself, and nothing answered 201 is lost.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::chaos::ChaosProxy;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_answers_503_and_recovers_without_a_restart() {
    let direct = fresh_database().await;
    let mut proxy = ChaosProxy::start("127.0.0.1:5432").await;
    let db_name = direct.rsplit('/').next().unwrap().to_string();
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/{db_name}", proxy.port);
    let m = Manifests::new(&via_proxy);
    m.write(
        "stream.yaml",
        &stream_yaml("flaky", &unique("weir.test.flaky."), ""),
    );
    let mut w = Weir::start_with(m.path(), &[("WEIR_REQUEST_TIMEOUT", "2s")]);
    w.wait_ready("test", "flaky").await;
    let url = w.events_url("test", "flaky");
    let c = common::http();
    let mut answered = BTreeSet::new();
    let publish = |id: String| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let r = c
                .post(&url)
                .json(&json!({"type": "t", "id": id, "data": {}}))
                .send()
                .await
                .unwrap();
            let retry_after = r.headers().get("retry-after").is_some();
            (r.status().as_u16(), retry_after, id)
        }
    };
    let (s, _, id) = publish("before".into()).await;
    assert_eq!(s, 201);
    answered.insert(id);

    proxy.cut();
    let (s, retry_after, _) = publish("during".into()).await;
    assert_eq!(
        (s, retry_after),
        (503, true),
        "a store outage is a 503 with Retry-After"
    );
    // (Status's StoreReady is a sample taken every 2 s; it is not asserted here.)
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "weir must keep running"
    );

    proxy.restore().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    loop {
        let (s, _, id) = publish(format!("after-{i}")).await;
        i += 1;
        if s == 201 {
            answered.insert(id);
            break;
        }
        assert_eq!(s, 503);
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let db = sqlx::PgPool::connect(&direct).await.unwrap();
    let stored = common::stored_ids(&db).await;
    assert!(
        answered.is_subset(&stored),
        "answered {answered:?}, stored {stored:?}"
    );
}
