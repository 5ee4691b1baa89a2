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
    pub eos_id: u32,
    pub pad_id: u32,
    /// The chat template of tokenizer_config.json beside tokenizer.json, if any.
    pub chat: Option<ChatTemplate>,
    /// Whether plain-text prompts get the tokenizer's special tokens (true unless set).
    pub prompt_special_tokens: bool,
}

impl TextTokenizer {
    /// `eos_id`/`pad_id` come from the model config when it has them, else from the
    /// usual token names in the vocabulary.
    pub fn load(path: &Path, eos_id: Option<u32>, pad_id: Option<u32>) -> Result<Self> {
        if !path.is_file() {
            bail!("{}: tokenizer.json not found", path.display());
        }
        let inner = Tokenizer::from_file(path).map_err(|e| anyhow!("{}: invalid tokenizer: {e}", path.display()))?;
        let by_name = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos_id = eos_id
            .or_else(|| by_name(&["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]))
            .ok_or_else(|| anyhow!("{}: no EOS token (set eos_token_id in config.json)", path.display()))?;
        let pad_id = pad_id.or_else(|| by_name(&["<pad>", "<|pad|>"])).unwrap_or(eos_id);
        let chat = ChatTemplate::load(&path.with_file_name("tokenizer_config.json"))?;
        Ok(Self { inner, path: path.to_path_buf(), eos_id, pad_id, chat, prompt_special_tokens: true })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, self.prompt_special_tokens).map_err(|e| anyhow!("tokenizing prompt: {e}"))?.get_ids().to_vec())
    }

    /// Whether `prompt` + `completion` tokenized as one text splits where the two meet (the
    /// prompt's tokens, then the completion's). TRL before 0.12 and from 0.29 tokenize the
    /// joined text; prefhost, like TRL 0.12 to 0.28, tokenizes the two apart, which gives
    /// other ids exactly when this is false.
    pub fn splits_at_boundary(&self, prompt: &str, completion: &str) -> Result<bool> {
        let ids = |text: &str| -> Result<Vec<u32>> { Ok(self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec()) };
        let mut apart = ids(prompt)?;
        apart.extend(ids(completion)?);
        Ok(apart == ids(&format!("{prompt}{completion}"))?)
    }

    /// A prompt rendered by the chat template: it already holds whatever special tokens
    /// the template writes (BOS included), so none are added.
    pub fn encode_templated_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing prompt: {e}"))?.get_ids().to_vec())
    }

    pub fn encode_completion(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing completion: {e}"))?.get_ids().to_vec();
        ids.push(self.eos_id);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }
}
