//! A model folder's tokenizer: `tokenizer.json` through the `tokenizers` crate, the special
//! tokens and chat template of `tokenizer_config.json` (or `chat_template.jinja`), batch encoding
//! truncated to the context length, and the paper's `ignore_first_n` and base-Llama token
//! replacement (DOMAIN.md §1).
//!
//! BOS is whatever the tokenizer's own post-processor adds with `add_special_tokens = true`
//! (Llama 3 and Gemma 2 add one, some models none); this module never adds it by hand.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::text::TextError;
use crate::text::template::{ChatTemplate, GenerationPrompt, Message, SpecialTokens, strip_leading_bos};

/// The paper's context length: `collect_activations.py` hard-codes 1024.
pub const DEFAULT_CONTEXT_LEN: usize = 1024;

/// A model's tokenizer with its special tokens, chat template and context length.
pub struct TextTokenizer {
    inner: Tokenizer,
    dir: PathBuf,
    tokens: SpecialTokens,
    chat_template: Option<ChatTemplate>,
    context_len: usize,
    truncation: TruncationDirection,
}

// By hand: the derived form would print the whole vocabulary.
impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("dir", &self.dir)
            .field("tokens", &self.tokens)
            .field("chat_template", &self.chat_template)
            .field("context_len", &self.context_len)
            .field("truncation", &self.truncation)
            .finish_non_exhaustive()
    }
}

/// Token ids of a batch of documents, concatenated, with each document's length: document `i`
/// is `ids[lengths[..i].sum()..][..lengths[i]]`. Nothing is padded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Each document's ids, in order.
    pub fn docs(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        let mut start = 0;
        self.lengths.iter().map(move |&len| {
            let doc = &self.ids[start..start + len];
            start += len;
            doc
        })
    }

    pub fn num_docs(&self) -> usize {
        self.lengths.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.ids.len()
    }

    /// The tokens the paper stores: each document without its first `n` positions (its
    /// `store_mask` zeroes columns `[:ignore_first_n]`). A document of `n` tokens or fewer keeps
    /// none, but stays in the batch with length 0, so document indices still line up.
    pub fn ignore_first_n(&self, n: usize) -> Batch {
        let mut out = Batch {
            ids: Vec::with_capacity(self.ids.len()),
            lengths: Vec::with_capacity(self.lengths.len()),
        };
        for doc in self.docs() {
            let kept = &doc[kept_range(doc.len(), n)];
            out.ids.extend_from_slice(kept);
            out.lengths.push(kept.len());
        }
        out
    }
}

/// The positions of a `len`-token document that are stored when the first `ignore_first_n` are
/// ignored: `min(ignore_first_n, len)..len`.
pub fn kept_range(len: usize, ignore_first_n: usize) -> Range<usize> {
    ignore_first_n.min(len)..len
}

/// A token id replacement applied to a model's input ids before its forward pass. The paper
/// feeds the *base* Llama models their chat-template tokens replaced by ordinary ones (the base
/// model never trained on them): [`TokenMap::llama3_base`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenMap {
    map: BTreeMap<u32, u32>,
}

impl TokenMap {
    /// The map SA:tools/configs.py sets for base Llama 3.x: `<|start_header_id|>` (128006) →
    /// 1432, `<|end_header_id|>` (128007) → 827, `<|eot_id|>` (128009) → 827.
    pub fn llama3_base() -> TokenMap {
        TokenMap::from_pairs([(128006, 1432), (128009, 827), (128007, 827)])
    }

    /// A map from `(from, to)` pairs; a later pair for the same `from` wins.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, u32)>) -> TokenMap {
        TokenMap { map: pairs.into_iter().collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The pairs in ascending `from` order (for keys and logs).
    pub fn pairs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.map.iter().map(|(&from, &to)| (from, to))
    }

    /// Replaces every mapped id in place (one pass: a replacement is not replaced again).
    pub fn apply(&self, ids: &mut [u32]) {
        if self.map.is_empty() {
            return;
        }
        for id in ids {
            if let Some(&to) = self.map.get(id) {
                *id = to;
            }
        }
    }

