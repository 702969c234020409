//! An in-process Kubernetes API server for tests: plain HTTP on `127.0.0.1` (random port),
//! speaking the REST protocol that `weir operator` (kube-rs client and watchers) and the
//! real `kubectl` use. There is no cluster on the test machines; this stands in for one.
//!
//! # Use
//!
//! ```ignore
//! mod apiserver;
//! use apiserver::TestApiServer;
//!
//! let server = TestApiServer::start().await;         // its own thread and runtime
//! server.url();                                      // "http://127.0.0.1:PORT"
//! server.kubeconfig();                               // path of a kubeconfig for it (context "test", namespace "default")
//! let client: kube::Client = server.client();        // a kube-rs client for it
//! let out = server.kubectl(&["get", "wes", "-A"]).await; // the real kubectl against it
//! assert!(out.success, "{}", out.stderr);
//! server.kubectl_with_input(&["apply", "-f", "-"], yaml).await;
//! server.apply_crds().await;                          // `kubectl apply -f crds/`, asserted to succeed
//! server.apply(yaml).await;                           // `kubectl apply -f -`, asserted to succeed
//! server.apply_namespace("shop").await;               // a Namespace, through `apply`
//! server.kubectl_command();                          // a std::process::Command with --kubeconfig/--cache-dir set
//! server.calls();                                    // every request served, as `Call`s (verb, group, resource, ...)
//! server.permissions_used(|c| !c.is_kubectl());      // {(group, "resource[/sub]", verb)} for RBAC checks
//! server.clear_calls();
//! server.object("weir.dev", "eventstreams", "shop", "orders"); // the stored object, if any
//! server.compact();                                  // forget watch history: resuming watches get 410
//! server.disconnect_watches();                       // end open watches (clients resume)
//! let token = server.issue_token("shop", "ops", &["weir"]); // a service-account token (TokenReview knows it)
//! server.revoke_token(&token);
//! server.grant("system:serviceaccount:shop:ops", "update", "weir.dev",
//!              "subscriptions", "deadletters", "shop"); // SubjectAccessReview allows this
//! server.revoke_grants("system:serviceaccount:shop:ops");
//! server.enforce_rbac(&common::helm::render(&[]).unwrap()); // authorize token holders by the chart's Roles
//! server.kubeconfig_with_token(&token);              // a kubeconfig that authenticates as `token`'s account
//! server.kubectl(&["--as", "system:serviceaccount:weir-system:weir", "get", "wes"]); // kubectl as that account (impersonation)
//! ```
//!
//! The server lives until the `TestApiServer` is dropped. It starts with the namespaces
//! `default`, `kube-system` and `kube-public`; other namespaces must be created (as on a
//! real cluster, objects in a missing namespace are rejected with 404).
//!
//! # What it serves
//!
//! - Discovery: `/api`, `/apis`, `/api/v1`, `/apis/{group}`, `/apis/{group}/{version}` (legacy
//!   documents with `shortNames`, `categories`, `verbs` and the `status`/`scale`
//!   subresources); `/version`; `/healthz`, `/readyz`, `/livez`. Aggregated discovery is not
//!   offered; kubectl falls back to the legacy documents.
//! - Built-in kinds: core v1 Namespaces, Secrets, ConfigMaps and Events,
//!   `events.k8s.io/v1` Events, `coordination.k8s.io/v1` Leases,
//!   `apiextensions.k8s.io/v1` CustomResourceDefinitions. Creating a CRD serves its kinds at
//!   once and sets `Established=True`; deleting it deletes its objects. A Secret's
//!   `stringData` is stored as base64 `data` and its `type` defaults to `Opaque`.
//! - Verbs: get, list (`labelSelector`, `fieldSelector`, `resourceVersion`,
//!   `resourceVersionMatch`, `limit`/`continue`), watch (replay from a `resourceVersion`,
//!   ADDED/MODIFIED/DELETED, BOOKMARK with `allowWatchBookmarks`, `sendInitialEvents`,
//!   `timeoutSeconds`, `ERROR` 410 for a compacted version; with a selector, an object that
//!   starts or stops matching is ADDED or DELETED; bookmarks every 2 s), create (`generateName`),
//!   update (409 on a stale `resourceVersion`), patch (JSON patch, merge patch, strategic
//!   merge treated as merge, server-side apply: a merge that takes
//!   `x-kubernetes-list-type: map` lists item by item by their keys, e.g. `conditions` by
//!   `type`, plus removal of the fields and items the manager stopped applying unless
//!   another manager owns them, `managedFields` per manager with `k:{...}` item keys, 409
//!   when an apply changes a field another manager owns unless `force=true`; updates take
//!   over the fields they change, so kube-lease-manager's locking works), delete (finalizers:
//!   `deletionTimestamp` first, removal with the last finalizer; preconditions),
//!   deletecollection; `dryRun=All`; `fieldValidation=Strict`.
//! - Validation with the real server's `422 Invalid` Status (`Kind.group "name" is invalid:
//!   ...`, `details.causes` with `FieldValueInvalid`, `FieldValueTypeInvalid`,
//!   `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueDuplicate`, ...; kubectl
//!   prints `The Kind "name" is invalid: ...`): metadata names on create (a DNS-1123
//!   subdomain; Namespaces a DNS-1123 label, Services a DNS-1035 label, CRDs
//!   `plural.group`; `generateName` prefixes too).
//! - Custom resources: unknown fields pruned (or a 400 `strict decoding error` when Strict),
//!   the object validated against the CRD's `openAPIV3Schema` (types, `enum`, bounds,
//!   lengths, `pattern`, item counts, `required`, `date-time`, unique list-map keys) and then
//!   its `x-kubernetes-validations` CEL rules (`message`, `messageExpression`, `fieldPath`,
//!   `reason`; `oldSelf` transition rules on updates; skipped, with the real notice, after
//!   a type, enum, required, length or item-count error) on create, update, patch and
//!   status writes (validated like any write; they change nothing but `status`);
//!   `metadata.generation` bumped on changes outside `metadata` and `status`, `status` only
//!   written through `/status`, `/scale` read and written through the CRD's
//!   `specReplicasPath`/`statusReplicasPath`/`labelSelectorPath`.
//! - Server-side printing: `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` gets a
//!   `Table` built from the printer columns (lists, gets and watches).
//! - `/openapi/v3` and `/openapi/v3/{api/v1 | apis/{group}/{version}}` from the CRD schemas
//!   (for `kubectl explain` and kubectl's check for server-side field validation).
//! - Reviews (`POST` only, answered 201 and never stored; recorded as `create` calls like any
//!   other, so RBAC checks see them):
//!   `authentication.k8s.io/v1` TokenReview authenticates the tokens a test issued with
//!   `issue_token` as `system:serviceaccount:NS:NAME` (groups `system:serviceaccounts`,
//!   `system:serviceaccounts:NS`, `system:authenticated`), when one of `spec.audiences`
//!   (default `https://kubernetes.default.svc`) is among the token's; `status.audiences` are
//!   the requested ones it is valid for. Anything else: `authenticated: false` with an
//!   `error`. `authorization.k8s.io/v1` SubjectAccessReview allows `resourceAttributes` that
//!   a `grant` matches (subject = `spec.user` or one of `spec.groups`), else `allowed: false`
//!   with a `reason`; `nonResourceAttributes` are always denied.
//!
//! # Not supported (differences from a real server)
//!
//! No other kinds (Pods, Deployments, Services, HPAs, ServiceAccounts, ... are not served);
//! RBAC is enforced only after `enforce_rbac`, only for callers with a bearer token or an
//! `Impersonate-User` header (requests with neither, the test's own kubectl and clients, are
//! allowed and recorded like a cluster admin's), from RBAC objects handed to it rather than
//! stored through the API, and without aggregated ClusterRoles or `nonResourceURLs` rules
//! (non-resource paths are allowed to every caller); no discovery for the review groups; no
//! `TokenRequest` (tests issue tokens with `issue_token`); SubjectAccessReview answers from
//! `grant`s, not from the enforced RBAC objects; no protobuf, CBOR or aggregated discovery; no
//! `/openapi/v2`; no admission webhooks or schema defaults; CEL rules run without a
//! cost budget or the Kubernetes CEL libraries (`quantity`, `url`, `ip`, ...), with
//! `date-time`/`duration` strings as plain strings; no validation ratcheting (an unchanged
//! invalid field still fails); no built-in kinds' own field validation (only their names);
//! no unknown-field warnings (`fieldValidation=Warn` prunes silently); no
//! garbage collection by `ownerReferences`; no conversion between CRD versions (every
//! served version shows the same stored object); server-side apply merges only
//! `listType: map` lists by key (`listType: set` lists and `metadata.finalizers` are owned
//! whole), keeps live order with new items appended, and does not prune ownership of
//! fields another write removed; core and `events.k8s.io` Events are separate
//! stores; a namespace is removed at once after deleting its contents, and contents held by
//! finalizers stay, marked, in the deleted namespace (a real one stays `Terminating` until
//! they are gone); lists are served from the current state
//! only; kubectl's typed subcommands that send protobuf (`kubectl create namespace`,
//! `kubectl create secret ...`) get 415 (use `kubectl apply -f`).
//!
//! Set `WEIR_TEST_APISERVER_LOG=1` to print every request and error to stderr, and
//! `WEIR_TEST_KUBECTL` to use another kubectl binary. For manual use, the ignored test
//! `serve_manually` in `tests/apiserver_kubectl.rs` starts a server with the quickstart
//! applied and prints its kubeconfig.

