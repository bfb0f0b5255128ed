//! Latent tables as the explorer queries them: filtered, sorted and paged on the server, so a
//! 131,072-latent table costs the browser one page of rows.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use engine::Key;
use serde::Serialize;
use serde_json::{Value, json};
use stages::latents::{Column, LatentTable};

use crate::error::ApiError;

/// A parsed table and the distinct values of its `class` column (for the filter menu).
pub struct Loaded {
    pub table: LatentTable,
    pub classes: Vec<String>,
}

impl Loaded {
    pub fn new(table: LatentTable) -> Loaded {
        let classes = match table.get("class") {
            Some(Column::Str(v)) => {
                let distinct: std::collections::BTreeSet<&str> = v.iter().map(String::as_str).collect();
                distinct.into_iter().map(str::to_string).collect()
            }
            _ => Vec::new(),
        };
        Loaded { table, classes }
    }
}

/// Parsed tables, by object key (objects are immutable, so a key's table never changes).
#[derive(Default)]
pub struct Tables {
    loaded: Mutex<HashMap<Key, Arc<Loaded>>>,
}

/// Tables kept in memory at most (a paper-sized table is ~30 MB).
const KEEP: usize = 8;

impl Tables {
    pub fn get(&self, key: Key, path: &Path) -> Result<Arc<Loaded>, ApiError> {
        if let Some(t) = self.loaded.lock().expect("not poisoned").get(&key) {
            return Ok(t.clone());
        }
        let table = LatentTable::read_parquet(path).map_err(|e| ApiError::internal(e.to_string()))?;
        let table = Arc::new(Loaded::new(table));
        let mut loaded = self.loaded.lock().expect("not poisoned");
        if loaded.len() >= KEEP {
            loaded.clear();
        }
        loaded.insert(key, table.clone());
        Ok(table)
    }
}

/// A table query: `sort` (a column), `desc`, `class` (a value of the `class` column),
/// `min.<column>` / `max.<column>` bounds (NaN never passes a bound), `offset`, `limit`.
#[derive(Debug, Default, PartialEq)]
pub struct Query {
    pub sort: Option<String>,
    pub desc: bool,
    pub class: Option<String>,
    pub bounds: Vec<(String, Option<f64>, Option<f64>)>,
    pub offset: usize,
    pub limit: usize,
}

/// Rows per page at most.
pub const MAX_LIMIT: usize = 1000;

impl Query {
    /// Parses the query string's pairs; unknown parameters and bad numbers are 400s that name
    /// the parameter.
    pub fn parse(pairs: &HashMap<String, String>) -> Result<Query, ApiError> {
        let mut q = Query { limit: 100, ..Query::default() };
        let mut bounds: HashMap<String, (Option<f64>, Option<f64>)> = HashMap::new();
        for (k, v) in pairs {
            let number = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| !x.is_nan())
                    .ok_or_else(|| ApiError::bad_request(format!("`{k}` must be a number, not {v:?}")))
            };
            let count = || {
                v.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(format!("`{k}` must be a non-negative integer, not {v:?}"))
                })
            };
            match k.as_str() {
                "sort" if !v.is_empty() => q.sort = Some(v.clone()),
                "sort" => {}
                "desc" => q.desc = matches!(v.as_str(), "1" | "true"),
                "class" if !v.is_empty() => q.class = Some(v.clone()),
                "class" => {}
                "offset" => q.offset = count()?,
                "limit" => q.limit = count()?,
                _ => {
                    if let Some(col) = k.strip_prefix("min.") {
                        bounds.entry(col.to_string()).or_default().0 = Some(number()?);
                    } else if let Some(col) = k.strip_prefix("max.") {
                        bounds.entry(col.to_string()).or_default().1 = Some(number()?);
                    } else {
                        return Err(ApiError::bad_request(format!(
                            "unknown query parameter `{k}` (expected sort, desc, class, min.<column>, \
                             max.<column>, offset, limit)"
                        )));
                    }
                }
            }
        }
        if q.limit == 0 || q.limit > MAX_LIMIT {
            return Err(ApiError::bad_request(format!("`limit` must be 1 to {MAX_LIMIT}")));
        }
        let mut bounds: Vec<_> = bounds.into_iter().map(|(c, (lo, hi))| (c, lo, hi)).collect();
        bounds.sort_by(|a, b| a.0.cmp(&b.0));
        q.bounds = bounds;
        Ok(q)
    }
}

