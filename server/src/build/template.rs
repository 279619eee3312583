//! Templated files: `{{ name }}` is replaced by the variable's value; `\{{` writes a literal
//! `{{`. A variable with no value is an error naming it (and the caller adds the file).

use std::collections::BTreeMap;

/// Why a template did not render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{ name }}` with no value for `name`.
    #[error("variable {name:?} has no value (line {line})")]
    Missing {
        /// The variable.
        name: String,
        /// 1-based line.
        line: usize,
    },
    /// `{{` without `}}`, or a bad name.
    #[error("malformed placeholder at line {line}: {text:?}")]
    Malformed {
        /// 1-based line.
        line: usize,
        /// What was there (cut).
        text: String,
    },
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Renders `text` with `vars`.
pub fn render(text: &str, vars: &BTreeMap<String, String>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let line_of = |rest: &str| text[..text.len() - rest.len()].matches('\n').count() + 1;
    while let Some(pos) = rest.find("{{") {
        if pos > 0 && rest.as_bytes().get(pos - 1) == Some(&b'\\') {
            out.push_str(&rest[..pos - 1]);
            out.push_str("{{");
            rest = &rest[pos + 2..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let Some(end) = after.find("}}") else {
            return Err(TemplateError::Malformed {
                line: line_of(&rest[pos..]),
                text: after.chars().take(40).collect(),
            });
        };
        let name = after[..end].trim();
        if !valid_name(name) {
            return Err(TemplateError::Malformed {
                line: line_of(&rest[pos..]),
                text: name.chars().take(40).collect(),
            });
        }
        match vars.get(name) {
            Some(v) => out.push_str(v),
            None => {
                return Err(TemplateError::Missing {
                    name: name.to_owned(),
                    line: line_of(&rest[pos..]),
                })
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn renders_and_escapes() {
        let v = vars(&[("role", "web"), ("port", "80")]);
        assert_eq!(
            render("role={{role}} port={{ port }}\n", &v).unwrap(),
            "role=web port=80\n"
        );
        assert_eq!(
            render("literal \\{{role}}", &v).unwrap(),
            "literal {{role}}"
        );
    }

    #[test]
    fn missing_variable_is_named() {
        let err = render("a\nb {{ nope }}", &vars(&[])).unwrap_err();
        assert_eq!(
            err,
            TemplateError::Missing {
                name: "nope".into(),
                line: 2
            }
        );
        assert!(matches!(
            render("x {{ open", &vars(&[])),
            Err(TemplateError::Malformed { .. })
        ));
        assert!(matches!(
            render("{{ a b }}", &vars(&[])),
            Err(TemplateError::Malformed { .. })
        ));
    }

    proptest! {
        #[test]
        fn text_without_braces_is_unchanged(s in "[^{}\\\\]*") {
            prop_assert_eq!(render(&s, &vars(&[])).unwrap(), s);
        }

        #[test]
        fn never_panics(s in ".*") {
            let _ = render(&s, &vars(&[("a", "b")]));
        }
    }
}
