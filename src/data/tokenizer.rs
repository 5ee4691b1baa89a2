//! tokenizer.json via the `tokenizers` crate. A prompt and its completion are tokenized
//! apart; the completion gets no special tokens and is followed by EOS. The prompt gets the
//! tokenizer's special tokens (its post-processor's, e.g. BOS) when `prompt_special_tokens`
//! is set, as TRL before 0.12, the SimPO, γ-PO and AMaPO repositories built on it, and TRL
//! from 0.29 do; without them, as TRL 0.12 to 0.28's `tokenize_row` does for decoder-only
//! models.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use tokenizers::Tokenizer;

use super::chat::ChatTemplate;

pub struct TextTokenizer {
    inner: Tokenizer,
    pub path: PathBuf,
    /// The EOS appended to every completion.
    pub eos_id: u32,
    /// Where generation stops: `eos_id` and every id config.json lists as eos_token_id.
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
    /// The chat template conversational rows are rendered with: the folder's default (see
    /// `ChatTemplate::load`), or the one `use_chat_template` named.
    pub chat: Option<ChatTemplate>,
    /// Whether plain-text prompts get the tokenizer's special tokens (true unless set).
    pub prompt_special_tokens: bool,
}

impl TextTokenizer {
    /// `eos_id`/`pad_id` come from the model config when it has them; see `load_with`.
    pub fn load(path: &Path, eos_id: Option<u32>, pad_id: Option<u32>) -> Result<Self> {
        Self::load_with(path, eos_id.as_slice(), pad_id)
    }

    /// `eos_ids`: config.json's eos_token_id, one id or several (Llama 3.1 and Gemma 2
    /// instruct models list every token that ends a turn). The EOS appended to completions
    /// is tokenizer_config.json's `eos_token` when the folder has one, as TRL appends the
    /// tokenizer's; it must then be one of `eos_ids`. Otherwise the one config id, or with
    /// none the usual token names; several config ids and no eos_token is an error, since
    /// which one ends a completion would be a guess.
    pub fn load_with(path: &Path, eos_ids: &[u32], pad_id: Option<u32>) -> Result<Self> {
        if !path.is_file() {
            bail!("{}: tokenizer.json not found", path.display());
        }
        let inner = Tokenizer::from_file(path).map_err(|e| anyhow!("{}: invalid tokenizer: {e}", path.display()))?;
        let by_name = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let tokenizer_config = path.with_file_name("tokenizer_config.json");
        let named = tokenizer_eos(&tokenizer_config, &inner)?;
        let eos_id = match (named, eos_ids) {
            (Some(id), []) => id,
            (Some(id), ids) if ids.contains(&id) => id,
            (Some(id), ids) => bail!(
                "{}: eos_token is token {id}, which config.json's eos_token_id {ids:?} does not list; which one ends a completion would be a guess",
                tokenizer_config.display()
            ),
            (None, [id]) => *id,
            (None, []) => by_name(&["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"])
                .ok_or_else(|| anyhow!("{}: no EOS token (set eos_token_id in config.json)", path.display()))?,
            (None, ids) => bail!(
                "{}: config.json's eos_token_id lists {ids:?} and the folder has no tokenizer_config.json eos_token to say which ends a completion",
                path.display()
            ),
        };
        let mut stop_ids = vec![eos_id];
        stop_ids.extend(eos_ids.iter().filter(|id| **id != eos_id));
        let pad_id = pad_id.or_else(|| by_name(&["<pad>", "<|pad|>"])).unwrap_or(eos_id);
        let chat = ChatTemplate::load(&tokenizer_config, None)?;
        Ok(Self { inner, path: path.to_path_buf(), eos_id, stop_ids, pad_id, chat, prompt_special_tokens: true })
    }

    /// Renders conversational rows with the folder's template named `name` (transformers'
    /// `apply_chat_template(chat_template=name)`) instead of the default.
    pub fn use_chat_template(&mut self, name: &str) -> Result<()> {
        self.chat = ChatTemplate::load(&self.path.with_file_name("tokenizer_config.json"), Some(name))?;
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, self.prompt_special_tokens)
            .map_err(|e| anyhow!("tokenizing prompt: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Whether `prompt` + each of `completions` tokenized as one text splits where the two
    /// meet (the prompt's tokens, then the completion's). TRL before 0.12 and from 0.29
    /// tokenize the joined text; prefhost, like TRL 0.12 to 0.28, tokenizes the two apart,
    /// which gives other ids exactly when this is false.
    pub fn splits_at_boundary<'a>(&self, prompt: &str, completions: impl IntoIterator<Item = &'a str>) -> Result<bool> {
        let ids = |text: &str| -> Result<Vec<u32>> {
            Ok(self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
        };
        let prompt_ids = ids(prompt)?;
        for completion in completions {
            let joined = ids(&format!("{prompt}{completion}"))?;
            if !(joined.starts_with(&prompt_ids) && joined[prompt_ids.len()..] == ids(completion)?) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A prompt rendered by the chat template: it already holds whatever special tokens
    /// the template writes (BOS included), so none are added.
    pub fn encode_templated_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing prompt: {e}"))?.get_ids().to_vec())
    }

    pub fn encode_completion(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids =
            self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing completion: {e}"))?.get_ids().to_vec();
        ids.push(self.eos_id);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }
}

/// The files beside tokenizer.json that decide how rows become tokens (special tokens,
/// chat templates, named ones included), as paths relative to `dir`, those present, sorted.
/// They travel with a saved model and are part of a run's identity.
pub fn side_files(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> =
        ["chat_template.jinja", "chat_template.json", "special_tokens_map.json", "tokenizer_config.json"]
            .into_iter()
            .filter(|n| dir.join(n).is_file())
            .map(str::to_string)
            .collect();
    for path in super::chat::named_template_files(dir)? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        names.push(format!("{}/{name}", super::chat::NAMED_TEMPLATES_DIR));
    }
    Ok(names)
}

/// tokenizer_config.json's `eos_token` as an id, when the file names one.
fn tokenizer_eos(config: &Path, inner: &Tokenizer) -> Result<Option<u32>> {
    let Ok(text) = std::fs::read_to_string(config) else { return Ok(None) };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}:{}: {e}", config.display(), e.line(), e.column()))?;
    let name = super::chat::token_text(json.get("eos_token"));
    if name.is_empty() {
        return Ok(None);
    }
    inner
        .token_to_id(&name)
        .map(Some)
        .ok_or_else(|| anyhow!("{}: eos_token \"{name}\" is not in tokenizer.json's vocabulary", config.display()))
}
