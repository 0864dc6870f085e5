use std::fmt;

/// How many characters of a client's own text an error message quotes.
pub const QUOTE_CHARS: usize = 48;

/// `s` quoted for an error message: whole when short, otherwise its first
/// [`QUOTE_CHARS`] characters and its length. Messages travel in response
/// headers, which are small; a client's text may be megabytes.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        None => format!("{s:?}"),
        Some(_) => format!("{:?} ({} characters)", prefix(s), s.chars().count()),
    }
}

/// `s` unquoted when short, otherwise its first [`QUOTE_CHARS`]
/// characters and "...": for client text inside a field name.
pub fn prefix(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(QUOTE_CHARS) {
        None => s.into(),
        Some((end, _)) => format!("{}...", &s[..end]).into(),
    }
}

/// One invalid field of a request: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Every invalid field of a request, collected so the client sees them all
/// at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn single(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Self::new();
        v.add(field, description);
        v
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Keeps the value of a check, or records its error against `field`.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.add(field, e);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.0.iter()
    }

    /// `Ok(value)` when nothing was recorded.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Violations> {
        if self.is_empty() {
            Ok(value())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short() {
        assert_eq!(quote("abc"), "\"abc\"");
        let long = "é".repeat(200_000);
        let q = quote(&long);
        assert!(q.len() < 200, "{q}");
        assert!(q.ends_with("(200000 characters)"), "{q}");
        assert!(
            q.starts_with(&format!("\"{}...\"", "é".repeat(QUOTE_CHARS))),
            "{q}"
        );
    }
}
