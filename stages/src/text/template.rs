//! Chat templates: a model's Jinja `chat_template` rendered the way transformers'
//! `apply_chat_template` renders it (jinja2 with `trim_blocks`, `lstrip_blocks` and loop
//! controls, Python string methods, `raise_exception`, a Python-style `tojson`, the special
//! tokens as variables, `tools` and `documents` set to none).
//!
//! Two deliberate differences from transformers, both for reproducible cache keys:
//! `strftime_now` is not defined, so templates that test for it (Llama 3.2) fall back to their
//! fixed date ("26 Jul 2024"), as the Llama 3.1 template always does; and the `{% generation %}`
//! blocks some training templates carry (the paper's own, among them) render their body, as
//! transformers does when it is not asked for an assistant mask.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};

use crate::text::TextError;

const NAME: &str = "chat_template";

/// One turn of a conversation: the `{role, content}` objects of a messages column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// Whether the rendered text ends with the header of an assistant turn to be generated.
/// Caching renders whole conversations, so it omits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationPrompt {
    Omit,
    Append,
}

/// The special tokens a template sees as `bos_token`, `eos_token`, `pad_token`, `unk_token`
/// (transformers passes its `special_tokens_map`; an unset token is left undefined).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// A compiled chat template with the special tokens it renders.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `origin` names where it came from (a file, a field) for error messages.
    pub fn new(source: &str, origin: impl Into<String>, tokens: SpecialTokens) -> Result<Self, TextError> {
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, without_generation_tags(source))
            .map_err(|e| TextError::TemplateSyntax { origin: origin.clone(), message: describe(&e) })?;
        Ok(ChatTemplate { env, source: source.to_owned(), origin, tokens })
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Renders a conversation, as `apply_chat_template(messages, tokenize=False)` does.
    pub fn render(&self, messages: &[Message], prompt: GenerationPrompt) -> Result<String, TextError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let map: BTreeMap<&str, Value> =
                    [("role", Value::from(m.role.as_str())), ("content", Value::from(m.content.as_str()))]
                        .into_iter()
                        .collect();
                Value::from(map)
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        ctx.insert("add_generation_prompt", Value::from(prompt == GenerationPrompt::Append));
        let named = [
            ("bos_token", &self.tokens.bos),
            ("eos_token", &self.tokens.eos),
            ("pad_token", &self.tokens.pad),
            ("unk_token", &self.tokens.unk),
        ];
        for (name, token) in named {
            if let Some(token) = token {
                ctx.insert(name, Value::from(token.as_str()));
            }
        }
        let template = self.env.get_template(NAME).expect("the template was added in new()");
        template
            .render(Value::from(ctx))
            .map_err(|e| TextError::TemplateRender { origin: self.origin.clone(), message: describe(&e) })
    }
}

/// `text` without one leading `bos` (the paper renders with the template, drops the template's
/// BOS and lets the tokenizer add its own). Text that does not start with it is returned whole.
pub fn strip_leading_bos<'a>(text: &'a str, bos: Option<&str>) -> &'a str {
    match bos {
        Some(bos) if !bos.is_empty() => text.strip_prefix(bos).unwrap_or(text),
        _ => text,
    }
}

fn describe(e: &Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let _ = write!(message, ": {inner}");
        source = inner.source();
    }
    message
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=False)`,
/// which, unlike minijinja's, escapes no HTML characters and uses Python's separators.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &value, indent, 0)?;
    Ok(Value::from(out))
}

fn write_json(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let _ = write!(out, "{value}");
        }
        ValueKind::String | ValueKind::Bytes => write_json_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &key.to_string());
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot write a {}", value.kind()),
            ));
        }
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask extension)
/// as `{% if true %}` / `{% endif %}`, keeping their whitespace control, so the body renders
/// exactly as jinja2 renders it when no mask is asked for.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, open_ctl, name, close_ctl)) => {
                let body = if name == "generation" { "if true" } else { "endif" };
                let _ = write!(out, "{{%{open_ctl} {body} {close_ctl}%}}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with a `generation` or `endgeneration` block tag, returns its length, its
/// whitespace-control markers and its name.
fn parse_generation_tag(tag: &str) -> Option<(usize, &str, &str, &str)> {
    let inner = &tag[2..];
    let open_ctl = if inner.starts_with(['-', '+']) { &inner[..1] } else { "" };
    let after_ctl = &inner[open_ctl.len()..];
    let trimmed = after_ctl.trim_start();
    let name = ["endgeneration", "generation"].into_iter().find(|name| trimmed.starts_with(name))?;
    let after_name = trimmed[name.len()..].trim_start();
    let (close_ctl, after) = if let Some(after) = after_name.strip_prefix("-%}") {
        ("-", after)
    } else if let Some(after) = after_name.strip_prefix("+%}") {
        ("+", after)
    } else {
        ("", after_name.strip_prefix("%}")?)
    };
    Some((tag.len() - after.len(), open_ctl, name, close_ctl))
}

/// Chat templates written for the tests and the tiny test models.
pub mod examples {
    /// Gemma 2's template as transformers ships it in `tokenizer_config.json` (gemma-2-2b-it):
    /// `<bos>`, then `<start_of_turn>{user|model}\n{content | trim}<end_of_turn>\n` per turn.
    pub const GEMMA2: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}";

    /// A Llama 3.1 Instruct template without the tool-calling branches: BOS, the system header
    /// with the knowledge cut-off and the fixed date (or `strftime_now`'s, when defined), the
    /// optional system message, then `<|start_header_id|>{role}<|end_header_id|>\n\n{content |
    /// trim}<|eot_id|>` per turn.
    pub const LLAMA31: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- generation %}
        {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;
}

