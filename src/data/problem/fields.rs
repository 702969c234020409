//! The faults a problem lists: one [`FieldError`] per broken field of one event, collected
//! by [`FieldErrors`] up to [`MAX_REPORTED_ERRORS`].

use super::{HttpProblem, MAX_REPORTED_ERRORS, ProblemKind};

/// What is wrong with one field of one event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// 0-based position of the event in the request; `null` when the error is not about one
    /// event (e.g. malformed JSON).
    pub index: Option<usize>,
    /// JSON pointer into the event (`/id`, `/data/orderId`); `null` for the event as a whole.
    pub pointer: Option<String>,
    /// The check that failed: a JSON Schema keyword (`required`, `type`, …) or Weir's own
    /// check name.
    pub keyword: Option<String>,
    /// A sentence a person can act on.
    pub message: String,
}

impl FieldError {
    /// An error with only a message; add the rest with the builder methods.
    pub fn new(message: impl Into<String>) -> FieldError {
        FieldError {
            index: None,
            pointer: None,
            keyword: None,
            message: message.into(),
        }
    }

    /// Sets the event index.
    pub fn at(mut self, index: usize) -> FieldError {
        self.index = Some(index);
        self
    }

    /// Sets the event index when known.
    pub fn at_opt(mut self, index: Option<usize>) -> FieldError {
        self.index = index;
        self
    }

    /// Sets the JSON pointer.
    pub fn pointer(mut self, pointer: impl Into<String>) -> FieldError {
        self.pointer = Some(pointer.into());
        self
    }

    /// Sets the failing keyword.
    pub fn keyword(mut self, keyword: impl Into<String>) -> FieldError {
        self.keyword = Some(keyword.into());
        self
    }
}

/// Collects field errors, keeping the first [`MAX_REPORTED_ERRORS`] and counting the rest.
#[derive(Clone, Debug, Default)]
pub struct FieldErrors {
    shown: Vec<FieldError>,
    total: usize,
}

impl FieldErrors {
    pub fn new() -> FieldErrors {
        FieldErrors::default()
    }

    pub fn push(&mut self, error: FieldError) {
        self.total += 1;
        if self.shown.len() < MAX_REPORTED_ERRORS {
            self.shown.push(error);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// How many errors were pushed (shown or not).
    pub fn total(&self) -> usize {
        self.total
    }

    /// The problem of `kind` with these errors; `detail` gains a note when some were left out.
    pub fn into_problem(self, kind: ProblemKind, detail: impl Into<String>) -> HttpProblem {
        let mut detail = detail.into();
        if self.total > self.shown.len() {
            detail.push_str(&format!(
                " (the first {} of {} errors are listed)",
                self.shown.len(),
                self.total
            ));
        }
        let mut problem = HttpProblem::new(kind, detail);
        problem.errors = self.shown;
        problem
    }
}
