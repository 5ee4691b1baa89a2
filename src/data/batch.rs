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
    /// The first column whose target is a completion token in any row: positions before it
    /// predict prompt tokens only, which no loss reads.
    pub first_target: usize,
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
    let first_target = sequences.iter().map(|(prompt, _)| prompt.len().saturating_sub(1)).min().unwrap_or(0);
    SequenceBatch {
        first_target: first_target.min(width),
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

/// Unpaired (KTO) batch: each row's prompt + completion, and the KL rows TRL builds for
/// the same batch: row i's prompt with row i−1's completion (row 0 takes the last one's),
/// mismatched pairs whose log-ratio estimates the policy's KL from the reference.
pub fn collate_unpaired(examples: &[&Example], pad_id: u32, device: &Device) -> (SequenceBatch, SequenceBatch) {
    let n = examples.len();
    let rows: Vec<(&[u32], &[u32])> = examples.iter().map(|e| (e.prompt.as_slice(), e.chosen.as_slice())).collect();
    let kl_rows: Vec<(&[u32], &[u32])> =
        (0..n).map(|i| (examples[i].prompt.as_slice(), examples[(i + n - 1) % n].chosen.as_slice())).collect();
    (collate(&rows, pad_id, device), collate(&kl_rows, pad_id, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(prompt: &[u32], completion: &[u32]) -> Example {
        Example {
            prompt: prompt.to_vec(),
            chosen: completion.to_vec(),
            rejected: Vec::new(),
            line: 1,
            label: Some(true),
        }
    }

    /// POET's shared mask (plugins/transforms/poet.rhai) needs what TRL's concatenated
    /// batch gives: a pair's chosen and rejected rows start their completions at one column.
    #[test]
    fn a_pairs_completions_start_at_the_same_column() {
        let pair = |prompt: &[u32], chosen: &[u32], rejected: &[u32]| Example {
            prompt: prompt.to_vec(),
            chosen: chosen.to_vec(),
            rejected: rejected.to_vec(),
            line: 1,
            label: None,
        };
        let pairs = [pair(&[1, 2, 3], &[10, 11], &[20, 21, 22, 23]), pair(&[4], &[12, 13, 14], &[24])];
        let refs: Vec<&Example> = pairs.iter().collect();
        let batch = collate_pairs(&refs, 0, &Device::flex());
        let width = batch.mask.dims()[1];
        let mask = crate::tensor::values(batch.mask.clone());
        let row = |r: usize| mask[r * width..(r + 1) * width].to_vec();
        let first = |r: usize| row(r).iter().position(|&m| m == 1.0).unwrap();
        let count = |r: usize| row(r).iter().filter(|&&m| m == 1.0).count();
        for (i, e) in pairs.iter().enumerate() {
            let (chosen, rejected) = (i, i + pairs.len());
            assert_eq!(first(chosen), e.prompt.len() - 1);
            assert_eq!(first(rejected), first(chosen));
            assert_eq!((count(chosen), count(rejected)), (e.chosen.len(), e.rejected.len()));
        }
    }

    #[test]
    fn kl_rows_take_the_previous_rows_completion_as_trl_does() {
        // TRL: KL_completion_ids = [c[-1]] + c[:-1], each with its own row's prompt.
        let rows = [row(&[1, 2], &[10]), row(&[3], &[20, 21]), row(&[4, 5, 6], &[30])];
        let refs: Vec<&Example> = rows.iter().collect();
        let device = Device::flex();
        let (plain, kl) = collate_unpaired(&refs, 0, &device);
        let targets = |b: &SequenceBatch| b.targets.clone().into_data().convert::<i64>().try_into_vec::<i64>().unwrap();
        let expected_kl =
            collate(&[(&[1u32, 2][..], &[30u32][..]), (&[3], &[10]), (&[4, 5, 6], &[20, 21])], 0, &device);
        assert_eq!(targets(&kl), targets(&expected_kl));
        assert_eq!(kl.lengths, vec![1.0, 1.0, 2.0]);
        assert_eq!(plain.lengths, vec![1.0, 2.0, 1.0]);
    }
}
