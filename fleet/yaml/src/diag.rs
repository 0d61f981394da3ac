//! Diagnostics: every problem in a manifest, with where it is and how to fix it.

use std::fmt;

use serde::Serialize;

use crate::yaml::Pos;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem. Renders as `line:column: severity: path: message; help`, and with a file name
/// in front through [`Diagnostic::in_file`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub line: usize,
    pub column: usize,
    /// The field, as `waves[1].regions[0]`; empty for the document itself.
    pub path: String,
    pub message: String,
    /// How to fix it; may be empty when the message says it all.
    pub help: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The diagnostic as a compiler would print it for `file`.
    pub fn in_file<'a>(&'a self, file: &'a str) -> impl fmt::Display + 'a {
        InFile { file, diag: self }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}:{}: {severity}: ", self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if !self.help.is_empty() {
            write!(f, "; {}", self.help)?;
        }
        Ok(())
    }
}

struct InFile<'a> {
    file: &'a str,
    diag: &'a Diagnostic,
}

impl fmt::Display for InFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.diag)
    }
}

/// Collects diagnostics; callers keep going after a problem so that all are reported at once.
#[derive(Debug, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn error(
        &mut self,
        pos: Pos,
        path: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.push(Severity::Error, pos, path, message.into(), help.into());
    }

    pub fn warning(
        &mut self,
        pos: Pos,
        path: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.push(Severity::Warning, pos, path, message.into(), help.into());
    }

    fn push(&mut self, severity: Severity, pos: Pos, path: &str, message: String, help: String) {
        self.items.push(Diagnostic {
            severity,
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            message,
            help,
        });
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.items.extend(other.items);
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    /// All diagnostics in source order (then errors before warnings), each reported once.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by_key(|d| (d.line, d.column, d.severity));
        self.items.dedup();
        self.items
    }
}

/// The closest candidate to `word`, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// `did you mean "x"?` or, with no close candidate, the list of what is allowed.
pub fn suggest(word: &str, candidates: &[&str]) -> String {
    match did_you_mean(word, candidates.iter().copied()) {
        Some(c) => format!("did you mean \"{c}\"?"),
        None => format!("expected one of: {}", candidates.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_misses_get_a_suggestion_and_far_ones_do_not() {
        assert_eq!(
            did_you_mean("regoins", ["regions", "waves"]),
            Some("regions")
        );
        assert_eq!(did_you_mean("bake_time", ["regions", "waves"]), None);
    }

    #[test]
    fn renders_like_a_compiler() {
        let mut d = Diagnostics::default();
        d.error(
            Pos { line: 3, column: 7 },
            "waves[0].bake",
            "bad",
            "write 1h",
        );
        let all = d.into_sorted();
        assert_eq!(
            all[0].in_file("f.yaml").to_string(),
            "f.yaml:3:7: error: waves[0].bake: bad; write 1h"
        );
    }
}
