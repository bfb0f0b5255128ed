//! Dataset files: local `jsonl` (one JSON object per line, as HF datasets exports them) read as
//! documents from a text column or a messages column, lazily, up to `max_docs`. The caller picks
//! the split by passing its file.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

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

/// The documents of a `jsonl` file, in file order, read lazily. Blank lines are skipped; a file
/// without any document yields one [`TextError::EmptyDataset`].
#[derive(Debug)]
pub struct JsonlDocs {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    column: Column,
    max_docs: Option<usize>,
    line: usize,
    yielded: usize,
    done: bool,
}

impl JsonlDocs {
    /// Opens `path`; at most `max_docs` documents are read (all when `None`).
    pub fn open(path: &Path, column: Column, max_docs: Option<usize>) -> Result<JsonlDocs, TextError> {
        let file = File::open(path).map_err(|source| TextError::Io { path: path.to_owned(), source })?;
        Ok(JsonlDocs {
            path: path.to_owned(),
            lines: BufReader::new(file).lines(),
            column,
            max_docs,
            line: 0,
            yielded: 0,
            done: false,
        })
    }

    fn record_error(&self, message: String) -> TextError {
        TextError::Record { path: self.path.clone(), line: self.line, message }
    }

    fn parse(&self, text: &str) -> Result<Doc, TextError> {
        let record: Json =
            serde_json::from_str(text).map_err(|e| self.record_error(format!("not valid JSON: {e}")))?;
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
        if self.done || self.max_docs.is_some_and(|max| self.yielded >= max) {
            return None;
        }
        loop {
            let Some(line) = self.lines.next() else {
                self.done = true;
                return (self.yielded == 0).then(|| Err(TextError::EmptyDataset { path: self.path.clone() }));
            };
            self.line += 1;
            let text = match line {
                Ok(text) => text,
                Err(e) => {
                    self.done = true;
                    return Some(Err(self.record_error(format!("cannot read: {e}"))));
                }
            };
            if text.trim().is_empty() {
                continue;
            }
            let doc = self.parse(&text);
            if doc.is_ok() {
                self.yielded += 1;
            } else {
                self.done = true;
            }
            return Some(doc);
        }
    }
}

/// The texts the tokenizer should encode: a text column as is, a messages column rendered
/// with the tokenizer's chat template the way the paper formats it
/// ([`TextTokenizer::render_chat`]). Fails up front when a messages column meets a tokenizer
/// without a chat template.
pub fn open_texts<'a>(
    path: &Path,
    column: Column,
    max_docs: Option<usize>,
    tokenizer: &'a TextTokenizer,
) -> Result<impl Iterator<Item = Result<String, TextError>> + 'a, TextError> {
    if let Column::Messages(name) = &column
        && tokenizer.chat_template().is_none()
    {
        return Err(TextError::NoChatTemplate {
            wanted_by: format!("the messages column `{name}` of {}", path.display()),
            tokenizer: tokenizer.dir().to_owned(),
        });
    }
    let docs = JsonlDocs::open(path, column, max_docs)?;
    let path = path.to_owned();
    Ok(docs.enumerate().map(move |(i, doc)| match doc? {
        Doc::Text(text) => Ok(text),
        Doc::Chat(messages) => tokenizer.render_chat(&messages).map_err(|e| match e {
            TextError::TemplateRender { origin, message } => TextError::TemplateRender {
                origin,
                message: format!("{message} (document {i} of {})", path.display()),
            },
            other => other,
        }),
    }))
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

#[cfg(test)]
mod tests {
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
        let got: Result<Vec<Doc>, TextError> = JsonlDocs::open(&path, column, max_docs).unwrap().collect();
        match (got, expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (Err(got), Err(want)) => {
                let got = got.to_string();
                assert!(got.contains(want), "{got:?} should contain {want:?}");
                assert!(got.contains("data.jsonl"), "{got:?} names the file");
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
        check(
            jsonl,
            messages("conversation"),
            None,
            Ok(&[Doc::Chat(vec![Message::new("user", "hi"), Message::new("assistant", "yo")])]),
        );
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
    fn empty_dataset() {
        check("", text("text"), None, Err("holds no documents"));
        check("\n  \n", text("text"), Some(10), Err("holds no documents"));
    }

    #[test]
    fn stops_at_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, "{\"text\": \"a\"}\nnot json\n{\"text\": \"c\"}\n").unwrap();
        let docs: Vec<_> = JsonlDocs::open(&path, text("text"), None).unwrap().collect();
        assert_eq!(docs.len(), 2);
        assert!(docs[1].is_err());
    }

    #[test]
    fn missing_file() {
        let err = JsonlDocs::open(Path::new("/nonexistent/x.jsonl"), text("text"), None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.jsonl"), "{err}");
    }

    #[test]
    fn chat_corpus_renders_like_the_paper() {
        let tok_dir = test_tokenizer_dir(&GEMMA2);
        let tok = TextTokenizer::from_dir(tok_dir.path()).unwrap();
        let texts: Vec<String> = open_texts(&data("chat.jsonl"), messages("messages"), Some(3), &tok)
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
    fn whole_corpora_read_and_encode() {
        let tok_dir = test_tokenizer_dir(&LLAMA3);
        let tok = TextTokenizer::from_dir(tok_dir.path()).unwrap();
        for (file, column) in [("web.jsonl", text("text")), ("chat.jsonl", messages("messages"))] {
            let texts: Vec<String> =
                open_texts(&data(file), column, None, &tok).unwrap().collect::<Result<_, _>>().unwrap();
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
        let err =
            open_texts(&data("chat.jsonl"), messages("messages"), None, &tok).err().unwrap().to_string();
        assert!(err.contains("chat.jsonl") && err.contains("messages") && err.contains("has none"), "{err}");
        let texts = open_texts(&data("web.jsonl"), text("text"), Some(1), &tok).unwrap();
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
        let err =
            open_texts(&path, messages("m"), None, &tok).unwrap().next().unwrap().unwrap_err().to_string();
        assert!(err.contains("System role not supported") && err.contains("document 0 of"), "{err}");
    }
}
