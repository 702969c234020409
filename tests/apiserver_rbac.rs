//! The test API server enforces RBAC like the real one, from the chart as `helm template`
//! renders it: the chart's service account may make exactly the calls its Roles allow, and
//! anything else is answered 403 with the real server's Status (what kubectl prints), an
//! unknown token 401.

mod apiserver;
mod common;

use apiserver::TestApiServer;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

const SA: &str = "system:serviceaccount:weir-system:weir";

async fn setup(chart_args: &[&str]) -> (TestApiServer, String) {
    let server = TestApiServer::start().await;
    server.apply_crds().await;
    server.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: weir-system}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: billing}\n---\n\
             apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {name: orders, namespace: shop}\n\
             spec: {broker: {urlSecretRef: {name: rabbitmq, key: url}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: rabbitmq, namespace: shop}\nstringData: {url: amqp://x}\n").await;
    let chart =
        common::helm::render_in("weir-system", chart_args).unwrap_or_else(|e| panic!("helm: {e}"));
    server.enforce_rbac(&chart);
    let token = server.issue_token("weir-system", "weir", &[]);
    (server, token)
}

fn client_with_token(server: &TestApiServer, token: &str) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.auth_info.token = Some(token.to_string().into());
    kube::Client::try_from(config).unwrap()
}

fn eventstreams(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weir.dev", "v1alpha1", "EventStream"),
        "eventstreams",
    );
    Api::namespaced_with(client, ns, &ar)
}

fn status_of(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_service_account_gets_exactly_its_rbac() {
    let (server, token) = setup(&[]).await;
    let client = client_with_token(&server, &token);

    // Allowed: what the operator does.
    let streams = eventstreams(client.clone(), "shop");
    let list = streams.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "shop");
    secrets.get("rabbitmq").await.unwrap();

    // Refused: deleting a stream, creating one, listing Secrets.
    let status = status_of(
        streams
            .delete("orders", &Default::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 403);
    assert_eq!(status.reason, "Forbidden");
    assert_eq!(
        status.message,
        format!(
            "eventstreams.weir.dev \"orders\" is forbidden: User \"{SA}\" cannot delete resource \
             \"eventstreams\" in API group \"weir.dev\" in the namespace \"shop\""
        )
    );
    let new: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "EventStream",
        "metadata": {"name": "sneaky", "namespace": "shop"},
        "spec": {"broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}}}
    }))
    .unwrap();
    let status = status_of(
        streams
            .create(&PostParams::default(), &new)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 403, "{}", status.message);
    let status = status_of(secrets.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        status.message,
        format!(
            "secrets is forbidden: User \"{SA}\" cannot list resource \"secrets\" in API group \"\" \
             in the namespace \"shop\""
        )
    );
    // Nothing was deleted or created.
    assert!(
        server
            .object("weir.dev", "eventstreams", "shop", "orders")
            .is_some()
    );
    assert!(
        server
            .object("weir.dev", "eventstreams", "shop", "sneaky")
            .is_none()
    );

    // The real kubectl prints the server's message. (client-go sends no token over plain
    // HTTP; it impersonates the service account instead, as `kubectl auth can-i --as` would.)
    let out = server
        .kubectl(&["--as", SA, "delete", "-n", "shop", "eventstream", "orders"])
        .await;
    assert!(!out.success);
    assert!(
        out.stderr.contains(&format!(
            "Error from server (Forbidden): eventstreams.weir.dev \"orders\" is forbidden: User \"{SA}\" cannot delete resource \"eventstreams\""
        )),
        "{}",
        out.stderr
    );

    // An unknown token: 401.
    let stranger = client_with_token(&server, "not-a-token");
    let status = status_of(
        eventstreams(stranger, "shop")
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));

    // The test's own calls (no token) stay unrestricted.
    let out = server.kubectl(&["get", "secrets", "-n", "shop"]).await;
    assert!(out.success, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_namespaces_confine_the_service_account() {
    let (server, token) = setup(&["--set=watchNamespaces={shop}"]).await;
    let client = client_with_token(&server, &token);
    // Its namespace: allowed.
    eventstreams(client.clone(), "shop")
        .list(&ListParams::default())
        .await
        .unwrap();
    // Another namespace, and all namespaces at once: refused.
    let status = status_of(
        eventstreams(client.clone(), "billing")
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 403);
    assert!(
        status.message.contains("in the namespace \"billing\""),
        "{}",
        status.message
    );
    let all: Api<DynamicObject> = Api::all_with(
        client,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("weir.dev", "v1alpha1", "EventStream"),
            "eventstreams",
        ),
    );
    let status = status_of(all.list(&ListParams::default()).await.unwrap_err());
    assert!(
        status.message.ends_with("at the cluster scope"),
        "{}",
        status.message
    );
}