#![allow(dead_code)]

mod cel;
mod field;
mod http;
mod openapi;
mod rbac;
mod registry;
mod review;
mod schema;
mod store;
mod table;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use serde_json::Value;

/// One request the server served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`), or the lower-case HTTP method for non-resource paths.
    pub verb: String,
    /// API group (`""` for core).
    pub group: String,
    pub version: String,
    /// Plural resource name; empty for non-resource paths (discovery, openapi).
    pub resource: String,
    /// `status` or `scale`.
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The request path.
    pub path: String,
    /// The `User-Agent` header (kubectl sends `kubectl/v1.32…`).
    pub user_agent: String,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
}

impl Call {
    /// The RBAC resource: `plural` or `plural/subresource` (empty for non-resource paths).
    pub fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// Whether kubectl made the call (rather than, e.g., the operator under test).
    pub fn is_kubectl(&self) -> bool {
        self.user_agent.starts_with("kubectl")
    }
}

/// What a kubectl run printed.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The output of a kubectl run that must have succeeded; panics with both streams if not.
pub fn ok(out: KubectlOutput) -> String {
    assert!(
        out.success,
        "kubectl failed:\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// A running test API server; stopped when dropped.
pub struct TestApiServer {
    url: String,
    shared: Arc<http::Shared>,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl TestApiServer {
    /// Starts a server on a random port of 127.0.0.1. Panics if no local port can be bound
    /// or the temporary kubeconfig cannot be written (the test cannot run then).
    pub async fn start() -> Self {
        match Self::try_start() {
            Ok(s) => s,
            Err(e) => panic!("the test API server cannot start: {e}"),
        }
    }

    /// Starts a server; usable from synchronous code too.
    pub fn try_start() -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let shared = Arc::new(http::Shared {
            store: Mutex::new(store::Store::new()),
            address: addr.to_string(),
            reviews: Mutex::new(review::Reviews::default()),
            rbac: Mutex::new(None),
        });
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n\
                 users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    \
                 user: test\n    namespace: default\ncurrent-context: test\n"
            ),
        )?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(http::handle)
            .with_state(shared.clone());
        // The server runs on its own runtime and thread so that tests may block (e.g. on a
        // synchronous kubectl run) or use a current-thread runtime without stalling it.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("test-apiserver-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("test API server: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        r = axum::serve(listener, app) => {
                            if let Err(e) = r {
                                eprintln!("test API server: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Open watch streams would keep a graceful shutdown waiting; drop them.
                runtime.shutdown_background();
            })?;
        Ok(Self {
            url,
            shared,
            dir,
            kubeconfig,
            stop: Mutex::new(Some(stop_tx)),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig file pointing at the server (context `test`, namespace `default`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube-rs client for the server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let uri: ::http::Uri = match self.url.parse() {
            Ok(u) => u,
            Err(e) => panic!("the server URL {} is not a URI: {e}", self.url),
        };
        match kube::Client::try_from(kube::Config::new(uri)) {
            Ok(c) => c,
            Err(e) => panic!("a kube client for {} cannot be built: {e}", self.url),
        }
    }

    /// A `kubectl` command (`$WEIR_TEST_KUBECTL`, else `kubectl` on the PATH) with
    /// `--kubeconfig` and a private `--cache-dir` set, so discovery is never read from
    /// another server's cache.
    pub fn kubectl_command(&self) -> std::process::Command {
        let bin = std::env::var("WEIR_TEST_KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"));
        cmd
    }

    /// Runs kubectl with `args` against the server. Panics if kubectl cannot be run at all.
    pub async fn kubectl(&self, args: &[&str]) -> KubectlOutput {
        let mut cmd = tokio::process::Command::from(self.kubectl_command());
        cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
        match cmd.output().await {
            Ok(out) => KubectlOutput {
                success: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            },
            Err(e) => panic!("kubectl cannot be run: {e}"),
        }
    }

    /// Starts kubectl with `args` in the background (a waiting `delete`, `wait` or
    /// `get -w`), its output piped for the caller to collect.
    pub fn kubectl_spawn(&self, args: &[&str]) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::from(self.kubectl_command());
        cmd.args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn()
            .unwrap_or_else(|e| panic!("kubectl cannot be run: {e}"))
    }

    /// Runs kubectl with `args`, writing `input` to its standard input (for `-f -`).
    pub async fn kubectl_with_input(&self, args: &[&str], input: &str) -> KubectlOutput {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::from(self.kubectl_command());
        cmd.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("kubectl cannot be run: {e}"),
        };
        if let Some(mut stdin) = child.stdin.take() {
            // kubectl exiting early closes the pipe; its output then says why.
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        match child.wait_with_output().await {
            Ok(out) => KubectlOutput {
                success: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            },
            Err(e) => panic!("kubectl cannot be run: {e}"),
        }
    }

    /// `kubectl apply -f -` of `yaml`; panics with kubectl's error output if it fails.
    pub async fn apply(&self, yaml: &str) {
        let out = self.kubectl_with_input(&["apply", "-f", "-"], yaml).await;
        assert!(out.success, "kubectl apply: {}", out.stderr);
    }

    /// Creates namespace `name` (through `kubectl apply`, asserted to succeed).
    pub async fn apply_namespace(&self, name: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"
        ))
        .await;
    }

    /// `kubectl apply -f crds/` (Weir's CRDs); panics with kubectl's error output if it fails.
    pub async fn apply_crds(&self) {
        let out = self.kubectl(&["apply", "-f", "crds/"]).await;
        assert!(out.success, "kubectl apply -f crds/: {}", out.stderr);
    }

    /// Every call served so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// The distinct `(group, resource[/subresource], verb)` triples of the resource calls
    /// that `include` selects, e.g. `|c| !c.is_kubectl()` for what the code under test
    /// used, to compare with RBAC rules.
    pub fn permissions_used(
        &self,
        include: impl Fn(&Call) -> bool,
    ) -> std::collections::BTreeSet<(String, String, String)> {
        self.calls()
            .iter()
            .filter(|c| !c.resource.is_empty() && include(c))
            .map(|c| (c.group.clone(), c.rbac_resource(), c.verb.clone()))
            .collect()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.shared.lock().calls.clear();
    }

    /// The stored object `group`/`plural` `namespace`/`name` (namespace `""` for
    /// cluster-scoped kinds), as the API would return it.
    pub fn object(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = self.shared.lock();
        let rt = store
            .registry
            .all()
            .iter()
            .find(|t| t.group == group && t.plural == plural)?
            .clone();
        store.get(&rt, namespace, name).ok()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    /// Forgets the watch history: a watch resuming from any version handed out so far gets
    /// `410 Gone` (as after etcd compaction); lists from now on return newer versions.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Issues a service-account token for `namespace`/`name`, valid for `audiences` (none:
    /// the server's default audience, [`review::DEFAULT_AUDIENCE`]). TokenReview
    /// authenticates it as `system:serviceaccount:NS:NAME` until it is revoked. The service
    /// account need not exist as an object (this server serves no ServiceAccounts).
    pub fn issue_token(&self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        self.shared.reviews().issue(namespace, name, audiences)
    }

    /// Makes TokenReview forget `token` (as if it expired or its account was deleted).
    pub fn revoke_token(&self, token: &str) {
        self.shared.reviews().revoke(token);
    }

    /// Lets `subject` (a user name such as `system:serviceaccount:shop:ops`, or a group) do
    /// `verb` (or `*`) on `group`/`resource` (or `*`) with `subresource` (`""`: none; `*`)
    /// in `namespace` (`""`: every namespace), as SubjectAccessReview answers it.
    pub fn grant(
        &self,
        subject: &str,
        verb: &str,
        group: &str,
        resource: &str,
        subresource: &str,
        namespace: &str,
    ) {
        self.shared.reviews().grant(review::Grant {
            subject: subject.into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
        });
    }

    /// Enforces RBAC from now on: a request carrying a bearer token from [`Self::issue_token`]
    /// is allowed only if the Roles/ClusterRoles bound to its service account among `objects`
    /// (e.g. the chart as `helm template` renders it) allow it, else answered 403 with the real
    /// server's Status; an unknown token gets 401. Requests without a token (the test's own
    /// kubectl and kube clients) stay unrestricted, like a cluster admin's.
    pub fn enforce_rbac(&self, objects: &[Value]) {
        *self.shared.rbac.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(rbac::Rbac::from_objects(objects));
    }

    /// A kubeconfig like [`Self::kubeconfig`] whose user authenticates with `token`.
    pub fn kubeconfig_with_token(&self, token: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{}", uuid::Uuid::now_v7().simple()));
        let text = std::fs::read_to_string(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("{}: {e}", self.kubeconfig.display()))
            .replace("  user: {}", &format!("  user: {{token: \"{token}\"}}"));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }

    /// Removes every grant to `subject` (as deleting its RoleBindings would).
    pub fn revoke_grants(&self, subject: &str) {
        self.shared.reviews().revoke_grants(subject);
    }

    /// Ends every open watch stream, as an API server restart or a load balancer timeout
    /// does; clients resume from their last resourceVersion.
    pub fn disconnect_watches(&self) {
        self.shared.lock().kick.send_modify(|n| *n += 1);
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(stop) = stop {
            // The server thread may already have ended; nothing to stop then.
            let _ = stop.send(());
        }
    }
}
