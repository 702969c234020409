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
    // Its sink is `weir sink` on 127.0.0.1: local development, loopback allowed on purpose.
    let (code, out, err) = weir(&[
        "validate",
        "-f",
        "examples/quickstart",
        "--allow-loopback-sinks",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resources valid"), "{out}");
    // Without the flag the sink guard refuses it, naming the file, the field and the flag.
    let (code, out, err) = weir(&["validate", "-f", "examples/quickstart"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("subscription.yaml doc 1: spec.sink.uri: \"http://127.0.0.1:8888/\": sink address 127.0.0.1 is loopback: refused (see --sink-allow-cidrs, or --allow-loopback-sinks for local development)"),
        "{out}"
    );
    // The allow-list does it too, and a malformed one is an error naming the value.
    let (code, out, err) = weir(&[
        "validate",
        "-f",
        "examples/quickstart",
        "--sink-allow-cidrs",
        "127.0.0.0/8",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = weir(&[
        "validate",
        "-f",
        "examples/quickstart",
        "--sink-allow-cidrs",
        "127.0.0/8",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"127.0.0/8\" is not a CIDR range"), "{err}");
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

/// A structured CloudEvent whose `data` is JSON and that names no `datacontenttype` reaches a
/// sink as JSON (the CloudEvents JSON format implies `application/json`): `weir sink` prints
/// the data as JSON, not as opaque `data_base64`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_data_without_a_content_type_reaches_the_sink_as_json() {
    use std::io::BufRead as _;
    use std::time::{Duration, Instant};

    let port = common::free_port();
    let mut sink = Command::new(common::weir_binary())
        .args(["sink", "-o", "json", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("weir sink");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let out = sink.stdout.take().unwrap();
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            l2.lock().unwrap().push(line);
        }
    });

    let db = common::fresh_database().await;
    let m = common::Manifests::new(&db);
    m.write(
        "s.yaml",
        &common::stream_yaml("untyped", &common::unique("weir.test.ct."), ""),
    );
    m.write(
        "sub.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: print, namespace: test}}\n\
             spec:\n  stream: untyped\n  sink: {{uri: \"http://127.0.0.1:{port}/\"}}\n  startFrom: earliest\n"
        ),
    );
    let mut w = common::Weir::start(m.path());
    w.wait_ready("test", "untyped").await;
    let r = common::http()
        .post(w.events_url("test", "untyped"))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"j1","source":"/cli","type":"t","data":{"a":[1,2]}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    let deadline = Instant::now() + Duration::from_secs(60);
    let printed: serde_json::Value = loop {
        let found = lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("\"j1\""))
            .cloned();
        if let Some(l) = found {
            break serde_json::from_str(&l).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the sink printed nothing for j1; weir log:\n{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = sink.kill();
    let _ = sink.wait();
    assert_eq!(
        printed["data"],
        serde_json::json!({"a": [1, 2]}),
        "{printed}"
    );
    assert!(printed.get("data_base64").is_none(), "{printed}");
    assert_eq!(printed["datacontenttype"], "application/json", "{printed}");
}
