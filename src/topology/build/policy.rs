//! The plans of ArchivePolicies and CachePolicies, and which streams each one selects (an
//! older policy of the same kind keeps a stream it already selects).

use super::stream::zstd_level;
use super::*;

/// The streams a policy selects, each with the path of the field that selected it.
pub(super) fn select_streams(
    cx: &mut Cx<'_>,
    selector: Option<&LabelSelector>,
    names: Option<&[String]>,
    kind: &str,
) -> Vec<(Key, String)> {
    match (selector, names) {
        (Some(_), Some(_)) | (None, None) => {
            cx.invalid("spec", "exactly one of streams or streamNames must be set");
            Vec::new()
        }
        (Some(sel), None) => {
            let mut out = Vec::new();
            let ns = cx.namespace.to_string();
            for (key, es) in cx.index.streams.range(Key::new(ns.clone(), "")..) {
                if key.namespace != ns {
                    break;
                }
                let labels = es.metadata.labels.clone().unwrap_or_default();
                match selector_matches(sel, &labels) {
                    Err(e) => {
                        cx.invalid("spec.streams", format!("invalid label selector: {e}"));
                        return Vec::new();
                    }
                    // A selector naturally matches broker-only streams too; they have nothing
                    // to archive or cache, so they are left out rather than reported.
                    Ok(true) if es.spec.store.is_some() => {
                        out.push((key.clone(), "spec.streams".to_string()))
                    }
                    Ok(_) => {}
                }
            }
            out
        }
        (None, Some(names)) => {
            let mut out = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let path = format!("spec.streamNames[{i}]");
                if let Some((key, es)) = cx.stream(name, &path) {
                    if es.spec.store.is_none() {
                        cx.invalid(
                            path,
                            format!("EventStream {key} has no store: a {kind} applies only to stored events"),
                        );
                    } else if !out.iter().any(|(k, _)| k == &key) {
                        out.push((key, path));
                    }
                }
            }
            out
        }
    }
}

type PolicyOutcome<P> = (Key, i64, Vec<Problem>, P);

/// Builds the policies of one kind. A stream may be selected by one policy of a kind only: the
/// oldest (by creation time, then namespace/name) keeps it and every later one reports a
/// PolicyConflict. Claims are made whatever the rest of a policy's validity, so that fixing an
/// unrelated mistake in an older policy does not suddenly break a newer one.
pub(super) fn policies<S, P>(
    index: &Index,
    items: &[(&Key, &ObjectMeta, &S)],
    selection: impl Fn(&S) -> (Option<&LabelSelector>, Option<&[String]>),
    plan: impl Fn(&mut Cx<'_>, &Key, &ObjectMeta, &S, Vec<Key>) -> P,
    defaults: &Defaults,
    kind: &str,
) -> Vec<PolicyOutcome<P>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| creation_order(items[i].1, items[i].0));
    let mut claimed: BTreeMap<Key, Key> = BTreeMap::new();
    let mut out: BTreeMap<Key, PolicyOutcome<P>> = BTreeMap::new();
    for i in order {
        let (key, meta, spec) = items[i];
        let mut cx = Cx::new(index, defaults, key);
        let (selector, names) = selection(spec);
        let mut streams = Vec::new();
        for (stream, path) in select_streams(&mut cx, selector, names, kind) {
            match claimed.get(&stream) {
                Some(owner) => cx.push(
                    path,
                    format!("EventStream {stream} is already selected by {kind} {owner}"),
                    Reason::PolicyConflict,
                ),
                None => {
                    claimed.insert(stream.clone(), key.clone());
                    streams.push(stream);
                }
            }
        }
        streams.sort();
        let p = plan(&mut cx, key, meta, spec, streams);
        out.insert(key.clone(), (key.clone(), generation(meta), cx.problems, p));
    }
    out.into_values().collect()
}

