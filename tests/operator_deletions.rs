//! Deletions reach every replica: the real `weir operator` (two replicas, one Lease) against
//! the in-process test API server with the real kubectl and the real RabbitMQ and PostgreSQL.
//!
//! No reconcile runs for an object that has left the watch cache, and only the Lease holder
//! runs finalizer cleanups. Deleting the last CachePolicy or ArchivePolicy (no finalizer) must
//! still take it out of force on both replicas, and the replica that does not hold the Lease
//! must stop a deleted Subscription, promptly.

mod apiserver;
mod common;

use apiserver::TestApiServer;
use common::{Operator, fresh_database, namespace_with_secrets, queue_exists, unique};
use serde_json::Value;

/// How many resources the replica runs (its admin summary, which needs no token).
async fn running(op: &Operator) -> Option<u64> {
    let v: Value = common::http_get(format!("{}/v1/status", op.admin))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["summary"]["resources"].as_u64()
}

async fn wait_running(ops: &[&Operator], n: u64, what: &str) {
    for op in ops {
        common::eventually(
            20,
            &format!("{what}: {} runs {n} resources", op.url),
            || op.log_text(),
            || async { (running(op).await == Some(n)).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_take_effect_on_every_replica() {
    let server = TestApiServer::start().await;
    let ns = unique("del");
    let lease = unique("weir-");
    let db = fresh_database().await;
    server.apply_crds().await;
    let manifests = namespace_with_secrets(&ns, &db)
        + &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec: {{broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}, store: {{urlSecretRef: {{name: pg, key: url}}}}, deletionPolicy: Delete}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: audit, namespace: {ns}}}\n\
         spec: {{stream: orders, sink: {{uri: \"http://127.0.0.1:9/\"}}, deletionPolicy: Delete}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: hot, namespace: {ns}}}\n\
         spec: {{streamNames: [orders]}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: nightly, namespace: {ns}}}\n\
         spec: {{streamNames: [orders]}}\n"
        );
    server.apply(&manifests).await;

    // A holds the Lease (it starts first and is seen running everything); B joins after. No
    // periodic resync within the test (it would re-apply the topology and hide the bug).
    let slow = ["--refresh", "10m"];
    let a = Operator::start(server.kubeconfig(), "op-a", &lease, &slow);
    wait_running(&[&a], 4, "all four applied").await;
    let b = Operator::start(server.kubeconfig(), "op-b", &lease, &slow);
    wait_running(&[&a, &b], 4, "both replicas run all four").await;

    // The last CachePolicy, then the last ArchivePolicy: no finalizer, no reconcile after.
    let out = server
        .kubectl(&["delete", "-n", &ns, "cachepolicy", "hot"])
        .await;
    assert!(out.success, "{}", out.stderr);
    wait_running(&[&a, &b], 3, "the deleted CachePolicy is out of force").await;
    let out = server
        .kubectl(&["delete", "-n", &ns, "archivepolicy", "nightly"])
        .await;
    assert!(out.success, "{}", out.stderr);
    wait_running(&[&a, &b], 2, "the deleted ArchivePolicy is out of force").await;

    // The Subscription: A (the holder) runs its cleanup and removes the finalizer; B must
    // stop it too, although it never sees it without the finalizer before it is gone.
    let out = server
        .kubectl(&[
            "delete",
            "-n",
            &ns,
            "subscription",
            "audit",
            "--timeout=60s",
        ])
        .await;
    assert!(out.success, "{}", out.stderr);
    wait_running(&[&a, &b], 1, "the deleted Subscription stopped").await;
}

/// A deleted Subscription's queue stays deleted. The holder's cleanup deletes the queues; a
/// resync that runs before the finalizer's removal reaches the caches, or the other replica's
/// consumers (cancelled by the queue's deletion, then reconnecting), used to declare it again,
/// leaving an orphan queue that collected the stream's events forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_subscriptions_queues_stay_deleted() {
    let server = TestApiServer::start().await;
    let ns = unique("delq");
    let lease = unique("weir-");
    let db = fresh_database().await;
    server.apply_crds().await;
    let subs = 6;
    let mut manifests = namespace_with_secrets(&ns, &db)
        + &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec: {{broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}, store: {{urlSecretRef: {{name: pg, key: url}}}}, deletionPolicy: Delete}}\n"
        );
    for i in 0..subs {
        manifests.push_str(&format!(
            "---\napiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: s{i}, namespace: {ns}}}\n\
             spec: {{stream: orders, sink: {{uri: \"http://127.0.0.1:9/\"}}, consumers: 4}}\n"
        ));
    }
    server.apply(&manifests).await;
    // Frequent resyncs widen the window between the cleanup and the finalizer's removal.
    let quick = ["--refresh", "300ms"];
    let a = Operator::start(server.kubeconfig(), "op-a", &lease, &quick);
    wait_running(&[&a], 1 + subs, "all applied").await;
    let b = Operator::start(server.kubeconfig(), "op-b", &lease, &quick);
    wait_running(&[&a, &b], 1 + subs, "both replicas run everything").await;
    let queues: Vec<String> = (0..subs)
        .map(|i| format!("weir.{ns}.orders.s{i}"))
        .collect();
    for q in &queues {
        common::eventually(
            20,
            &format!("{q} declared"),
            || a.log_text(),
            || async { queue_exists(q).await.then_some(()) },
        )
        .await;
    }

    for i in 0..subs {
        let out = server
            .kubectl(&[
                "delete",
                "-n",
                &ns,
                "subscription",
                &format!("s{i}"),
                "--timeout=60s",
            ])
            .await;
        assert!(out.success, "{}", out.stderr);
    }
    wait_running(&[&a, &b], 1, "the deleted Subscriptions stopped").await;
    // Several resync periods later, none has come back.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while std::time::Instant::now() < until {
        for q in &queues {
            assert!(
                !queue_exists(q).await,
                "{q} exists again after its Subscription was deleted\nop-a:\n{}\nop-b:\n{}",
                a.log_text(),
                b.log_text()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
