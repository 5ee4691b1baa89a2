//! Chat templates: tokenizer_config.json's Jinja `chat_template`, rendered with minijinja
//! (Python string methods from minijinja-contrib, as HF templates use them), turning
//! message lists into the prompt and completion text TRL would train on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// The `chat_template` of tokenizer_config.json: a string (the default template), or a list
/// of `{name, template}` entries (transformers' legacy way to save several).
fn config_templates(json: &Value, config: &Path) -> Result<Vec<(String, String)>> {
    Ok(match json.get("chat_template") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![(DEFAULT.to_string(), s.clone())],
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let field = |key: &str| entry.get(key).and_then(|v| v.as_str()).map(str::to_string);
                match (field("name"), field("template")) {
                    (Some(name), Some(template)) => Ok((name, template)),
                    _ => bail!("{}: chat_template[{i}] must have a string \"name\" and \"template\"", config.display()),
                }
            })
            .collect::<Result<_>>()?,
        Some(_) => bail!("{}: chat_template must be a string or a list of named templates", config.display()),
    })
}

/// The name of the template chat uses unless a run names another (transformers' rule).
const DEFAULT: &str = "default";

/// transformers' folder for named templates besides the default (`NAME.jinja`), written
/// by save_pretrained since 4.5x when a tokenizer holds several.
pub const NAMED_TEMPLATES_DIR: &str = "additional_chat_templates";

/// Template name → (its text, the file it came from).
type TemplatesBySource = BTreeMap<String, (String, String)>;

/// Every chat template a tokenizer folder holds, by name, with where each was read.
/// Several sources may hold the same name only with the same text: which one transformers
/// would pick is not ours to guess.
fn folder_templates(config: &Path) -> Result<(Value, TemplatesBySource)> {
    let dir = config.parent().unwrap_or(Path::new("."));
    let json: Value = if config.is_file() {
        let text = std::fs::read_to_string(config).with_context(|| format!("{}: cannot read", config.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", config.display(), e.line(), e.column()))?
    } else {
        Value::Null
    };
    let read = |path: &Path| std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()));
    let mut found: Vec<(String, String, String)> = Vec::new(); // (name, source, template)
    for (name, template) in config_templates(&json, config)? {
        found.push((name.clone(), format!("{}: chat_template ({name})", config.display()), template));
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        found.push((DEFAULT.into(), jinja.display().to_string(), read(&jinja)?));
    }
    let legacy = dir.join("chat_template.json");
    if legacy.is_file() {
        let value: Value = serde_json::from_str(&read(&legacy)?)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", legacy.display(), e.line(), e.column()))?;
        let template = value
            .get("chat_template")
            .and_then(|t| t.as_str())
            .with_context(|| format!("{}: no string chat_template", legacy.display()))?;
        found.push((DEFAULT.into(), legacy.display().to_string(), template.to_string()));
    }
    for path in named_template_files(dir)? {
        let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        found.push((name, path.display().to_string(), read(&path)?));
    }
    let mut by_name: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (name, source, template) in found {
        match by_name.get(&name) {
            Some((first, kept)) if *kept != template => {
                bail!("{first} and {source} hold different chat templates named \"{name}\"; keep one")
            }
            Some(_) => {}
            None => {
                by_name.insert(name, (source, template));
            }
        }
    }
    Ok((json, by_name))
}

/// `additional_chat_templates/*.jinja` in a tokenizer folder, sorted (none without the folder).
pub fn named_template_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let folder = dir.join(NAMED_TEMPLATES_DIR);
    if !folder.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .with_context(|| format!("{}: cannot list", folder.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "jinja"))
        .collect();
    files.sort();
    Ok(files)
}

/// The names of the chat templates a tokenizer folder holds ("default" first when present),
/// for messages; empty when it holds none or cannot be read.
pub fn template_names(config: &Path) -> Vec<String> {
    folder_templates(config).map(|(_, by_name)| default_first(by_name)).unwrap_or_default()
}

fn default_first(by_name: BTreeMap<String, (String, String)>) -> Vec<String> {
    let mut names: Vec<String> = by_name.into_keys().collect();
    names.sort_by_key(|n| n != DEFAULT);
    names
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
    /// The chat template of the tokenizer folder holding `config` (tokenizer_config.json)
    /// that chat uses: `name`, or without one the default — tokenizer_config.json's
    /// `chat_template` (a string, or the "default" entry of a list), `chat_template.jinja`
    /// (what transformers 4.5x and 5.x save), or a legacy `chat_template.json`. Named
    /// templates also come from `additional_chat_templates/NAME.jinja`. None when the folder
    /// has no default and no name is asked for; a name it lacks is an error listing those
    /// it has.
    pub fn load(config: &Path, name: Option<&str>) -> Result<Option<Self>> {
        let (json, mut by_name) = folder_templates(config)?;
        let wanted = name.unwrap_or(DEFAULT);
        let Some((source, template)) = by_name.remove(wanted) else {
            if name.is_none() {
                return Ok(None);
            }
            let dir = config.parent().unwrap_or(Path::new("."));
            let has = default_first(by_name);
            bail!(
                "chat_template: {} has no chat template named \"{wanted}\" (it has: {})",
                dir.display(),
                if has.is_empty() { "none".to_string() } else { has.join(", ") }
            );
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
        env.add_template_owned("chat", template).map_err(|e| anyhow::anyhow!("{source}: {e:#}"))?;
        Ok(Some(Self {
            env,
            bos_token: token_text(json.get("bos_token")),
            eos_token: token_text(json.get("eos_token")),
            source,
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
            .map_err(|e| format!("{}: {e}", self.source))
    }

    /// TRL's rule: the prompt is rendered with the generation prompt; each completion is
    /// what rendering prompt + completion adds after it.
    pub fn prompt_and_completions(
        &self,
        prompt: &[Message],
        completions: &[&[Message]],
    ) -> Result<(String, Vec<String>), String> {
        let prompt_text = self.render(prompt, true)?;
        let mut out = Vec::new();
        for completion in completions {
            let all: Vec<Message> = prompt.iter().chain(completion.iter()).cloned().collect();
            let full = self.render(&all, false)?;
            let Some(rest) = full.strip_prefix(&prompt_text) else {
                return Err(
                    "the chat template renders the conversation with a different prefix than the prompt alone".into()
                );
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
            let get = |key: &str| {
                m.get(key)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| format!("`{field}[{i}]` has no string `{key}`"))
            };
            Ok(Message { role: get("role")?, content: get("content")? })
        })
        .collect()
}
