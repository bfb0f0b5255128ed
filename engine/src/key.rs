//! Stage keys: a canonical value tree ([`Canon`]), the stable hash that feeds it to blake3, and the
//! pre-image of a key ([`PreImage`]): format version, kind, stage version, canonical parameters,
//! upstream keys by role, content hashes of external inputs.
//!
//! Stage *names* and file paths are deliberately not part of a key: renaming a stage or moving a
//! dataset file reuses the output.

use std::collections::BTreeMap;
use std::fmt;

/// Version of what goes into a key and how it is hashed. Bump it whenever [`PreImage`], the
/// [`StableHash`] encoding or the canonicalisation rules change: every key changes with it.
pub const KEY_FORMAT_VERSION: u32 = 1;

/// A 32-byte blake3 key, shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key([u8; 32]);

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn hex(&self) -> String {
        self.to_string()
    }
    /// The first 12 hex digits, for tables and messages.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
    pub fn parse(hex: &str) -> Option<Self> {
        let h = blake3::Hash::from_hex(hex).ok()?;
        Some(Self(*h.as_bytes()))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

/// Feeds a value into a hasher so that distinct values never produce the same byte stream:
/// every variable-length field is length-prefixed and every variant is tagged.
pub trait StableHash {
    fn stable_hash(&self, h: &mut blake3::Hasher);
}

fn put_len(h: &mut blake3::Hasher, n: usize) {
    h.update(&(n as u64).to_le_bytes());
}

fn put_str(h: &mut blake3::Hasher, s: &str) {
    put_len(h, s.len());
    h.update(s.as_bytes());
}

/// A canonical value: maps are ordered, floats are normalised (`-0.0` is `0.0`; NaN and
/// infinities are refused), integers and floats are distinct.
#[derive(Clone, Debug, PartialEq)]
pub enum Canon {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Canon>),
    Map(BTreeMap<String, Canon>),
}

impl Canon {
    pub fn float(x: f64) -> Result<Self, String> {
        if !x.is_finite() {
            return Err(format!("{x} is not allowed: parameters must be finite numbers"));
        }
        Ok(Canon::Float(if x == 0.0 { 0.0 } else { x }))
    }

    /// Converts serialized parameters. Fails on NaN/infinite floats and integers beyond i64.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        use serde_json::Value as J;
        Ok(match v {
            J::Null => Canon::Null,
            J::Bool(b) => Canon::Bool(*b),
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Canon::Int(i)
                } else if n.is_u64() {
                    return Err(format!("integer {n} is too large (the limit is {})", i64::MAX));
                } else {
                    Canon::float(n.as_f64().unwrap_or(f64::NAN))?
                }
            }
            J::String(s) => Canon::Str(s.clone()),
            J::Array(a) => Canon::List(a.iter().map(Canon::from_json).collect::<Result<_, _>>()?),
            J::Object(o) => Canon::Map(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), Canon::from_json(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }

    /// JSON with sorted keys; floats always carry a `.` or exponent so they stay floats.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Canon::Null => J::Null,
            Canon::Bool(b) => J::Bool(*b),
            Canon::Int(i) => J::from(*i),
            Canon::Float(x) => serde_json::Number::from_f64(*x).map(J::Number).unwrap_or(J::Null),
            Canon::Str(s) => J::String(s.clone()),
            Canon::List(l) => J::Array(l.iter().map(Canon::to_json).collect()),
            Canon::Map(m) => J::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Canon> {
        match self {
            Canon::Map(m) => m.get(key),
            _ => None,
        }
    }

