//! The layering, checked cheaply: the data plane (`src/data`) and the kube-free part of the
//! topology (`plan`, `filter`, `defaults`, `units`) must not name Kubernetes crates, the
//! operator (`crate::control`) or the manifest sources (`crate::source`); the data plane must
//! not name the CRD types (`crate::api`) either. Both modes share that code only while it stays
//! free of them.

use std::path::{Path, PathBuf};

const KUBE_CRATES: [&str; 5] = [
    "kube",
    "kube_runtime",
    "kube_client",
    "kube_core",
    "k8s_openapi",
];

/// The source with `//` comments (doc comments included) removed: prose may say "kube-free".
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `code` uses `name` as the first segment of a path (`name::...`).
fn uses_crate(code: &str, name: &str) -> bool {
    code.match_indices(name).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = &code[i + name.len()..];
        !before.is_some_and(|c| is_ident(c) || c == ':') && after.trim_start().starts_with("::")
    })
}

/// Whether `code` names the module `crate::module`, directly or inside a `crate::{...}` group.
fn uses_module(code: &str, module: &str) -> bool {
    let squeezed: String = code.split_whitespace().collect::<Vec<_>>().join("");
    let direct = format!("crate::{module}");
    if squeezed.match_indices(&direct).any(|(i, _)| {
        !squeezed[i + direct.len()..]
            .chars()
            .next()
            .is_some_and(is_ident)
    }) {
        return true;
    }
    squeezed.match_indices("crate::{").any(|(i, _)| {
        let group = &squeezed[i + "crate::{".len()..];
        // The group up to its closing brace, nested groups included.
        let mut depth = 1;
        let mut end = group.len();
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        // Only top-level items of the group name a module of the crate root.
        let mut depth = 0;
        let mut item = String::new();
        let mut items = Vec::new();
        for c in group[..end].chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                _ if depth == 0 => item.push(c),
                _ => {}
            }
        }
        items.push(item);
        items
            .iter()
            .any(|it| it == module || it.starts_with(&format!("{module}::")))
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every forbidden name `path` uses.
fn violations(path: &Path, forbid_api: bool) -> Vec<String> {
    let code = code_of(&std::fs::read_to_string(path).unwrap());
    let mut found = Vec::new();
    for k in KUBE_CRATES {
        if uses_crate(&code, k) {
            found.push(format!("{}: names `{k}::`", path.display()));
        }
    }
    let mut modules = vec!["control", "source"];
    if forbid_api {
        modules.push("api");
    }
    for m in modules {
        if uses_module(&code, m) {
            found.push(format!("{}: names `crate::{m}`", path.display()));
        }
    }
    found
}

#[test]
fn the_checker_sees_what_it_forbids() {
    // A checker that never fires would pass this suite forever.
    assert!(uses_crate("use kube::Api;", "kube"));
    assert!(uses_crate(
        "let x = k8s_openapi ::api::core::v1::Pod;",
        "k8s_openapi"
    ));
    assert!(!uses_crate("let kube_free = 1; my_kube::x();", "kube"));
    assert!(uses_module("use crate::control::Context;", "control"));
    assert!(uses_module(
        "use crate::{\n  data::x,\n  api::EventStream,\n};",
        "api"
    ));
    assert!(uses_module("use crate::{api::{A, B}, data};", "api"));
    assert!(!uses_module("use crate::{data::{api, b}};", "api"));
    assert!(!uses_module("use crate::apiary;", "api"));
    assert!(!uses_module(
        &code_of("// crate::api is not used here"),
        "api"
    ));
}

#[test]
fn data_plane_and_plan_do_not_reach_up_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut data = Vec::new();
    rust_files(&root.join("data"), &mut data);
    assert!(data.len() > 20, "src/data holds {} files", data.len());
    let mut found = Vec::new();
    for f in &data {
        found.extend(violations(f, true));
    }
    for f in ["plan", "filter", "defaults", "units"] {
        found.extend(violations(
            &root.join("topology").join(format!("{f}.rs")),
            false,
        ));
    }
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}
