//! Tiny tokenizers for tests and the tiny test models: a byte-level BPE trained at run time on a
//! small corpus, with a family's special tokens, a `TemplateProcessing` post-processor that adds
//! BOS, and the family's chat template in `tokenizer_config.json`. Training is deterministic, so
//! the same corpus always gives the same `tokenizer.json`, and nothing large is committed.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::text::TextError;
use crate::text::template::examples;

/// The special tokens and chat template of a tiny tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub bos: &'static str,
    pub eos: &'static str,
    pub pad: Option<&'static str>,
    /// Every special token, in id order from 0 (BOS, EOS and pad among them).
    pub specials: &'static [&'static str],
    pub chat_template: &'static str,
    /// Vocabulary size to train to, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
}

/// Llama 3 shaped: `<|begin_of_text|>` BOS, header and end-of-turn tokens, no pad token.
pub const LLAMA3: TinySpec = TinySpec {
    bos: "<|begin_of_text|>",
    eos: "<|eot_id|>",
    pad: None,
    specials: &[
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    chat_template: examples::LLAMA31,
    vocab_size: 512,
};

/// Gemma 2 shaped: `<bos>`, `<eos>`, `<pad>` and the turn tokens.
pub const GEMMA2: TinySpec = TinySpec {
    bos: "<bos>",
    eos: "<eos>",
    pad: Some("<pad>"),
    specials: &["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
    chat_template: examples::GEMMA2,
    vocab_size: 512,
};

/// Trains a byte-level BPE on `corpus` and writes `dir/tokenizer.json` and
/// `dir/tokenizer_config.json` (special tokens and chat template), creating `dir`.
pub fn write_tokenizer_files<S: AsRef<str> + Send>(
    dir: &Path,
    spec: &TinySpec,
    corpus: impl Iterator<Item = S> + Send,
) -> Result<(), TextError> {
    let tokenizer_path = dir.join("tokenizer.json");
    let fail = |message: String| TextError::Tokenizer { path: tokenizer_path.clone(), message };
    let tokenizer = train(spec, corpus).map_err(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|source| TextError::Io { path: dir.to_owned(), source })?;
    let json = tokenizer.to_string(true).map_err(|e| fail(e.to_string()))?;
    write(&tokenizer_path, &json)?;
    let mut config = serde_json::json!({
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "chat_template": spec.chat_template,
        "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(pad) = spec.pad {
        config["pad_token"] = pad.into();
    }
    let config = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    write(&dir.join("tokenizer_config.json"), &config)
}

fn write(path: &Path, text: &str) -> Result<(), TextError> {
    std::fs::write(path, text).map_err(|source| TextError::Io { path: path.to_owned(), source })
}

fn train<S: AsRef<str> + Send>(
    spec: &TinySpec,
    corpus: impl Iterator<Item = S> + Send,
) -> tokenizers::Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let specials = spec.specials.iter().map(|s| AddedToken::from(*s, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(spec.vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build()
        .into();
    tokenizer.train(&mut trainer, corpus)?;
    let bos_id = tokenizer.token_to_id(spec.bos).ok_or("the BOS token is not among the special tokens")?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{} $A", spec.bos))?
        .try_pair(format!("{0} $A {0} $B:1", spec.bos))?
        .special_tokens(vec![(spec.bos, bos_id)])
        .build()?;
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// The corpus of `stages/tests/data` (web text and rendered-free chat turns), for unit tests.
#[cfg(test)]
pub(crate) fn test_corpus() -> Vec<String> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut corpus = Vec::new();
    for name in ["web.jsonl", "chat.jsonl"] {
        let text = std::fs::read_to_string(data.join(name)).expect("test data is present");
        for line in text.lines() {
            let record: serde_json::Value = serde_json::from_str(line).expect("test data is JSON");
            if let Some(text) = record["text"].as_str() {
                corpus.push(text.to_owned());
            }
            for turn in record["messages"].as_array().into_iter().flatten() {
                corpus.push(turn["content"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    corpus
}

/// A folder with a tiny tokenizer of `spec`'s family trained on [`test_corpus`].
#[cfg(test)]
pub(crate) fn test_tokenizer_dir(spec: &TinySpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temp dir");
    write_tokenizer_files(dir.path(), spec, test_corpus().into_iter()).expect("training works");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_is_deterministic() {
        let a = test_tokenizer_dir(&LLAMA3);
        let b = test_tokenizer_dir(&LLAMA3);
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let a = std::fs::read(a.path().join(name)).unwrap();
            let b = std::fs::read(b.path().join(name)).unwrap();
            assert!(a == b, "{name} differs between two trainings");
        }
    }

    #[test]
    fn special_tokens_come_first() {
        for spec in [LLAMA3, GEMMA2] {
            let dir = test_tokenizer_dir(&spec);
            let tokenizer = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
            for (id, token) in spec.specials.iter().enumerate() {
                assert_eq!(tokenizer.token_to_id(token), Some(id as u32), "{token}");
            }
            assert_eq!(tokenizer.get_vocab_size(true), spec.vocab_size);
        }
    }
}
