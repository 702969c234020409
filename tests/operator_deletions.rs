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
use common::{AMQP_URL, Operator, fresh_database, unique};
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
    let out = server.kubectl(&["apply", "-f", "crds/"]).await;
    assert!(out.success, "{}", out.stderr);
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nstringData: {{url: \"{AMQP_URL}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {ns}}}\nstringData: {{url: \"{db}\"}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec: {{broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}, store: {{urlSecretRef: {{name: pg, key: url}}}}, deletionPolicy: Delete}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: audit, namespace: {ns}}}\n\
         spec: {{stream: orders, sink: {{uri: \"http://127.0.0.1:9/\"}}, deletionPolicy: Delete}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: hot, namespace: {ns}}}\n\
         spec: {{streamNames: [orders]}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: nightly, namespace: {ns}}}\n\
         spec: {{streamNames: [orders]}}\n"
    );
    let out = server
        .kubectl_with_input(&["apply", "-f", "-"], &manifests)
        .await;
    assert!(out.success, "{}", out.stderr);

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