pub(super) fn archive_plan(
    cx: &mut Cx<'_>,
    key: &Key,
    meta: &ObjectMeta,
    spec: &ArchivePolicySpec,
    streams: Vec<Key>,
) -> ArchivePlan {
    let archive_after = cx.positive_duration(
        spec.archive_after.as_ref(),
        "spec.archiveAfter",
        cx.defaults.archive_after,
    );
    let delete_after = spec
        .delete_after
        .as_ref()
        .map(|v| cx.positive_duration(Some(v), "spec.deleteAfter", Duration::MAX));
    if let Some(del) = delete_after
        && del != Duration::MAX
        && del <= archive_after
    {
        cx.invalid(
            "spec.deleteAfter",
            format!(
                "{:?} must exceed archiveAfter ({})",
                spec.delete_after.as_deref().unwrap_or_default(),
                spec.archive_after
                    .clone()
                    .unwrap_or_else(|| format!("{}d", archive_after.as_secs() / 86_400))
            ),
        );
    }
    let segment = spec.segment.clone().unwrap_or_default();
    let segment_max_events = match segment.max_events {
        None => 100_000,
        Some(0) => {
            cx.invalid("spec.segment.maxEvents", "must be at least 1");
            1
        }
        // A u32 always fits the usize of the 64- and 32-bit targets Weir is built for.
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let compression = spec.compression.clone().unwrap_or_default();
    let destination = match &spec.destination {
        None => ArchiveDestinationPlan::Store,
        Some(d) => match (&d.store, &d.volume) {
            (Some(_), None) => ArchiveDestinationPlan::Store,
            (None, Some(v)) => {
                if !v.path.starts_with('/') {
                    cx.invalid(
                        "spec.destination.volume.path",
                        format!("{:?} must be an absolute path", v.path),
                    );
                }
                if let Some(mounts) = &cx.defaults.archive_mounts
                    && let Err(why) = mounts.check_durable(std::path::Path::new(&v.path))
                {
                    cx.invalid("spec.destination.volume.path", why);
                }
                ArchiveDestinationPlan::Volume(PathBuf::from(&v.path))
            }
            _ => {
                cx.invalid(
                    "spec.destination",
                    "exactly one of store or volume must be set",
                );
                ArchiveDestinationPlan::Store
            }
        },
    };
    ArchivePlan {
        key: key.clone(),
        generation: generation(meta),
        streams,
        archive_after,
        delete_after,
        schedule: cx.positive_duration(
            spec.schedule.as_ref(),
            "spec.schedule",
            Duration::from_secs(3600),
        ),
        segment_max_events,
        segment_max_bytes: cx.size(
            segment.max_bytes.as_ref(),
            "spec.segment.maxBytes",
            64 << 20,
            false,
        ),
        compression_level: zstd_level(cx, compression.level, 6, "spec.compression.level"),
        dictionary: compression.dictionary.unwrap_or(true),
        destination,
    }
}

pub(super) fn cache_plan(
    cx: &mut Cx<'_>,
    key: &Key,
    meta: &ObjectMeta,
    spec: &CachePolicySpec,
    streams: Vec<Key>,
) -> CachePlan {
    use api::cachepolicy::CacheStrategy as S;
    let max_items = match spec.max_items {
        None => cx.defaults.cache_max_items,
        Some(0) => {
            cx.invalid("spec.maxItems", "must be at least 1");
            1
        }
        Some(n) => n,
    };
    let max_bytes = spec.max_bytes.as_ref().map(|v| match parse_size(v) {
        Ok(0) => {
            cx.invalid("spec.maxBytes", "must be greater than zero");
            0
        }
        Ok(n) => n,
        Err(e) => {
            cx.invalid("spec.maxBytes", e.to_string());
            0
        }
    });
    CachePlan {
        key: key.clone(),
        generation: generation(meta),
        streams,
        strategy: match spec.strategy {
            Some(S::Lru) | None => CacheStrategy::Lru,
            Some(S::Lfu) => CacheStrategy::Lfu,
            Some(S::Fifo) => CacheStrategy::Fifo,
            Some(S::Ttl) => CacheStrategy::Ttl,
        },
        max_items,
        max_bytes,
        ttl: cx.positive_duration(spec.ttl.as_ref(), "spec.ttl", cx.defaults.cache_ttl),
    }
}
