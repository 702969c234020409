//! `kubectl weir`: the binary run as a kubectl plugin (named `kubectl-weir` on the PATH).
//!
//! kubectl runs a plugin with the arguments after its name and does not parse them, so the
//! plugin takes kubectl's usual cluster flags itself: `--kubeconfig`, `--context`,
//! `-n/--namespace` and `-A/--all-namespaces`. They exist only in plugin mode and only
//! `status` uses them: as a plugin, `status` reads the weir.dev resources and their
//! `.status.conditions` from the cluster (what the operator wrote), as `kubectl get` would,
//! instead of asking one worker's admin API. The other client commands (`dlq`, `archive`,
//! `tail`, ...) act on one worker and keep using `--admin`/`--url` (a port-forward).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory, FromArgMatches};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

use super::Cli;
use super::output::Output;
use crate::api::{ArchivePolicy, CachePolicy, EventStream, Subscription};

/// The file name kubectl looks for on the PATH to run `kubectl weir`.
pub const PLUGIN_BINARY: &str = "kubectl-weir";

/// kubectl's cluster flags, as a plugin takes them.
#[derive(Args, Debug, Default, Clone)]
pub struct KubeFlags {
    /// Path of the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else the
    /// Pod's service account).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace to show (default: the context's namespace, else `default`).
    #[arg(short = 'n', long = "namespace", id = "kube_namespace", global = true)]
    pub namespace: Option<String>,
    /// Show the resources of every namespace.
    #[arg(short = 'A', long = "all-namespaces", global = true)]
    pub all_namespaces: bool,
}

/// Whether the program was started as `kubectl-weir` (argv[0]'s file name, as kubectl runs
/// plugins, possibly through a symbolic link).
pub fn invoked_as_plugin() -> bool {
    std::env::args_os().next().is_some_and(|a| {
        Path::new(&a)
            .file_name()
            .is_some_and(|n| n == PLUGIN_BINARY)
    })
}

/// The command line of `kubectl weir`: Weir's own, plus kubectl's cluster flags.
pub fn parse() -> (Cli, KubeFlags) {
    let command = KubeFlags::augment_args(Cli::command())
        .name(PLUGIN_BINARY)
        .bin_name("kubectl weir");
    let matches = command.get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let flags = KubeFlags::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    (cli, flags)
}

/// A client for the cluster the flags name, and the namespace they select.
async fn client(flags: &KubeFlags) -> anyhow::Result<(kube::Client, String)> {
    let options = KubeConfigOptions {
        context: flags.context.clone(),
        ..Default::default()
    };
    let config = match (&flags.kubeconfig, &flags.context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        // A context names an entry of the kubeconfig: no in-cluster fallback then.
        (None, Some(context)) => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("the kubeconfig context {context}"))?,
        (None, None) => kube::Config::infer()
            .await
            .context("no kubeconfig found (--kubeconfig, $KUBECONFIG, ~/.kube/config)")?,
    };
    let namespace = flags
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("a Kubernetes client")?;
    Ok((client, namespace))
}

/// One resource as `kubectl weir status` shows it.
struct Row {
    kind: String,
    namespace: String,
    name: String,
    object: DynamicObject,
}

/// `kubectl weir status`: every weir.dev resource of the namespace (or all) with its Ready
/// condition, read from the cluster.
pub async fn status(flags: &KubeFlags, output: Output) -> anyhow::Result<ExitCode> {
    let (client, namespace) = client(flags).await?;
    let kinds = [
        ApiResource::erase::<EventStream>(&()),
        ApiResource::erase::<Subscription>(&()),
        ApiResource::erase::<ArchivePolicy>(&()),
        ApiResource::erase::<CachePolicy>(&()),
    ];
    let mut rows = Vec::new();
    for ar in &kinds {
        let api: Api<DynamicObject> = if flags.all_namespaces {
            Api::all_with(client.clone(), ar)
        } else {
            Api::namespaced_with(client.clone(), &namespace, ar)
        };
        let list = api
            .list(&ListParams::default())
            .await
            .with_context(|| format!("listing {}", ar.plural))?;
        for object in list {
            rows.push(Row {
                kind: ar.kind.clone(),
                namespace: object.metadata.namespace.clone().unwrap_or_default(),
                name: object.metadata.name.clone().unwrap_or_default(),
                object,
            });
        }
    }
    if output == Output::Json {
        let resources: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "kind": r.kind,
                    "namespace": r.namespace,
                    "name": r.name,
                    "generation": r.object.metadata.generation,
                    "status": r.object.data.get("status").cloned().unwrap_or(Value::Null),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "resources": resources }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        if flags.all_namespaces {
            println!("No weir resources found.");
        } else {
            println!("No weir resources found in namespace {namespace}.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<14} {:<28} {:<7} MESSAGE", "KIND", "NAME", "READY");
    for r in &rows {
        let (ready, message) = ready_of(&r.object);
        println!(
            "{:<14} {:<28} {:<7} {}",
            r.kind,
            format!("{}/{}", r.namespace, r.name),
            ready,
            message
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `Ready` condition's status and message; `Unknown` while the operator has written none.
fn ready_of(object: &DynamicObject) -> (String, String) {
    let ready = object
        .data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
    match ready {
        Some(c) => (
            c["status"].as_str().unwrap_or("Unknown").to_string(),
            c["message"].as_str().unwrap_or("").to_string(),
        ),
        None => ("Unknown".into(), "no status written yet".into()),
    }
}
