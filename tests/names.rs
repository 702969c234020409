//! Names that become broker identifiers, the exchange scope, the unsupported `pii.fields` and
//! the size ceilings, checked where both modes share them (the topology build, which the
//! operator runs on what the API server accepts) and through `weir validate`.
//!
//! The colliding pairs of the issue: stream `a.b` + subscription `c` and stream `a` +
//! subscription `b.c` both made queue `weir.<ns>.a.b.c`; subscription `x.p0` made the queue
//! of perKey subscription `x`'s first lane. Each is tried with either resource created first.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use weir::data::delivery::Names;
use weir::topology::*;

const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: rabbitmq, namespace: shop}\n\
                      stringData: {url: \"amqp://guest:guest@127.0.0.1:5672/%2f\"}\n";

use common::index_from_yaml as index;

fn stream(name: &str, created: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: weir.dev/v1alpha1\nkind: EventStream\n\
         metadata: {{name: \"{name}\", namespace: shop, creationTimestamp: \"{created}\"}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n{extra}"
    )
}

fn subscription(name: &str, stream: &str, created: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: weir.dev/v1alpha1\nkind: Subscription\n\
         metadata: {{name: \"{name}\", namespace: shop, creationTimestamp: \"{created}\"}}\n\
         spec:\n  stream: \"{stream}\"\n  sink: {{uri: \"http://sink.shop.svc/\"}}\n{extra}"
    )
}

fn problems(built: &Built, kind: Kind, name: &str) -> Vec<String> {
    built
        .report(kind, &Key::new("shop", name))
        .unwrap_or_else(|| panic!("no report for {kind} shop/{name}"))
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Every queue and exchange name of the valid subscriptions, with its owner; panics when two
/// subscriptions (or a subscription and a stream exchange) share one.
fn assert_names_distinct(built: &Built) {
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut claim = |name: String, who: String| {
        if let Some(first) = owner.insert(name.clone(), who.clone()) {
            assert_eq!(first, who, "{name} belongs to both {first} and {who}");
        }
    };
    for (key, s) in &built.topology.streams {
        claim(format!("exchange {}", s.broker.exchange), format!("{key}"));
    }
    for (key, plan) in &built.topology.subscriptions {
        let n = Names::new(plan);
        let who = format!("{key}");
        for q in [n.queue.clone(), n.dead_letter_queue.clone()]
            .into_iter()
            .chain(n.partitions.clone())
            .chain(n.holds.clone())
            .chain(n.intake.clone())
            .chain([n.retry_queue(std::time::Duration::from_millis(100))])
        {
            claim(format!("queue {q}"), who.clone());
        }
    }
}

/// A colliding pair: the resources of each side, and which names must be refused.
struct Pair {
    what: &'static str,
    /// Documents of one side, given the creation time.
    first: fn(&str) -> String,
    second: fn(&str) -> String,
    /// (kind, name) refused with a `metadata.name` problem.
    refused: &'static [(Kind, &'static str)],
    /// (kind, name) that stay valid.
    valid: &'static [(Kind, &'static str)],
}

const PAIRS: &[Pair] = &[
    Pair {
        what: "stream a.b + subscription c / stream a + subscription b.c",
        first: |t| stream("a.b", t, "") + &subscription("c", "a.b", t, ""),
        second: |t| stream("a", t, "") + &subscription("b.c", "a", t, ""),
        refused: &[(Kind::EventStream, "a.b"), (Kind::Subscription, "b.c")],
        valid: &[(Kind::EventStream, "a")],
    },
    Pair {
        what: "perKey subscription x / subscription x.p0",
        first: |t| {
            stream("s", "2020-01-01T00:00:00Z", "")
                + &subscription("x", "s", t, "  ordering: perKey\n  partitions: 2\n")
        },
        second: |t| subscription("x.p0", "s", t, ""),
        refused: &[(Kind::Subscription, "x.p0")],
        valid: &[(Kind::EventStream, "s"), (Kind::Subscription, "x")],
    },
];

