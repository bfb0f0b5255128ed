//! Dataset files, as Hugging Face datasets stores and exports them: JSON lines (`.jsonl`, `.json`)
//! and parquet (`.parquet`), one file or a dataset folder with splits, read lazily as documents
//! from a text column or a messages column, up to `max_docs`.
//!
//! A dataset path is a file or a folder. A file is read as is and ignores the split. A folder is
//! a Hugging Face dataset snapshot or a plain export: with a split, the split's files are the ones
//! Hugging Face names for it, at the top or under `data/` ([`dataset_files`]); without one, the
//! data files directly in the folder. Several files are read in sorted order as one stream.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use parquet::basic::{Compression, ConvertedType, LogicalType, Repetition, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::record::reader::{ReaderIter, TreeBuilder};
use parquet::schema::types::{SchemaDescPtr, SchemaDescriptor, Type};
use serde_json::Value as Json;

use crate::text::template::Message;
use crate::text::{TextError, TextTokenizer};

/// Which column holds the documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// A string per record (`text`, or the pre-rendered `text_llama3`).
    Text(String),
    /// A list of `{role, content}` objects per record, rendered with the chat template.
    Messages(String),
}

impl Column {
    pub fn name(&self) -> &str {
        match self {
            Column::Text(name) | Column::Messages(name) => name,
        }
    }
}

/// One record's document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doc {
    Text(String),
    Chat(Vec<Message>),
}

/// The file formats a dataset may come in, told apart by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `.jsonl` or `.json`: one JSON object per line, as `datasets` writes with `to_json`.
    JsonLines,
    /// `.parquet`: the Hub's storage format.
    Parquet,
}

impl Format {
    fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "jsonl" | "json" => Some(Format::JsonLines),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    fn require(path: &Path) -> Result<Format, TextError> {
        Format::of(path).ok_or_else(|| TextError::Format { path: path.to_owned() })
    }
}

