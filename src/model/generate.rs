//! Greedy decoding with a KV cache, for evaluation. Prompts of equal token length are
//! decoded together, so no padding or position bookkeeping is needed.

use std::collections::BTreeMap;

use burn::tensor::{Int, Tensor, TensorData};

use super::attention::KvCache;
use super::llama::Llama;

/// Up to `max_new_tokens` greedy tokens after each prompt, stopping at any of `eos` (not
/// included) or at the model's last position. `model` should be on a plain (non-autodiff)
/// device. Returns the new tokens of each prompt, in the prompts' order.
pub fn greedy(model: &Llama, prompts: &[Vec<u32>], max_new_tokens: usize, eos: &[u32], group_size: usize) -> Vec<Vec<u32>> {
    let mut by_length: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        by_length.entry(p.len()).or_default().push(i);
    }
    let mut out = vec![Vec::new(); prompts.len()];
    for (length, rows) in by_length {
        for group in rows.chunks(group_size.max(1)) {
            let group_prompts: Vec<&[u32]> = group.iter().map(|&i| prompts[i].as_slice()).collect();
            let generated = greedy_same_length(model, &group_prompts, length, max_new_tokens, eos);
            for (&i, tokens) in group.iter().zip(generated) {
                out[i] = tokens;
            }
        }
    }
    out
}

fn greedy_same_length(model: &Llama, prompts: &[&[u32]], length: usize, max_new_tokens: usize, eos: &[u32]) -> Vec<Vec<u32>> {
    let n = prompts.len();
    let mut out = vec![Vec::new(); n];
    if length == 0 {
        return out;
    }
    let device = model.embed_tokens.weight.val().device();
    let budget = max_new_tokens.min(model.max_positions().saturating_sub(length));
    let mut cache: Vec<KvCache> = (0..model.layers.len()).map(|_| KvCache::default()).collect();
    let flat: Vec<i64> = prompts.iter().flat_map(|p| p.iter().map(|&t| t as i64)).collect();
    let mut input = Tensor::<2, Int>::from_data(TensorData::new(flat, [n, length]), &device);
    let mut finished = vec![false; n];
    for _ in 0..budget {
        let next = model.forward_last(input, &mut cache).argmax(1);
        let next: Vec<i64> = next.into_data().iter::<i64>().collect();
        for (row, &token) in next.iter().enumerate() {
            if !finished[row] {
                if eos.contains(&(token as u32)) {
                    finished[row] = true;
                } else {
                    out[row].push(token as u32);
                }
            }
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        input = Tensor::<2, Int>::from_data(TensorData::new(next, [n, 1]), &device);
    }
    out
}
