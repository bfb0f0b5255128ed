//! Path-valued fields: `${VAR}` and leading `~/` expansion, then resolution against the directory
//! of the file that wrote the value. Never touches the filesystem.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ExpandError {
    Unset(String),
    Unterminated,
    EmptyName,
    NoHome,
    Empty,
}

impl ExpandError {
    pub fn message(&self) -> String {
        match self {
            ExpandError::Unset(var) => format!("environment variable `{var}` is not set"),
            ExpandError::Unterminated => "unterminated `${` in path: write `${NAME}`".to_string(),
            ExpandError::EmptyName => "empty `${}` in path: write `${NAME}`".to_string(),
            ExpandError::NoHome => "cannot expand `~`: environment variable `HOME` is not set".to_string(),
            ExpandError::Empty => "empty path".to_string(),
        }
    }
}

/// Expands `${VAR}` anywhere and `~` at the start (`~` alone or `~/...`).
pub(crate) fn expand(raw: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    if rest == "~" || rest.starts_with("~/") {
        out.push_str(&env("HOME").ok_or(ExpandError::NoHome)?);
        rest = &rest[1..];
    }
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or(ExpandError::Unterminated)?;
        let name = &after[..end];
        if name.is_empty() {
            return Err(ExpandError::EmptyName);
        }
        out.push_str(&env(name).ok_or_else(|| ExpandError::Unset(name.to_string()))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(ExpandError::Empty);
    }
    Ok(out)
}

/// Whether a value starts with an explicit scheme, `name:` before any `/` (`hf:org/name`). Such a
/// value of a path input with a resolver is a reference, never a local path. A scheme has two
/// characters or more, so a drive letter (`C:`) is none.
pub(crate) fn has_scheme(value: &str) -> bool {
    let Some((scheme, _)) = value.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    scheme.len() >= 2
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// `path` made absolute against `dir`, with `.` components removed. `..` is kept: removing it
/// lexically would be wrong under symlinks.
pub(crate) fn resolve(dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    let joined = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
    clean(&joined)
}

pub(crate) fn clean(p: &Path) -> PathBuf {
    p.components().filter(|c| !matches!(c, Component::CurDir)).collect()
}

/// The directory of `file` made absolute against the current directory (no filesystem access
/// beyond asking for the current directory).
pub(crate) fn absolute(file: &Path) -> PathBuf {
    clean(&std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "HOME" => Some("/home/u".into()),
            "X" => Some("/x".into()),
            _ => None,
        }
    }

    fn check(raw: &str, expected: Result<&str, ExpandError>) {
        assert_eq!(expand(raw, &env), expected.map(str::to_string), "{raw}");
    }

    #[test]
    fn expansion() {
        check("${X}/m", Ok("/x/m"));
        check("a${X}b${X}", Ok("a/xb/x"));
        check("~/m", Ok("/home/u/m"));
        check("~", Ok("/home/u"));
        check("a/~/b", Ok("a/~/b"));
        check("~user/x", Ok("~user/x"));
        check("$X/m", Ok("$X/m"));
        check("${Y}", Err(ExpandError::Unset("Y".into())));
        check("${X", Err(ExpandError::Unterminated));
        check("${}", Err(ExpandError::EmptyName));
        check("", Err(ExpandError::Empty));
    }

    #[test]
    fn schemes() {
        for yes in ["hf:org/name", "hf:", "s3+x.y-z:a", "HF:org/name@main"] {
            assert!(has_scheme(yes), "{yes}");
        }
        for no in ["org/name", "C:/x", "/abs/hf:x", "a/hf:x", "./hf:x", "1hf:x", "h f:x", ":x", "~/x", ""] {
            assert!(!has_scheme(no), "{no}");
        }
    }

    #[test]
    fn resolution() {
        assert_eq!(resolve(Path::new("/p/d"), "./m/./x"), PathBuf::from("/p/d/m/x"));
        assert_eq!(resolve(Path::new("/p/d"), "/abs/m"), PathBuf::from("/abs/m"));
        assert_eq!(resolve(Path::new("/p/d"), "../m"), PathBuf::from("/p/d/../m"));
    }
}