/// One page of a query's result.
#[derive(Debug, Serialize)]
pub struct Page {
    pub columns: Vec<String>,
    /// `f64`, `i64`, `bool` or `str`, per column.
    pub types: Vec<&'static str>,
    /// Rows that pass the filters.
    pub total: usize,
    /// Rows in the table.
    pub rows_in_table: usize,
    pub offset: usize,
    pub rows: Vec<Vec<Value>>,
    /// The values of the `class` column, for the filter menu.
    pub classes: Vec<String>,
}

fn numeric(c: &Column, i: usize) -> Option<f64> {
    match c {
        Column::F64(v) => Some(v[i]),
        Column::I64(v) => Some(v[i] as f64),
        Column::Bool(v) => Some(v[i] as u8 as f64),
        Column::Str(_) => None,
    }
}

/// A cell as JSON; NaN and infinities (a latent that never fired) are `null`.
pub fn cell(c: &Column, i: usize) -> Value {
    match c {
        Column::F64(v) if v[i].is_finite() => json!(v[i]),
        Column::F64(_) => Value::Null,
        Column::I64(v) => json!(v[i]),
        Column::Bool(v) => json!(v[i]),
        Column::Str(v) => json!(v[i]),
    }
}

fn type_name(c: &Column) -> &'static str {
    match c {
        Column::F64(_) => "f64",
        Column::I64(_) => "i64",
        Column::Bool(_) => "bool",
        Column::Str(_) => "str",
    }
}

fn column<'a>(t: &'a LatentTable, name: &str) -> Result<&'a Column, ApiError> {
    t.get(name).ok_or_else(|| {
        let names: Vec<&str> = t.columns.iter().map(|(n, _)| n.as_str()).collect();
        ApiError::bad_request(format!("no column `{name}` in the table (columns: {})", names.join(", ")))
    })
}

/// Runs `q` on `t`. Sorting is stable (ties keep latent order) and puts missing values last in
/// both directions.
pub fn query(loaded: &Loaded, q: &Query) -> Result<Page, ApiError> {
    let t = &loaded.table;
    let n = t.rows();
    let mut idx: Vec<usize> = (0..n).collect();
    if let Some(class) = &q.class {
        let Column::Str(classes) = column(t, "class")? else {
            return Err(ApiError::bad_request("the `class` column is not text"));
        };
        idx.retain(|&i| &classes[i] == class);
    }
    for (name, lo, hi) in &q.bounds {
        let c = column(t, name)?;
        if matches!(c, Column::Str(_)) {
            return Err(ApiError::bad_request(format!("`{name}` is a text column: it takes no bounds")));
        }
        idx.retain(|&i| {
            let x = numeric(c, i).unwrap_or(f64::NAN);
            !x.is_nan() && lo.is_none_or(|lo| x >= lo) && hi.is_none_or(|hi| x <= hi)
        });
    }
    if let Some(name) = &q.sort {
        let c = column(t, name)?;
        match c {
            Column::Str(v) => {
                idx.sort_by(|&a, &b| if q.desc { v[b].cmp(&v[a]) } else { v[a].cmp(&v[b]) });
            }
            _ => {
                let key = |i: usize| numeric(c, i).filter(|x| !x.is_nan());
                idx.sort_by(|&a, &b| match (key(a), key(b)) {
                    (Some(x), Some(y)) if q.desc => y.total_cmp(&x),
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                });
            }
        }
    }
    let total = idx.len();
    let rows = idx
        .iter()
        .skip(q.offset)
        .take(q.limit)
        .map(|&i| t.columns.iter().map(|(_, c)| cell(c, i)).collect())
        .collect();
    Ok(Page {
        columns: t.columns.iter().map(|(n, _)| n.clone()).collect(),
        types: t.columns.iter().map(|(_, c)| type_name(c)).collect(),
        total,
        rows_in_table: n,
        offset: q.offset,
        rows,
        classes: loaded.classes.clone(),
    })
}

/// A histogram of one numeric column: `bins` equal bins on [lo, hi] (the finite values' range
/// unless given), values outside counted apart, NaN as missing.
#[derive(Debug, Serialize, PartialEq)]
pub struct Histogram {
    pub column: String,
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<u64>,
    pub below: u64,
    pub above: u64,
    pub missing: u64,
}

