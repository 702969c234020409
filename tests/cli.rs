//! The `weir` command line, run as users run it.

mod common;

use std::process::Command;

fn weir(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::weir_binary())
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run weir");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_every_broken_document_with_file_doc_and_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        "examples/quickstart/secrets.yaml",
        dir.path().join("secrets.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("streams.yaml"),
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {name: a, namespace: shop}\n\
         spec:\n  broker: {urlSecretRef: {name: rabbitmq, key: url}}\n  batching: {maxDelay: 5 sec}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {name: b, namespace: shop}\n\
         spec:\n  broker: {urlSecretRef: {name: rabbitmq, key: url}}\n  batching: {maxEvents: lots}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("sub.yaml"),
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {name: s, namespace: shop}\n\
         spec:\n  stream: nope\n  sink: {uri: \"http://sink.local/\"}\n",
    )
    .unwrap();
    let d = dir.path().display().to_string();
    let (code, out, err) = weir(&["validate", "-f", &d]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines.contains(&format!("{d}/streams.yaml doc 1: spec.batching.maxDelay: invalid duration \"5 sec\": expected an integer and a unit (ms, s, m, h, d), e.g. \"250ms\" or \"90d\"").as_str()), "{out}");
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "{d}/streams.yaml doc 2: spec.batching.maxEvents: invalid type"
        ))),
        "{out}"
    );
    assert!(
        lines.contains(
            &format!("{d}/sub.yaml doc 1: spec.stream: EventStream shop/nope not found").as_str()
        ),
        "{out}"
    );
}

#[test]
fn validate_accepts_the_quickstart() {
    let (code, out, err) = weir(&["validate", "-f", "examples/quickstart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resources valid"), "{out}");
}

#[test]
fn crds_prints_exactly_the_committed_files() {
    let (code, out, err) = weir(&["crds"]);
    assert_eq!(code, 0, "{err}");
    for name in [
        "eventstreams",
        "subscriptions",
        "archivepolicies",
        "cachepolicies",
    ] {
        let file = std::fs::read_to_string(format!("crds/{name}.weir.dev.yaml")).unwrap();
        assert!(
            out.contains(file.trim()),
            "crds/{name}.weir.dev.yaml differs from `weir crds`"
        );
    }
}
