//! Collation: prompt+completion sequences, right-padded, with next-token targets and a
//! mask that is 1 only where the target is a completion token.

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::pairs::Example;

/// Token tensors for N sequences of L-1 predicted positions.
pub struct SequenceBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    pub mask: Tensor<2>,
    /// Completion tokens per sequence.
    pub lengths: Vec<f32>,
}

/// Builds one batch from (prompt, completion) pairs.
pub fn collate(sequences: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> SequenceBatch {
    let longest = sequences.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(2);
    let width = longest - 1;
    let n = sequences.len();
    let mut inputs = vec![pad_id as i64; n * width];
    let mut targets = vec![pad_id as i64; n * width];
    let mut mask = vec![0f32; n * width];
    let mut lengths = Vec::with_capacity(n);
    for (row, (prompt, completion)) in sequences.iter().enumerate() {
        let tokens: Vec<u32> = prompt.iter().chain(completion.iter()).copied().collect();
        for pos in 0..tokens.len() - 1 {
            inputs[row * width + pos] = tokens[pos] as i64;
            targets[row * width + pos] = tokens[pos + 1] as i64;
            // Position pos predicts token pos+1; it is a completion token from prompt.len() on.
            if pos + 1 >= prompt.len() {
                mask[row * width + pos] = 1.0;
            }
        }
        lengths.push(completion.len() as f32);
    }
    SequenceBatch {
        inputs: Tensor::from_data(TensorData::new(inputs, [n, width]), device),
        targets: Tensor::from_data(TensorData::new(targets, [n, width]), device),
        mask: Tensor::from_data(TensorData::new(mask, [n, width]), device),
        lengths,
    }
}

/// Preference batch: chosen rows first, then rejected rows (one forward pass for both).
pub fn collate_pairs(examples: &[&Example], pad_id: u32, device: &Device) -> SequenceBatch {
    let mut seqs: Vec<(&[u32], &[u32])> = examples.iter().map(|e| (e.prompt.as_slice(), e.chosen.as_slice())).collect();
    seqs.extend(examples.iter().map(|e| (e.prompt.as_slice(), e.rejected.as_slice())));
    collate(&seqs, pad_id, device)
}

/// SFT batch: prompt + completion rows.
pub fn collate_sft(examples: &[&Example], pad_id: u32, device: &Device) -> SequenceBatch {
    let seqs: Vec<(&[u32], &[u32])> = examples.iter().map(|e| (e.prompt.as_slice(), e.chosen.as_slice())).collect();
    collate(&seqs, pad_id, device)
}