pub fn histogram(
    t: &LatentTable,
    name: &str,
    bins: usize,
    lo: Option<f64>,
    hi: Option<f64>,
) -> Result<Histogram, ApiError> {
    let c = column(t, name)?;
    if matches!(c, Column::Str(_)) {
        return Err(ApiError::bad_request(format!("`{name}` is a text column: it has no histogram")));
    }
    let values: Vec<f64> = (0..t.rows()).map(|i| numeric(c, i).unwrap_or(f64::NAN)).collect();
    let finite = values.iter().copied().filter(|x| x.is_finite());
    let lo = lo.unwrap_or_else(|| finite.clone().fold(f64::INFINITY, f64::min));
    let hi = hi.unwrap_or_else(|| finite.fold(f64::NEG_INFINITY, f64::max));
    let (lo, hi) = if lo.is_finite() && hi.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    if hi < lo {
        return Err(ApiError::bad_request("`lo` must not exceed `hi`"));
    }
    let width = if hi > lo { (hi - lo) / bins as f64 } else { 1.0 };
    let mut h =
        Histogram { column: name.to_string(), lo, hi, counts: vec![0; bins], below: 0, above: 0, missing: 0 };
    for x in values {
        if !x.is_finite() {
            h.missing += 1;
        } else if x < lo {
            h.below += 1;
        } else if x > hi {
            h.above += 1;
        } else {
            h.counts[(((x - lo) / width) as usize).min(bins - 1)] += 1;
        }
    }
    Ok(h)
}

/// Row `j` as a JSON object (column → value); `None` when out of range.
pub fn row(t: &LatentTable, j: usize) -> Option<serde_json::Map<String, Value>> {
    (j < t.rows()).then(|| t.columns.iter().map(|(n, c)| (n.clone(), cell(c, j))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Loaded {
        let mut t = LatentTable::default();
        t.push("latent", Column::I64(vec![0, 1, 2, 3])).unwrap();
        t.push(
            "class",
            Column::Str(vec!["Shared".into(), "Chat only".into(), "Chat only".into(), "Shared".into()]),
        )
        .unwrap();
        t.push("nu", Column::F64(vec![0.5, f64::NAN, 0.1, 0.9])).unwrap();
        Loaded::new(t)
    }

    fn pairs(p: &[(&str, &str)]) -> HashMap<String, String> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn ids(page: &Page) -> Vec<i64> {
        page.rows.iter().map(|r| r[0].as_i64().unwrap()).collect()
    }

    #[test]
    fn sorts_with_missing_values_last_both_ways() {
        let t = table();
        let asc = query(&t, &Query::parse(&pairs(&[("sort", "nu")])).unwrap()).unwrap();
        assert_eq!(ids(&asc), [2, 0, 3, 1]);
        let desc = query(&t, &Query::parse(&pairs(&[("sort", "nu"), ("desc", "1")])).unwrap()).unwrap();
        assert_eq!(ids(&desc), [3, 0, 2, 1]);
        assert_eq!(asc.rows[3][2], Value::Null, "NaN is sent as null");
        assert_eq!(asc.classes, ["Chat only", "Shared"]);
    }

    #[test]
    fn filters_and_pages() {
        let t = table();
        let q = Query::parse(&pairs(&[("class", "Chat only"), ("min.nu", "0")])).unwrap();
        let page = query(&t, &q).unwrap();
        assert_eq!((ids(&page), page.total, page.rows_in_table), (vec![2], 1, 4));
        let q =
            Query::parse(&pairs(&[("sort", "latent"), ("desc", "true"), ("offset", "1"), ("limit", "2")]))
                .unwrap();
        let page = query(&t, &q).unwrap();
        assert_eq!((ids(&page), page.total), (vec![2, 1], 4));
    }

    #[test]
    fn histograms_bin_on_the_range_and_count_the_rest() {
        let t = table();
        let h = histogram(&t.table, "nu", 4, Some(0.0), Some(0.8)).unwrap();
        assert_eq!((h.counts, h.below, h.above, h.missing), (vec![1, 0, 1, 0], 0, 1, 1));
        let h = histogram(&t.table, "nu", 2, None, None).unwrap();
        assert_eq!((h.lo, h.hi, h.counts), (0.1, 0.9, vec![1, 2]));
        assert!(histogram(&t.table, "class", 2, None, None).is_err());
    }

    #[test]
    fn bad_queries_name_the_parameter() {
        let t = table();
        let msg = |p: &[(&str, &str)]| {
            Query::parse(&pairs(p)).and_then(|q| query(&t, &q)).err().map(|e| e.message).unwrap_or_default()
        };
        assert!(msg(&[("limit", "0")]).contains("`limit`"));
        assert!(msg(&[("limit", "5000")]).contains("`limit`"));
        assert!(msg(&[("min.nu", "abc")]).contains("`min.nu`"));
        assert!(msg(&[("sort", "nope")]).contains("no column `nope`"));
        assert!(msg(&[("max.class", "1")]).contains("text column"));
        assert!(msg(&[("bogus", "1")]).contains("unknown query parameter `bogus`"));
    }
}