    /// A map without the top-level `keys` (anything else is returned as is).
    pub fn without(&self, keys: &[&str]) -> Canon {
        match self {
            Canon::Map(m) => Canon::Map(
                m.iter()
                    .filter(|(k, _)| !keys.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

impl fmt::Display for Canon {
    /// TOML-like rendering for messages: `64`, `0.001`, `"web"`, `[1, 2]`, `{a = 1}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Canon::Null => f.write_str("null"),
            Canon::Bool(b) => write!(f, "{b}"),
            Canon::Int(i) => write!(f, "{i}"),
            Canon::Float(x) => write!(f, "{x:?}"),
            Canon::Str(s) => write!(f, "{s:?}"),
            Canon::List(l) => {
                f.write_str("[")?;
                for (i, v) in l.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Canon::Map(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k} = {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

impl StableHash for Canon {
    fn stable_hash(&self, h: &mut blake3::Hasher) {
        match self {
            Canon::Null => {
                h.update(b"n");
            }
            Canon::Bool(b) => {
                h.update(if *b { b"t" } else { b"f" });
            }
            Canon::Int(i) => {
                h.update(b"i");
                h.update(&i.to_le_bytes());
            }
            Canon::Float(x) => {
                h.update(b"d");
                h.update(&x.to_bits().to_le_bytes());
            }
            Canon::Str(s) => {
                h.update(b"s");
                put_str(h, s);
            }
            Canon::List(l) => {
                h.update(b"l");
                put_len(h, l.len());
                for v in l {
                    v.stable_hash(h);
                }
            }
            Canon::Map(m) => {
                h.update(b"m");
                put_len(h, m.len());
                for (k, v) in m {
                    put_str(h, k);
                    v.stable_hash(h);
                }
            }
        }
    }
}

/// The blake3 content hash of an external file or folder.
pub type ContentHash = Key;

/// Everything a stage key is computed from. Its canonical JSON is kept beside each output so a
/// changed key can be explained field by field.
#[derive(Clone, Debug, PartialEq)]
pub struct PreImage {
    pub kind: String,
    pub version: u32,
    pub params: Canon,
    /// (input role, upstream keys in the written order), roles in the stage's declared order.
    pub inputs: Vec<(String, Vec<Key>)>,
    /// (path input role, content hashes in the written order), roles in declared order.
    pub external: Vec<(String, Vec<ContentHash>)>,
}

fn keyed_lists(list: &[(String, Vec<Key>)]) -> Canon {
    Canon::List(
        list.iter()
            .map(|(role, keys)| {
                Canon::List(vec![
                    Canon::Str(role.clone()),
                    Canon::List(keys.iter().map(|k| Canon::Str(k.hex())).collect()),
                ])
            })
            .collect(),
    )
}

fn parse_keyed_lists(c: Option<&Canon>) -> Option<Vec<(String, Vec<Key>)>> {
    let Some(Canon::List(items)) = c else { return None };
    items
        .iter()
        .map(|item| match item {
            Canon::List(pair) => match pair.as_slice() {
                [Canon::Str(role), Canon::List(keys)] => Some((
                    role.clone(),
                    keys.iter()
                        .map(|k| match k {
                            Canon::Str(s) => Key::parse(s),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()?,
                )),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl PreImage {
    /// The pre-image as one canonical tree; the key is the stable hash of exactly this tree.
    pub fn to_canon(&self) -> Canon {
        Canon::Map(BTreeMap::from([
            ("format".to_string(), Canon::Int(KEY_FORMAT_VERSION as i64)),
            ("kind".to_string(), Canon::Str(self.kind.clone())),
            ("version".to_string(), Canon::Int(self.version as i64)),
            ("params".to_string(), self.params.clone()),
            ("inputs".to_string(), keyed_lists(&self.inputs)),
            ("external".to_string(), keyed_lists(&self.external)),
        ]))
    }

    pub fn key(&self) -> Key {
        let mut h = blake3::Hasher::new();
        h.update(b"pipe-key\0");
        self.to_canon().stable_hash(&mut h);
        Key(*h.finalize().as_bytes())
    }

    pub fn to_json(&self) -> serde_json::Value {
        self.to_canon().to_json()
    }

    /// Reads a pre-image written by [`PreImage::to_json`]; `None` for another format version.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let c = Canon::from_json(v).ok()?;
        if c.get("format") != Some(&Canon::Int(KEY_FORMAT_VERSION as i64)) {
            return None;
        }
        let Some(Canon::Str(kind)) = c.get("kind") else { return None };
        let Some(Canon::Int(version)) = c.get("version") else { return None };
        Some(Self {
            kind: kind.clone(),
            version: u32::try_from(*version).ok()?,
            params: c.get("params")?.clone(),
            inputs: parse_keyed_lists(c.get("inputs"))?,
            external: parse_keyed_lists(c.get("external"))?,
        })
    }
}

/// One structural difference between two canonical values, by dotted path.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub path: String,
    pub old: Option<Canon>,
    pub new: Option<Canon>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.old, &self.new) {
            (Some(o), Some(n)) => write!(f, "{}: {o} -> {n}", self.path),
            (None, Some(n)) => write!(f, "{}: added {n}", self.path),
            (Some(o), None) => write!(f, "{}: removed (was {o})", self.path),
            (None, None) => write!(f, "{}", self.path),
        }
    }
}

/// The leaves where `old` and `new` differ; maps are compared key by key, everything else whole.
pub fn diff(old: &Canon, new: &Canon) -> Vec<Change> {
    let mut out = Vec::new();
    diff_into("", old, new, &mut out);
    out
}

fn diff_into(path: &str, old: &Canon, new: &Canon, out: &mut Vec<Change>) {
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match (old, new) {
        (Canon::Map(a), Canon::Map(b)) => {
            for (k, va) in a {
                match b.get(k) {
                    Some(vb) => diff_into(&join(k), va, vb, out),
                    None => out.push(Change { path: join(k), old: Some(va.clone()), new: None }),
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    out.push(Change { path: join(k), old: None, new: Some(vb.clone()) });
                }
            }
        }
        (a, b) if a != b => {
            out.push(Change { path: path.to_string(), old: Some(a.clone()), new: Some(b.clone()) })
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(params: serde_json::Value) -> PreImage {
        PreImage {
            kind: "train".into(),
            version: 1,
            params: Canon::from_json(&params).unwrap(),
            inputs: vec![("activations".into(), vec![Key([1; 32]), Key([2; 32])])],
            external: vec![("model".into(), vec![Key([3; 32])])],
        }
    }

    #[test]
    fn golden_key_is_pinned() {
        // An accidental change of the key format fails here; bump KEY_FORMAT_VERSION on purpose.
        let k = pre(serde_json::json!({"k": 100, "lr": 1e-4, "name": "x", "list": [1, 2.5]})).key();
        assert_eq!(k.hex(), "a145564eb7d9e4207277a194d78b883102a6fc6edbb859f4101451609fc985fd");
    }

    #[test]
    fn same_inputs_same_key() {
        let a = pre(serde_json::json!({"k": 100, "lr": 0.5}));
        let b = pre(serde_json::from_str(r#"{"lr": 0.5, "k": 100}"#).unwrap());
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = pre(serde_json::json!({"k": 100}));
        let mut variants = vec![];
        let mut v = base.clone();
        v.kind = "scale".into();
        variants.push(v);
        let mut v = base.clone();
        v.version = 2;
        variants.push(v);
        variants.push(pre(serde_json::json!({"k": 101})));
        variants.push(pre(serde_json::json!({"k": 100.0})));
        let mut v = base.clone();
        v.inputs[0].1.swap(0, 1);
        variants.push(v);
        let mut v = base.clone();
        v.inputs[0].0 = "other".into();
        variants.push(v);
        let mut v = base.clone();
        v.external[0].1[0] = Key([4; 32]);
        variants.push(v);
        let mut keys: Vec<Key> = variants.iter().map(PreImage::key).collect();
        keys.push(base.key());
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }

    #[test]
    fn floats_are_canonical() {
        assert_eq!(Canon::float(-0.0).unwrap(), Canon::Float(0.0));
        assert!(Canon::float(f64::NAN).is_err());
        assert!(Canon::float(f64::INFINITY).is_err());
    }

    #[test]
    fn length_prefix_separates_fields() {
        let a = Canon::List(vec![Canon::Str("ab".into()), Canon::Str("c".into())]);
        let b = Canon::List(vec![Canon::Str("a".into()), Canon::Str("bc".into())]);
        let h = |c: &Canon| {
            let mut h = blake3::Hasher::new();
            c.stable_hash(&mut h);
            h.finalize()
        };
        assert_ne!(h(&a), h(&b));
    }

    #[test]
    fn preimage_round_trips_through_json() {
        let p = pre(serde_json::json!({"k": 100, "lr": 1e-4}));
        let back = PreImage::from_json(&p.to_json()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.key(), p.key());
    }

    #[test]
    fn diff_names_paths() {
        let a = Canon::from_json(&serde_json::json!({"k": 1, "opt": {"lr": 0.1}})).unwrap();
        let b = Canon::from_json(&serde_json::json!({"k": 2, "opt": {"lr": 0.1, "b": true}})).unwrap();
        let d: Vec<String> = diff(&a, &b).iter().map(|c| c.to_string()).collect();
        assert_eq!(d, ["k: 1 -> 2", "opt.b: added true"]);
    }
}
