//! Config errors: where they are (file, line, column, key path), what to do about them, and their
//! rustc-like rendering with the offending source underlined.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use annotate_snippets::{AnnotationKind, Group, Level, Origin, Renderer, Snippet};

/// Index of a source in [`Sources`]: the top file is 0, then the files it extends in chain order,
/// then one pseudo-file per `--set` override.
pub(crate) type FileId = usize;

/// A byte range in one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub file: FileId,
    pub range: Range<usize>,
}

impl Span {
    pub fn new(file: FileId, range: Range<usize>) -> Self {
        Self { file, range }
    }
}

/// A text the config was read from: a pipeline file or a `--set` override.
#[derive(Debug)]
pub(crate) struct Source {
    /// The path as the user gave it (or `--set`), for messages.
    pub display: PathBuf,
    /// The directory relative paths written in this source resolve against (absolute).
    pub dir: PathBuf,
    pub text: Arc<str>,
    /// Byte offset of each line's start, for line numbers without rescanning the text.
    line_starts: Vec<usize>,
}

impl Source {
    /// 1-based line and character column of a byte offset (already clamped).
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let col = self.text.get(start..offset).map_or(0, |s| s.chars().count());
        (line, col + 1)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Sources {
    pub list: Vec<Source>,
}

impl Sources {
    pub fn add(&mut self, display: PathBuf, dir: PathBuf, text: &str) -> FileId {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        self.list.push(Source { display, dir, text: Arc::from(text), line_starts });
        self.list.len() - 1
    }

    pub fn get(&self, file: FileId) -> Option<&Source> {
        self.list.get(file)
    }

    /// An error at `span`, labelled with `key_path`.
    pub fn error(&self, span: &Span, key_path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let Some(src) = self.get(span.file) else {
            return ConfigError::without_source(PathBuf::new(), message);
        };
        let range = clamp(&src.text, span.range.clone());
        let (line, col) = src.line_col(range.start);
        ConfigError {
            file: src.display.clone(),
            line,
            col,
            key_path: key_path.into(),
            message: message.into(),
            help: None,
            text: Some(src.text.clone()),
            range,
            order: (span.file, span.range.start),
        }
    }
}

/// One problem in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The file as the user named it, or `--set` for an override.
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    /// Dotted key path of the offending value (`stages.train.k`); empty when unknown.
    pub key_path: String,
    pub message: String,
    /// What to do about it, when there is more to say than the message.
    pub help: Option<String>,
    text: Option<Arc<str>>,
    range: Range<usize>,
    /// (file id, byte offset): errors sort by file, then position.
    order: (usize, usize),
}

impl ConfigError {
    /// An error about a file as a whole (e.g. it cannot be read): rendered without a snippet.
    pub(crate) fn without_source(file: PathBuf, message: impl Into<String>) -> Self {
        Self {
            file,
            line: 1,
            col: 1,
            key_path: String::new(),
            message: message.into(),
            help: None,
            text: None,
            range: 0..0,
            order: (0, 0),
        }
    }

    pub(crate) fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub(crate) fn with_help_opt(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }

    pub(crate) fn order(&self) -> (usize, usize) {
        self.order
    }

    /// `file:line:col`.
    pub fn location(&self) -> String {
        format!("{}:{}:{}", self.file.display(), self.line, self.col)
    }

    /// The rustc-like rendering: message, location, underlined source, key path, help.
    pub fn render(&self) -> String {
        self.render_with_note(None)
    }