    /// The first id of the map that does not fit a vocabulary of `vocab_size` tokens, if any
    /// (a map meant for another tokenizer).
    pub fn out_of_vocab(&self, vocab_size: usize) -> Option<u32> {
        self.pairs().flat_map(|(from, to)| [from, to]).find(|&id| id as usize >= vocab_size)
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`, and `dir/tokenizer_config.json` and `dir/chat_template.jinja`
    /// when present (the `.jinja` file wins over the config's `chat_template`, as in
    /// transformers). The context length starts at [`DEFAULT_CONTEXT_LEN`].
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer, TextError> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| TextError::Io { path: path.clone(), source })?;
        let mut inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| TextError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        // Padding is the model runner's business; a tokenizer.json may come with it switched on.
        inner.with_padding(None);
        let config = read_config(&dir.join("tokenizer_config.json"))?;
        let jinja = dir.join("chat_template.jinja");
        let template = match std::fs::read_to_string(&jinja) {
            Ok(source) => Some((source, jinja.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => config.chat_template,
            Err(source) => return Err(TextError::Io { path: jinja, source }),
        };
        let chat_template = template
            .map(|(source, origin)| ChatTemplate::new(&source, origin, config.tokens.clone()))
            .transpose()?;
        TextTokenizer {
            inner,
            dir: dir.to_owned(),
            tokens: config.tokens,
            chat_template,
            context_len: DEFAULT_CONTEXT_LEN,
            truncation: config.truncation,
        }
        .with_context_len(DEFAULT_CONTEXT_LEN)
    }

    /// Truncates every encoded document to `context_len` tokens, special tokens included (as
    /// transformers' `truncation=True, max_length=context_len`).
    pub fn with_context_len(mut self, context_len: usize) -> Result<TextTokenizer, TextError> {
        if context_len == 0 {
            return Err(TextError::ContextLen(context_len));
        }
        let params = TruncationParams {
            direction: self.truncation,
            max_length: context_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        };
        self.inner.with_truncation(Some(params)).map_err(|e| TextError::Tokenizer {
            path: self.dir.join("tokenizer.json"),
            message: e.to_string(),
        })?;
        self.context_len = context_len;
        Ok(self)
    }

    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// The folder the tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `tokenizers` tokenizer, truncation set, padding off.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Vocabulary size, added tokens included (the ids a model's embedding must cover).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.tokens.bos.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.tokens.eos.as_deref().and_then(|t| self.token_id(t))
    }

    /// The pad id, or the EOS id when the tokenizer has no pad token (as the paper sets it).
    pub fn pad_id(&self) -> Option<u32> {
        self.tokens.pad.as_deref().and_then(|t| self.token_id(t)).or_else(|| self.eos_id())
    }

    /// Whether the post-processor starts every document with the BOS token.
    pub fn adds_bos(&self) -> Result<bool, TextError> {
        let Some(bos) = self.bos_id() else {
            return Ok(false);
        };
        let batch = self.encode_batch(&[""])?;
        Ok(batch.ids.first() == Some(&bos))
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// A conversation as the paper formats it (SA:scripts/data/format_lmsys.py): rendered with
    /// the chat template, without the template's leading BOS, which the tokenizer adds back.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, TextError> {
        let template = self.chat_template.as_ref().ok_or_else(|| TextError::NoChatTemplate {
            wanted_by: "rendering a conversation".into(),
            tokenizer: self.dir.clone(),
        })?;
        let text = template.render(messages, GenerationPrompt::Omit)?;
        Ok(strip_leading_bos(&text, self.tokens.bos.as_deref()).to_owned())
    }

    /// Encodes documents with the post-processor's special tokens, each truncated to the context
    /// length, in parallel.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Batch, TextError> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self.inner.encode_batch_fast(inputs, true).map_err(|e| TextError::Encode {
            path: self.dir.join("tokenizer.json"),
            message: e.to_string(),
        })?;
        let mut batch = Batch {
            ids: Vec::with_capacity(encodings.iter().map(|e| e.len()).sum()),
            lengths: Vec::with_capacity(encodings.len()),
        };
        for encoding in &encodings {
            batch.ids.extend_from_slice(encoding.get_ids());
            batch.lengths.push(encoding.len());
        }
        Ok(batch)
    }

    /// The text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TextError::Encode { path: self.dir.join("tokenizer.json"), message: e.to_string() })
    }
}

/// What `tokenizer_config.json` contributes.
struct Config {
    tokens: SpecialTokens,
    /// The template's source and where it came from.
    chat_template: Option<(String, String)>,
    truncation: TruncationDirection,
}

fn read_config(path: &Path) -> Result<Config, TextError> {
    let mut config = Config {
        tokens: SpecialTokens::default(),
        chat_template: None,
        truncation: TruncationDirection::Right,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(config),
        Err(source) => {
            return Err(TextError::Io { path: path.to_owned(), source });
        }
    };
    let bad = |message: String| TextError::TokenizerConfig { path: path.to_owned(), message };
    let json: Json = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Json::Object(fields) = json else {
        return Err(bad("expected a JSON object".into()));
    };
    let token = |name: &str| -> Result<Option<String>, TextError> {
        match fields.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            // An AddedToken written out: {"content": "<s>", "lstrip": false, ...}.
            Some(Json::Object(o)) => match o.get("content") {
                Some(Json::String(s)) => Ok(Some(s.clone())),
                _ => Err(bad(format!("`{name}` is an object without a string `content`"))),
            },
            Some(other) => Err(bad(format!("`{name}` must be a string, got {other}"))),
        }
    };
    config.tokens = SpecialTokens {
        bos: token("bos_token")?,
        eos: token("eos_token")?,
        pad: token("pad_token")?,
        unk: token("unk_token")?,
    };
    let origin = format!("{}", path.display());
    config.chat_template = match fields.get("chat_template") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some((s.clone(), origin)),
        // Several named templates: transformers uses the one named "default".
        Some(Json::Array(named)) => {
            let mut names = Vec::new();
            let mut found = None;
            for entry in named {
                match (entry.get("name"), entry.get("template")) {
                    (Some(Json::String(name)), Some(Json::String(template))) => {
                        if name == "default" {
                            found = Some(template.clone());
                        }
                        names.push(name.clone());
                    }
                    _ => {
                        return Err(bad(
                            "`chat_template` entries must be {\"name\": ..., \"template\": ...}".into(),
                        ));
                    }
                }
            }
            let template = found.ok_or_else(|| {
                bad(format!(
                    "`chat_template` has no template named \"default\" (it has: {})",
                    names.join(", ")
                ))
            })?;
            Some((template, format!("{origin} (template \"default\")")))
        }
        Some(other) => {
            return Err(bad(format!(
                "`chat_template` must be a string or a list of named templates, got {other}"
            )));
        }
    };
    config.truncation = match fields.get("truncation_side") {
        None | Some(Json::Null) => TruncationDirection::Right,
        Some(Json::String(s)) if s == "right" => TruncationDirection::Right,
        Some(Json::String(s)) if s == "left" => TruncationDirection::Left,
        Some(other) => {
            return Err(bad(format!("`truncation_side` must be \"right\" or \"left\", got {other}")));
        }
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tiny::{GEMMA2, LLAMA3, TinySpec, test_tokenizer_dir};

    fn load(spec: &TinySpec) -> (tempfile::TempDir, TextTokenizer) {
        let dir = test_tokenizer_dir(spec);
        let tokenizer = TextTokenizer::from_dir(dir.path()).unwrap();
        (dir, tokenizer)
    }

    fn check_kept(len: usize, n: usize, expected: Range<usize>) {
        assert_eq!(kept_range(len, n), expected, "len {len}, ignore_first_n {n}");
    }

    #[test]
    fn kept_ranges() {
        check_kept(30, 25, 25..30);
        check_kept(25, 25, 25..25);
        check_kept(10, 25, 10..10);
        check_kept(10, 0, 0..10);
        check_kept(0, 0, 0..0);
    }

    fn check_ignore(lengths: &[usize], n: usize, expected: &[&[u32]]) {
        let ids = (0..lengths.iter().sum::<usize>() as u32).collect();
        let batch = Batch { ids, lengths: lengths.to_vec() };
        let kept = batch.ignore_first_n(n);
        let got: Vec<&[u32]> = kept.docs().collect();
        assert_eq!(got, expected, "lengths {lengths:?}, ignore_first_n {n}");
        assert_eq!(kept.num_tokens(), expected.iter().map(|d| d.len()).sum::<usize>());
    }

    #[test]
    fn ignore_first_n_per_document() {
        check_ignore(&[4, 2, 3], 0, &[&[0, 1, 2, 3], &[4, 5], &[6, 7, 8]]);
        check_ignore(&[4, 2, 3], 2, &[&[2, 3], &[], &[8]]);
        check_ignore(&[4, 2, 3], 5, &[&[], &[], &[]]);
        check_ignore(&[], 3, &[]);
    }

    fn check_map(map: &TokenMap, input: &[u32], expected: &[u32]) {
        let mut ids = input.to_vec();
        map.apply(&mut ids);
        assert_eq!(ids, expected, "{map:?} on {input:?}");
    }

    #[test]
    fn llama3_base_replacement() {
        let map = TokenMap::llama3_base();
        check_map(
            &map,
            &[128000, 128006, 882, 128007, 271, 9906, 128009],
            &[128000, 1432, 882, 827, 271, 9906, 827],
        );
        check_map(&map, &[], &[]);
        assert_eq!(map.pairs().collect::<Vec<_>>(), [(128006, 1432), (128007, 827), (128009, 827)]);
        assert_eq!(map.out_of_vocab(128256), None);
        assert_eq!(map.out_of_vocab(512), Some(128006));
        assert_eq!(map.out_of_vocab(1000), Some(128006));
        assert_eq!(TokenMap::from_pairs([(3, 827)]).out_of_vocab(512), Some(827));
    }

    #[test]
    fn replacement_is_one_pass_and_parameterised() {
        let chain = TokenMap::from_pairs([(1, 2), (2, 3)]);
        check_map(&chain, &[1, 2, 3], &[2, 3, 3]);
        check_map(&TokenMap::default(), &[1, 2], &[1, 2]);
        check_map(&TokenMap::from_pairs([(5, 6), (5, 7)]), &[5], &[7]);
    }

    #[test]
    fn post_processor_adds_bos() {
        for spec in [LLAMA3, GEMMA2] {
            let (_dir, tok) = load(&spec);
            let bos = tok.token_id(spec.bos).unwrap();
            assert_eq!(tok.bos_id(), Some(bos));
            assert!(tok.adds_bos().unwrap());
            let batch = tok.encode_batch(&["Hello world.", "A second one, a bit longer."]).unwrap();
            assert_eq!(batch.num_docs(), 2);
            for doc in batch.docs() {
                assert_eq!(doc[0], bos);
                assert_eq!(doc.iter().filter(|&&id| id == bos).count(), 1);
            }
            let first = batch.docs().next().unwrap();
            assert_eq!(tok.decode(first).unwrap(), format!("{}Hello world.", spec.bos));
        }
    }

    #[test]
    fn truncates_to_context_len_with_bos() {
        let (_dir, tok) = load(&LLAMA3);
        let long = "The museum is open every day except Monday. ".repeat(50);
        let full = tok.encode_batch(&[long.as_str()]).unwrap();
        assert!(full.num_tokens() > 16);
        let tok = tok.with_context_len(16).unwrap();
        assert_eq!(tok.context_len(), 16);
        let batch = tok.encode_batch(&[long.as_str(), "short"]).unwrap();
        let docs: Vec<&[u32]> = batch.docs().collect();
        assert_eq!(docs[0].len(), 16);
        assert_eq!(docs[0], &full.ids[..16]);
        assert_eq!(docs[0][0], tok.bos_id().unwrap());
        assert!(docs[1].len() < 16);
        assert!(matches!(tok.with_context_len(0), Err(TextError::ContextLen(0))));
    }

    #[test]
    fn default_context_len_is_1024() {
        let (_dir, tok) = load(&GEMMA2);
        assert_eq!(tok.context_len(), DEFAULT_CONTEXT_LEN);
        let long = "word ".repeat(3000);
        assert_eq!(tok.encode_batch(&[long]).unwrap().lengths, [1024]);
    }

    #[test]
    fn chat_tokens_are_single_ids_and_bos_appears_once() {
        let (_dir, tok) = load(&LLAMA3);
        let messages = [Message::new("user", " What is 2+2? "), Message::new("assistant", "4.")];
        let text = tok.render_chat(&messages).unwrap();
        assert!(text.starts_with("<|start_header_id|>system<|end_header_id|>\n\n"), "{text:?}");
        let batch = tok.encode_batch(&[text.as_str()]).unwrap();
        let ids = &batch.ids;
        let id = |t: &str| tok.token_id(t).unwrap();
        assert_eq!(ids[0], id("<|begin_of_text|>"));
        assert_eq!(ids[1], id("<|start_header_id|>"));
        assert_eq!(ids.iter().filter(|&&i| i == id("<|begin_of_text|>")).count(), 1);
        assert_eq!(ids.iter().filter(|&&i| i == id("<|eot_id|>")).count(), 3);
        assert_eq!(tok.decode(ids).unwrap(), format!("<|begin_of_text|>{text}"));
    }

    #[test]
    fn pad_falls_back_to_eos() {
        let (_dir, llama) = load(&LLAMA3);
        assert_eq!(llama.pad_id(), llama.token_id("<|eot_id|>"));
        let (_dir, gemma) = load(&GEMMA2);
        assert_eq!(gemma.pad_id(), gemma.token_id("<pad>"));
    }

    /// Rewrites the tiny tokenizer's `tokenizer_config.json` with `edit` and loads it.
    fn load_with_config(edit: impl FnOnce(&mut Json)) -> Result<TextTokenizer, TextError> {
        let dir = test_tokenizer_dir(&GEMMA2);
        let path = dir.path().join("tokenizer_config.json");
        let mut config: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(&path, config.to_string()).unwrap();
        TextTokenizer::from_dir(dir.path())
    }

    fn check_config(edit: impl FnOnce(&mut Json), expected: Result<&str, &str>) {
        let rendered = load_with_config(edit).map(|tok| {
            let template = tok.chat_template().map(|t| t.source().to_owned());
            format!("{:?} {:?}", tok.special_tokens().bos, template)
        });
        match (rendered, expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (Err(got), Err(want)) => {
                let got = got.to_string();
                assert!(got.contains(want), "{got:?} should contain {want:?}");
                assert!(got.contains("tokenizer_config.json"), "{got:?} names the file");
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn tokenizer_config_variants() {
        check_config(|c| c["chat_template"] = "T".into(), Ok(r#"Some("<bos>") Some("T")"#));
        check_config(
            |c| {
                c["bos_token"] = serde_json::json!({"content": "<bos>", "lstrip": false});
                c["chat_template"] = serde_json::json!([
                    {"name": "tool_use", "template": "U"},
                    {"name": "default", "template": "D"},
                ]);
            },
            Ok(r#"Some("<bos>") Some("D")"#),
        );
        check_config(
            |c| {
                c.as_object_mut().unwrap().remove("chat_template");
                c["bos_token"] = Json::Null;
            },
            Ok("None None"),
        );
        check_config(
            |c| c["chat_template"] = serde_json::json!([{"name": "tool_use", "template": "U"}]),
            Err("no template named \"default\" (it has: tool_use)"),
        );
        check_config(|c| c["chat_template"] = 3.into(), Err("`chat_template` must be"));
        check_config(|c| c["eos_token"] = 3.into(), Err("`eos_token` must be a string"));
        check_config(|c| c["chat_template"] = "{% if %}".into(), Err("does not compile"));
    }

    #[test]
    fn left_truncation_side() {
        let tok =
            load_with_config(|c| c["truncation_side"] = "left".into()).unwrap().with_context_len(4).unwrap();
        let full = tok.inner().encode("one two three four five six", false).unwrap();
        let batch = tok.encode_batch(&["one two three four five six"]).unwrap();
        assert_eq!(batch.ids[0], tok.bos_id().unwrap());
        assert_eq!(batch.ids[1..], full.get_ids()[full.len() - 3..]);
    }

    #[test]
    fn chat_template_jinja_file_wins() {
        let dir = test_tokenizer_dir(&GEMMA2);
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}J").unwrap();
        let tok = TextTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.chat_template().unwrap().source(), "{{ bos_token }}J");
        assert_eq!(tok.render_chat(&[]).unwrap(), "J");
    }

    #[test]
    fn missing_and_corrupt_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
        let err = TextTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("is not a tokenizer"), "{err}");
    }

    #[test]
    fn render_chat_without_template_says_so() {
        let tok = load_with_config(|c| {
            c.as_object_mut().unwrap().remove("chat_template");
        })
        .unwrap();
        let err = tok.render_chat(&[Message::new("user", "hi")]).unwrap_err().to_string();
        assert!(err.contains("has none") && err.contains("chat_template"), "{err}");
    }
}
