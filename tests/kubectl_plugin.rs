//! `kubectl weir`: the real kubectl finds the `weir` binary named `kubectl-weir` on the PATH
//! (`kubectl plugin list`) and runs it as `kubectl weir status`, which reads the weir.dev
//! resources and their conditions from the cluster (the in-process test API server), honouring
//! `--kubeconfig`, `$KUBECONFIG`, `--context`, `-n` and `-A`.

mod apiserver;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use apiserver::{TestApiServer, ok};
use serde_json::Value;

fn kubectl() -> String {
    std::env::var("WEIR_TEST_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// A PATH whose first folder holds `kubectl-weir`, a symbolic link to the weir binary.
struct PluginPath {
    dir: tempfile::TempDir,
    home: tempfile::TempDir,
    path: String,
}

impl PluginPath {
    fn new() -> PluginPath {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(common::weir_binary(), dir.path().join("kubectl-weir")).unwrap();
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // An empty home: no ~/.kube/config of the machine is read.
        let home = tempfile::tempdir().unwrap();
        PluginPath { dir, home, path }
    }

    fn plugin(&self) -> PathBuf {
        self.dir.path().join("kubectl-weir")
    }

    /// `kubectl <args>` with this PATH, no `$KUBECONFIG` unless given.
    fn kubectl(&self, args: &[&str], kubeconfig_env: Option<&Path>) -> Output {
        let mut cmd = Command::new(kubectl());
        cmd.args(args)
            .env("PATH", &self.path)
            .env("HOME", self.home.path())
            .env_remove("KUBECONFIG");
        if let Some(k) = kubeconfig_env {
            cmd.env("KUBECONFIG", k);
        }
        cmd.output().expect("kubectl runs")
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The table line of `kind` `ns/name`, split on whitespace.
fn row<'a>(table: &'a str, kind: &str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&kind) && cols.get(1) == Some(&name))
        .unwrap_or_else(|| panic!("no {kind} {name} in:\n{table}"))
}

fn ready_status(ready: &str, reason: &str, message: &str) -> String {
    format!(
        r#"{{"status":{{"observedGeneration":1,"conditions":[{{"type":"Ready","status":"{ready}","reason":"{reason}","message":"{message}","lastTransitionTime":"2026-01-01T00:00:00Z"}}]}}}}"#
    )
}

/// Writes an EventStream's status through `/status`, as the operator does.
async fn patch_status(server: &TestApiServer, name: &str, ns: &str, body: String) {
    let args = [
        "patch",
        "wes",
        name,
        "-n",
        ns,
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        &body,
    ];
    ok(server.kubectl(&args).await);
}

#[tokio::test]
async fn kubectl_runs_weir_as_a_plugin() {
    let server = TestApiServer::start().await;
    for ns in ["shop", "billing"] {
        let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
        ok(server
            .kubectl_with_input(&["apply", "-f", "-"], &yaml)
            .await);
    }
    ok(server.kubectl(&["apply", "-f", "crds/"]).await);
    ok(server
        .kubectl(&["apply", "-f", "examples/quickstart/"])
        .await);
    server
        .apply(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {name: invoices, namespace: billing}\n\
             spec:\n  broker: {urlSecretRef: {name: rabbitmq, key: url}, exchange: weir.billing.invoices}\n",
        )
        .await;
    // The conditions as the operator writes them.
    patch_status(
        &server,
        "orders",
        "shop",
        ready_status("True", "Provisioned", "ok"),
    )
    .await;
    patch_status(
        &server,
        "notifications",
        "shop",
        ready_status("False", "BrokerUnavailable", "broker: connection refused"),
    )
    .await;
    patch_status(
        &server,
        "invoices",
        "billing",
        ready_status("True", "Provisioned", "ok"),
    )
    .await;

    let p = PluginPath::new();
    let kubeconfig = server.kubeconfig().to_str().unwrap().to_string();

    // kubectl finds the plugin on the PATH.
    let list = p.kubectl(&["plugin", "list"], None);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains(p.plugin().to_str().unwrap()),
        "kubectl plugin list: {listed}\n{}",
        String::from_utf8_lossy(&list.stderr)
    );

    // `-n`: the namespace's resources, with their Ready condition.
    let table = stdout(&p.kubectl(
        &["weir", "status", "--kubeconfig", &kubeconfig, "-n", "shop"],
        None,
    ));
    assert_eq!(
        row(&table, "EventStream", "shop/orders")[2..],
        ["True", "ok"],
        "{table}"
    );
    assert_eq!(
        row(&table, "EventStream", "shop/notifications")[2..],
        ["False", "broker:", "connection", "refused"],
        "{table}"
    );
    assert_eq!(
        row(&table, "Subscription", "shop/print-orders")[2],
        "Unknown",
        "{table}"
    );
    assert!(!table.contains("billing/invoices"), "{table}");

    // Without `-n`: the context's namespace (`default` in the test kubeconfig).
    let none = stdout(&p.kubectl(&["weir", "status", "--kubeconfig", &kubeconfig], None));
    assert_eq!(
        none.trim(),
        "No weir resources found in namespace default.",
        "{none}"
    );

    // `-A` and `$KUBECONFIG` (what kubectl hands its plugins from the environment).
    let all = stdout(&p.kubectl(&["weir", "status", "-A"], Some(server.kubeconfig())));
    row(&all, "EventStream", "billing/invoices");
    row(&all, "EventStream", "shop/orders");

    // `--context` names the kubeconfig's context; an unknown one is an error naming it.
    let named = stdout(&p.kubectl(
        &[
            "weir",
            "status",
            "--kubeconfig",
            &kubeconfig,
            "--context",
            "test",
            "--namespace",
            "billing",
        ],
        None,
    ));
    assert_eq!(
        row(&named, "EventStream", "billing/invoices")[2],
        "True",
        "{named}"
    );
    let wrong = p.kubectl(
        &[
            "weir",
            "status",
            "--kubeconfig",
            &kubeconfig,
            "--context",
            "no-such-context",
        ],
        None,
    );
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("no-such-context"), "{err}");

    // `-o json`: the resources and the status the operator wrote.
    let json = stdout(&p.kubectl(
        &[
            "weir",
            "status",
            "--kubeconfig",
            &kubeconfig,
            "-n",
            "shop",
            "-o",
            "json",
        ],
        None,
    ));
    let v: Value = serde_json::from_str(&json).unwrap();
    let orders = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "EventStream" && r["name"] == "orders")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(orders["status"]["conditions"][0]["reason"], "Provisioned");

    // Help names the command as kubectl runs it; the cluster flags exist only there.
    let help = stdout(&p.kubectl(&["weir", "--help"], None));
    assert!(help.contains("kubectl weir"), "{help}");
    assert!(help.contains("--kubeconfig"), "{help}");
    let plain = Command::new(common::weir_binary())
        .args(["status", "--kubeconfig", &kubeconfig])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "weir itself takes no --kubeconfig");
}
