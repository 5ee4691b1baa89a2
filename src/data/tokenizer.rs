//! tokenizer.json via the `tokenizers` crate, with the prompt/completion rules TRL uses:
//! the prompt gets the tokenizer's special tokens (e.g. BOS), the completion does not and
//! is followed by EOS.

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
        Ok(Self { inner, path: path.to_path_buf(), eos_id, pad_id, chat })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, true).map_err(|e| anyhow!("tokenizing prompt: {e}"))?.get_ids().to_vec())
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
