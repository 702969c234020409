//! The plan of a Subscription: sink, delivery policy, dead letters, ordering, start point.

use super::*;

pub(super) fn subscription_plan(
    cx: &mut Cx<'_>,
    key: &Key,
    meta: &ObjectMeta,
    spec: &SubscriptionSpec,
    plans: &BTreeMap<Key, Arc<StreamPlan>>,
) -> SubscriptionPlan {
    let (streams, multi, broker_only) = read_streams(cx, spec, plans);

    let filters = match parse_filters(spec.filters.as_deref().unwrap_or_default(), "spec.filters") {
        Ok(f) => f,
        Err(problems) => {
            cx.problems.extend(problems);
            Vec::new()
        }
    };

    // Sink.
    let s = &spec.sink;
    let url =
        destination_url(cx, s.uri.as_deref(), s.ref_.as_ref(), "spec.sink").unwrap_or_default();
    let auth_token = s
        .auth_secret_ref
        .as_ref()
        .and_then(|r| cx.secret_text(r, "spec.sink.authSecretRef"));
    let sink = SinkPlan {
        url,
        format: match s.format {
            Some(api::subscription::SinkFormat::Structured) => SinkFormat::Structured,
            Some(api::subscription::SinkFormat::Binary) | None => SinkFormat::Binary,
        },
        auth_token,
    };

    // Delivery.
    let d = DeliveryPlan::default();
    let dl = spec.delivery.clone().unwrap_or_default();
    let delivery = DeliveryPlan {
        timeout: cx.positive_duration(dl.timeout.as_ref(), "spec.delivery.timeout", d.timeout),
        retry: dl.retry.unwrap_or(d.retry),
        backoff_policy: match dl.backoff_policy {
            Some(api::subscription::BackoffPolicy::Linear) => BackoffPolicy::Linear,
            Some(api::subscription::BackoffPolicy::Exponential) | None => {
                BackoffPolicy::Exponential
            }
        },
        backoff_delay: cx.duration(
            dl.backoff_delay.as_ref(),
            "spec.delivery.backoffDelay",
            d.backoff_delay,
        ),
        backoff_max: cx.duration(
            dl.backoff_max.as_ref(),
            "spec.delivery.backoffMax",
            d.backoff_max,
        ),
        retry_after_max: cx.duration(
            dl.retry_after_max.as_ref(),
            "spec.delivery.retryAfterMax",
            d.retry_after_max,
        ),
        dead_letter: dl
            .dead_letter_sink
            .as_ref()
            .and_then(|dls| dead_letter_plan(cx, dls)),
        pii_envelope: dl.pii == Some(api::subscription::PiiDelivery::Envelope),
    };
    if delivery.backoff_delay > delivery.backoff_max {
        cx.invalid(
            "spec.delivery.backoffDelay",
            format!(
                "{:?} exceeds backoffMax ({:?})",
                dl.backoff_delay.as_deref().unwrap_or("200ms"),
                dl.backoff_max.as_deref().unwrap_or("5m")
            ),
        );
    }

    let start_from = match parse_start_from(spec.start_from.as_deref().unwrap_or("latest")) {
        Ok(sf) => sf,
        Err(msg) => {
            cx.invalid("spec.startFrom", msg);
            StartFrom::Latest
        }
    };
    if start_from != StartFrom::Latest
        && let Some(stream_key) = broker_only
    {
        cx.invalid(
            "spec.startFrom",
            format!(
                "{:?} replays stored events, but EventStream {stream_key} has no store (use latest, or give the stream a store)",
                spec.start_from.as_deref().unwrap_or_default()
            ),
        );
    }

    let partition_key = spec
        .partition_key
        .clone()
        .unwrap_or_else(|| "subject".to_string());
    if !is_attribute_name(&partition_key) {
        cx.invalid(
            "spec.partitionKey",
            format!("{partition_key:?} is not a CloudEvents attribute name (lowercase letters and digits)"),
        );
    }
    let partitions = spec.partitions.unwrap_or(4);
    if partitions == 0 {
        cx.invalid("spec.partitions", "must be at least 1");
    }
    let ordering = match spec.ordering {
        Some(api::subscription::DeliveryOrdering::PerKey) => OrderingPlan::PerKey {
            partition_key,
            partitions,
        },
        Some(api::subscription::DeliveryOrdering::None) | None => OrderingPlan::None,
    };
    // 0 is valid: the subscription is scaled to zero (provisioned, nothing consumed), which
    // is how an autoscaler such as KEDA parks an idle one through `/scale`.
    let consumers = spec.consumers.unwrap_or(4);
    let reply = spec
        .reply
        .as_ref()
        .and_then(|r| cx.stream(&r.stream, "spec.reply.stream"))
        .map(|(k, _)| k);

    SubscriptionPlan {
        key: key.clone(),
        generation: generation(meta),
        streams,
        multi,
        filters,
        sink,
        delivery,
        start_from,
        ordering,
        consumers,
        rate_limit: spec
            .rate_limit
            .as_ref()
            .and_then(|r| r.events_per_second)
            .filter(|n| *n > 0),
        reply,
        deletion_policy: match spec.deletion_policy {
            Some(api::DeletionPolicy::Retain) => DeletionPolicy::Retain,
            Some(api::DeletionPolicy::Delete) | None => DeletionPolicy::Delete,
        },
    }
}

