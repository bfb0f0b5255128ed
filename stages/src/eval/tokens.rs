//! Which tokens of a chat conversation are the assistant's, and which of them the KL is measured
//! on.
//!
//! The conversation is rendered once with the chat template (its leading BOS stripped, as the
//! `cache` stage renders it) and tokenised with byte offsets. Assistant turn i spans the bytes
//! from the end of `render(messages[..i], generation prompt)` (the assistant header written) to
//! the end of `render(messages[..=i])` (its content and end-of-turn tokens); a token belongs to
//! the turn when it starts inside that span. Working on byte offsets of the one full encoding,
//! rather than on the lengths of prefix encodings, keeps the answer right where the tokenizer
//! would merge differently at the cut (BPE across `\n\n` and the first word).

use std::ops::Range;

use crate::text::template::strip_leading_bos;
use crate::text::{GenerationPrompt, Message, TextTokenizer};

/// A tokenised conversation: its ids (truncated to the tokenizer's context length, BOS as the
/// post-processor adds it) and the token range of each assistant turn (cut by the truncation;
/// a turn that starts beyond it is left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub ids: Vec<u32>,
    pub turns: Vec<Range<usize>>,
}

/// A predicted token: position `pos` (≥ 1) of the conversation, predicted by the logits at
/// `pos - 1`; `k_first` when it is among the first `k` non-special tokens of its turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub pos: usize,
    pub k_first: bool,
}

/// Renders and tokenises `messages`, finding the assistant turns. Errors are messages (the
/// caller names the document).
pub fn conversation(tokenizer: &TextTokenizer, messages: &[Message]) -> Result<Conversation, String> {
    let template = tokenizer
        .chat_template()
        .ok_or_else(|| format!("the tokenizer in {} has no chat template", tokenizer.dir().display()))?;
    let bos = tokenizer.special_tokens().bos.as_deref();
    let render = |m: &[Message], prompt| -> Result<String, String> {
        let text = template.render(m, prompt).map_err(|e| e.to_string())?;
        Ok(strip_leading_bos(&text, bos).to_owned())
    };
    let full = render(messages, GenerationPrompt::Omit)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = render(&messages[..i], GenerationPrompt::Append)?;
        let end = render(&messages[..=i], GenerationPrompt::Omit)?;
        if !full.starts_with(&start) || !full.starts_with(&end) || start.len() > end.len() {
            return Err(format!(
                "the chat template does not render the conversation prefix by prefix (turn {i}): \
                 assistant tokens cannot be located"
            ));
        }
        spans.push(start.len()..end.len());
    }
    let encoding = tokenizer.inner().encode(full.as_str(), true).map_err(|e| {
        format!("tokenizing with {} failed: {e}", tokenizer.dir().join("tokenizer.json").display())
    })?;
    let ids = encoding.get_ids().to_vec();
    let offsets = encoding.get_offsets();
    let turns = spans
        .iter()
        .filter_map(|span| {
            // Tokens the post-processor added (BOS) carry offsets (0, 0), and a turn never
            // starts at byte 0 (its header comes first).
            let inside = |t: usize| span.contains(&offsets[t].0);
            let first = (0..ids.len()).find(|&t| inside(t))?;
            let last = (first..ids.len()).take_while(|&t| inside(t)).last()?;
            Some(first..last + 1)
        })
        .collect();
    Ok(Conversation { ids, turns })
}

/// The measured tokens of `conv`: every assistant-turn position ≥ max(1, `ignore_first_n`), in
/// order; in each turn the first `k` whose id is not in `special` (sorted) are `k_first`.
pub fn targets(conv: &Conversation, special: &[u32], k: usize, ignore_first_n: usize) -> Vec<Target> {
    let mut out = Vec::new();
    for turn in &conv.turns {
        let mut seen = 0;
        for pos in turn.clone().filter(|&p| p >= ignore_first_n.max(1)) {
            let plain = special.binary_search(&conv.ids[pos]).is_err();
            out.push(Target { pos, k_first: plain && seen < k });
            if plain {
                seen += 1;
            }
        }
    }
    out
}