    /// [`render`](Self::render) with a closing note (the other places of a repeated error).
    fn render_with_note(&self, note: Option<&str>) -> String {
        let path = self.file.to_string_lossy();
        let mut group = Group::with_title(Level::ERROR.primary_title(self.message.as_str()));
        match &self.text {
            Some(text) if !text.is_empty() => {
                // Only the lines the span touches: rendering stays cheap in huge files.
                let start = text[..self.range.start].rfind('\n').map_or(0, |i| i + 1);
                let end = text[self.range.end..].find('\n').map_or(text.len(), |i| self.range.end + i);
                let mut annotation =
                    AnnotationKind::Primary.span(self.range.start - start..self.range.end - start);
                if !self.key_path.is_empty() {
                    annotation = annotation.label(self.key_path.as_str());
                }
                group = group.element(
                    Snippet::source(&text[start..end])
                        .line_start(self.line)
                        .path(path.as_ref())
                        .annotation(annotation),
                );
            }
            _ => {
                group = group.element(Origin::path(path.as_ref()).line(self.line).char_column(self.col));
            }
        }
        if let Some(help) = &self.help {
            group = group.element(Level::HELP.message(help.as_str()));
        }
        if let Some(note) = note {
            group = group.element(Level::NOTE.message(note));
        }
        Renderer::plain().render(&[group])
    }
}

/// How many errors `Display` renders; a file that produces more is not worth reading further.
const MAX_SHOWN: usize = 100;

/// All the problems found in a pipeline file and the files it extends, sorted by file, then
/// position. `Display` renders every one of them and a summary line.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigErrors {
    file: PathBuf,
    errors: Vec<ConfigError>,
}

impl ConfigErrors {
    pub(crate) fn new(file: PathBuf, mut errors: Vec<ConfigError>) -> Self {
        errors.sort_by_key(ConfigError::order);
        errors.dedup();
        Self { file, errors }
    }

    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The top pipeline file, as the user named it.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Each distinct error (same message and help) once, in order of its first place, with a
    /// note naming its other places: a missing model that four stages use is one error, not four.
    fn render(&self) -> String {
        let mut groups: Vec<(&ConfigError, Vec<&ConfigError>)> = Vec::new();
        for e in &self.errors {
            match groups.iter_mut().find(|(first, _)| first.message == e.message && first.help == e.help) {
                Some((_, more)) => more.push(e),
                None => groups.push((e, Vec::new())),
            }
        }
        let mut out = String::new();
        for (first, more) in groups.iter().take(MAX_SHOWN) {
            let note = (!more.is_empty()).then(|| {
                let places: Vec<String> = more
                    .iter()
                    .map(|e| {
                        if e.key_path.is_empty() {
                            e.location()
                        } else {
                            format!("{} ({})", e.key_path, e.location())
                        }
                    })
                    .collect();
                format!("the same at {}", places.join(", "))
            });
            out.push_str(&first.render_with_note(note.as_deref()));
            out.push_str("\n\n");
        }
        let n = self.errors.len();
        out.push_str(&format!(
            "error: {n} error{} in {}",
            if n == 1 { "" } else { "s" },
            self.file.display()
        ));
        if groups.len() < n {
            out.push_str(&format!(" ({} distinct)", groups.len()));
        }
        if groups.len() > MAX_SHOWN {
            out.push_str(&format!(" (the first {MAX_SHOWN} are shown)"));
        }
        out
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// Keeps a range inside `text` and on character boundaries, so rendering can never panic.
fn clamp(text: &str, range: Range<usize>) -> Range<usize> {
    let floor = |mut i: usize| {
        i = i.min(text.len());
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let start = floor(range.start);
    let end = floor(range.end.max(range.start));
    start..end
}

/// `stages.train.k`; segments that are not bare TOML keys are quoted (`stages."a/b"`).
pub(crate) fn key_path<S: AsRef<str>>(segments: &[S]) -> String {
    let mut out = String::new();
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(&key_segment(s.as_ref()));
    }
    out
}

fn key_segment(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        s.to_string()
    } else {
        format!("{s:?}")
    }
}

/// "did you mean `x`?" for the candidate closest to `word`, if one is close enough.
pub(crate) fn did_you_mean<'a, I>(word: &str, candidates: I) -> Option<String>
where
    I: IntoIterator<Item = &'a str>,
{
    let limit = (word.chars().count() / 3).max(1);
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!("did you mean `{c}`?"))
}
