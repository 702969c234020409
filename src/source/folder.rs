//! The manifest folder of standalone mode.
//!
//! Every `*.yaml`/`*.yml` file under the folder (recursively, hidden entries skipped) may hold
//! several documents. Each document is dispatched on `apiVersion`/`kind`: the four Weir kinds,
//! `v1/Secret` and `v1/ConfigMap` go into an [`Index`]; anything else is skipped with a warning.
//! Every problem is kept with its file, its 1-based document index and its field path, and a
//! broken document never hides the problems of the others.
//!
//! Resources that are present in the folder but whose document could not be loaded are listed in
//! [`Loaded::broken`]: the engine keeps their running version instead of stopping them. When a
//! whole file stops parsing its resources can no longer be named, so [`reload`] takes them from
//! what the file held at the previous load.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::decode::{decode_config_map, decode_resource, decode_secret};
use super::report::FieldProblem;
pub use super::report::{ManifestProblem, ValidationReport, build_problems};
use super::yaml;

mod carry;

use super::SourceError;
use crate::api;
use crate::topology::build;
use crate::topology::index::Kind;
use crate::topology::units::{is_dns_label, is_dns_subdomain, resource_name_problem};
use crate::topology::{Defaults, Index, Key};

/// Namespace of a manifest that names none, as `kubectl apply` does.
const DEFAULT_NAMESPACE: &str = "default";

/// Where a resource was defined: the file and the 1-based index of the document in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based, as in messages.
    pub doc: usize,
}

/// What one manifest file defined at its last successful parse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRecord {
    pub resources: BTreeSet<(Kind, Key)>,
    pub secrets: BTreeSet<Key>,
    pub config_maps: BTreeSet<Key>,
}

/// One snapshot of the manifest folder.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Every resource that loaded without a problem. Weir resources carry
    /// `metadata.namespace` (filled with `default` when absent) and a `metadata.generation`
    /// that starts at 1 and grows by one whenever the spec changes between reloads, as the
    /// Kubernetes API server does, so the engine can treat both sources alike.
    pub index: Index,
    /// Where each Weir resource (loaded or broken) was defined.
    pub origins: BTreeMap<(Kind, Key), Origin>,
    /// Every problem found while loading, in file and document order.
    pub problems: Vec<ManifestProblem>,
    /// Resources present in the folder whose document could not be loaded: the engine must keep
    /// their running version. They are not in `index`.
    pub broken: BTreeSet<(Kind, Key)>,
    /// What each file defined at its last successful parse (carried forward while a file does
    /// not parse, so its resources stay `broken` rather than being taken as deleted).
    pub files: BTreeMap<PathBuf, FileRecord>,
    /// The last good generation and spec of each Weir resource, carried forward while the
    /// resource is broken, so that a fixed resource continues its generation count.
    pub generations: BTreeMap<(Kind, Key), (i64, serde_json::Value)>,
    /// How many times the folder has been loaded to produce this snapshot (1 for the first).
    pub revision: u64,
    /// How long reading and parsing the folder took (`weir_topology_sync_seconds{phase="load"}`).
    pub took: std::time::Duration,
}

impl Loaded {
    /// Number of resources loaded into the index (the four Weir kinds, Secrets and ConfigMaps).
    pub fn resource_count(&self) -> usize {
        let i = &self.index;
        i.streams.len()
            + i.subscriptions.len()
            + i.archive_policies.len()
            + i.cache_policies.len()
            + i.secrets.len()
            + i.config_maps.len()
    }
}

/// Loads every manifest under `dir`.
pub fn load(dir: &Path) -> Result<Loaded, SourceError> {
    load_inner(dir, None)
}

/// Loads every manifest under `dir` again, knowing the previous snapshot: resources of files
/// that no longer parse are marked [`Loaded::broken`], Secrets and ConfigMaps of such files
/// keep their previous data, and generations continue from the previous snapshot.
pub fn reload(dir: &Path, previous: &Loaded) -> Result<Loaded, SourceError> {
    load_inner(dir, Some(previous))
}