/// The streams a subscription reads (sorted, never empty: a placeholder key stands in when
/// none resolves, the plan being refused anyway), whether they were named by `streams` or
/// `streamSelector`, and the first of them without a store.
fn read_streams(
    cx: &mut Cx<'_>,
    spec: &SubscriptionSpec,
    plans: &BTreeMap<Key, Arc<StreamPlan>>,
) -> (Vec<Key>, bool, Option<Key>) {
    let mut found: Vec<(Key, String, bool)> = Vec::new();
    let mut named = |cx: &mut Cx<'_>, name: &str, path: String| {
        // The stream's name is part of the queue name of a single-stream subscription: one
        // that is not a DNS label could make two subscriptions share a queue (and no valid
        // EventStream can carry it).
        if !is_dns_label(name) {
            cx.invalid(
                path.clone(),
                format!("{name:?} is not a valid EventStream name (a DNS label)"),
            );
        }
        if let Some((key, es)) = cx.stream(name, &path) {
            if found.iter().any(|(k, _, _)| *k == key) {
                cx.invalid(path, format!("EventStream {key} is listed twice"));
            } else {
                found.push((key, path, es.spec.store.is_none()));
            }
        }
    };
    let multi = match (&spec.stream, &spec.streams, &spec.stream_selector) {
        (Some(name), None, None) => {
            named(cx, name, "spec.stream".to_string());
            false
        }
        (None, names, selector) if names.is_some() || selector.is_some() => {
            if let Some(names) = names {
                if names.is_empty() {
                    cx.invalid("spec.streams", "must name at least one EventStream");
                }
                for (i, name) in names.iter().enumerate() {
                    named(cx, name, format!("spec.streams[{i}]"));
                }
            }
            if let Some(sel) = selector {
                select(cx, sel, plans, &mut found, names.is_some());
            }
            true
        }
        _ => {
            cx.invalid(
                "spec",
                "either stream, or streams and/or streamSelector must be set",
            );
            false
        }
    };
    found.sort();
    // One queue is bound to every stream's exchange, on one broker connection.
    let mut first: Option<(&Key, &StreamPlan)> = None;
    for (key, path, _) in &found {
        let Some(p) = plans.get(key) else { continue };
        let Some((k0, p0)) = first else {
            first = Some((key, p));
            continue;
        };
        if p.broker.url != p0.broker.url || p.broker.tls != p0.broker.tls {
            cx.invalid(
                path.clone(),
                format!(
                    "EventStream {key} is on another broker than {k0} (URL or TLS settings \
                     differ): one queue cannot be bound to both; subscribe to them separately"
                ),
            );
        } else if p.broker.queue_type != p0.broker.queue_type {
            cx.invalid(
                path.clone(),
                format!(
                    "EventStream {key} has queueType {}, {k0} {}: the subscription's one queue \
                     has one type",
                    p.broker.queue_type.as_arg(),
                    p0.broker.queue_type.as_arg()
                ),
            );
        }
    }
    let broker_only = found.iter().find(|f| f.2).map(|f| f.0.clone());
    let mut keys: Vec<Key> = found.into_iter().map(|f| f.0).collect();
    if keys.is_empty() {
        let name = spec.stream.clone().unwrap_or_default();
        keys.push(cx.key(&name));
    }
    (keys, multi, broker_only)
}