#[test]
fn colliding_names_are_refused_whichever_is_created_first() {
    let (early, late) = ("2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z");
    for pair in PAIRS {
        for (order, t1, t2) in [
            ("first side older", early, late),
            ("second side older", late, early),
        ] {
            let yaml = format!("{SECRET}{}{}", (pair.first)(t1), (pair.second)(t2));
            let built = build(&index(&yaml), &Defaults::default());
            for (kind, name) in pair.refused {
                let ps = problems(&built, *kind, name);
                assert!(
                    ps.iter()
                        .any(|p| p.starts_with("metadata.name: ")
                            && p.contains("must be a DNS label")),
                    "{} ({order}): {kind} {name} must be refused at metadata.name, got {ps:?}",
                    pair.what
                );
                let report = built.report(*kind, &Key::new("shop", *name)).unwrap();
                assert!(
                    report
                        .problems
                        .iter()
                        .any(|p| p.path == "metadata.name" && p.reason == Reason::InvalidSpec),
                    "{} ({order}): {kind} {name}: reason InvalidSpec",
                    pair.what
                );
            }
            for (kind, name) in pair.valid {
                assert_eq!(
                    problems(&built, *kind, name),
                    Vec::<String>::new(),
                    "{} ({order}): {kind} {name} stays valid",
                    pair.what
                );
            }
            assert_names_distinct(&built);
        }
    }
}

/// The names that replaced the dotted ones (DNS labels joined by '-') all run side by side,
/// each with queues of its own.
#[test]
fn dns_label_names_never_share_a_queue() {
    let t = "2024-01-01T00:00:00Z";
    let yaml = format!(
        "{SECRET}{}{}{}{}{}{}{}",
        stream("a-b", t, ""),
        subscription("c", "a-b", t, ""),
        stream("a", t, ""),
        subscription("b-c", "a", t, ""),
        stream("s", t, ""),
        subscription("x", "s", t, "  ordering: perKey\n  partitions: 2\n"),
        subscription("x-p0", "s", t, "  ordering: perKey\n  partitions: 2\n"),
    );
    let built = build(&index(&yaml), &Defaults::default());
    assert!(built.is_valid(), "{:#?}", built.reports);
    assert_eq!(built.topology.subscriptions.len(), 4);
    assert_names_distinct(&built);
}

#[test]
fn a_subscription_naming_a_dotted_stream_is_refused() {
    let t = "2024-01-01T00:00:00Z";
    let yaml = format!("{SECRET}{}", subscription("c", "a.b", t, ""));
    let built = build(&index(&yaml), &Defaults::default());
    let ps = problems(&built, Kind::Subscription, "c");
    assert!(
        ps.iter()
            .any(|p| p.starts_with("spec.stream: \"a.b\" is not a valid EventStream name")),
        "{ps:?}"
    );
}

#[test]
fn exchanges_outside_the_namespace_prefix_need_the_setting() {
    // (exchange, allow_custom_exchanges, accepted)
    let table: &[(&str, bool, bool)] = &[
        ("weir.shop.orders-v2", false, true),
        ("weir.shop.legacy.orders", false, true),
        ("weir.shop.", false, false),
        ("weir.payments.orders", false, false),
        // Another namespace's exchange stays refused even with the setting.
        ("weir.payments.orders", true, false),
        ("weir.shopx.orders", true, false),
        ("weir-hash.shop.x", true, false),
        ("legacy-orders", false, false),
        ("legacy-orders", true, true),
        ("amq.topic", true, false),
    ];
    for &(exchange, allow, accepted) in table {
        let yaml = format!(
            "{SECRET}{}",
            stream(
                "orders",
                "2024-01-01T00:00:00Z",
                &format!("  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: \"{exchange}\"}}\n")
            )
            .replace(
                "  broker: {urlSecretRef: {name: rabbitmq, key: url}}\n",
                ""
            )
        );
        let defaults = Defaults {
            allow_custom_exchanges: allow,
            ..Defaults::default()
        };
        let built = build(&index(&yaml), &defaults);
        let ps = problems(&built, Kind::EventStream, "orders");
        if accepted {
            assert_eq!(ps, Vec::<String>::new(), "{exchange} (allow {allow})");
            assert_eq!(
                built.topology.streams[&Key::new("shop", "orders")]
                    .broker
                    .exchange,
                exchange
            );
        } else {
            assert!(
                ps.iter().any(|p| p.starts_with("spec.broker.exchange: ")),
                "{exchange} (allow {allow}) must be refused, got {ps:?}"
            );
        }
    }
    // Without the setting, the message says how to get it.
    let yaml = format!(
        "{SECRET}---\napiVersion: weir.dev/v1alpha1\nkind: EventStream\n\
         metadata: {{name: orders, namespace: shop}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: legacy}}\n"
    );
    let built = build(&index(&yaml), &Defaults::default());
    assert_eq!(
        problems(&built, Kind::EventStream, "orders"),
        [
            "spec.broker.exchange: exchange \"legacy\" is outside this namespace's prefix \
          \"weir.shop.\"; use a name starting with \"weir.shop.\", or have the operator allow \
          other names (--allow-custom-exchanges, WEIR_ALLOW_CUSTOM_EXCHANGES=true, chart value \
          operator.allowCustomExchanges)"
        ]
    );
}

