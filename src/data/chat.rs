//! Chat templates: tokenizer_config.json's Jinja `chat_template`, rendered with minijinja
//! (Python string methods from minijinja-contrib, as HF templates use them), turning
//! message lists into the prompt and completion text TRL would train on.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    source: String,
}

/// The `chat_template` of tokenizer_config.json: a string, or several named templates of
/// which chat uses "default".
fn config_template(json: &Value, config: &Path) -> Result<Option<String>> {
    Ok(match json.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => Some(
            list.iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string))
                .with_context(|| format!("{}: chat_template has no \"default\" entry", config.display()))?,
        ),
        Some(_) => bail!("{}: chat_template must be a string or a list of named templates", config.display()),
    })
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
pub(crate) fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The chat template of the tokenizer folder holding `config` (tokenizer_config.json):
    /// its `chat_template` key (transformers before 4.5x), or `chat_template.jinja` beside it
    /// (what transformers 4.5x and 5.x save), or a legacy `chat_template.json`. Two of them
    /// with different templates are refused: which one transformers picks is not ours to guess.
    pub fn load(config: &Path) -> Result<Option<Self>> {
        let dir = config.parent().unwrap_or(Path::new("."));
        let json: Value = if config.is_file() {
            let text = std::fs::read_to_string(config).with_context(|| format!("{}: cannot read", config.display()))?;
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", config.display(), e.line(), e.column()))?
        } else {
            Value::Null
        };
        let mut found: Vec<(String, String)> = Vec::new();
        if let Some(template) = config_template(&json, config)? {
            found.push((format!("{}: chat_template", config.display()), template));
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).with_context(|| format!("{}: cannot read", jinja.display()))?;
            found.push((jinja.display().to_string(), text));
        }
        let legacy = dir.join("chat_template.json");
        if legacy.is_file() {
            let text = std::fs::read_to_string(&legacy).with_context(|| format!("{}: cannot read", legacy.display()))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", legacy.display(), e.line(), e.column()))?;
            let template = value.get("chat_template").and_then(|t| t.as_str()).with_context(|| format!("{}: no string chat_template", legacy.display()))?;
            found.push((legacy.display().to_string(), template.to_string()));
        }
        let Some((source, template)) = found.first().cloned() else { return Ok(None) };
        if let Some((other, _)) = found.iter().find(|(_, t)| *t != template) {
            bail!("{source} and {other} hold different chat templates; keep one");
        }
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with these two Jinja settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", template).map_err(|e| anyhow::anyhow!("{source}: {e:#}"))?;
        Ok(Some(Self { env, bos_token: token_text(json.get("bos_token")), eos_token: token_text(json.get("eos_token")), source }))
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| format!("{}: {e}", self.source))
    }

    /// TRL's rule: the prompt is rendered with the generation prompt; each completion is
    /// what rendering prompt + completion adds after it.
    pub fn prompt_and_completions(&self, prompt: &[Message], completions: &[&[Message]]) -> Result<(String, Vec<String>), String> {
        let prompt_text = self.render(prompt, true)?;
        let mut out = Vec::new();
        for completion in completions {
            let all: Vec<Message> = prompt.iter().chain(completion.iter()).cloned().collect();
            let full = self.render(&all, false)?;
            let Some(rest) = full.strip_prefix(&prompt_text) else {
                return Err("the chat template renders the conversation with a different prefix than the prompt alone".into());
            };
            out.push(rest.to_string());
        }
        Ok((prompt_text, out))
    }
}

/// A list of {role, content} messages, or an error naming the field.
pub fn messages(value: &Value, field: &str) -> Result<Vec<Message>, String> {
    let list = value.as_array().ok_or_else(|| format!("`{field}` must be a string or a list of messages"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |key: &str| m.get(key).and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| format!("`{field}[{i}]` has no string `{key}`"));
            Ok(Message { role: get("role")?, content: get("content")? })
        })
        .collect()
}
