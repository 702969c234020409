//! Standalone mode's manifest folder: loading, `weir validate`, and the folder watch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weir::source::{self, Loaded, Origin};
use weir::topology::index::Kind;
use weir::topology::{Defaults, Key};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/source")
        .join(name)
}

fn lines(loaded: &Loaded) -> Vec<String> {
    loaded.problems.iter().map(ToString::to_string).collect()
}

fn shop(name: &str) -> Key {
    Key::new("shop", name)
}

#[test]
fn loads_multi_document_files_secrets_config_maps_and_nested_folders() {
    let dir = fixture("valid");
    let loaded = source::load(&dir).unwrap();
    assert!(loaded.problems.is_empty(), "{:#?}", lines(&loaded));
    let index = &loaded.index;

    let orders = &index.streams[&shop("orders")];
    assert_eq!(orders.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(orders.metadata.generation, Some(1));
    let batching = orders.spec.batching.as_ref().unwrap();
    assert_eq!(batching.max_events, Some(100));
    assert_eq!(batching.max_delay.as_deref(), Some("10ms"));
    assert!(index.subscriptions.contains_key(&shop("notify-on-order")));
    // From a `.yml` file in a subfolder.
    assert!(index.archive_policies.contains_key(&shop("business")));
    assert!(index.cache_policies.contains_key(&shop("business")));

    // `stringData` as is, `data` base64-decoded.
    assert_eq!(
        index.secrets[&shop("rabbitmq")]["url"],
        b"amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    assert_eq!(
        index.secrets[&shop("pg.credentials")]["url"],
        b"postgres://postgres@127.0.0.1:5432/postgres"
    );
    assert_eq!(
        index.config_maps[&shop("order-schemas")]["created.json"],
        "{\"type\": \"object\", \"required\": [\"orderId\"]}\n"
    );

    // The Deployment is skipped, the empty document ignored, the hidden file not read, and the
    // Subscription after them keeps its document index.
    assert_eq!(loaded.resource_count(), 7);
    assert_eq!(
        loaded.origins[&(Kind::Subscription, shop("notify-on-order"))],
        Origin {
            file: dir.join("pipeline.yaml"),
            doc: 4
        }
    );
    assert_eq!(
        loaded.origins[&(Kind::CachePolicy, shop("business"))],
        Origin {
            file: dir.join("nested/policies.yml"),
            doc: 2
        }
    );
    assert!(loaded.broken.is_empty());

    let report = source::validate(&dir, &Defaults::default()).unwrap();
    assert!(report.is_ok(), "{:#?}", report.problems);
    assert_eq!(report.resources, 7);
}

#[test]
fn three_mistakes_in_three_files_are_all_reported_with_file_document_and_path() {
    let dir = fixture("mistakes");
    let d = dir.display();
    let loaded = source::load(&dir).unwrap();
    let got = lines(&loaded);
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(
        got[0],
        format!(
            "{d}/a.yaml doc 2: spec.batching.maxEvents: invalid type: string \"x\", expected u32"
        )
    );
    assert!(
        got[1].starts_with(&format!(
            "{d}/b.yaml doc 1: metadata.name: \"Notify_On_Order\" is not a valid name"
        )),
        "{}",
        got[1]
    );
    assert_eq!(
        got[2],
        format!("{d}/c.yaml doc 2: spec.maxItem: unknown field")
    );

    // Resources that are present but broken are named so the engine keeps them running; the
    // valid ones around them load.
    let default = |n: &str| Key::new("default", n);
    assert!(
        loaded
            .broken
            .contains(&(Kind::EventStream, default("orders")))
    );
    assert!(
        loaded
            .broken
            .contains(&(Kind::CachePolicy, default("cold")))
    );
    assert!(loaded.index.streams.is_empty());
    assert!(loaded.index.cache_policies.contains_key(&default("hot")));
    assert!(loaded.index.secrets.contains_key(&default("rabbitmq")));

    // `weir validate` reports the same three (and whatever the topology adds), and fails.
    let report = source::validate(&dir, &Defaults::default()).unwrap();
    assert!(!report.is_ok());
    for line in &got {
        assert!(
            report.problems.contains(line),
            "{line} not in {:#?}",
            report.problems
        );
    }
}

#[test]
fn yaml_syntax_error_names_file_document_and_line_and_hides_nothing_else() {
    let dir = fixture("syntax");
    let loaded = source::load(&dir).unwrap();
    assert_eq!(loaded.problems.len(), 1, "{:#?}", lines(&loaded));
    let problem = &loaded.problems[0];
    assert_eq!(problem.file, dir.join("broken.yaml"));
    assert_eq!(problem.doc, Some(2));
    assert_eq!(problem.line, Some(10));
    assert!(
        problem.to_string().contains("broken.yaml doc 2: ") && problem.message.contains("line 10"),
        "{problem}"
    );
    // The document before the error, and the other file, still load.
    let default = |n: &str| Key::new("default", n);
    assert!(loaded.index.config_maps.contains_key(&default("first")));
    assert!(loaded.index.config_maps.contains_key(&default("fine")));
}

#[test]
fn a_resource_defined_twice_is_a_problem_on_the_second_definition() {
    let dir = fixture("duplicate");
    let loaded = source::load(&dir).unwrap();
    assert_eq!(
        lines(&loaded),
        [format!(
            "{} doc 2: metadata.name: CachePolicy shop/hot is already defined in {} doc 1",
            dir.join("two.yaml").display(),
            dir.join("one.yaml").display()
        )]
    );
    // The first definition wins; the same name in another kind is no duplicate.
    let hot = &loaded.index.cache_policies[&shop("hot")];
    assert_eq!(
        hot.spec.stream_names.as_deref(),
        Some(&["orders".to_string()][..])
    );
    assert!(loaded.index.cache_policies.contains_key(&shop("other")));
    assert!(loaded.index.archive_policies.contains_key(&shop("hot")));
}

#[test]
fn unknown_kinds_namespaces_and_bad_secret_data() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStreams\nmetadata: {name: typo}\nspec: {}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: pg}\ndata: {url: 'not base64!'}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {k: v}\n---\n\
         - just a list\n",
    )
    .unwrap();
    let loaded = source::load(tmp.path()).unwrap();
    let got = lines(&loaded);
    let f = file.display();
    assert_eq!(got.len(), 3, "{got:#?}");
    // A Service is someone else's: skipped with a warning, no problem. A typo in a Weir kind is.
    assert!(
        got[0].starts_with(&format!(
            "{f} doc 2: kind: unknown Weir kind \"EventStreams\""
        )),
        "{}",
        got[0]
    );
    assert!(
        got[1].starts_with(&format!("{f} doc 3: data.url: invalid base64")),
        "{}",
        got[1]
    );
    assert_eq!(
        got[2],
        format!("{f} doc 5: a manifest must be a mapping with apiVersion, kind and metadata")
    );
    assert!(loaded.index.secrets.is_empty());
    assert_eq!(
        loaded.index.config_maps[&Key::new("default", "cm")]["k"],
        "v"
    );
}

