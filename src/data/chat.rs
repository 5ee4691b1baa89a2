//! Chat templates: tokenizer_config.json's Jinja `chat_template`, rendered with minijinja
//! (Python string methods from minijinja-contrib, as HF templates use them), turning
//! message lists into the prompt and completion text TRL would train on.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

#[derive(Clone, Debug, Serialize, PartialEq)]
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

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template in `tokenizer_config.json`, if the file exists and has one.
    pub fn load(config: &Path) -> Result<Option<Self>> {
        if !config.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(config).with_context(|| format!("{}: cannot read", config.display()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", config.display(), e.line(), e.column()))?;
        let template = match json.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            // Several named templates: the "default" one is for chat.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string))
                .with_context(|| format!("{}: chat_template has no \"default\" entry", config.display()))?,
            Some(_) => bail!("{}: chat_template must be a string or a list of named templates", config.display()),
        };
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with these two Jinja settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", template).map_err(|e| anyhow::anyhow!("{}: chat_template: {e:#}", config.display()))?;
        Ok(Some(Self {
            env,
            bos_token: token_text(json.get("bos_token")),
            eos_token: token_text(json.get("eos_token")),
            source: config.display().to_string(),
        }))
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
            .map_err(|e| format!("{}: chat_template: {e}", self.source))
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