/// Adds the streams `sel` selects to `found` (those already named by `streams` once). With
/// no list beside it, a selector that selects nothing is reported: the subscription would
/// read nothing.
fn select(
    cx: &mut Cx<'_>,
    sel: &LabelSelector,
    plans: &BTreeMap<Key, Arc<StreamPlan>>,
    found: &mut Vec<(Key, String, bool)>,
    with_list: bool,
) {
    let ns = cx.namespace.to_string();
    let before = found.len();
    cx.volatile = true;
    for (key, es) in cx.index.streams.range(Key::new(ns.clone(), "")..) {
        if key.namespace != ns {
            break;
        }
        let labels = es.metadata.labels.clone().unwrap_or_default();
        match selector_matches(sel, &labels) {
            Err(e) => {
                cx.invalid(
                    "spec.streamSelector",
                    format!("invalid label selector: {e}"),
                );
                found.truncate(before);
                return;
            }
            // A selected stream that is itself invalid does not run: it is left out
            // (status.streams shows what is read) rather than stopping the others.
            Ok(true) if plans.contains_key(key) && !found.iter().any(|f| f.0 == *key) => found
                .push((
                    key.clone(),
                    "spec.streamSelector".to_string(),
                    es.spec.store.is_none(),
                )),
            Ok(_) => {}
        }
    }
    if found.is_empty() && !with_list {
        cx.push(
            "spec.streamSelector",
            format!("selects no valid EventStream of namespace {ns}"),
            Reason::StreamNotFound,
        );
    }
}

/// The URL of a sink given as exactly one of `uri` or `ref`.
pub(super) fn destination_url(
    cx: &mut Cx<'_>,
    uri: Option<&str>,
    service: Option<&ServiceRef>,
    path: &str,
) -> Option<String> {
    match (uri, service) {
        (Some(uri), None) => {
            if check_url(uri, &["http", "https"]) {
                // The sink guard: a literal loopback, link-local or unspecified host (or
                // `localhost`) is refused here already; names are checked when resolved.
                if let Err(refused) = cx.defaults.sinks.check_url(uri) {
                    cx.invalid(format!("{path}.uri"), format!("{uri:?}: {refused}"));
                    return None;
                }
                Some(uri.to_string())
            } else {
                cx.invalid(
                    format!("{path}.uri"),
                    format!("{uri:?} is not an absolute http:// or https:// URL"),
                );
                None
            }
        }
        (None, Some(r)) => {
            let before = cx.problems.len();
            if let Some(kind) = r.kind.as_deref().filter(|k| *k != "Service") {
                cx.invalid(
                    format!("{path}.ref.kind"),
                    format!("kind {kind:?} is not supported: only Service"),
                );
            }
            if !is_dns_label(&r.name) {
                cx.invalid(
                    format!("{path}.ref.name"),
                    format!("{:?} is not a valid Service name", r.name),
                );
            }
            let port = r.port.unwrap_or(80);
            if port == 0 {
                cx.invalid(format!("{path}.ref.port"), "must be 1-65535");
            }
            let p = r.path.as_deref().unwrap_or("/");
            if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() {
                cx.invalid(
                    format!("{path}.ref.path"),
                    format!("{p:?} is not an absolute URL path"),
                );
            }
            (cx.problems.len() == before)
                .then(|| format!("http://{}.{}.svc:{port}{p}", r.name, cx.namespace))
        }
        (None, None) | (Some(_), Some(_)) => {
            cx.invalid(path, "exactly one of uri or ref must be set");
            None
        }
    }
}

pub(super) fn dead_letter_plan(
    cx: &mut Cx<'_>,
    dls: &DeadLetterSinkSpec,
) -> Option<DeadLetterPlan> {
    const PATH: &str = "spec.delivery.deadLetterSink";
    let set = [dls.uri.is_some(), dls.ref_.is_some(), dls.stream.is_some()]
        .into_iter()
        .filter(|x| *x)
        .count();
    if set != 1 {
        cx.invalid(PATH, "exactly one of uri, ref or stream must be set");
        return None;
    }
    match &dls.stream {
        Some(name) => cx
            .stream(name, &format!("{PATH}.stream"))
            .map(|(k, _)| DeadLetterPlan::Stream(k)),
        None => destination_url(cx, dls.uri.as_deref(), dls.ref_.as_ref(), PATH)
            .map(DeadLetterPlan::Sink),
    }
}

/// `latest` | `earliest` | an RFC 3339 time | a position (digits, >= 1).
pub fn parse_start_from(s: &str) -> Result<StartFrom, String> {
    match s {
        "latest" => return Ok(StartFrom::Latest),
        "earliest" => return Ok(StartFrom::Earliest),
        _ => {}
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<i64>() {
            Ok(p) if p >= 1 => Ok(StartFrom::Position(p)),
            _ => Err(format!("position {s:?} must be between 1 and {}", i64::MAX)),
        };
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| StartFrom::Time(t.with_timezone(&chrono::Utc)))
        .map_err(|_| {
            format!(
                "invalid startFrom {s:?}: expected latest, earliest, an RFC 3339 time (e.g. \"2024-05-01T00:00:00Z\") or a position (e.g. \"1200\")"
            )
        })
}

// ----------------------------------------------------------------------------------------------
// ArchivePolicy and CachePolicy