#[test]
fn a_missing_folder_is_an_error_not_a_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    assert!(matches!(
        source::load(&missing),
        Err(source::SourceError::Folder { .. })
    ));
    let file = tmp.path().join("f.yaml");
    std::fs::write(&file, "").unwrap();
    assert!(matches!(
        source::load(&file),
        Err(source::SourceError::NotADirectory(_))
    ));
}

#[test]
fn reload_keeps_what_a_file_that_stopped_parsing_held() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let two_streams = format!(
        "{}---\n{}",
        stream(1),
        stream(2).replace("name: orders", "name: payments")
    );
    std::fs::write(dir.join("streams.yaml"), &two_streams).unwrap();
    std::fs::write(dir.join("secret.yaml"), SECRET).unwrap();
    let first = source::load(dir).unwrap();
    assert!(first.problems.is_empty(), "{:#?}", lines(&first));
    assert_eq!(first.index.streams.len(), 2);

    // The second document stops parsing: the first still loads, the second is kept as broken.
    // The Secret's file loses its name: its previous data is kept.
    let broken_second =
        two_streams.replace("kind: EventStream\nmetadata: {name: payments", "kind: [");
    assert_ne!(broken_second, two_streams);
    std::fs::write(dir.join("streams.yaml"), broken_second).unwrap();
    std::fs::write(
        dir.join("secret.yaml"),
        SECRET.replace("name: rabbitmq, ", ""),
    )
    .unwrap();
    let second = source::reload(dir, &first).unwrap();
    assert_eq!(second.revision, 2);
    assert_eq!(second.problems.len(), 2, "{:#?}", lines(&second));
    assert_eq!(max_events(&second), Some(1));
    assert_eq!(
        generation(&second),
        Some(1),
        "unchanged spec, same generation"
    );
    assert_eq!(
        second.broken.iter().collect::<Vec<_>>(),
        [&(Kind::EventStream, shop("payments"))]
    );
    assert_eq!(
        second.index.secrets[&shop("rabbitmq")]["url"],
        b"amqp://127.0.0.1"
    );

    // Without a previous load there is nothing to carry forward.
    let fresh = source::load(dir).unwrap();
    assert!(fresh.broken.is_empty());
    assert!(fresh.index.secrets.is_empty());

    // Once the file is gone, so are its resources.
    std::fs::remove_file(dir.join("streams.yaml")).unwrap();
    let third = source::reload(dir, &second).unwrap();
    assert!(third.broken.is_empty() && third.index.streams.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The folder watch.

const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: rabbitmq, namespace: shop}\n\
                      stringData: {url: 'amqp://127.0.0.1'}\n";