/// The files a dataset path stands for, in the order they are read.
///
/// - A file is itself, whatever the split (a split only picks files inside a folder).
/// - A folder with a split `s` holds, at its top and under `data/`, the files named `s.*` or
///   `s-*.*` (`data/train-00000-of-00003.parquet`, `validation.jsonl`) and the files directly in
///   a folder `s/`. Hugging Face split names hold no `-`, so `-` ends the name.
/// - A folder without a split holds the data files directly in it (a plain export, one shard
///   folder), unless they belong to several splits.
///
/// Only `.jsonl`, `.json` and `.parquet` files count; hidden files are skipped and links are
/// followed (the Hub cache links snapshots to blobs). A folder with no file for the split is an
/// error that lists the splits it has.
pub fn dataset_files(path: &Path, split: Option<&str>) -> Result<Vec<PathBuf>, TextError> {
    let meta = std::fs::metadata(path).map_err(|source| TextError::Io { path: path.to_owned(), source })?;
    if !meta.is_dir() {
        Format::require(path)?;
        return Ok(vec![path.to_owned()]);
    }
    let split_error = |message: String| TextError::Split { path: path.to_owned(), message };
    let mut files = Vec::new();
    match split {
        Some(split) => {
            for root in search_roots(path)? {
                for entry in list_dir(&root)? {
                    let name = file_name(&entry);
                    if entry.is_dir() {
                        if name == split {
                            files.extend(list_dir(&entry)?.into_iter().filter(|f| is_data_file(f)));
                        }
                    } else if is_data_file(&entry) && split_of(&entry) == split {
                        files.push(entry);
                    }
                }
            }
            if files.is_empty() {
                return Err(split_error(format!(
                    "no .jsonl, .json or .parquet file for split `{split}` (looked for {split}.*, \
                     {split}-*.* and {split}/* at the top and under data/); {}",
                    found_splits(path)?
                )));
            }
        }
        None => {
            files = list_dir(path)?.into_iter().filter(|f| is_data_file(f)).collect();
            if files.is_empty() {
                return Err(split_error(format!(
                    "no .jsonl, .json or .parquet file directly in this folder; name a split ({})",
                    found_splits(path)?
                )));
            }
            let known: BTreeSet<&str> =
                files.iter().map(|f| split_of(f)).filter(|s| KNOWN_SPLITS.contains(s)).collect();
            if known.len() > 1 {
                let known: Vec<&str> = known.into_iter().collect();
                return Err(split_error(format!(
                    "holds the splits {}; name the one to read",
                    known.join(", ")
                )));
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The split names `datasets` recognises in file names, to refuse reading several at once.
const KNOWN_SPLITS: &[&str] =
    &["train", "training", "validation", "valid", "dev", "val", "test", "testing", "eval", "evaluation"];

/// The folder and its `data/` subfolder, where Hugging Face puts split files.
fn search_roots(path: &Path) -> Result<Vec<PathBuf>, TextError> {
    let data = path.join("data");
    Ok(if data.is_dir() { vec![path.to_owned(), data] } else { vec![path.to_owned()] })
}

/// The entries of a folder, hidden ones left out, sorted.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, TextError> {
    let io = |source| TextError::Io { path: dir.to_owned(), source };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if !file_name(&path).starts_with('.') {
            entries.push(path);
        }
    }
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn is_data_file(path: &Path) -> bool {
    Format::of(path).is_some() && path.is_file()
}

/// The split a data file's name puts it in: its stem up to the first `-`.
fn split_of(path: &Path) -> &str {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    stem.split('-').next().unwrap_or(stem)
}

/// "found splits: test, train" for a folder, from its split files and split folders.
fn found_splits(path: &Path) -> Result<String, TextError> {
    let mut splits = BTreeSet::new();
    for root in search_roots(path)? {
        for entry in list_dir(&root)? {
            if entry.is_dir() {
                if entry != path.join("data") && list_dir(&entry)?.iter().any(|f| is_data_file(f)) {
                    splits.insert(file_name(&entry).to_owned());
                }
            } else if is_data_file(&entry) {
                splits.insert(split_of(&entry).to_owned());
            }
        }
    }
    Ok(if splits.is_empty() {
        "found no data files at all".to_owned()
    } else {
        format!("found splits: {}", splits.into_iter().collect::<Vec<_>>().join(", "))
    })
}

/// The documents of a dataset, file after file in [`dataset_files`] order, read lazily. The
/// first file is opened up front, the others when reached. A dataset without any document
/// yields one [`TextError::EmptyDataset`]; the stream ends after the first error.
#[derive(Debug)]
pub struct Docs {
    path: PathBuf,
    files: Vec<PathBuf>,
    column: Column,
    max_docs: Option<usize>,
    /// The reader of `files[opened - 1]`.
    current: Option<FileDocs>,
    opened: usize,
    yielded: usize,
    done: bool,
}

#[derive(Debug)]
enum FileDocs {
    JsonLines(JsonlDocs),
    Parquet(Box<ParquetDocs>),
}

impl FileDocs {
    fn open(path: &Path, column: &Column) -> Result<FileDocs, TextError> {
        Ok(match Format::require(path)? {
            Format::JsonLines => FileDocs::JsonLines(JsonlDocs::open(path, column.clone())?),
            Format::Parquet => FileDocs::Parquet(Box::new(ParquetDocs::open(path, column.clone())?)),
        })
    }

    fn next(&mut self) -> Option<Result<Doc, TextError>> {
        match self {
            FileDocs::JsonLines(docs) => docs.next(),
            FileDocs::Parquet(docs) => docs.next(),
        }
    }
}

impl Docs {
    /// Opens the dataset at `path` (a file, or a folder read for `split`, see
    /// [`dataset_files`]); at most `max_docs` documents are read (all when `None`).
    pub fn open(
        path: &Path,
        split: Option<&str>,
        column: Column,
        max_docs: Option<usize>,
    ) -> Result<Docs, TextError> {
        let files = dataset_files(path, split)?;
        let mut docs = Docs {
            path: path.to_owned(),
            files,
            column,
            max_docs,
            current: None,
            opened: 0,
            yielded: 0,
            done: false,
        };
        docs.open_next()?;
        Ok(docs)
    }

    /// The dataset path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every file of the dataset, in reading order (also the ones `max_docs` leaves unread).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Opens the next file; false when there is none.
    fn open_next(&mut self) -> Result<bool, TextError> {
        self.current = None;
        let Some(file) = self.files.get(self.opened) else { return Ok(false) };
        self.current = Some(FileDocs::open(file, &self.column)?);
        self.opened += 1;
        Ok(true)
    }
}

impl Iterator for Docs {
    type Item = Result<Doc, TextError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.max_docs.is_some_and(|max| self.yielded >= max) {
            return None;
        }
        loop {
            let doc = match self.current.as_mut().and_then(FileDocs::next) {
                Some(doc) => doc,
                None => match self.open_next() {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.done = true;
                        return (self.yielded == 0)
                            .then(|| Err(TextError::EmptyDataset { path: self.path.clone() }));
                    }
                    Err(e) => Err(e),
                },
            };
            if doc.is_ok() {
                self.yielded += 1;
            } else {
                self.done = true;
            }
            return Some(doc);
        }
    }
}

/// The documents of a JSON lines file, in file order. Blank lines are skipped.
#[derive(Debug)]
struct JsonlDocs {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    column: Column,
    line: usize,
}

impl JsonlDocs {
    fn open(path: &Path, column: Column) -> Result<JsonlDocs, TextError> {
        let file = File::open(path).map_err(|source| TextError::Io { path: path.to_owned(), source })?;
        Ok(JsonlDocs { path: path.to_owned(), lines: BufReader::new(file).lines(), column, line: 0 })
    }

    fn record_error(&self, message: String) -> TextError {
        TextError::Record { path: self.path.clone(), line: self.line, message }
    }

    fn parse(&self, text: &str) -> Result<Doc, TextError> {
        let record: Json = serde_json::from_str(text).map_err(|e| {
            // `datasets` also writes whole-file JSON arrays as `.json`; say why those fail.
            let hint = if self.path.extension().is_some_and(|e| e == "json") {
                " (a .json file is read as JSON lines: one object per line)"
            } else {
                ""
            };
            self.record_error(format!("not valid JSON: {e}{hint}"))
        })?;
        let Json::Object(fields) = record else {
            return Err(self.record_error(format!("expected a JSON object, got {}", kind(&record))));
        };
        let name = self.column.name();
        let value = fields.get(name).ok_or_else(|| {
            let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
            names.sort_unstable();
            self.record_error(format!("no column `{name}` (this record has: {})", names.join(", ")))
        })?;
        match &self.column {
            Column::Text(_) => match value {
                Json::String(s) => Ok(Doc::Text(s.clone())),
                other => Err(self.record_error(format!(
                    "column `{name}` should be a string (a text column), got {}",
                    kind(other)
                ))),
            },
            Column::Messages(_) => {
                let Json::Array(turns) = value else {
                    return Err(self.record_error(format!(
                        "column `{name}` should be a list of {{role, content}} messages, got {}",
                        kind(value)
                    )));
                };
                turns
                    .iter()
                    .enumerate()
                    .map(|(i, turn)| self.message(name, i, turn))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Doc::Chat)
            }
        }
    }

    fn message(&self, column: &str, index: usize, turn: &Json) -> Result<Message, TextError> {
        let field = |key: &str| match turn.get(key) {
            Some(Json::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.record_error(format!(
                "message {index} of column `{column}`: `{key}` should be a string, got {}",
                kind(other)
            ))),
            None => Err(self.record_error(format!(
                "message {index} of column `{column}` has no `{key}` (expected {{role, content}})"
            ))),
        };
        if !turn.is_object() {
            return Err(self.record_error(format!(
                "message {index} of column `{column}` should be a {{role, content}} object, got {}",
                kind(turn)
            )));
        }
        Ok(Message { role: field("role")?, content: field("content")? })
    }
}

