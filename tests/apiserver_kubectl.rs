//! The test API server driven by the real kubectl and by kube-rs.

mod apiserver;

use apiserver::TestApiServer;

#[tokio::test]
async fn smoke() {
    let server = TestApiServer::start().await;
    let out = server.kubectl(&["get", "ns"]).await;
    println!("{}\n{}", out.stdout, out.stderr);
    assert!(out.success);
}