fn stream(max_events: u32) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: shop}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  batching: {{maxEvents: {max_events}}}\n"
    )
}

fn max_events(loaded: &Loaded) -> Option<u32> {
    loaded
        .index
        .streams
        .get(&shop("orders"))?
        .spec
        .batching
        .as_ref()?
        .max_events
}

fn generation(loaded: &Loaded) -> Option<i64> {
    loaded
        .index
        .streams
        .get(&shop("orders"))?
        .metadata
        .generation
}

/// Waits (at most 10 s) for a snapshot that satisfies `pred`.
async fn wait_for(
    rx: &mut watch::Receiver<Arc<Loaded>>,
    what: &str,
    pred: impl Fn(&Loaded) -> bool,
) -> Arc<Loaded> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let current = rx.borrow_and_update().clone();
        if pred(&current) {
            return current;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the watch stopped while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; last snapshot: revision {}, problems {:#?}",
                current.revision,
                lines(&current)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_applies_create_edit_break_fix_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("secret.yaml"), SECRET).unwrap();
    let shutdown = CancellationToken::new();
    let mut rx =
        source::spawn_folder_watch(dir.clone(), Duration::from_millis(100), shutdown.clone())
            .unwrap();
    {
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.revision, 1);
        assert!(first.index.streams.is_empty());
        assert!(first.index.secrets.contains_key(&shop("rabbitmq")));
    }

    let file = dir.join("orders.yaml");
    std::fs::write(&file, stream(10)).unwrap();
    let s = wait_for(&mut rx, "the new stream", |l| max_events(l) == Some(10)).await;
    assert_eq!(generation(&s), Some(1));

    std::fs::write(&file, stream(20)).unwrap();
    let s = wait_for(&mut rx, "the edited stream", |l| max_events(l) == Some(20)).await;
    assert_eq!(generation(&s), Some(2));

    // A syntax error: the stream can no longer be read, but it is still there.
    std::fs::write(&file, "apiVersion: weir.dev/v1alpha1\nkind: [EventStream\n").unwrap();
    let s = wait_for(&mut rx, "the broken stream", |l| !l.broken.is_empty()).await;
    assert_eq!(
        s.broken.iter().collect::<Vec<_>>(),
        [&(Kind::EventStream, shop("orders"))]
    );
    assert!(s.index.streams.is_empty());
    assert_eq!(s.problems.len(), 1, "{:#?}", lines(&s));
    assert_eq!(s.problems[0].file, file);
    assert!(s.index.secrets.contains_key(&shop("rabbitmq")));

    // Still broken after an unrelated change: the file's resources are carried forward.
    std::fs::write(dir.join("other.yaml"), "# nothing yet\n").unwrap();
    let s = wait_for(&mut rx, "an unrelated reload", |l| l.files.len() == 3).await;
    assert!(s.broken.contains(&(Kind::EventStream, shop("orders"))));

    // Fixed with a new spec: the generation continues from the last good one.
    std::fs::write(&file, stream(30)).unwrap();
    let s = wait_for(&mut rx, "the fixed stream", |l| max_events(l) == Some(30)).await;
    assert_eq!(generation(&s), Some(3));
    assert!(s.broken.is_empty() && s.problems.is_empty());

    std::fs::remove_file(&file).unwrap();
    let s = wait_for(&mut rx, "the deleted stream", |l| {
        l.index.streams.is_empty()
    })
    .await;
    assert!(
        s.broken.is_empty(),
        "a deleted manifest is gone, not broken"
    );
    assert!(!s.files.contains_key(&file));

    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_then_rename_burst_is_one_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let shutdown = CancellationToken::new();
    let debounce = Duration::from_millis(150);
    let mut rx = source::spawn_folder_watch(dir.clone(), debounce, shutdown.clone()).unwrap();
    assert_eq!(rx.borrow_and_update().revision, 1);

    // An editor's save: write a temporary file, then rename it over the manifest; then two more
    // manifests, as a tool writing several files would. The steps are a few milliseconds apart,
    // so the debouncer releases the paths in different ticks: still one change.
    let step = Duration::from_millis(20);
    let tmp_file = dir.join("orders.yaml.tmp");
    std::fs::write(&tmp_file, stream(10)).unwrap();
    tokio::time::sleep(step).await;
    std::fs::rename(&tmp_file, dir.join("orders.yaml")).unwrap();
    tokio::time::sleep(step).await;
    std::fs::write(dir.join("secret.yaml"), SECRET).unwrap();
    tokio::time::sleep(step).await;
    std::fs::write(
        dir.join("schemas.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: schemas, namespace: shop}\n",
    )
    .unwrap();

    let s = wait_for(&mut rx, "the burst", |l| l.revision > 1).await;
    assert_eq!(s.revision, 2);
    assert_eq!(max_events(&s), Some(10));
    assert!(s.index.secrets.contains_key(&shop("rabbitmq")));
    assert!(s.index.config_maps.contains_key(&shop("schemas")));

    // Nothing more arrives: no second reload for the same burst, and the reload's own reads of
    // the files do not trigger another.
    tokio::time::sleep(debounce * 8).await;
    assert_eq!(rx.borrow().revision, 2);
    assert!(!rx.has_changed().unwrap());

    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_watch() {
    let tmp = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let mut rx = source::spawn_folder_watch(
        tmp.path().to_path_buf(),
        Duration::from_millis(50),
        shutdown.clone(),
    )
    .unwrap();
    shutdown.cancel();
    // The task ends and drops the sender.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while rx.changed().await.is_ok() {}
    })
    .await;
    assert!(closed.is_ok(), "the watch did not stop");
    // A change after shutdown publishes nothing.
    std::fs::write(tmp.path().join("orders.yaml"), stream(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.borrow().revision, 1);
}

#[test]
fn validate_locates_topology_problems_at_their_file_and_document() {
    let dir = fixture("topology");
    let d = dir.display();
    let report = source::validate(&dir, &Defaults::default()).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.resources, 5);
    let hint = "expected an integer and a unit (ms, s, m, h, d), e.g. \"250ms\" or \"90d\"";
    assert_eq!(
        report.problems,
        [
            format!(
                "{d}/pipeline.yaml doc 2: spec.batching.maxDelay: invalid duration \"5 sec\": {hint}"
            ),
            format!(
                "{d}/pipeline.yaml doc 3: spec.broker.urlSecretRef: Secret shop/amqp not found"
            ),
            format!(
                "{d}/subscriptions.yaml doc 2: spec.delivery.timeout: invalid duration \"10 s\": {hint}"
            ),
        ]
    );
}