#[cfg(test)]
mod tests {
    use super::examples::{GEMMA2, LLAMA31};
    use super::*;

    fn tokens(bos: &str, eos: &str) -> SpecialTokens {
        SpecialTokens { bos: Some(bos.into()), eos: Some(eos.into()), pad: None, unk: None }
    }

    fn gemma() -> ChatTemplate {
        ChatTemplate::new(GEMMA2, "gemma", tokens("<bos>", "<eos>")).unwrap()
    }

    fn llama() -> ChatTemplate {
        ChatTemplate::new(LLAMA31, "llama", tokens("<|begin_of_text|>", "<|eot_id|>")).unwrap()
    }

    fn msgs(turns: &[(&str, &str)]) -> Vec<Message> {
        turns.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    fn check(template: &ChatTemplate, turns: &[(&str, &str)], prompt: GenerationPrompt, expected: &str) {
        let got = template.render(&msgs(turns), prompt).unwrap();
        assert_eq!(got, expected, "\n got: {got:?}\nwant: {expected:?}");
    }

    fn check_source(source: &str, turns: &[(&str, &str)], expected: &str) {
        let template = ChatTemplate::new(source, "test", tokens("<s>", "</s>")).unwrap();
        check(&template, turns, GenerationPrompt::Omit, expected);
    }

    fn check_render_error(template: &ChatTemplate, turns: &[(&str, &str)], needle: &str) {
        let err = template.render(&msgs(turns), GenerationPrompt::Omit).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    }

    #[test]
    fn gemma_conversation() {
        check(
            &gemma(),
            &[("user", "  Hi there! \n"), ("assistant", "\nHello.  ")],
            GenerationPrompt::Omit,
            "<bos><start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n",
        );
    }

    #[test]
    fn gemma_generation_prompt() {
        check(
            &gemma(),
            &[("user", "Name a colour.")],
            GenerationPrompt::Append,
            "<bos><start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n",
        );
    }

    #[test]
    fn gemma_raises_on_system_and_order() {
        check_render_error(&gemma(), &[("system", "Be brief."), ("user", "Hi")], "System role not supported");
        check_render_error(&gemma(), &[("assistant", "Hi")], "Conversation roles must alternate");
    }

    #[test]
    fn llama_conversation() {
        check(
            &llama(),
            &[("user", "What is 2+2? "), ("assistant", " 4.")],
            GenerationPrompt::Omit,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>",
        );
    }

    #[test]
    fn llama_system_message_and_prompt() {
        check(
            &llama(),
            &[("system", " Be brief.\n"), ("user", "Hi")],
            GenerationPrompt::Append,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n",
        );
    }

    #[test]
    fn python_string_methods() {
        check_source(
            "{% for m in messages %}{{ m.role.title() }}: {{ m.content.strip() }}|{% endfor %}",
            &[("user", "  a b "), ("assistant", "c\n")],
            "User: a b|Assistant: c|",
        );
        check_source(
            "{{ messages[0].content.split(',') | join('+') }} {{ messages[0].content.upper() }}",
            &[("user", "x,y")],
            "x+y X,Y",
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        check_source(
            "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n",
            &[("user", "a"), ("user", "b")],
            "U:a\nU:b\n",
        );
    }

    #[test]
    fn loop_controls() {
        check_source(
            "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
            &[("user", "a"), ("user", "b")],
            "a",
        );
    }

    #[test]
    fn special_tokens_and_none_tools() {
        check_source(
            "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ pad_token is defined }}",
            &[("user", "a")],
            "<s>|</s>|True|False",
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        check_source(
            "{% for m in messages %}[{%- generation -%}  {{ m.content }}  {%- endgeneration %}]{% endfor %}",
            &[("assistant", "a")],
            "[a]",
        );
        assert_eq!(
            without_generation_tags("{% generation %}x{%+ endgeneration -%}{% if %}"),
            "{% if true %}x{%+ endif -%}{% if %}"
        );
    }

    #[test]
    fn tojson_like_python() {
        check_source("{{ {'a': [1, 'x<y'], 'b': none} | tojson }}", &[], r#"{"a": [1, "x<y"], "b": null}"#);
        check_source(
            "{{ {'a': [1, true]} | tojson(indent=2) }}",
            &[],
            "{\n  \"a\": [\n    1,\n    true\n  ]\n}",
        );
    }

    #[test]
    fn syntax_error_names_origin() {
        let err = ChatTemplate::new("{% for %}", "model/tokenizer_config.json", SpecialTokens::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("model/tokenizer_config.json"), "{err}");
    }

    #[test]
    fn strips_one_leading_bos() {
        let cases = [
            ("<bos><bos>x", Some("<bos>"), "<bos>x"),
            ("x<bos>", Some("<bos>"), "x<bos>"),
            ("<bos>x", None, "<bos>x"),
            ("<bos>x", Some(""), "<bos>x"),
        ];
        for (text, bos, expected) in cases {
            assert_eq!(strip_leading_bos(text, bos), expected, "{text:?} {bos:?}");
        }
    }
}
