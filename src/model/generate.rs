//! Decoding with a KV cache: greedy for evaluation, and seeded sampling (`host sample`,
//! on-policy data). Rows of equal prompt length are decoded together, so no padding or
//! position bookkeeping is needed; a finished row goes on being fed (its output ignored)
//! until its group is done, as transformers' generate does.

use std::collections::BTreeMap;
use std::convert::Infallible;

use anyhow::{Context, Result};
use burn::tensor::{Int, Tensor, TensorData};

use super::attention::KvCache;
use super::llama::Llama;
use super::sampling::{SamplingSettings, uniform};

/// Up to `max_new_tokens` greedy tokens after each prompt, stopping at any of `eos` (not
/// included) or at the model's last position. `model` should be on a plain (non-autodiff)
/// device. Returns the new tokens of each prompt, in the prompts' order.
pub fn greedy(
    model: &Llama,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    group_size: usize,
) -> Vec<Vec<u32>> {
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let Ok(decoded) = decode_by_length(
        model,
        &rows,
        max_new_tokens,
        eos,
        group_size,
        |_, logits: Tensor<2>, _| -> Result<Vec<u32>, Infallible> {
            // On the device: only the chosen ids come back to the host.
            Ok(logits.argmax(1).into_data().iter::<i64>().map(|t| t as u32).collect())
        },
    );
    decoded.into_iter().map(|d| d.tokens).collect()
}

/// One generated completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// New tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// Whether it stopped at one of the EOS ids (else at max_new_tokens or the model's last position).
    pub eos: bool,
}

/// One sample: the `sample`-th completion of prompt number `prompt`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub prompt: usize,
    pub sample: usize,
    pub completion: Completion,
}

/// `n` completions of every prompt under `settings`, decoded in groups of up to
/// `batch_size` rows of equal prompt length. Token t of sample k of prompt i is drawn with
/// `uniform(seed, i, k, t)`, so the result does not depend on `batch_size` or on which
/// other prompts are in the file. Returns prompt-major order (every sample of prompt 0 first).
pub fn sample(
    model: &Llama,
    prompts: &[Vec<u32>],
    n: usize,
    settings: &SamplingSettings,
    eos: &[u32],
    batch_size: usize,
) -> Result<Vec<Sample>> {
    settings.validate()?;
    let ids: Vec<(usize, usize)> = (0..prompts.len()).flat_map(|p| (0..n).map(move |s| (p, s))).collect();
    let rows: Vec<&[u32]> = ids.iter().map(|&(p, _)| prompts[p].as_slice()).collect();
    let vocab = model.vocab_size();
    // Each row's tokens so far, for the repetition penalty (a finished row's extra tokens
    // land here too, unread).
    let mut seen: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
    let decoded = decode_by_length(
        model,
        &rows,
        settings.max_new_tokens,
        eos,
        batch_size,
        |group: &[usize], logits: Tensor<2>, step| {
            // The logits come to the host, so every backend samples with the same code.
            let logits = crate::tensor::values(logits);
            group
                .iter()
                .zip(logits.chunks(vocab))
                .map(|(&row, row_logits)| {
                    let (p, s) = ids[row];
                    let token = settings
                        .choose(row_logits, &seen[row], uniform(settings.seed, p, s, step))
                        .with_context(|| format!("prompt {p}, sample {s}, token {step}"))?;
                    seen[row].push(token);
                    Ok::<u32, anyhow::Error>(token)
                })
                .collect()
        },
    )?;
    Ok(ids
        .into_iter()
        .zip(decoded)
        .map(|((prompt, sample), completion)| Sample { prompt, sample, completion })
        .collect())
}

/// Decodes every row, grouped by prompt length into groups of up to `group_size`.
/// `choose(group, logits [group.len(), vocab], step)` gives the group's next tokens, `group`
/// holding the rows' indices into `prompts`. Returns the rows' completions in order.
fn decode_by_length<E>(
    model: &Llama,
    prompts: &[&[u32]],
    max_new_tokens: usize,
    eos: &[u32],
    group_size: usize,
    mut choose: impl FnMut(&[usize], Tensor<2>, usize) -> Result<Vec<u32>, E>,
) -> Result<Vec<Completion>, E> {
    let mut out = vec![Completion { tokens: Vec::new(), eos: false }; prompts.len()];
    for group in groups_by_length(prompts, group_size) {
        let generated =
            decode_same_length(model, prompts, &group, prompts[group[0]].len(), max_new_tokens, eos, &mut choose)?;
        for (&i, completion) in group.iter().zip(generated) {
            out[i] = completion;
        }
    }
    Ok(out)
}

/// The groups rows are decoded in: indices of non-empty prompts of equal length, shortest
/// first, in order, at most `group_size` each.
pub fn groups_by_length(prompts: &[&[u32]], group_size: usize) -> Vec<Vec<usize>> {
    let mut by_length: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
        by_length.entry(p.len()).or_default().push(i);
    }
    by_length.values().flat_map(|rows| rows.chunks(group_size.max(1)).map(<[usize]>::to_vec)).collect()
}

fn decode_same_length<E>(
    model: &Llama,
    prompts: &[&[u32]],
    group: &[usize],
    length: usize,
    max_new_tokens: usize,
    eos: &[u32],
    choose: &mut impl FnMut(&[usize], Tensor<2>, usize) -> Result<Vec<u32>, E>,
) -> Result<Vec<Completion>, E> {
    let n = group.len();
    let mut out = vec![Completion { tokens: Vec::new(), eos: false }; n];
    let device = model.embed_tokens.weight.val().device();
    let budget = max_new_tokens.min(model.max_positions().saturating_sub(length));
    let mut cache: Vec<KvCache> = (0..model.layers.len()).map(|_| KvCache::default()).collect();
    let flat: Vec<i64> = group.iter().flat_map(|&i| prompts[i].iter().map(|&t| t as i64)).collect();
    let mut input = Tensor::<2, Int>::from_data(TensorData::new(flat, [n, length]), &device);
    let mut finished = vec![false; n];
    for step in 0..budget {
        let next = choose(group, model.forward_last(input, &mut cache), step)?;
        for (row, &token) in next.iter().enumerate() {
            if !finished[row] {
                if eos.contains(&token) {
                    finished[row] = true;
                    out[row].eos = true;
                } else {
                    out[row].tokens.push(token);
                }
            }
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        let next: Vec<i64> = next.into_iter().map(i64::from).collect();
        input = Tensor::<2, Int>::from_data(TensorData::new(next, [n, 1]), &device);
    }
    Ok(out)
}
