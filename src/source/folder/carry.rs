//! What a load takes from the previous one: the resources of files that no longer parse (kept
//! as broken, their Secrets' and ConfigMaps' data kept), and generations.

use std::collections::BTreeMap;

use kube::Resource;
use kube::core::object::HasSpec;

use super::{Ident, Loader};
use crate::topology::Key;
use crate::topology::index::Kind;

impl Loader<'_> {
    /// For every file that could not be fully read, keeps what it held at the previous load and
    /// that no other document defines now: Weir resources become broken (their running version
    /// stays), Secrets and ConfigMaps keep their previous data (so that resources using them are
    /// not failed by a file they do not live in).
    pub(super) fn carry_forward(&mut self) {
        let Some(previous) = self.previous else {
            return;
        };
        for file in std::mem::take(&mut self.incomplete) {
            let Some(before) = previous.files.get(&file) else {
                continue;
            };
            let Some(record) = self.out.files.get_mut(&file) else {
                continue;
            };
            for (kind, key) in &before.resources {
                if !self.seen.contains_key(&Ident::Weir(*kind, key.clone())) {
                    record.resources.insert((*kind, key.clone()));
                    self.out.broken.insert((*kind, key.clone()));
                    if let Some(origin) = previous.origins.get(&(*kind, key.clone())) {
                        self.out
                            .origins
                            .insert((*kind, key.clone()), origin.clone());
                    }
                }
            }
            for key in &before.secrets {
                if !self.seen.contains_key(&Ident::Secret(key.clone()))
                    && let Some(data) = previous.index.secrets.get(key)
                {
                    record.secrets.insert(key.clone());
                    self.out.index.secrets.insert(key.clone(), data.clone());
                }
            }
            for key in &before.config_maps {
                if !self.seen.contains_key(&Ident::ConfigMap(key.clone()))
                    && let Some(data) = previous.index.config_maps.get(key)
                {
                    record.config_maps.insert(key.clone());
                    self.out.index.config_maps.insert(key.clone(), data.clone());
                }
            }
        }
    }

    /// Gives every loaded Weir resource its generation, and carries forward the last good
    /// generation of broken ones.
    pub(super) fn stamp_generations(&mut self) {
        let empty = BTreeMap::new();
        let before = self.previous.map_or(&empty, |p| &p.generations);
        let gens = &mut self.out.generations;
        let index = &mut self.out.index;
        stamp(Kind::EventStream, &mut index.streams, before, gens);
        stamp(Kind::Subscription, &mut index.subscriptions, before, gens);
        stamp(
            Kind::ArchivePolicy,
            &mut index.archive_policies,
            before,
            gens,
        );
        stamp(Kind::CachePolicy, &mut index.cache_policies, before, gens);
        for id in &self.out.broken {
            if let Some(g) = before.get(id) {
                gens.insert(id.clone(), g.clone());
            }
        }
    }
}

/// Generation 1 for a new resource; the previous one while the spec is unchanged; one more when
/// it changed.
fn stamp<T>(
    kind: Kind,
    map: &mut BTreeMap<Key, std::sync::Arc<T>>,
    before: &BTreeMap<(Kind, Key), (i64, serde_json::Value)>,
    out: &mut BTreeMap<(Kind, Key), (i64, serde_json::Value)>,
) where
    T: Resource + HasSpec + Clone,
    T::Spec: serde::Serialize,
{
    for (key, obj) in map.iter_mut() {
        // Freshly loaded, so not shared yet: no copy is made.
        let obj = std::sync::Arc::make_mut(obj);
        // Serializing plain spec structs cannot fail; should it, the spec counts as changed.
        let spec = serde_json::to_value(obj.spec()).unwrap_or(serde_json::Value::Null);
        let id = (kind, key.clone());
        let generation = match before.get(&id) {
            Some((g, s)) if *s == spec && !spec.is_null() => *g,
            Some((g, _)) => g + 1,
            None => 1,
        };
        obj.meta_mut().generation = Some(generation);
        out.insert(id, (generation, spec));
    }
}
