//! Secrets and ConfigMaps that resources reference, read one by one with `get`.
//!
//! Weir never lists or watches Secrets cluster-wide (least privilege): it reads exactly the
//! ones its resources name, again when the referencing resource changes and whenever a cached
//! copy is older than the refresh interval, so a rotated credential is picked up within it.

use crate::poison::MutexExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use tokio::time::Instant;

use crate::control::ControlError;
use crate::topology::Key;

/// The Secrets and ConfigMaps one resource references (in its own namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refs {
    pub secrets: BTreeSet<Key>,
    pub config_maps: BTreeSet<Key>,
}

impl Refs {
    /// Adds the references of `other`. Most resources reference the same few Secrets, so
    /// only keys not yet present are copied.
    pub fn extend(&mut self, other: &Refs) {
        for k in &other.secrets {
            if !self.secrets.contains(k) {
                self.secrets.insert(k.clone());
            }
        }
        for k in &other.config_maps {
            if !self.config_maps.contains(k) {
                self.config_maps.insert(k.clone());
            }
        }
    }
}

/// The references found in a resource's `spec`: every field named `...SecretRef` (a
/// `{name, key}` or `{name}`) and every `configMapKeyRef`. Walking the JSON keeps this in step
/// with the API types without listing each field twice.
pub fn refs_of(namespace: &str, spec: &serde_json::Value) -> Refs {
    let mut refs = Refs::default();
    walk(namespace, spec, &mut refs);
    refs
}

fn walk(namespace: &str, v: &serde_json::Value, refs: &mut Refs) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let name = v.get("name").and_then(serde_json::Value::as_str);
                match (k.as_str(), name) {
                    (k, Some(name)) if k.ends_with("SecretRef") => {
                        refs.secrets.insert(Key::new(namespace, name));
                    }
                    ("configMapKeyRef", Some(name)) => {
                        refs.config_maps.insert(Key::new(namespace, name));
                    }
                    _ => walk(namespace, v, refs),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                walk(namespace, v, refs);
            }
        }
        _ => {}
    }
}

struct Cached<T> {
    fetched: Instant,
    /// `None`: the object does not exist (re-read on every reconcile, so that creating it is
    /// noticed promptly).
    value: Option<T>,
}

/// A Secret's decoded values by key.
pub type SecretData = BTreeMap<String, Vec<u8>>;
/// A ConfigMap's `data`.
pub type ConfigMapData = BTreeMap<String, String>;

/// Cache of the referenced Secrets (decoded) and ConfigMaps.
#[derive(Default)]
pub struct RefCache {
    secrets: Mutex<HashMap<Key, Cached<SecretData>>>,
    config_maps: Mutex<HashMap<Key, Cached<ConfigMapData>>>,
    /// Bumped whenever a read finds an object different from its cached copy (or one not
    /// cached before): a sync whose objects and references are unchanged can skip its build.
    version: AtomicU64,
}

/// Decoded `data` of a Secret, with `stringData` on top (as the API server would merge it).
pub fn decode_secret(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// The keys of `wanted` whose cached copy is missing, absent or older than `max_age`.
fn due<T>(
    cache: &Mutex<HashMap<Key, Cached<T>>>,
    wanted: &BTreeSet<Key>,
    max_age: Duration,
) -> Vec<Key> {
    let now = Instant::now();
    let cache = cache.locked();
    wanted
        .iter()
        .filter(|k| {
            cache
                .get(*k)
                .is_none_or(|c| c.value.is_none() || now - c.fetched >= max_age)
        })
        .cloned()
        .collect()
}

impl RefCache {
    /// Reads every object of `refs` whose cached copy is missing, absent or older than
    /// `max_age` (`Duration::ZERO`: always). Objects that do not exist are remembered as
    /// absent; any other API failure is returned (transient).
    pub async fn refresh(
        &self,
        client: &Client,
        refs: &Refs,
        max_age: Duration,
    ) -> Result<(), ControlError> {
        let secrets = due(&self.secrets, &refs.secrets, max_age);
        for key in secrets {
            let api: Api<Secret> = Api::namespaced(client.clone(), &key.namespace);
            let value = api.get_opt(&key.name).await?.map(|s| decode_secret(&s));
            self.store(&self.secrets, key, value);
        }
        let config_maps = due(&self.config_maps, &refs.config_maps, max_age);
        for key in config_maps {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &key.namespace);
            let value = api
                .get_opt(&key.name)
                .await?
                .map(|c| c.data.unwrap_or_default());
            self.store(&self.config_maps, key, value);
        }
        Ok(())
    }

    /// Caches `value` as just read, counting a change when it differs from the cached copy.
    fn store<T: PartialEq>(
        &self,
        cache: &Mutex<HashMap<Key, Cached<T>>>,
        key: Key,
        value: Option<T>,
    ) {
        let mut cache = cache.locked();
        if cache.get(&key).is_none_or(|c| c.value != value) {
            self.version.fetch_add(1, Ordering::AcqRel);
        }
        cache.insert(
            key,
            Cached {
                fetched: Instant::now(),
                value,
            },
        );
    }

    /// Counts the changes reads have found (see the field).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The cached Secrets and ConfigMaps among `refs` that exist, as the index holds them.
    pub fn resolved(
        &self,
        refs: &Refs,
    ) -> (BTreeMap<Key, SecretData>, BTreeMap<Key, ConfigMapData>) {
        let secrets = self.secrets.locked();
        let s = refs
            .secrets
            .iter()
            .filter_map(|k| {
                secrets
                    .get(k)
                    .and_then(|c| c.value.clone())
                    .map(|v| (k.clone(), v))
            })
            .collect();
        let cms = self.config_maps.locked();
        let c = refs
            .config_maps
            .iter()
            .filter_map(|k| {
                cms.get(k)
                    .and_then(|c| c.value.clone())
                    .map(|v| (k.clone(), v))
            })
            .collect();
        (s, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_every_secret_and_config_map_reference() {
        let spec = json!({
            "broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}},
            "store": {"urlSecretRef": {"name": "pg", "key": "url"},
                      "readUrlSecretRef": {"name": "pg-read", "key": "url"}},
            "validation": {"schemas": [
                {"type": "a", "schemaFrom": {"configMapKeyRef": {"name": "schemas", "key": "a.json"}}}
            ]},
            "ingest": {"auth": {"mode": "Tokens", "tokensSecretRef": {"name": "publishers"}}},
            "sink": {"uri": "http://x", "authSecretRef": {"name": "sink-token", "key": "t"}}
        });
        let refs = refs_of("shop", &spec);
        let names: Vec<_> = refs.secrets.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            ["pg", "pg-read", "publishers", "rabbitmq", "sink-token"]
        );
        assert!(refs.secrets.iter().all(|k| k.namespace == "shop"));
        let cms: Vec<_> = refs.config_maps.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(cms, ["schemas"]);
    }

    #[test]
    fn string_data_wins_over_data() {
        let s = Secret {
            data: Some(
                [
                    ("url".to_string(), k8s_openapi::ByteString(b"old".to_vec())),
                    ("other".to_string(), k8s_openapi::ByteString(b"x".to_vec())),
                ]
                .into(),
            ),
            string_data: Some([("url".to_string(), "new".to_string())].into()),
            ..Secret::default()
        };
        let d = decode_secret(&s);
        assert_eq!(d["url"], b"new");
        assert_eq!(d["other"], b"x");
    }
}
