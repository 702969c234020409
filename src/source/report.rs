//! What is wrong with the manifest folder: problems located by file, document and field path,
//! as `weir validate` and the standalone log print them.

use std::fmt;
use std::path::PathBuf;

use super::folder::Loaded;
use crate::topology::Report;

/// One problem in the manifest folder, located as precisely as it is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    pub file: PathBuf,
    /// 1-based document index; `None` when the file as a whole could not be read.
    pub doc: Option<usize>,
    /// Line of a YAML syntax error (1-based), when the problem is one.
    pub line: Option<usize>,
    /// Field path inside the document (`spec.batching.maxDelay`); empty when the problem is
    /// about the document as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ManifestProblem {
    /// `examples/x.yaml doc 2: spec.batching.maxDelay: invalid duration "5 sec"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(doc) = self.doc {
            write!(f, " doc {doc}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The outcome of `weir validate -f DIR`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationReport {
    /// One formatted line per problem, every broken document included.
    pub problems: Vec<String>,
    /// Resources that loaded (see [`Loaded::resource_count`]).
    pub resources: usize,
}

impl ValidationReport {
    /// `true` when no problem was found: `weir validate` exits 0.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Locates the problems the topology found in `reports` at the file and document that defined
/// each resource.
pub fn build_problems(loaded: &Loaded, reports: &[Report]) -> Vec<ManifestProblem> {
    let mut out = Vec::new();
    for report in reports {
        let origin = loaded.origins.get(&(report.kind, report.key.clone()));
        for problem in &report.problems {
            out.push(match origin {
                Some(origin) => ManifestProblem {
                    file: origin.file.clone(),
                    doc: Some(origin.doc),
                    line: None,
                    path: problem.path.clone(),
                    message: problem.message.clone(),
                },
                // Every indexed resource has an origin; this only names the resource in case a
                // report ever concerns one that does not.
                None => ManifestProblem {
                    file: PathBuf::from(format!("{} {}", report.kind, report.key)),
                    doc: None,
                    line: None,
                    path: problem.path.clone(),
                    message: problem.message.clone(),
                },
            });
        }
    }
    out
}

/// A problem inside one document, before it is located in a file.
pub(crate) struct FieldProblem {
    pub(crate) path: String,
    pub(crate) message: String,
}

impl FieldProblem {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> FieldProblem {
        FieldProblem {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_display() {
        let p = ManifestProblem {
            file: PathBuf::from("examples/x.yaml"),
            doc: Some(2),
            line: None,
            path: "spec.batching.maxDelay".into(),
            message: "invalid duration \"5 sec\"".into(),
        };
        assert_eq!(
            p.to_string(),
            "examples/x.yaml doc 2: spec.batching.maxDelay: invalid duration \"5 sec\""
        );
        let p = ManifestProblem {
            doc: None,
            path: String::new(),
            message: "cannot read: denied".into(),
            ..p
        };
        assert_eq!(p.to_string(), "examples/x.yaml: cannot read: denied");
    }
}