/// Loads `dir` and builds its topology without starting anything: every problem, from YAML
/// syntax to a dangling reference, located by file, document and field path.
pub fn validate(dir: &Path, defaults: &Defaults) -> Result<ValidationReport, SourceError> {
    let loaded = load(dir)?;
    let built = build(&loaded.index, defaults);
    let mut problems = loaded.problems.clone();
    problems.extend(build_problems(&loaded, &built.reports));
    // Sorting by location keeps a file's problems together; the sort is stable, so problems of
    // one document keep the order in which they were found.
    problems.sort_by(|a, b| (&a.file, a.doc).cmp(&(&b.file, b.doc)));
    Ok(ValidationReport {
        problems: problems.iter().map(ToString::to_string).collect(),
        resources: loaded.resource_count(),
    })
}

/// Identity of a document, for duplicate detection across kinds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ident {
    Weir(Kind, Key),
    Secret(Key),
    ConfigMap(Key),
}

/// What a document is, from its `apiVersion`/`kind`.
#[derive(Clone, Copy, Debug)]
enum Target {
    Weir(Kind),
    Secret,
    ConfigMap,
}

/// Whether a document's resources could all be named. A file whose resources cannot all be
/// named (a syntax error, a document without a name, ...) is incomplete: what it held at the
/// previous load is carried forward as broken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Named {
    Yes,
    No,
}

struct Loader<'p> {
    previous: Option<&'p Loaded>,
    out: Loaded,
    seen: BTreeMap<Ident, Origin>,
    incomplete: Vec<PathBuf>,
}