impl Iterator for JsonlDocs {
    type Item = Result<Doc, TextError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = self.lines.next()?;
            self.line += 1;
            let text = match line {
                Ok(text) => text,
                Err(e) => return Some(Err(self.record_error(format!("cannot read: {e}")))),
            };
            if !text.trim().is_empty() {
                return Some(self.parse(&text));
            }
        }
    }
}

fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// The documents of a parquet file, in file order, read one row group at a time through the
/// record API, and only the one column. A zero-byte file holds no rows.
struct ParquetDocs {
    path: PathBuf,
    /// The file and its schema cut down to the document column; `None` for a zero-byte file.
    reader: Option<(SerializedFileReader<File>, SchemaDescPtr)>,
    column: Column,
    row_group: usize,
    rows: Option<ReaderIter>,
    /// Index of the next row in the file, from 0 (as `dataset[i]` counts).
    row: usize,
}

impl std::fmt::Debug for ParquetDocs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetDocs")
            .field("path", &self.path)
            .field("column", &self.column)
            .field("row_group", &self.row_group)
            .field("row", &self.row)
            .finish_non_exhaustive()
    }
}

/// The codecs this build decompresses: what pyarrow and `datasets` write. zstd (polars'
/// default) would bring C code into the build.
const REWRITE: &str = "rewrite it with pyarrow, whose default is snappy: python -c \"import \
                       pyarrow.parquet as pq; pq.write_table(pq.read_table('IN'), 'OUT')\"";

impl ParquetDocs {
    fn open(path: &Path, column: Column) -> Result<ParquetDocs, TextError> {
        let file = File::open(path).map_err(|source| TextError::Io { path: path.to_owned(), source })?;
        let len = file.metadata().map_err(|source| TextError::Io { path: path.to_owned(), source })?.len();
        let parquet_error = |e: parquet::errors::ParquetError| TextError::Parquet {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let schema_error = |message: String| TextError::Schema { path: path.to_owned(), message };
        let mut docs =
            ParquetDocs { path: path.to_owned(), reader: None, column, row_group: 0, rows: None, row: 0 };
        if len == 0 {
            return Ok(docs);
        }
        let reader = SerializedFileReader::new(file).map_err(parquet_error)?;
        let metadata = reader.metadata();
        let schema = metadata.file_metadata().schema();
        let name = docs.column.name();
        let field = schema.get_fields().iter().find(|f| f.name() == name).ok_or_else(|| {
            let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            schema_error(format!("no column `{name}` (this file has: {})", names.join(", ")))
        })?;
        let wrong_type = match &docs.column {
            Column::Text(_) => (field.is_group() || field.get_physical_type() != PhysicalType::BYTE_ARRAY)
                .then(|| {
                    format!("column `{name}` should be a string (a text column), got {}", describe(field))
                }),
            Column::Messages(_) => (!field.is_group()).then(|| {
                format!(
                    "column `{name}` should be a list of {{role, content}} messages, got {}",
                    describe(field)
                )
            }),
        };
        if let Some(message) = wrong_type {
            return Err(schema_error(message));
        }
        for row_group in metadata.row_groups() {
            for chunk in row_group.columns() {
                let codec = chunk.compression();
                if chunk.column_path().parts().first().is_some_and(|p| p == name)
                    && !matches!(codec, Compression::UNCOMPRESSED | Compression::SNAPPY)
                {
                    return Err(schema_error(format!(
                        "column `{name}` is compressed with {}, and only snappy or uncompressed \
                         parquet is read; {REWRITE}",
                        codec_name(codec)
                    )));
                }
            }
        }
        let projection = Type::group_type_builder(schema.name())
            .with_fields(vec![field.clone()])
            .build()
            .map_err(parquet_error)?;
        let projection = SchemaDescriptor::new(std::sync::Arc::new(projection));
        docs.reader = Some((reader, projection.into()));
        Ok(docs)
    }

    fn row_error(&self, message: String) -> TextError {
        TextError::Row { path: self.path.clone(), row: self.row, message }
    }

    /// The next row's document column, reading the next row group when this one is done.
    fn next_value(&mut self) -> Option<Result<Field, TextError>> {
        loop {
            if let Some(row) = self.rows.as_mut().and_then(Iterator::next) {
                return Some(match row {
                    Ok(row) => Ok(row.into_columns().pop().map_or(Field::Null, |(_, value)| value)),
                    Err(e) => Err(self.row_error(format!("cannot read: {e}"))),
                });
            }
            let (reader, projection) = self.reader.as_ref()?;
            if self.row_group >= reader.num_row_groups() {
                return None;
            }
            let rows = reader
                .get_row_group(self.row_group)
                .and_then(|group| TreeBuilder::new().as_iter(projection.clone(), &*group));
            self.row_group += 1;
            match rows {
                Ok(rows) => self.rows = Some(rows),
                Err(e) => {
                    return Some(Err(TextError::Parquet {
                        path: self.path.clone(),
                        message: format!("row group {}: {e}", self.row_group - 1),
                    }));
                }
            }
        }
    }

    fn parse(&self, value: Field) -> Result<Doc, TextError> {
        let name = self.column.name();
        match &self.column {
            Column::Text(_) => string(value).map(Doc::Text).map_err(|got| {
                self.row_error(format!("column `{name}` should be a string (a text column), got {got}"))
            }),
            Column::Messages(_) => {
                let Field::ListInternal(turns) = value else {
                    return Err(self.row_error(format!(
                        "column `{name}` should be a list of {{role, content}} messages, got {}",
                        field_kind(&value)
                    )));
                };
                turns
                    .elements()
                    .iter()
                    .enumerate()
                    .map(|(i, turn)| self.message(name, i, turn))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Doc::Chat)
            }
        }
    }

