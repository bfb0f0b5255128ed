//! The latent table: one row per latent of a crosscoder, as parquet (and CSV) that pandas and
//! polars load directly. [`decoder_columns`] gives the columns every table starts with (DOMAIN.md
//! §5a): decoder norms per model, Δ_norm, the class, the decoder cosine similarity; stages add
//! theirs (activation statistics, betas) with [`LatentTable::push`].

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::{Compression, LogicalType, Repetition, Type as PhysicalType};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A column's values.
#[derive(Clone, Debug, PartialEq)]
pub enum Column {
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

impl Column {
    pub fn len(&self) -> usize {
        match self {
            Column::F64(v) => v.len(),
            Column::I64(v) => v.len(),
            Column::Bool(v) => v.len(),
            Column::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn csv(&self, i: usize) -> String {
        match self {
            Column::F64(v) if v[i].is_nan() => String::new(),
            Column::F64(v) => format!("{}", v[i]),
            Column::I64(v) => v[i].to_string(),
            Column::Bool(v) => v[i].to_string(),
            Column::Str(v) if v[i].contains([',', '"', '\n']) => format!("\"{}\"", v[i].replace('"', "\"\"")),
            Column::Str(v) => v[i].clone(),
        }
    }
}

/// Why a latent table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("column `{name}` has {got} rows, the table {want}")]
    Length { name: String, got: usize, want: usize },
}

/// Named columns of equal length, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatentTable {
    pub columns: Vec<(String, Column)>,
}

impl LatentTable {
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, |(_, c)| c.len())
    }

    /// Adds (or replaces) a column.
    pub fn push(&mut self, name: &str, column: Column) -> Result<(), TableError> {
        if !self.columns.is_empty() && column.len() != self.rows() {
            return Err(TableError::Length { name: name.into(), got: column.len(), want: self.rows() });
        }
        match self.columns.iter_mut().find(|(n, _)| n == name) {
            Some((_, c)) => *c = column,
            None => self.columns.push((name.into(), column)),
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Writes a snappy-compressed parquet file with one row group.
    pub fn write_parquet(&self, path: &Path) -> Result<(), TableError> {
        let err = |message: String| TableError::Write { path: path.to_owned(), message };
        let fields = self
            .columns
            .iter()
            .map(|(name, c)| {
                let (physical, logical) = match c {
                    Column::F64(_) => (PhysicalType::DOUBLE, None),
                    Column::I64(_) => (PhysicalType::INT64, None),
                    Column::Bool(_) => (PhysicalType::BOOLEAN, None),
                    Column::Str(_) => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
                };
                Type::primitive_type_builder(name, physical)
                    .with_repetition(Repetition::REQUIRED)
                    .with_logical_type(logical)
                    .build()
                    .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        let schema =
            Type::group_type_builder("schema").with_fields(fields).build().map_err(|e| err(e.to_string()))?;
        let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        let file = File::create(path).map_err(|e| err(e.to_string()))?;
        let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props))
            .map_err(|e| err(e.to_string()))?;
        let mut rg = writer.next_row_group().map_err(|e| err(e.to_string()))?;
        for (_, column) in &self.columns {
            let mut col = rg.next_column().map_err(|e| err(e.to_string()))?.expect("one writer per column");
            let written = match column {
                Column::F64(v) => col.typed::<DoubleType>().write_batch(v, None, None),
                Column::I64(v) => col.typed::<Int64Type>().write_batch(v, None, None),
                Column::Bool(v) => col.typed::<BoolType>().write_batch(v, None, None),
                Column::Str(v) => {
                    let bytes: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(s.as_str())).collect();
                    col.typed::<ByteArrayType>().write_batch(&bytes, None, None)
                }
            };
            written.map_err(|e| err(e.to_string()))?;
            col.close().map_err(|e| err(e.to_string()))?;
        }
        rg.close().map_err(|e| err(e.to_string()))?;
        writer.close().map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Reads a parquet latent table: the files this crate writes, and flat tables from pandas or
    /// polars (double, float, integer, boolean and string columns; a null reads as NaN, 0, false
    /// or ""). Other columns are skipped.
    pub fn read_parquet(path: &Path) -> Result<LatentTable, TableError> {
        use parquet::basic::Type as P;
        use parquet::column::reader::get_typed_column_reader;
        use parquet::data_type::{DataType, FloatType, Int32Type};
        use parquet::file::reader::{FileReader, SerializedFileReader};

        let err = |message: String| TableError::Read { path: path.to_owned(), message };
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        let reader = SerializedFileReader::new(file).map_err(|e| err(e.to_string()))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let mut table = LatentTable::default();
        let mut columns: Vec<(String, Column)> = Vec::new();
        let kept: Vec<(usize, P)> = (0..schema.num_columns())
            .filter_map(|i| {
                let c = schema.column(i);
                let keep = c.max_rep_level() == 0
                    && matches!(
                        c.physical_type(),
                        P::DOUBLE | P::FLOAT | P::INT64 | P::INT32 | P::BOOLEAN | P::BYTE_ARRAY
                    );
                keep.then(|| {
                    let empty = match c.physical_type() {
                        P::DOUBLE | P::FLOAT => Column::F64(Vec::new()),
                        P::INT64 | P::INT32 => Column::I64(Vec::new()),
                        P::BOOLEAN => Column::Bool(Vec::new()),
                        _ => Column::Str(Vec::new()),
                    };
                    columns.push((c.name().to_string(), empty));
                    (i, c.physical_type())
                })
            })
            .collect();
        // Reads one column chunk, filling nulls with `null`.
        fn chunk<T: DataType>(
            reader: parquet::column::reader::ColumnReader,
            rows: usize,
            max_def: i16,
            null: T::T,
        ) -> parquet::errors::Result<Vec<T::T>>
        where
            T::T: Clone,
        {
            let mut r = get_typed_column_reader::<T>(reader);
            let (mut values, mut defs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
            let mut read = 0;
            while read < rows {
                let (n, _, _) = r.read_records(rows - read, Some(&mut defs), None, &mut values)?;
                if n == 0 {
                    break;
                }
                read += n;
            }
            if max_def == 0 {
                return Ok(values);
            }
            let mut it = values.into_iter();
            Ok(defs
                .iter()
                .map(|d| if *d == max_def { it.next().unwrap_or(null.clone()) } else { null.clone() })
                .collect())
        }
        for g in 0..reader.num_row_groups() {
            let rg = reader.get_row_group(g).map_err(|e| err(e.to_string()))?;
            let rows = rg.metadata().num_rows() as usize;
            for (slot, (i, physical)) in kept.iter().enumerate() {
                let max_def = schema.column(*i).max_def_level();
                let cr = rg.get_column_reader(*i).map_err(|e| err(e.to_string()))?;
                let column_name = columns[slot].0.clone();
                let e = |e: parquet::errors::ParquetError| err(format!("column `{column_name}`: {e}"));
                match (&mut columns[slot].1, physical) {
                    (Column::F64(v), P::DOUBLE) => {
                        v.extend(chunk::<DoubleType>(cr, rows, max_def, f64::NAN).map_err(e)?)
                    }
                    (Column::F64(v), _) => v.extend(
                        chunk::<FloatType>(cr, rows, max_def, f32::NAN)
                            .map_err(e)?
                            .into_iter()
                            .map(f64::from),
                    ),
                    (Column::I64(v), P::INT64) => {
                        v.extend(chunk::<Int64Type>(cr, rows, max_def, 0).map_err(e)?)
                    }
                    (Column::I64(v), _) => v.extend(
                        chunk::<Int32Type>(cr, rows, max_def, 0).map_err(e)?.into_iter().map(i64::from),
                    ),
                    (Column::Bool(v), _) => v.extend(chunk::<BoolType>(cr, rows, max_def, false).map_err(e)?),
                    (Column::Str(v), _) => v.extend(
                        chunk::<ByteArrayType>(cr, rows, max_def, ByteArray::from(""))
                            .map_err(e)?
                            .into_iter()
                            .map(|b| String::from_utf8_lossy(b.data()).into_owned()),
                    ),
                }
            }
        }
        for (name, column) in columns {
            table.push(&name, column)?;
        }
        Ok(table)
    }

    /// A float column (integers converted; booleans as 0/1), or `None` when there is none.
    pub fn f64s(&self, name: &str) -> Option<Vec<f64>> {
        Some(match self.get(name)? {
            Column::F64(v) => v.clone(),
            Column::I64(v) => v.iter().map(|x| *x as f64).collect(),
            Column::Bool(v) => v.iter().map(|x| f64::from(u8::from(*x))).collect(),
            Column::Str(_) => return None,
        })
    }

    /// A boolean column, or `None` when there is none (or it is not boolean).
    pub fn bools(&self, name: &str) -> Option<&[bool]> {
        match self.get(name)? {
            Column::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// Writes CSV with a header row; NaN is written as an empty field.
    pub fn write_csv(&self, path: &Path) -> Result<(), TableError> {
        let err = |e: std::io::Error| TableError::Write { path: path.to_owned(), message: e.to_string() };
        let mut out = std::io::BufWriter::new(File::create(path).map_err(err)?);
        let header: Vec<&str> = self.columns.iter().map(|(n, _)| n.as_str()).collect();
        writeln!(out, "{}", header.join(",")).map_err(err)?;
        for i in 0..self.rows() {
            let row: Vec<String> = self.columns.iter().map(|(_, c)| c.csv(i)).collect();
            writeln!(out, "{}", row.join(",")).map_err(err)?;
        }
        out.flush().map_err(err)
    }
}

/// Class boundaries on Δ_norm (DOMAIN.md §5a; the paper's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ClassThresholds {
    /// Chat-only: Δ_norm ≥ this.
    pub chat_only: f64,
    /// Base-only: Δ_norm < this.
    pub base_only: f64,
    /// Shared: `shared_low` ≤ Δ_norm < `shared_high`.
    pub shared_low: f64,
    pub shared_high: f64,
}

impl Default for ClassThresholds {
    fn default() -> Self {
        ClassThresholds { chat_only: 0.9, base_only: 0.1, shared_low: 0.4, shared_high: 0.6 }
    }
}

/// A latent's class by its relative decoder norm difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    ChatOnly,
    BaseOnly,
    Shared,
    Other,
}

impl Class {
    pub fn of(delta_norm: f64, t: &ClassThresholds) -> Class {
        if delta_norm >= t.chat_only {
            Class::ChatOnly
        } else if delta_norm < t.base_only {
            Class::BaseOnly
        } else if delta_norm >= t.shared_low && delta_norm < t.shared_high {
            Class::Shared
        } else {
            Class::Other
        }
    }

    /// The class a table's `class` value names.
    pub fn from_name(name: &str) -> Option<Class> {
        [Class::ChatOnly, Class::BaseOnly, Class::Shared, Class::Other].into_iter().find(|c| c.name() == name)
    }

    /// The name used in the table (the original's `tag` values).
    pub fn name(self) -> &'static str {
        match self {
            Class::ChatOnly => "Chat only",
            Class::BaseOnly => "Base only",
            Class::Shared => "Shared",
            Class::Other => "Other",
        }
    }
}

/// Per-latent decoder geometry from `w_dec` (2, F, d) row-major.
pub struct DecoderStats {
    pub norm_base: Vec<f64>,
    pub norm_chat: Vec<f64>,
    /// Δ_norm = ½((n_chat − n_base) / max(n_base, n_chat) + 1): 1 = chat-only, 0 = base-only.
    pub delta_norm: Vec<f64>,
    pub cos_sim: Vec<f64>,
}

impl DecoderStats {
    pub fn new(w_dec: &[f32], f: usize, d: usize) -> DecoderStats {
        let row = |l: usize, j: usize| &w_dec[(l * f + j) * d..(l * f + j + 1) * d];
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let mut s = DecoderStats {
            norm_base: Vec::with_capacity(f),
            norm_chat: Vec::with_capacity(f),
            delta_norm: Vec::with_capacity(f),
            cos_sim: Vec::with_capacity(f),
        };
        for j in 0..f {
            let (b, c) = (row(0, j), row(1, j));
            let (nb, nc) = (norm(b), norm(c));
            let dot: f64 = b.iter().zip(c).map(|(x, y)| *x as f64 * *y as f64).sum();
            s.norm_base.push(nb);
            s.norm_chat.push(nc);
            s.delta_norm.push(0.5 * ((nc - nb) / nb.max(nc) + 1.0));
            s.cos_sim.push(dot / (nb * nc));
        }
        s
    }
}

/// The columns every latent table starts with: `latent`, `norm_base`, `norm_chat`, `delta_norm`,
/// `dec_norm_diff` (= 1 − Δ_norm, the original's column), `class`, `dec_cos_sim`.
pub fn decoder_columns(stats: &DecoderStats, thresholds: &ClassThresholds) -> LatentTable {
    let f = stats.delta_norm.len();
    let mut t = LatentTable::default();
    let push = |t: &mut LatentTable, n: &str, c: Column| t.push(n, c).expect("same length");
    push(&mut t, "latent", Column::I64((0..f as i64).collect()));
    push(&mut t, "norm_base", Column::F64(stats.norm_base.clone()));
    push(&mut t, "norm_chat", Column::F64(stats.norm_chat.clone()));
    push(&mut t, "delta_norm", Column::F64(stats.delta_norm.clone()));
    push(&mut t, "dec_norm_diff", Column::F64(stats.delta_norm.iter().map(|d| 1.0 - d).collect()));
    push(
        &mut t,
        "class",
        Column::Str(stats.delta_norm.iter().map(|d| Class::of(*d, thresholds).name().to_string()).collect()),
    );
    push(&mut t, "dec_cos_sim", Column::F64(stats.cos_sim.clone()));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    #[test]
    fn classes_follow_the_paper_thresholds() {
        let t = ClassThresholds::default();
        assert_eq!(Class::of(0.95, &t), Class::ChatOnly);
        assert_eq!(Class::of(0.9, &t), Class::ChatOnly);
        assert_eq!(Class::of(0.05, &t), Class::BaseOnly);
        assert_eq!(Class::of(0.1, &t), Class::Other);
        assert_eq!(Class::of(0.5, &t), Class::Shared);
        assert_eq!(Class::of(0.6, &t), Class::Other);
    }

    #[test]
    fn decoder_stats_and_round_trip_through_parquet_and_csv() {
        // F = 3, d = 2: chat-only, base-only, shared (equal norms, orthogonal).
        let w = [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, /* chat */ 3.0, 4.0, 0.0, 0.0, -1.0, 1.0];
        let s = DecoderStats::new(&w, 3, 2);
        assert_eq!(s.norm_chat[0], 5.0);
        assert_eq!(s.delta_norm[0], 1.0);
        assert_eq!(s.delta_norm[1], 0.0);
        assert_eq!(s.delta_norm[2], 0.5);
        assert!(s.cos_sim[2].abs() < 1e-12);
        let mut t = decoder_columns(&s, &ClassThresholds::default());
        t.push("beta", Column::F64(vec![0.5, f64::NAN, 1.0])).unwrap();
        t.push("dead", Column::Bool(vec![false, true, false])).unwrap();
        assert!(t.push("short", Column::I64(vec![1])).is_err());

        let dir = tempfile::tempdir().unwrap();
        let pq = dir.path().join("latents.parquet");
        t.write_parquet(&pq).unwrap();
        let reader = SerializedFileReader::new(File::open(&pq).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 3);
        let rows: Vec<String> = reader.get_row_iter(None).unwrap().map(|r| r.unwrap().to_string()).collect();
        assert!(rows[0].contains("class: \"Chat only\"") && rows[1].contains("dead: true"), "{rows:?}");
        let back = LatentTable::read_parquet(&pq).unwrap();
        assert_eq!(back.columns.len(), t.columns.len());
        for ((n, a), (m, b)) in t.columns.iter().zip(&back.columns) {
            assert_eq!(n, m);
            match (a, b) {
                // NaN != NaN: compare bit patterns.
                (Column::F64(x), Column::F64(y)) => {
                    assert!(x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()), "{n}")
                }
                _ => assert_eq!(a, b, "{n}"),
            }
        }
        assert_eq!(back.f64s("dead"), Some(vec![0.0, 1.0, 0.0]));
        assert!(back.bools("dead").is_some() && back.f64s("class").is_none());
        let missing = LatentTable::read_parquet(&dir.path().join("nope.parquet")).unwrap_err();
        assert!(missing.to_string().contains("nope.parquet"), "{missing}");

        let csv = dir.path().join("latents.csv");
        t.write_csv(&csv).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "latent,norm_base,norm_chat,delta_norm,dec_norm_diff,class,dec_cos_sim,beta,dead"
        );
        assert!(lines[2].starts_with("1,1,0,0,1,Base only,") && lines[2].contains(",,true"), "{}", lines[2]);
    }
}