/// The ids of the tokenizer's special added tokens (BOS, end-of-turn, headers …), sorted.
pub fn special_ids(tokenizer: &TextTokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer
        .inner()
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tiny::{GEMMA2, LLAMA3, TinySpec, test_tokenizer_dir};

    fn msgs(turns: &[(&str, &str)]) -> Vec<Message> {
        turns.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    /// Renders, tokenises and checks each assistant turn decodes to `expected[i]`, and that no
    /// other token is in a turn.
    fn check(spec: &TinySpec, turns: &[(&str, &str)], expected: &[&str]) -> (TextTokenizer, Conversation) {
        let dir = test_tokenizer_dir(spec);
        let tok = TextTokenizer::from_dir(dir.path()).unwrap();
        let conv = conversation(&tok, &msgs(turns)).unwrap();
        let got: Vec<String> = conv.turns.iter().map(|r| tok.decode(&conv.ids[r.clone()]).unwrap()).collect();
        assert_eq!(got, expected);
        // The whole conversation is what the cache stage would encode.
        let rendered = tok.render_chat(&msgs(turns)).unwrap();
        assert_eq!(tok.encode_batch(&[rendered]).unwrap().ids, conv.ids);
        (tok, conv)
    }

    #[test]
    fn llama_assistant_turns() {
        let (tok, conv) = check(
            &LLAMA3,
            &[
                ("user", "What is the capital of France?"),
                ("assistant", " Paris, of course."),
                ("user", "And of Italy?"),
                ("assistant", "Rome."),
            ],
            &["Paris, of course.<|eot_id|>", "Rome.<|eot_id|>"],
        );
        // The header before each turn is not the assistant's.
        let before = tok.decode(&conv.ids[..conv.turns[0].start]).unwrap();
        assert!(before.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"), "{before:?}");
        assert_eq!(conv.ids[0], tok.bos_id().unwrap());
    }

    #[test]
    fn gemma_assistant_turns() {
        check(
            &GEMMA2,
            &[
                ("user", "Name a colour."),
                ("assistant", "Blue.\n"),
                ("user", "Another?"),
                ("assistant", "Red"),
            ],
            &["Blue.<end_of_turn>\n", "Red<end_of_turn>\n"],
        );
    }

    #[test]
    fn no_assistant_turn_and_truncation() {
        let dir = test_tokenizer_dir(&LLAMA3);
        let tok = TextTokenizer::from_dir(dir.path()).unwrap();
        let conv = conversation(&tok, &msgs(&[("user", "Hello there")])).unwrap();
        assert!(conv.turns.is_empty() && !conv.ids.is_empty());
        let turns = [("user", "Hi"), ("assistant", "A long answer with many words in it.")];
        let full = conversation(&tok, &msgs(&turns)).unwrap();
        let cut = full.turns[0].start + 3;
        let short = conversation(&tok.with_context_len(cut).unwrap(), &msgs(&turns)).unwrap();
        assert_eq!(short.ids, full.ids[..cut]);
        assert_eq!(short.turns, std::iter::once(full.turns[0].start..cut).collect::<Vec<_>>());
        let none = conversation(
            &TextTokenizer::from_dir(dir.path()).unwrap().with_context_len(5).unwrap(),
            &msgs(&turns),
        )
        .unwrap();
        assert!(none.turns.is_empty());
    }

    #[test]
    fn gemma_refuses_a_system_turn_with_its_message() {
        let dir = test_tokenizer_dir(&GEMMA2);
        let tok = TextTokenizer::from_dir(dir.path()).unwrap();
        let err = conversation(&tok, &msgs(&[("system", "x"), ("user", "y")])).unwrap_err();
        assert!(err.contains("System role not supported"), "{err}");
    }

    #[test]
    fn k_first_skips_special_tokens_and_restarts_per_turn() {
        // Ids 0..=2 are special.
        let conv = Conversation { ids: vec![0, 5, 1, 6, 7, 8, 2, 9, 1, 10, 11, 2], turns: vec![2..7, 8..12] };
        let got = targets(&conv, &[0, 1, 2], 2, 0);
        let want = [
            (2, false),
            (3, true),
            (4, true),
            (5, false),
            (6, false),
            (8, false),
            (9, true),
            (10, true),
            (11, false),
        ];
        assert_eq!(got, want.map(|(pos, k_first)| Target { pos, k_first }));
        // Positions before ignore_first_n are not measured, nor counted.
        let got = targets(&conv, &[0, 1, 2], 1, 4);
        assert_eq!(got[0], Target { pos: 4, k_first: true });
        assert_eq!(got.len(), 7);
        // Position 0 has no prediction.
        let first = Conversation { ids: vec![5, 6], turns: std::iter::once(0..2).collect() };
        assert_eq!(targets(&first, &[], 10, 0), [Target { pos: 1, k_first: true }]);
    }

    #[test]
    fn special_ids_of_the_tiny_llama() {
        let dir = test_tokenizer_dir(&LLAMA3);
        let tok = TextTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(special_ids(&tok), [0, 1, 2, 3, 4]);
    }
}