    fn message(&self, column: &str, index: usize, turn: &Field) -> Result<Message, TextError> {
        let Field::Group(turn) = turn else {
            return Err(self.row_error(format!(
                "message {index} of column `{column}` should be a {{role, content}} struct, got {}",
                field_kind(turn)
            )));
        };
        let field = |key: &str| {
            let (_, value) = turn.get_column_iter().find(|(name, _)| *name == key).ok_or_else(|| {
                self.row_error(format!(
                    "message {index} of column `{column}` has no `{key}` (expected {{role, content}})"
                ))
            })?;
            string(value.clone()).map_err(|got| {
                self.row_error(format!(
                    "message {index} of column `{column}`: `{key}` should be a string, got {got}"
                ))
            })
        };
        Ok(Message { role: field("role")?, content: field("content")? })
    }
}

impl Iterator for ParquetDocs {
    type Item = Result<Doc, TextError>;

    fn next(&mut self) -> Option<Self::Item> {
        let doc = self.next_value()?.and_then(|value| self.parse(value));
        self.row += 1;
        Some(doc)
    }
}

/// A parquet value as a string: UTF-8 strings, and binary that is UTF-8 (writers that leave
/// strings unannotated); otherwise what it is instead.
fn string(value: Field) -> Result<String, &'static str> {
    match value {
        Field::Str(s) => Ok(s),
        Field::Bytes(bytes) => String::from_utf8(bytes.data().to_vec()).map_err(|_| "binary (not UTF-8)"),
        other => Err(field_kind(&other)),
    }
}

fn field_kind(value: &Field) -> &'static str {
    match value {
        Field::Null => "null",
        Field::Bool(_) => "a boolean",
        Field::Byte(_)
        | Field::Short(_)
        | Field::Int(_)
        | Field::Long(_)
        | Field::UByte(_)
        | Field::UShort(_)
        | Field::UInt(_)
        | Field::ULong(_) => "an integer",
        Field::Float16(_) | Field::Float(_) | Field::Double(_) | Field::Decimal(_) => "a number",
        Field::Str(_) => "a string",
        Field::Bytes(_) => "binary",
        Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => "a date or time",
        Field::Group(_) => "a struct",
        Field::ListInternal(_) => "a list",
        Field::MapInternal(_) => "a map",
    }
}

/// A schema field's type in the words of the error messages.
fn describe(field: &Type) -> String {
    let info = field.get_basic_info();
    if info.has_repetition() && info.repetition() == Repetition::REPEATED {
        return "a list".to_owned();
    }
    if field.is_group() {
        return match (info.logical_type_ref(), info.converted_type()) {
            (Some(LogicalType::List), _) | (_, ConvertedType::LIST) => "a list",
            (Some(LogicalType::Map), _) | (_, ConvertedType::MAP | ConvertedType::MAP_KEY_VALUE) => "a map",
            _ => "a struct",
        }
        .to_owned();
    }
    let stringy = matches!(info.logical_type_ref(), Some(LogicalType::String | LogicalType::Json))
        || info.converted_type() == ConvertedType::UTF8;
    match field.get_physical_type() {
        PhysicalType::BYTE_ARRAY if stringy => "a string".to_owned(),
        PhysicalType::BYTE_ARRAY => "binary".to_owned(),
        PhysicalType::BOOLEAN => "a boolean".to_owned(),
        PhysicalType::FIXED_LEN_BYTE_ARRAY => "fixed-size binary".to_owned(),
        other => other.to_string().to_lowercase(),
    }
}

fn codec_name(codec: Compression) -> &'static str {
    match codec {
        Compression::UNCOMPRESSED => "no compression",
        Compression::SNAPPY => "snappy",
        Compression::GZIP(_) => "gzip",
        Compression::LZO => "lzo",
        Compression::BROTLI(_) => "brotli",
        Compression::LZ4 | Compression::LZ4_RAW => "lz4",
        Compression::ZSTD(_) => "zstd",
    }
}

/// The texts the tokenizer should encode, in dataset order, as [`open_texts`] reads them.
pub struct Texts<'a> {
    docs: Docs,
    tokenizer: &'a TextTokenizer,
    index: usize,
}

impl std::fmt::Debug for Texts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Texts").field("docs", &self.docs).field("index", &self.index).finish_non_exhaustive()
    }
}

impl Texts<'_> {
    /// Every file of the dataset, in reading order, for a manifest.
    pub fn files(&self) -> &[PathBuf] {
        self.docs.files()
    }
}

impl Iterator for Texts<'_> {
    type Item = Result<String, TextError>;

    fn next(&mut self) -> Option<Self::Item> {
        let doc = self.docs.next()?;
        let index = self.index;
        self.index += 1;
        Some(doc.and_then(|doc| match doc {
            Doc::Text(text) => Ok(text),
            Doc::Chat(messages) => self.tokenizer.render_chat(&messages).map_err(|e| match e {
                TextError::TemplateRender { origin, message } => TextError::TemplateRender {
                    origin,
                    message: format!("{message} (document {index} of {})", self.docs.path().display()),
                },
                other => other,
            }),
        }))
    }
}

