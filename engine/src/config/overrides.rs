//! `--set KEY=VALUE` overrides: a dotted key path and a TOML value (or, failing that, a plain
//! string), applied to the merged document. Each override is its own pseudo-source named `--set`
//! so errors about its value render like errors in a file.

use std::ops::Range;

use toml::de::DeValue;

use super::error::{FileId, Span};
use super::tree::{self, Entry, Node, Table, Val};

pub(crate) struct Override {
    /// Key segments with their byte ranges in the override text.
    pub path: Vec<(String, Range<usize>)>,
    pub value: Node,
}

/// What is wrong with an override's syntax: message, range in the override text, help.
pub(crate) struct SyntaxError {
    pub message: String,
    pub range: Range<usize>,
    pub help: &'static str,
}

/// Deeper keys serve no pipeline and would only make deep trees.
const MAX_DEPTH: usize = 32;

const HELP: &str = "write `--set KEY=VALUE`, e.g. `--set stages.train.k=64`";

pub(crate) fn parse(text: &str, file: FileId) -> Result<Override, SyntaxError> {
    let Some(eq) = find_eq(text) else {
        return Err(SyntaxError {
            message: format!("invalid override `{text}`: expected `KEY=VALUE`"),
            range: 0..text.len(),
            help: HELP,
        });
    };
    let path = parse_key(text, 0..eq)?;
    let (start, end) = trimmed(text, eq + 1..text.len());
    let raw = &text[start..end];
    let mut value_errors = Vec::new();
    let value = match DeValue::parse(raw) {
        Ok(v) => {
            let span = Span::new(file, v.span().start + start..v.span().end + start);
            let node = tree::from_de_value(v.get_ref(), span, file, start, &mut value_errors);
            if value_errors.is_empty() { Some(node) } else { None }
        }
        Err(_) => None,
    };
    let value =
        value.unwrap_or_else(|| Node { span: Span::new(file, start..end), value: Val::Str(raw.to_string()) });
    Ok(Override { path, value })
}

/// The first `=` outside a quoted key segment.
fn find_eq(text: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '=' => return Some(i),
            None => {}
        }
    }
    None
}

fn trimmed(text: &str, range: Range<usize>) -> (usize, usize) {
    let s = &text[range.clone()];
    let start = range.start + (s.len() - s.trim_start().len());
    let end = range.end - (s.len() - s.trim_end().len());
    (start, end.max(start))
}

/// Dotted key: bare segments (`[A-Za-z0-9_-]+`) or quoted ones (`"a/b"`, `'a/b'`).
fn parse_key(text: &str, range: Range<usize>) -> Result<Vec<(String, Range<usize>)>, SyntaxError> {
    let bad = |message: String, range: Range<usize>| SyntaxError {
        message,
        range,
        help: "keys are dotted paths like `stages.train.k`; quote segments with other characters: `stages.\"a b\".k`",
    };
    let mut out = Vec::new();
    let mut i = range.start;
    loop {
        // Skip whitespace before a segment.
        while text[i..range.end].starts_with([' ', '\t']) {
            i += 1;
        }
        let rest = &text[i..range.end];
        let (seg, len) = if rest.starts_with('"') || rest.starts_with('\'') {
            let q = rest.as_bytes()[0] as char;
            let mut end = None;
            let mut escaped = false;
            for (j, c) in rest.char_indices().skip(1) {
                if q == '"' && escaped {
                    escaped = false;
                } else if q == '"' && c == '\\' {
                    escaped = true;
                } else if c == q {
                    end = Some(j);
                    break;
                }
            }
            let Some(end) = end else {
                return Err(bad(
                    format!("unterminated quoted key in `{}`", &text[range.clone()]),
                    i..range.end,
                ));
            };
            let quoted = &rest[..=end];
            match DeValue::parse(quoted).ok().and_then(|v| v.get_ref().as_str().map(str::to_string)) {
                Some(s) => (s, end + 1),
                None => return Err(bad(format!("invalid quoted key {quoted}"), i..i + end + 1)),
            }
        } else {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(rest.len());
            if len == 0 {
                let what = if text[range.clone()].trim().is_empty() {
                    "empty key in override".to_string()
                } else {
                    format!("invalid key `{}` in override", text[range.clone()].trim())
                };
                return Err(bad(what, range.clone()));
            }
            (rest[..len].to_string(), len)
        };
        out.push((seg, i..i + len));
        if out.len() > MAX_DEPTH {
            return Err(bad(format!("override key is nested more than {MAX_DEPTH} levels deep"), range));
        }
        i += len;
        while text[i..range.end].starts_with([' ', '\t']) {
            i += 1;
        }
        if i == range.end {
            return Ok(out);
        }
        if !text[i..range.end].starts_with('.') {
            return Err(bad(format!("invalid key `{}` in override", text[range.clone()].trim()), range));
        }
        i += 1;
    }
}

/// Where applying an override failed: the key prefix that is not a table, and what it is.
pub(crate) struct NotATable {
    /// Number of path segments up to and including the non-table value.
    pub depth: usize,
    pub found: &'static str,
}

/// Sets the value at the override's path, creating tables on the way.
pub(crate) fn apply(root: &mut Table, o: Override, file: FileId) -> Result<(), NotATable> {
    let Some(((last, last_range), parents)) = o.path.split_last() else {
        return Ok(());
    };
    let mut table = root;
    for (depth, (seg, range)) in parents.iter().enumerate() {
        let entry = table.0.entry(seg.clone()).or_insert_with(|| Entry {
            key: Span::new(file, range.clone()),
            node: Node { span: Span::new(file, range.clone()), value: Val::Table(Table::default()) },
        });
        let found = entry.node.value.type_name();
        table = match &mut entry.node.value {
            Val::Table(t) => t,
            _ => {
                return Err(NotATable { depth: depth + 1, found });
            }
        };
    }
    table.0.insert(last.clone(), Entry { key: Span::new(file, last_range.clone()), node: o.value });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &str) {
        let got = match parse(text, 0) {
            Ok(o) => {
                let keys: Vec<&str> = o.path.iter().map(|(s, _)| s.as_str()).collect();
                format!("{} = {}", keys.join("|"), o.value.to_toml())
            }
            Err(e) => format!("error: {} at {:?}", e.message, e.range),
        };
        assert_eq!(got, expected, "{text}");
    }

    #[test]
    fn parses() {
        check("stages.train.k=64", "stages|train|k = 64");
        check("a.b = 1e-3", "a|b = 0.001");
        check("a=\"x\"", "a = \"x\"");
        check("a=[1, 2]", "a = [1, 2]");
        check("a={x=1}", "a = { x = 1 }");
        check("a=/data/x", "a = \"/data/x\"");
        check("a=", "a = \"\"");
        check("a=b=c", "a = \"b=c\"");
        check("stages.\"a.b=c\".k=1", "stages|a.b=c|k = 1");
        check("stages.'x y'.k=true", "stages|x y|k = true");
        check("a.b", "error: invalid override `a.b`: expected `KEY=VALUE` at 0..3");
        check("=1", "error: empty key in override at 0..0");
        check("a..b=1", "error: invalid key `a..b` in override at 0..4");
        check("a b=1", "error: invalid key `a b` in override at 0..3");
        check("\"a=1", "error: invalid override `\"a=1`: expected `KEY=VALUE` at 0..4");
        check("a.\u{e9}=1", "error: invalid key `a.\u{e9}` in override at 0..4");
        check("x=99999999999999999999", "x = \"99999999999999999999\"");
    }
}
