//! Conditions the operator no longer produces leave `status`; conditions another controller
//! set stay. The real `weir operator` against the in-process test API server (whose
//! server-side apply merges `status.conditions` by `type` per field manager, as a real one
//! does), with the real kubectl, RabbitMQ and PostgreSQL.

mod apiserver;
mod common;

use apiserver::TestApiServer;
use common::{Operator, fresh_database, namespace_with_secrets, unique};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};

fn stream_yaml(ns: &str, with_store: bool) -> String {
    let store = if with_store {
        "\n  store: {urlSecretRef: {name: pg, key: url}}"
    } else {
        ""
    };
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}{store}\n"
    )
}

/// `type -> status` of the stream's conditions, once the operator has written the status
/// of the current generation.
fn current_conditions(server: &TestApiServer, ns: &str) -> Option<Vec<(String, String)>> {
    let obj = server.object("weir.dev", "eventstreams", ns, "orders")?;
    if obj["status"]["observedGeneration"] != obj["metadata"]["generation"] {
        return None;
    }
    obj["status"]["conditions"].as_array().map(|list| {
        list.iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("type"), s("status"))
            })
            .collect()
    })
}

fn has(conditions: &[(String, String)], type_: &str) -> bool {
    conditions.iter().any(|(t, _)| t == type_)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_no_longer_produced_is_removed_and_others_conditions_stay() {
    let server = TestApiServer::start().await;
    let ns = unique("cond");
    let db = fresh_database().await;
    server.apply_crds().await;
    let setup = namespace_with_secrets(&ns, &db) + &stream_yaml(&ns, true);
    server.apply(&setup).await;
    let op = Operator::start(server.kubeconfig(), "op-a", &unique("weir-"), &[]);

    // With a store, the stream reports StoreReady.
    common::eventually(
        60,
        "StoreReady and Ready=True on the stream with a store",
        || op.log_text(),
        || async {
            let c = current_conditions(&server, &ns)?;
            (has(&c, "StoreReady") && c.contains(&("Ready".into(), "True".into()))).then_some(())
        },
    )
    .await;

    // Another controller adds its own condition (its own field manager, no force).
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weir.dev", "v1alpha1", "EventStream"),
        "eventstreams",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(server.client(), &ns, &ar);
    let theirs = json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "EventStream",
        "metadata": {"name": "orders"},
        "status": {"conditions": [{
            "type": "Probed", "status": "True", "reason": "Reachable", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]},
    });
    api.patch_status(
        "orders",
        &PatchParams::apply("monitor"),
        &Patch::Apply(&theirs),
    )
    .await
    .expect("another manager's condition is applied");

    // Without a store there is no StoreReady any more: the operator's next status drops it,
    // and the other controller's condition is still there.
    server.apply(&stream_yaml(&ns, false)).await;
    let conditions = common::eventually(
        60,
        "the status of the store-less generation without StoreReady",
        || {
            format!(
                "{}\n{:#}",
                op.log_text(),
                server
                    .object("weir.dev", "eventstreams", &ns, "orders")
                    .unwrap_or(Value::Null)
            )
        },
        || async {
            let c = current_conditions(&server, &ns)?;
            (!has(&c, "StoreReady") && has(&c, "BrokerReady")).then_some(c)
        },
    )
    .await;
    assert!(has(&conditions, "Probed"), "{conditions:?}");
    assert!(
        conditions.contains(&("Ready".into(), "True".into())),
        "{conditions:?}"
    );
    let obj = server
        .object("weir.dev", "eventstreams", &ns, "orders")
        .unwrap_or(Value::Null);
    let managers: Vec<&str> = obj["metadata"]["managedFields"]
        .as_array()
        .map(|l| l.iter().filter_map(|e| e["manager"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        managers.contains(&"weir") && managers.contains(&"monitor"),
        "{managers:?}"
    );

    // The operator does not rewrite a status that differs only by the other controller's
    // condition: no status writes across a few resyncs (refresh is 2 s). Nothing changes in
    // that window, so there is no event to wait for: a fixed wait is the test.
    server.clear_calls();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let writes = server
        .calls()
        .into_iter()
        .filter(|c| {
            c.resource == "eventstreams"
                && c.subresource.as_deref() == Some("status")
                && c.field_manager.as_deref() == Some("weir")
        })
        .count();
    assert_eq!(writes, 0, "{}", op.log_text());
}
