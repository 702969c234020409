//! Renders the chart `charts/weir` with the real `helm` (installed by `scripts/install-helm.sh`,
//! which `.ci/run` calls): what a user's `helm install` would send to the API server.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/weir")
}

/// The helm binary: `WEIR_TEST_HELM`, else `helm` on PATH.
pub fn helm() -> Command {
    let bin = std::env::var("WEIR_TEST_HELM").unwrap_or_else(|_| "helm".into());
    let mut cmd = Command::new(bin);
    // Keep helm's caches and config out of the user's home.
    let scratch = std::env::temp_dir().join("weir-test-helm");
    cmd.env("HELM_CACHE_HOME", scratch.join("cache"))
        .env("HELM_CONFIG_HOME", scratch.join("config"))
        .env("HELM_DATA_HOME", scratch.join("data"));
    cmd
}

/// Runs helm with `args`; Ok(stdout) on success, Err(stderr) on failure. Panics with a hint
/// when helm is not installed.
pub fn run(args: &[&str]) -> Result<String, String> {
    let out = helm().args(args).output().unwrap_or_else(|e| {
        panic!("helm not runnable ({e}): run scripts/install-helm.sh (or set WEIR_TEST_HELM)")
    });
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm template weir charts/weir --namespace weir-system ARGS...`, as parsed objects
/// (empty documents dropped). Err(stderr) when helm refuses the values.
pub fn render(args: &[&str]) -> Result<Vec<Value>, String> {
    render_in("weir-system", args)
}

/// [`render`] into the release namespace `namespace`.
pub fn render_in(namespace: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let dir = chart_dir();
    let mut all = vec![
        "template",
        "weir",
        dir.to_str().expect("utf-8 path"),
        "--namespace",
        namespace,
    ];
    all.extend_from_slice(args);
    let text = run(&all)?;
    let docs: Vec<Value> = weir::yaml::from_multiple(&text)
        .unwrap_or_else(|e| panic!("helm rendered invalid YAML: {e}\n{text}"));
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The rendered objects of `kind`.
pub fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The one rendered object of `kind` (panics when there is not exactly one).
pub fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind}, rendered {}",
        found.len()
    );
    found[0]
}
