//! Prompts files (`host sample`, online rounds): the `prompt` of each JSONL or Parquet row,
//! tokenized as training tokenizes prompts.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use super::TextTokenizer;
use super::chat::messages;
use super::pairs::read_rows;

/// One prompt of a prompts file: as written (a string or a list of messages), its tokens,
/// and where it was read.
pub struct PromptRow {
    pub prompt: serde_json::Value,
    /// The whole row (all its fields), e.g. for a reward that reads its `answer`.
    pub row: serde_json::Value,
    pub tokens: Vec<u32>,
    pub at: String,
}

/// The `prompt` of every row of a JSONL or Parquet file (other fields are ignored, so a
/// pairs or eval file serves): a string gets the tokenizer's special tokens as training's
/// prompts do, a list of messages is rendered by the chat template with the generation prompt.
pub fn load_prompts(path: &Path, tokenizer: &TextTokenizer, max_positions: usize) -> Result<Vec<PromptRow>> {
    let mut rows = Vec::new();
    for raw in read_rows(path)? {
        let at = raw.at;
        let value = raw.value.map_err(|e| anyhow!("{at}: {e}"))?;
        let tokens = match value.get("prompt") {
            Some(serde_json::Value::String(text)) => tokenizer.encode_prompt(text),
            Some(list @ serde_json::Value::Array(_)) => {
                let messages = messages(list, "prompt").map_err(|e| anyhow!("{at}: {e}"))?;
                let template = tokenizer.chat.as_ref().with_context(|| {
                    format!(
                        "{at}: the prompt is a list of messages, but {} has no chat_template",
                        tokenizer.path.with_file_name("tokenizer_config.json").display()
                    )
                })?;
                let text = template.render(&messages, true).map_err(|e| anyhow!("{at}: {e}"))?;
                tokenizer.encode_templated_prompt(&text)
            }
            _ => bail!("{at}: missing field `prompt` (a string or a list of messages)"),
        }
        .with_context(|| at.clone())?;
        if tokens.is_empty() {
            bail!("{at}: the prompt has no tokens");
        }
        if tokens.len() >= max_positions {
            bail!(
                "{at}: the prompt has {} tokens, which leaves no room before the model's {max_positions} positions end",
                tokens.len()
            );
        }
        rows.push(PromptRow { prompt: value["prompt"].clone(), tokens, at, row: value });
    }
    if rows.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(rows)
}
