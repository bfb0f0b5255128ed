//! The spanned value tree: a TOML document in which every value and key remembers the source and
//! byte range it came from, so a value merged in from an extended file or a `--set` override
//! still points at the right place. Built from `toml`'s recoverable parser.

use std::collections::BTreeMap;

use toml::de::{DeTable, DeValue};
use toml::value::Datetime;

use super::error::{FileId, Span};

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub span: Span,
    pub value: Val,
}

#[derive(Clone, Debug)]
pub(crate) enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(Datetime),
    Array(Vec<Node>),
    Table(Table),
}

/// Keys in name order (as `toml::Table`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Table(pub BTreeMap<String, Entry>);

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub key: Span,
    pub node: Node,
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.0.get(key)
    }
}

impl Val {
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Bool(_) => "a boolean",
            Val::Datetime(_) => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

impl Node {
    pub fn as_table(&self) -> Option<&Table> {
        match &self.value {
            Val::Table(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn to_toml(&self) -> toml::Value {
        match &self.value {
            Val::Str(s) => toml::Value::String(s.clone()),
            Val::Int(i) => toml::Value::Integer(*i),
            Val::Float(x) => toml::Value::Float(*x),
            Val::Bool(b) => toml::Value::Boolean(*b),
            Val::Datetime(d) => toml::Value::Datetime(*d),
            Val::Array(a) => toml::Value::Array(a.iter().map(Node::to_toml).collect()),
            Val::Table(t) => toml::Value::Table(t.to_toml()),
        }
    }

    /// Follows `path` (keys, and array indices as decimal strings) as far as it exists. Returns
    /// the deepest node reached, the entry's key span when the last step was a table key, and
    /// whether the whole path was found.
    pub fn walk(&self, path: &[String]) -> (&Node, Option<&Span>, bool) {
        let mut node = self;
        let mut key = None;
        for seg in path {
            let next = match &node.value {
                Val::Table(t) => t.get(seg).map(|e| (&e.node, Some(&e.key))),
                Val::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)).map(|n| (n, None)),
                _ => None,
            };
            match next {
                Some((n, k)) => {
                    node = n;
                    key = k;
                }
                None => return (node, key, false),
            }
        }
        (node, key, true)
    }
}

impl Table {
    pub fn to_toml(&self) -> toml::Table {
        self.0.iter().map(|(k, e)| (k.clone(), e.node.to_toml())).collect()
    }

    /// Deep merge: `child`'s keys win; tables merge recursively; arrays and scalars replace.
    pub fn merge(&mut self, child: Table) {
        for (k, c) in child.0 {
            match self.0.get_mut(&k) {
                Some(b) => match (&mut b.node.value, c.node.value) {
                    (Val::Table(bt), Val::Table(ct)) => {
                        bt.merge(ct);
                        b.key = c.key;
                        b.node.span = c.node.span;
                    }
                    (_, value) => *b = Entry { key: c.key, node: Node { span: c.node.span, value } },
                },
                None => {
                    self.0.insert(k, c);
                }
            }
        }
    }
}

/// A value the parser accepted but that does not fit the engine's value model.
pub(crate) struct ValueError {
    pub span: Span,
    pub message: String,
}

/// Converts a parsed document; `offset` shifts every span (for values parsed out of a larger text).
pub(crate) fn from_de_table(
    table: &DeTable<'_>,
    file: FileId,
    offset: usize,
    errors: &mut Vec<ValueError>,
) -> Table {
    let mut out = BTreeMap::new();
    for (k, v) in table.iter() {
        let key = shifted(file, k.span(), offset);
        let node = from_de_value(v.get_ref(), shifted(file, v.span(), offset), file, offset, errors);
        out.insert(k.get_ref().to_string(), Entry { key, node });
    }
    Table(out)
}

pub(crate) fn from_de_value(
    value: &DeValue<'_>,
    span: Span,
    file: FileId,
    offset: usize,
    errors: &mut Vec<ValueError>,
) -> Node {
    let value = match value {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(i) => Val::Int(i),
            Err(_) => {
                errors.push(ValueError {
                    span: span.clone(),
                    message: format!("integer `{}` does not fit in 64 bits", i),
                });
                Val::Int(0)
            }
        },
        DeValue::Float(x) => match x.as_str().parse::<f64>() {
            Ok(f) => Val::Float(f),
            Err(_) => {
                errors.push(ValueError { span: span.clone(), message: format!("invalid float `{x}`") });
                Val::Float(0.0)
            }
        },
        DeValue::Boolean(b) => Val::Bool(*b),
        DeValue::Datetime(d) => Val::Datetime(*d),
        DeValue::Array(a) => Val::Array(
            a.iter()
                .map(|v| from_de_value(v.get_ref(), shifted(file, v.span(), offset), file, offset, errors))
                .collect(),
        ),
        DeValue::Table(t) => Val::Table(from_de_table(t, file, offset, errors)),
    };
    Node { span, value }
}

fn shifted(file: FileId, range: std::ops::Range<usize>, offset: usize) -> Span {
    Span::new(file, range.start.saturating_add(offset)..range.end.saturating_add(offset))
}