/// The texts of the dataset at `path` (a file, or a folder read for `split`; see
/// [`dataset_files`]) the tokenizer should encode: a text column as is, a messages column
/// rendered with the tokenizer's chat template the way the paper formats it
/// ([`TextTokenizer::render_chat`]). At most `max_docs` documents are read. Fails up front when a
/// messages column meets a tokenizer without a chat template, or when the first file cannot be
/// opened or lacks the column.
pub fn open_texts<'a>(
    path: &Path,
    split: Option<&str>,
    column: Column,
    max_docs: Option<usize>,
    tokenizer: &'a TextTokenizer,
) -> Result<Texts<'a>, TextError> {
    if let Column::Messages(name) = &column
        && tokenizer.chat_template().is_none()
    {
        return Err(TextError::NoChatTemplate {
            wanted_by: format!("the messages column `{name}` of {}", path.display()),
            tokenizer: tokenizer.dir().to_owned(),
        });
    }
    let docs = Docs::open(path, split, column, max_docs)?;
    Ok(Texts { docs, tokenizer, index: 0 })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;
    use crate::text::DEFAULT_CONTEXT_LEN;
    use crate::text::tiny::{GEMMA2, LLAMA3, test_tokenizer_dir};

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
    }

    /// Reads `jsonl` as a file with `column`, expecting documents or an error containing a
    /// needle.
    fn check(jsonl: &str, column: Column, max_docs: Option<usize>, expected: Result<&[Doc], &str>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, jsonl).unwrap();
        check_docs(&path, column, max_docs, expected);
    }

    /// Reads the dataset file `path` with `column`, expecting documents or an error that
    /// contains a needle and names the file.
    fn check_docs(path: &Path, column: Column, max_docs: Option<usize>, expected: Result<&[Doc], &str>) {
        let got: Result<Vec<Doc>, TextError> =
            Docs::open(path, None, column, max_docs).and_then(|docs| docs.collect());
        match (got, expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (Err(got), Err(want)) => {
                let got = got.to_string();
                assert!(got.contains(want), "{got:?} should contain {want:?}");
                let name = path.file_name().unwrap().to_str().unwrap();
                assert!(got.contains(name), "{got:?} names the file");
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    fn text(name: &str) -> Column {
        Column::Text(name.into())
    }

    fn messages(name: &str) -> Column {
        Column::Messages(name.into())
    }

    fn t(s: &str) -> Doc {
        Doc::Text(s.into())
    }

    fn chat(turns: &[(&str, &str)]) -> Doc {
        Doc::Chat(turns.iter().map(|&(role, content)| Message::new(role, content)).collect())
    }

    #[test]
    fn text_column() {
        let jsonl = "{\"text\": \"a\", \"id\": 1}\n\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n";
        check(jsonl, text("text"), None, Ok(&[t("a"), t("b"), t("c")]));
        check(jsonl, text("text"), Some(2), Ok(&[t("a"), t("b")]));
        check(jsonl, text("text"), Some(0), Ok(&[]));
        check("{\"text_llama3\": \"x\"}", text("text_llama3"), None, Ok(&[t("x")]));
    }

    #[test]
    fn messages_column() {
        let jsonl = r#"{"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "turn": 2}]}"#;
        check(jsonl, messages("conversation"), None, Ok(&[chat(&[("user", "hi"), ("assistant", "yo")])]));
    }

    #[test]
    fn record_errors_name_line_and_problem() {
        check("{\"text\": \"a\"}\n{\"text\": ", text("text"), None, Err("data.jsonl:2: not valid JSON"));
        check("[1]", text("text"), None, Err(":1: expected a JSON object, got a list"));
        check(
            "{\"a\": 1, \"b\": 2}",
            text("text"),
            None,
            Err(":1: no column `text` (this record has: a, b)"),
        );
        check(
            "{\"text\": null}",
            text("text"),
            None,
            Err("column `text` should be a string (a text column), got null"),
        );
        check(
            "{\"text\": \"x\"}",
            messages("text"),
            None,
            Err("column `text` should be a list of {role, content} messages, got a string"),
        );
        check(
            "\n\n{\"m\": [{\"role\": \"user\"}]}",
            messages("m"),
            None,
            Err(":3: message 0 of column `m` has no `content`"),
        );
        check(
            "{\"m\": [{\"role\": \"user\", \"content\": 1}]}",
            messages("m"),
            None,
            Err("`content` should be a string, got a number"),
        );
        check(
            "{\"m\": [\"hi\"]}",
            messages("m"),
            None,
            Err("message 0 of column `m` should be a {role, content} object, got a string"),
        );
    }

    #[test]
    fn json_extension_reads_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.json");
        std::fs::write(&path, "{\"text\": \"a\"}\n").unwrap();
        check_docs(&path, text("text"), None, Ok(&[t("a")]));
        std::fs::write(&path, "[\n  {\"text\": \"a\"}\n]\n").unwrap();
        check_docs(&path, text("text"), None, Err("read as JSON lines"));
    }

    #[test]
    fn empty_dataset() {
        check("", text("text"), None, Err("holds no documents"));
        check("\n  \n", text("text"), Some(10), Err("holds no documents"));
    }

    #[test]
    fn stops_at_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, "{\"text\": \"a\"}\nnot json\n{\"text\": \"c\"}\n").unwrap();
        let docs: Vec<_> = Docs::open(&path, None, text("text"), None).unwrap().collect();
        assert_eq!(docs.len(), 2);
        assert!(docs[1].is_err());
    }

    #[test]
    fn missing_file() {
        for name in ["x.jsonl", "x.parquet"] {
            let path = Path::new("/nonexistent").join(name);
            let err = Docs::open(&path, None, text("text"), None).unwrap_err();
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        }
    }

    #[test]
    fn unsupported_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.csv");
        std::fs::write(&path, "text\na\n").unwrap();
        let err = Docs::open(&path, Some("train"), text("text"), None).unwrap_err().to_string();
        assert!(
            err.contains("train.csv") && err.contains(".jsonl or .json") && err.contains(".parquet"),
            "{err}"
        );
    }

    // Parquet, written here with the `parquet` crate; `pyarrow_fixture` reads what pyarrow writes.

    /// One leaf column's values of one row group, with the Dremel levels when the schema needs
    /// them.
    enum Leaf {
        Str(Vec<&'static str>, Option<Vec<i16>>, Option<Vec<i16>>),
        Int(Vec<i64>),
    }

    /// Writes a snappy parquet file of `schema` with one row group per entry of `row_groups`,
    /// each holding one [`Leaf`] per leaf column, in schema order.
    fn write_parquet(path: &Path, schema: &str, row_groups: Vec<Vec<Leaf>>) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let props = Arc::new(
            WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build(),
        );
        let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
        for leaves in row_groups {
            let mut group = writer.next_row_group().unwrap();
            for leaf in leaves {
                let mut column = group.next_column().unwrap().unwrap();
                match leaf {
                    Leaf::Str(values, def, rep) => {
                        let values: Vec<ByteArray> = values.into_iter().map(ByteArray::from).collect();
                        column
                            .typed::<ByteArrayType>()
                            .write_batch(&values, def.as_deref(), rep.as_deref())
                            .unwrap();
                    }
                    Leaf::Int(values) => {
                        column.typed::<Int64Type>().write_batch(&values, None, None).unwrap();
                    }
                }
                column.close().unwrap();
            }
            group.close().unwrap();
        }
        writer.close().unwrap();
    }

    const TEXT_SCHEMA: &str = "message schema { required int64 id; optional binary text (STRING); }";

    /// A row group of [`TEXT_SCHEMA`]; `None` is a null text.
    fn text_rows(texts: &[Option<&'static str>]) -> Vec<Leaf> {
        let def = texts.iter().map(|t| i16::from(t.is_some())).collect();
        let ids = (0..texts.len() as i64).collect();
        vec![Leaf::Int(ids), Leaf::Str(texts.iter().flatten().copied().collect(), Some(def), None)]
    }

    /// The layout pyarrow gives a `list<struct<role, content>>` column (optional all the way
    /// down), with `extra` as a third struct field.
    const CHAT_SCHEMA: &str = "message schema {
        optional group messages (LIST) {
            repeated group list {
                optional group element {
                    optional binary role (STRING);
                    optional binary content (STRING);
                    optional binary extra (STRING);
                }
            }
        }
    }";

    /// A row group of [`CHAT_SCHEMA`]: one conversation per row; a `None` content is a null.
    fn chat_rows(rows: &[&[(&'static str, Option<&'static str>)]]) -> Vec<Leaf> {
        let (mut def, mut rep) = (Vec::new(), Vec::new());
        let (mut roles, mut contents, mut content_def) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            if row.is_empty() {
                // An empty list: `messages` defined, `list` not.
                def.push(1);
                rep.push(0);
                content_def.push(1);
            }
            for (i, &(role, content)) in row.iter().enumerate() {
                def.push(4);
                rep.push(i16::from(i > 0));
                roles.push(role);
                contents.extend(content);
                content_def.push(if content.is_some() { 4 } else { 3 });
            }
        }
        let extra_def = def.iter().map(|&d| d.min(3)).collect();
        vec![
            Leaf::Str(roles, Some(def), Some(rep.clone())),
            Leaf::Str(contents, Some(content_def), Some(rep.clone())),
            Leaf::Str(Vec::new(), Some(extra_def), Some(rep)),
        ]
    }

    fn parquet_file(dir: &Path, name: &str, schema: &str, row_groups: Vec<Vec<Leaf>>) -> PathBuf {
        let path = dir.join(name);
        write_parquet(&path, schema, row_groups);
        path
    }

    #[test]
    fn parquet_text_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = parquet_file(
            dir.path(),
            "data.parquet",
            TEXT_SCHEMA,
            vec![text_rows(&[Some("a"), Some("b")]), text_rows(&[Some("c")]), text_rows(&[Some("d")])],
        );
        check_docs(&path, text("text"), None, Ok(&[t("a"), t("b"), t("c"), t("d")]));
        check_docs(&path, text("text"), Some(3), Ok(&[t("a"), t("b"), t("c")]));
        check_docs(&path, text("text"), Some(0), Ok(&[]));
    }

    #[test]
    fn parquet_messages_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = parquet_file(
            dir.path(),
            "data.parquet",
            CHAT_SCHEMA,
            vec![
                chat_rows(&[&[("user", Some("hi")), ("assistant", Some("yo"))], &[]]),
                chat_rows(&[&[("user", Some("días"))]]),
            ],
        );
        let want = [chat(&[("user", "hi"), ("assistant", "yo")]), chat(&[]), chat(&[("user", "días")])];
        check_docs(&path, messages("messages"), None, Ok(&want));
        check_docs(&path, messages("messages"), Some(1), Ok(&want[..1]));
    }

    #[test]
    fn parquet_errors_name_column_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let texts = parquet_file(
            dir.path(),
            "texts.parquet",
            TEXT_SCHEMA,
            vec![text_rows(&[Some("a")]), text_rows(&[Some("b"), None])],
        );
        check_docs(
            &texts,
            text("body"),
            None,
            Err("texts.parquet: no column `body` (this file has: id, text)"),
        );
        check_docs(
            &texts,
            text("id"),
            None,
            Err("column `id` should be a string (a text column), got int64"),
        );
        check_docs(
            &texts,
            messages("text"),
            None,
            Err("column `text` should be a list of {role, content} messages, got a string"),
        );
        check_docs(
            &texts,
            text("text"),
            None,
            Err("texts.parquet: row 2: column `text` should be a string (a text column), got null"),
        );
        let chats = parquet_file(
            dir.path(),
            "chats.parquet",
            CHAT_SCHEMA,
            vec![chat_rows(&[&[("user", Some("hi"))], &[("user", Some("a")), ("assistant", None)]])],
        );
        check_docs(&chats, text("messages"), None, Err("should be a string (a text column), got a list"));
        check_docs(
            &chats,
            messages("messages"),
            None,
            Err(
                "chats.parquet: row 1: message 1 of column `messages`: `content` should be a string, got null",
            ),
        );
        let structs = parquet_file(
            dir.path(),
            "structs.parquet",
            "message schema { required group m { required binary role (STRING); } }",
            vec![vec![Leaf::Str(vec!["user"], None, None)]],
        );
        check_docs(
            &structs,
            messages("m"),
            None,
            Err("row 0: column `m` should be a list of {role, content} messages, got a struct"),
        );
        let no_content = parquet_file(
            dir.path(),
            "no-content.parquet",
            "message schema { optional group m (LIST) { repeated group list {
                required group element { required binary role (STRING); } } } }",
            vec![vec![Leaf::Str(vec!["user"], Some(vec![2]), Some(vec![0]))]],
        );
        check_docs(
            &no_content,
            messages("m"),
            None,
            Err("row 0: message 0 of column `m` has no `content` (expected {role, content})"),
        );
    }

    #[test]
    fn parquet_empty() {
        let dir = tempfile::tempdir().unwrap();
        let no_rows = parquet_file(dir.path(), "no-rows.parquet", TEXT_SCHEMA, vec![]);
        check_docs(&no_rows, text("text"), None, Err("holds no documents"));
        let zero_bytes = dir.path().join("zero-bytes.parquet");
        std::fs::write(&zero_bytes, "").unwrap();
        check_docs(&zero_bytes, text("text"), None, Err("holds no documents"));
        let garbage = dir.path().join("garbage.parquet");
        std::fs::write(&garbage, "{\"text\": \"a\"}\n").unwrap();
        check_docs(&garbage, text("text"), None, Err("cannot read"));
    }

    /// The fixture pyarrow writes (scripts/make_parquet_fixture.py) holds chat.jsonl's
    /// conversations, in three row groups.
    #[test]
    fn pyarrow_fixture() {
        let fixture = data("chat-sample.parquet");
        let from_jsonl: Vec<Doc> = Docs::open(&data("chat.jsonl"), None, messages("messages"), None)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let from_parquet: Vec<Doc> =
            Docs::open(&fixture, None, messages("messages"), None).unwrap().map(Result::unwrap).collect();
        assert_eq!(from_parquet, from_jsonl);
        let texts: Vec<Doc> = from_jsonl
            .iter()
            .map(|doc| match doc {
                Doc::Chat(turns) => {
                    t(&turns.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n"))
                }
                Doc::Text(_) => unreachable!("a messages column reads as chats"),
            })
            .collect();
        check_docs(&fixture, text("text"), None, Ok(&texts));
        check_docs(&fixture, text("text"), Some(10), Ok(&texts[..10]));
        check_docs(&fixture, text("prompt"), None, Err("(this file has: id, messages, text)"));
    }

    // Folders.

    /// Lays out a dataset folder of empty files at `files` (relative paths) and asks it for
    /// `split`, expecting the files read (relative) or an error containing a needle.
    fn check_split(files: &[&str], split: Option<&str>, expected: Result<&[&str], &str>) {
        let dir = tempfile::tempdir().unwrap();
        for file in files {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        let got = dataset_files(dir.path(), split).map(|files| -> Vec<String> {
            files.iter().map(|f| f.strip_prefix(dir.path()).unwrap().to_str().unwrap().to_owned()).collect()
        });
        match (got, expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (Err(got), Err(want)) => {
                let got = got.to_string();
                assert!(got.contains(want), "{got:?} should contain {want:?}");
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn hub_snapshot_splits() {
        let hub = [
            "README.md",
            ".gitattributes",
            "data/train-00001-of-00002-5c2a.parquet",
            "data/train-00000-of-00002-9f1e.parquet",
            "data/test-00000-of-00001.parquet",
            "data/train_sft-00000-of-00001.parquet",
        ];
        check_split(
            &hub,
            Some("train"),
            Ok(&["data/train-00000-of-00002-9f1e.parquet", "data/train-00001-of-00002-5c2a.parquet"]),
        );
        check_split(&hub, Some("test"), Ok(&["data/test-00000-of-00001.parquet"]));
        check_split(&hub, Some("train_sft"), Ok(&["data/train_sft-00000-of-00001.parquet"]));
        check_split(
            &hub,
            Some("validation"),
            Err("no .jsonl, .json or .parquet file for split `validation`"),
        );
        check_split(&hub, Some("validation"), Err("found splits: test, train, train_sft"));
        check_split(&hub, None, Err("directly in this folder; name a split (found splits: test, train"));
    }

    #[test]
    fn export_folder_splits() {
        let export = [
            "train.jsonl",
            "validation-0.jsonl",
            "validation-1.json",
            "test/a.parquet",
            "test/b.jsonl",
            "test/x.md",
        ];
        check_split(&export, Some("train"), Ok(&["train.jsonl"]));
        check_split(&export, Some("validation"), Ok(&["validation-0.jsonl", "validation-1.json"]));
        check_split(&export, Some("test"), Ok(&["test/a.parquet", "test/b.jsonl"]));
        check_split(&export, Some("training"), Err("found splits: test, train, validation"));
        check_split(&export, None, Err("holds the splits train, validation; name the one to read"));
        check_split(
            &["data/train/0.jsonl", "data/train/1.jsonl"],
            Some("train"),
            Ok(&["data/train/0.jsonl", "data/train/1.jsonl"]),
        );
        check_split(
            &["000_00000.parquet", "001_00000.parquet", "README.md"],
            None,
            Ok(&["000_00000.parquet", "001_00000.parquet"]),
        );
        check_split(&["README.md", "train.csv"], Some("train"), Err("found no data files at all"));
        check_split(&[], None, Err("found no data files at all"));
    }

    #[test]
    fn file_path_ignores_split() {
        let files = dataset_files(&data("chat.jsonl"), Some("validation")).unwrap();
        assert_eq!(files, [data("chat.jsonl")]);
    }

    /// A split of several files reads as one stream: documents in file order, `max_docs`
    /// counted across files, emptiness judged on the whole split, `files` listing them all.
    #[test]
    fn split_reads_as_one_stream() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        parquet_file(
            &data_dir,
            "train-00000-of-00003.parquet",
            TEXT_SCHEMA,
            vec![text_rows(&[Some("a"), Some("b")])],
        );
        parquet_file(&data_dir, "train-00001-of-00003.parquet", TEXT_SCHEMA, vec![]);
        parquet_file(&data_dir, "train-00002-of-00003.parquet", TEXT_SCHEMA, vec![text_rows(&[Some("c")])]);
        std::fs::write(data_dir.join("test.jsonl"), "\n").unwrap();
        let read = |split, max_docs| -> Result<Vec<Doc>, TextError> {
            Docs::open(dir.path(), Some(split), text("text"), max_docs)?.collect()
        };
        assert_eq!(read("train", None).unwrap(), [t("a"), t("b"), t("c")]);
        assert_eq!(read("train", Some(2)).unwrap(), [t("a"), t("b")]);
        let docs = Docs::open(dir.path(), Some("train"), text("text"), Some(1)).unwrap();
        assert_eq!(docs.files().len(), 3);
        assert_eq!(docs.path(), dir.path());
        let err = read("test", None).unwrap_err();
        assert!(matches!(&err, TextError::EmptyDataset { path } if path == dir.path()), "{err}");
    }

    #[test]
    fn chat_corpus_renders_like_the_paper() {
        let tok_dir = test_tokenizer_dir(&GEMMA2);
        let tok = TextTokenizer::from_dir(tok_dir.path()).unwrap();
        let texts: Vec<String> = open_texts(&data("chat.jsonl"), None, messages("messages"), Some(3), &tok)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(texts.len(), 3);
        assert_eq!(
            texts[0],
            "<start_of_turn>user\nWhat is the capital of Australia?<end_of_turn>\n<start_of_turn>model\n\
             The capital of Australia is Canberra. Many people guess Sydney or Melbourne, but Canberra \
             was chosen as a compromise between the two and became the capital in 1913.<end_of_turn>\n"
        );
        let batch = tok.encode_batch(&texts).unwrap();
        let bos = tok.bos_id().unwrap();
        for doc in batch.docs() {
            assert_eq!(doc[0], bos);
            assert_eq!(doc[1], tok.token_id("<start_of_turn>").unwrap());
            assert_eq!(doc.iter().filter(|&&id| id == bos).count(), 1);
        }
    }

    #[test]
    fn parquet_and_jsonl_render_alike() {
        let tok_dir = test_tokenizer_dir(&GEMMA2);
        let tok = TextTokenizer::from_dir(tok_dir.path()).unwrap();
        let read = |file: &str| -> Vec<String> {
            let texts = open_texts(&data(file), Some("train"), messages("messages"), None, &tok).unwrap();
            assert_eq!(texts.files(), [data(file)]);
            texts.collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(read("chat-sample.parquet"), read("chat.jsonl"));
    }

    #[test]
    fn whole_corpora_read_and_encode() {
        let tok_dir = test_tokenizer_dir(&LLAMA3);
        let tok = TextTokenizer::from_dir(tok_dir.path()).unwrap();
        for (file, column) in [("web.jsonl", text("text")), ("chat.jsonl", messages("messages"))] {
            let texts: Vec<String> =
                open_texts(&data(file), None, column, None, &tok).unwrap().collect::<Result<_, _>>().unwrap();
            assert!(texts.len() >= 15, "{file}: {}", texts.len());
            let batch = tok.encode_batch(&texts).unwrap();
            assert_eq!(batch.num_docs(), texts.len());
            assert!(batch.lengths.iter().all(|&n| n > 1 && n <= DEFAULT_CONTEXT_LEN));
        }
    }

    #[test]
    fn messages_without_template_fail_up_front() {
        let tok_dir = test_tokenizer_dir(&LLAMA3);
        let config = tok_dir.path().join("tokenizer_config.json");
        std::fs::write(&config, r#"{"bos_token": "<|begin_of_text|>"}"#).unwrap();
        let tok = TextTokenizer::from_dir(tok_dir.path()).unwrap();
        let err = open_texts(&data("chat.jsonl"), None, messages("messages"), None, &tok)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chat.jsonl") && err.contains("messages") && err.contains("has none"), "{err}");
        let texts = open_texts(&data("web.jsonl"), None, text("text"), Some(1), &tok).unwrap();
        assert_eq!(texts.count(), 1);
    }

    #[test]
    fn render_errors_name_the_document() {
        let tok_dir = test_tokenizer_dir(&GEMMA2);
        let tok = TextTokenizer::from_dir(tok_dir.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sys.jsonl");
        std::fs::write(
            &path,
            r#"{"m": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}"#,
        )
        .unwrap();
        let err = open_texts(&path, None, messages("m"), None, &tok)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("System role not supported") && err.contains("document 0 of"), "{err}");
    }
}