fn load_inner(dir: &Path, previous: Option<&Loaded>) -> Result<Loaded, SourceError> {
    let meta = fs::metadata(dir).map_err(|source| SourceError::Folder {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(SourceError::NotADirectory(dir.to_path_buf()));
    }
    let started = std::time::Instant::now();
    let mut loader = Loader {
        previous,
        out: Loaded {
            revision: previous.map_or(1, |p| p.revision + 1),
            ..Loaded::default()
        },
        seen: BTreeMap::new(),
        incomplete: Vec::new(),
    };
    for file in manifest_files(dir, &mut loader.out.problems)? {
        loader.load_file(&file);
    }
    loader.carry_forward();
    loader.stamp_generations();
    loader.out.took = started.elapsed();
    Ok(loader.out)
}

/// The manifest files under `dir`, sorted so that loads are deterministic (and "the second
/// definition" of a duplicate is well defined). Hidden entries are skipped: editors keep swap
/// and lock files there, and a ConfigMap mounted as a volume keeps a second copy of every file
/// under `..data/`. Symbolic links are followed (that same mount links each file into `..data/`),
/// with walkdir detecting loops.
fn manifest_files(
    dir: &Path,
    problems: &mut Vec<ManifestProblem>,
) -> Result<Vec<PathBuf>, SourceError> {
    let mut files = Vec::new();
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                let path = err.path().map(Path::to_path_buf);
                match (err.depth(), path) {
                    (0, _) | (_, None) => {
                        return Err(SourceError::Folder {
                            path: dir.to_path_buf(),
                            source: err.into(),
                        });
                    }
                    // Removed while we were walking: as if it had never been there.
                    _ if err.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) => {
                        continue;
                    }
                    (_, Some(path)) => {
                        problems.push(ManifestProblem {
                            file: path,
                            doc: None,
                            line: None,
                            path: String::new(),
                            message: format!("cannot read: {err}"),
                        });
                        continue;
                    }
                }
            }
        };
        if entry.file_type().is_file() && is_manifest_name(entry.path()) {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

/// `*.yaml` or `*.yml` (any case).
pub(crate) fn is_manifest_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

impl Loader<'_> {
    fn problem(&mut self, file: &Path, doc: Option<usize>, p: FieldProblem) {
        self.out.problems.push(ManifestProblem {
            file: file.to_path_buf(),
            doc,
            line: None,
            path: p.path,
            message: p.message,
        });
    }

    fn load_file(&mut self, file: &Path) {
        let mut record = FileRecord::default();
        let named = match fs::read(file) {
            // Deleted between listing and reading: the watch reports the deletion and the next
            // load will not list it.
            Err(err) if err.kind() == io::ErrorKind::NotFound => return,
            Err(err) => {
                self.problem(
                    file,
                    None,
                    FieldProblem::new("", format!("cannot read: {err}")),
                );
                Named::No
            }
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => self.load_text(file, &text, &mut record),
                Err(err) => {
                    self.problem(
                        file,
                        None,
                        FieldProblem::new("", format!("not UTF-8 text: {err}")),
                    );
                    Named::No
                }
            },
        };
        if named == Named::No {
            self.incomplete.push(file.to_path_buf());
        }
        self.out.files.insert(file.to_path_buf(), record);
    }

    fn load_text(&mut self, file: &Path, text: &str, record: &mut FileRecord) -> Named {
        let mut named = Named::Yes;
        for document in yaml::documents(text) {
            let doc = document.number;
            let value = match yaml::parse(&document) {
                Ok(Some(value)) => value,
                // An empty document (`---` twice, or only comments) is no resource.
                Ok(None) => continue,
                Err(err) => {
                    named = Named::No;
                    self.out.problems.push(ManifestProblem {
                        file: file.to_path_buf(),
                        doc: Some(doc),
                        line: err.line,
                        path: String::new(),
                        message: err.message,
                    });
                    continue;
                }
            };
            if self.load_document(file, doc, value, record) == Named::No {
                named = Named::No;
            }
        }
        named
    }

    fn load_document(
        &mut self,
        file: &Path,
        doc: usize,
        value: Value,
        record: &mut FileRecord,
    ) -> Named {
        if !value.is_object() {
            self.problem(
                file,
                Some(doc),
                FieldProblem::new(
                    "",
                    "a manifest must be a mapping with apiVersion, kind and metadata",
                ),
            );
            return Named::No;
        }
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        let kind_name = value.get("kind").and_then(Value::as_str);
        let (Some(api_version), Some(kind_name)) = (api_version, kind_name) else {
            for field in ["apiVersion", "kind"] {
                if value.get(field).and_then(Value::as_str).is_none() {
                    self.problem(
                        file,
                        Some(doc),
                        FieldProblem::new(field, "required: a string"),
                    );
                }
            }
            return Named::No;
        };
        let weir_kind = if api_version == api::common::API_VERSION {
            Kind::from_name(kind_name)
        } else {
            None
        };
        let target = match (weir_kind, api_version, kind_name) {
            (Some(kind), _, _) => Target::Weir(kind),
            (None, "v1", "Secret") => Target::Secret,
            (None, "v1", "ConfigMap") => Target::ConfigMap,
            (None, v, k) if v.split('/').next() == Some(api::common::GROUP) => {
                // A Weir group with a kind or version Weir does not know is a typo, not a
                // resource meant for someone else: say so rather than skip it quietly.
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                self.problem(
                    file,
                    Some(doc),
                    FieldProblem::new(
                        "kind",
                        format!(
                            "unknown Weir kind {k:?} in {v:?}: expected {} in {}",
                            known.join(", "),
                            api::common::API_VERSION
                        ),
                    ),
                );
                return Named::No;
            }
            (None, v, k) => {
                tracing::warn!(file = %file.display(), doc, api_version = v, kind = k,
                    "skipping a manifest of a kind Weir does not read");
                return Named::Yes;
            }
        };

        let Some(name) = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
        else {
            self.problem(
                file,
                Some(doc),
                FieldProblem::new("metadata.name", "required: a string"),
            );
            return Named::No;
        };
        let namespace = match value.get("metadata").and_then(|m| m.get("namespace")) {
            None | Some(Value::Null) => DEFAULT_NAMESPACE,
            Some(ns) => match ns.as_str() {
                Some(ns) => ns,
                None => {
                    self.problem(
                        file,
                        Some(doc),
                        FieldProblem::new("metadata.namespace", "must be a string"),
                    );
                    return Named::No;
                }
            },
        };
        let key = Key::new(namespace, name);
        let ident = match target {
            Target::Weir(kind) => Ident::Weir(kind, key.clone()),
            Target::Secret => Ident::Secret(key.clone()),
            Target::ConfigMap => Ident::ConfigMap(key.clone()),
        };
        let origin = Origin {
            file: file.to_path_buf(),
            doc,
        };
        if let Some(first) = self.seen.get(&ident) {
            let message = format!(
                "{kind_name} {key} is already defined in {} doc {}",
                first.file.display(),
                first.doc
            );
            self.problem(file, Some(doc), FieldProblem::new("metadata.name", message));
            return Named::Yes;
        }
        self.seen.insert(ident, origin.clone());

        let mut problems = Vec::new();
        let name_problem = match target {
            // The rule the topology build applies in both modes (names become queue names).
            Target::Weir(_) => resource_name_problem(name),
            // Kubernetes allows dots in Secret and ConfigMap names.
            Target::Secret | Target::ConfigMap => (!is_dns_subdomain(name)).then(|| {
                format!(
                    "{name:?} is not a valid name: it must be a DNS subdomain (lowercase letters, digits and '-', \
                     starting and ending with a letter or digit, at most 63 characters)"
                )
            }),
        };
        if let Some(message) = name_problem {
            problems.push(FieldProblem::new("metadata.name", message));
        }
        if !is_dns_label(namespace) {
            problems.push(FieldProblem::new(
                "metadata.namespace",
                format!("{namespace:?} is not a valid namespace: it must be a DNS label"),
            ));
        }

        match target {
            Target::Weir(kind) => {
                record.resources.insert((kind, key.clone()));
                self.out.origins.insert((kind, key.clone()), origin);
                match self.insert_weir(kind, &key, value) {
                    Err(mut decode) => problems.append(&mut decode),
                    Ok(()) if !problems.is_empty() => remove_weir(&mut self.out.index, kind, &key),
                    Ok(()) => {}
                }
                if !problems.is_empty() {
                    self.out.broken.insert((kind, key));
                }
            }
            Target::Secret => {
                record.secrets.insert(key.clone());
                match decode_secret(value) {
                    Ok(data) if problems.is_empty() => {
                        self.out.index.secrets.insert(key, data);
                    }
                    Ok(_) => {}
                    Err(mut decode) => problems.append(&mut decode),
                }
            }
            Target::ConfigMap => {
                record.config_maps.insert(key.clone());
                match decode_config_map(value) {
                    Ok(data) if problems.is_empty() => {
                        self.out.index.config_maps.insert(key, data);
                    }
                    Ok(_) => {}
                    Err(mut decode) => problems.append(&mut decode),
                }
            }
        }
        for p in problems {
            self.problem(file, Some(doc), p);
        }
        Named::Yes
    }

    /// Decodes a Weir resource into the index.
    fn insert_weir(
        &mut self,
        kind: Kind,
        key: &Key,
        value: Value,
    ) -> Result<(), Vec<FieldProblem>> {
        let index = &mut self.out.index;
        match kind {
            Kind::EventStream => {
                index.streams.insert(
                    key.clone(),
                    std::sync::Arc::new(decode_resource(value, key)?),
                );
            }
            Kind::Subscription => {
                index.subscriptions.insert(
                    key.clone(),
                    std::sync::Arc::new(decode_resource(value, key)?),
                );
            }
            Kind::ArchivePolicy => {
                index.archive_policies.insert(
                    key.clone(),
                    std::sync::Arc::new(decode_resource(value, key)?),
                );
            }
            Kind::CachePolicy => {
                index.cache_policies.insert(
                    key.clone(),
                    std::sync::Arc::new(decode_resource(value, key)?),
                );
            }
        }
        Ok(())
    }
}

fn remove_weir(index: &mut Index, kind: Kind, key: &Key) {
    match kind {
        Kind::EventStream => {
            index.streams.remove(key);
        }
        Kind::Subscription => {
            index.subscriptions.remove(key);
        }
        Kind::ArchivePolicy => {
            index.archive_policies.remove(key);
        }
        Kind::CachePolicy => {
            index.cache_policies.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names() {
        assert!(is_manifest_name(Path::new("a/b.yaml")));
        assert!(is_manifest_name(Path::new("b.YML")));
        assert!(!is_manifest_name(Path::new("b.yaml.swp")));
        assert!(!is_manifest_name(Path::new("b.yaml~")));
        assert!(!is_manifest_name(Path::new("yaml")));
    }
}