#[test]
fn the_setting_is_read_from_the_environment() {
    let d = Defaults::from_lookup(|v| (v == "WEIR_ALLOW_CUSTOM_EXCHANGES").then(|| "true".into()))
        .unwrap();
    assert!(d.allow_custom_exchanges);
    assert!(
        !Defaults::from_lookup(|_| None)
            .unwrap()
            .allow_custom_exchanges
    );
    let err =
        Defaults::from_lookup(|v| (v == "WEIR_ALLOW_CUSTOM_EXCHANGES").then(|| "maybe".into()))
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable WEIR_ALLOW_CUSTOM_EXCHANGES=\"maybe\": expected true or false"
    );
}

#[test]
fn pii_fields_need_a_store_and_a_valid_key_ring() {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let with_keys = |keys: &str, spec: &str| {
        format!(
            "{SECRET}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: pii, namespace: shop}}\n\
             stringData: {{key: {keys:?}}}\n---\napiVersion: v1\nkind: Secret\n\
             metadata: {{name: pg, namespace: shop}}\nstringData: {{url: \"postgres://u@h/db\"}}\n{}",
            stream("orders", "2024-01-01T00:00:00Z", spec)
        )
    };
    let spec = "  pii: {fields: [/customer/email], keySecretRef: {name: pii, key: key}}\n";
    let stored = format!("  store: {{urlSecretRef: {{name: pg, key: url}}}}\n{spec}");
    let problems = |yaml: &str| {
        let built = build(&index(yaml), &Defaults::default());
        built
            .report(Kind::EventStream, &Key::new("shop", "orders"))
            .unwrap()
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect::<Vec<_>>()
    };
    // With a store and a good key ring: planned, key bytes nowhere in the plan's Debug.
    let yaml = with_keys(&format!("k1:{key}"), &stored);
    let built = build(&index(&yaml), &Defaults::default());
    assert!(built.is_valid(), "{:?}", problems(&yaml));
    let plan = built.topology.streams.values().next().unwrap();
    let pii = plan.pii.as_ref().unwrap();
    assert_eq!(pii.fields, ["/customer/email"]);
    assert_eq!(pii.keys.newest().0, "k1");
    assert!(!format!("{plan:?}").contains(&key));

    // Broker-only: refused (the keys live in the store).
    let got = problems(&with_keys(&format!("k1:{key}"), spec));
    assert!(
        got.iter()
            .any(|p| p.starts_with("spec.pii.fields: personal-data encryption needs spec.store")),
        "{got:?}"
    );
    // A bad line is named by number, never by content.
    let got = problems(&with_keys(&format!("k1:{key}\nk2:c2hvcnQ="), &stored));
    assert!(
        got.iter().any(|p| p.starts_with("spec.pii.keySecretRef:")
            && p.contains("line 2: the key is 5 bytes long")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .all(|p| !p.contains(&key) && !p.contains("c2hvcnQ")),
        "{got:?}"
    );

    // An empty list promises nothing and stays accepted.
    let yaml = format!(
        "{SECRET}{}",
        stream("orders", "2024-01-01T00:00:00Z", "  pii: {fields: []}\n")
    );
    assert!(build(&index(&yaml), &Defaults::default()).is_valid());
}

#[test]
fn size_limits_above_the_ceiling_are_refused() {
    // (field, value, accepted)
    let table: &[(&str, &str, bool)] = &[
        ("maxEventBytes", "64MiB", true),
        ("maxEventBytes", "67108865", false),
        ("maxEventBytes", "65MiB", false),
        ("maxRequestBytes", "64MiB", true),
        ("maxRequestBytes", "1GiB", false),
        ("maxRequestBytes", "100GB", false),
    ];
    for &(field, value, accepted) in table {
        let yaml = format!(
            "{SECRET}{}",
            stream(
                "orders",
                "2024-01-01T00:00:00Z",
                &format!("  validation: {{{field}: \"{value}\"}}\n")
            )
        );
        let built = build(&index(&yaml), &Defaults::default());
        let ps = problems(&built, Kind::EventStream, "orders");
        if accepted {
            assert_eq!(ps, Vec::<String>::new(), "{field}: {value}");
        } else {
            assert_eq!(
                ps,
                [format!(
                    "spec.validation.{field}: {value:?} is above the ceiling of 64 MiB (the largest payload Weir decompresses)"
                )],
                "{field}: {value}"
            );
        }
    }
}

/// `weir validate` on a folder holding every refused case, with and without the setting.
#[test]
fn weir_validate_names_every_refused_field() {
    let dir = tempfile::tempdir().unwrap();
    let doc = |kind: &str, name: &str, spec: &str| {
        format!(
            "---\napiVersion: weir.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: \"{name}\", namespace: shop}}\nspec:\n{spec}"
        )
    };
    let broker = "  broker: {urlSecretRef: {name: rabbitmq, key: url}}\n";
    let sink = "  sink: {uri: \"http://sink.shop.svc/\"}\n";
    let text = [
        SECRET.to_string(),
        doc("EventStream", "a.b", broker),
        doc("EventStream", "a", broker),
        doc("Subscription", "c", &format!("  stream: a.b\n{sink}")),
        doc("Subscription", "b.c", &format!("  stream: a\n{sink}")),
        doc(
            "Subscription",
            "x",
            &format!("  stream: a\n{sink}  ordering: perKey\n  partitions: 2\n"),
        ),
        doc("Subscription", "x.p0", &format!("  stream: a\n{sink}")),
        doc(
            "EventStream",
            "custom",
            "  broker: {urlSecretRef: {name: rabbitmq, key: url}, exchange: legacy-orders}\n",
        ),
        doc(
            "EventStream",
            "big",
            &format!("{broker}  validation: {{maxRequestBytes: 128MiB}}\n"),
        ),
        doc(
            "EventStream",
            "secretive",
            &format!(
                "{broker}  pii: {{fields: [/email], keySecretRef: {{name: rabbitmq, key: url}}}}\n"
            ),
        ),
    ]
    .concat();
    std::fs::write(dir.path().join("all.yaml"), text).unwrap();

    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(common::weir_binary());
        cmd.arg("validate").arg("-f").arg(dir.path()).args(args);
        cmd.env_remove("WEIR_ALLOW_CUSTOM_EXCHANGES");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run weir validate");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let has = |out: &str, doc: usize, needle: &str| {
        out.lines()
            .any(|l| l.contains(&format!(" doc {doc}: ")) && l.contains(needle))
    };

    let (code, out) = run(&[], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        has(&out, 2, "metadata.name: \"a.b\" is not a valid name"),
        "{out}"
    );
    assert!(
        has(&out, 5, "metadata.name: \"b.c\" is not a valid name"),
        "{out}"
    );
    assert!(
        has(&out, 7, "metadata.name: \"x.p0\" is not a valid name"),
        "{out}"
    );
    assert!(
        has(
            &out,
            8,
            "spec.broker.exchange: exchange \"legacy-orders\" is outside"
        ),
        "{out}"
    );
    assert!(
        has(
            &out,
            9,
            "spec.validation.maxRequestBytes: \"128MiB\" is above the ceiling of 64 MiB"
        ),
        "{out}"
    );
    assert!(
        has(
            &out,
            10,
            "spec.pii.fields: personal-data encryption needs spec.store"
        ),
        "{out}"
    );
    // The subscription of the refused stream a.b is refused as well, by its spec.stream.
    assert!(
        has(
            &out,
            4,
            "spec.stream: \"a.b\" is not a valid EventStream name"
        ),
        "{out}"
    );
    for ok in [3, 6] {
        assert!(
            !out.contains(&format!(" doc {ok}: ")),
            "doc {ok} is valid: {out}"
        );
    }

    for (args, env) in [
        (&["--allow-custom-exchanges"][..], &[][..]),
        (&[][..], &[("WEIR_ALLOW_CUSTOM_EXCHANGES", "true")][..]),
    ] {
        let (code, out) = run(args, env);
        assert_eq!(code, Some(1), "{out}");
        assert!(!out.contains("legacy-orders"), "{args:?} {env:?}: {out}");
        assert!(has(&out, 2, "metadata.name"), "{out}");
    }
}
