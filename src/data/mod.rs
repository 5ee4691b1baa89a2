//! Data: tokenizer, JSONL and Parquet rows, batches, and the generated arithmetic corpus.

pub mod arithmetic;
pub mod batch;
pub mod build_pairs;
pub mod chat;
pub mod packed;
pub mod pairs;
pub mod parquet;
pub mod prompts;
pub mod tokenizer;

pub use batch::{SequenceBatch, collate_pairs, collate_sft, collate_unpaired};
pub use pairs::{Example, LoadReport, Truncation, load_examples, load_unpaired_examples};
pub use tokenizer::TextTokenizer;
