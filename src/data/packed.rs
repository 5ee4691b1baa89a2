//! Prefix sharing: one row per preference pair instead of two. The row holds the prompt
//! and the completions' common prefix once, then the chosen suffix, then the rejected
//! suffix; the rejected suffix restarts at the chosen suffix's positions and cannot see
//! it. Index maps lay the log-probs back out as the plain batch's [2B, W] rows, so
//! everything downstream (loss, metrics) is unchanged.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::pairs::Example;

/// Host-side layout of B packed rows of width L (pure data, testable without a model).
pub struct PackedLayout {
    pub batch: usize,
    pub width: usize,
    pub tokens: Vec<i64>,
    /// RoPE position of each token ([B * L]).
    pub positions: Vec<usize>,
    /// Key j is masked from query i ([B * L * L], true = masked).
    pub masked: Vec<bool>,
    /// Next chosen / rejected token at each packed position ([B * L]; pad where none).
    pub chosen_targets: Vec<i64>,
    pub rejected_targets: Vec<i64>,
    /// For plain position t of pair b's chosen / rejected row: the packed position whose
    /// prediction it is ([B * W], W = the plain batch's width).
    pub chosen_index: Vec<i64>,
    pub rejected_index: Vec<i64>,
    pub plain_width: usize,
    /// Tokens in the rows, padding excluded: what prefix sharing saves shows here.
    pub real_tokens: usize,
    /// The first packed position that predicts a completion token in any row (each row
    /// starts with its prompt).
    pub first_target: usize,
}

const SHARED: u8 = 0;
const CHOSEN: u8 = 1;
const REJECTED: u8 = 2;
const PAD: u8 = 3;

impl PackedLayout {
    /// `share_completion_prefix`: also share the completions' common prefix (low
    /// edit-distance pairs), not just the prompt.
    pub fn new(examples: &[&Example], pad_id: u32, share_completion_prefix: bool) -> Self {
        let batch = examples.len();
        let shared_len = |e: &Example| {
            let common = if share_completion_prefix {
                e.chosen.iter().zip(&e.rejected).take_while(|(a, b)| a == b).count()
            } else {
                0
            };
            // Keep one token of each completion out of the shared part, so both rows
            // have a suffix whose first token is predicted from the shared end.
            e.prompt.len() + common.min(e.chosen.len().saturating_sub(1)).min(e.rejected.len().saturating_sub(1))
        };
        let row_len = |e: &Example| {
            let s = shared_len(e);
            e.prompt.len() + e.chosen.len() + e.rejected.len() - (s - e.prompt.len())
        };
        let width = examples.iter().map(|e| row_len(e)).max().unwrap_or(1);
        let plain_width =
            examples.iter().map(|e| e.prompt.len() + e.chosen.len().max(e.rejected.len())).max().unwrap_or(2) - 1;
        let mut layout = Self {
            batch,
            width,
            tokens: vec![pad_id as i64; batch * width],
            positions: vec![0; batch * width],
            masked: vec![true; batch * width * width],
            chosen_targets: vec![pad_id as i64; batch * width],
            rejected_targets: vec![pad_id as i64; batch * width],
            chosen_index: vec![0; batch * plain_width],
            rejected_index: vec![0; batch * plain_width],
            plain_width,
            real_tokens: examples.iter().map(|e| row_len(e)).sum(),
            first_target: examples.iter().map(|e| e.prompt.len().saturating_sub(1)).min().unwrap_or(0).min(width),
        };
        for (b, e) in examples.iter().enumerate() {
            layout.pack_row(b, e, shared_len(e));
        }
        layout
    }

    fn pack_row(&mut self, b: usize, e: &Example, shared: usize) {
        let (l, w) = (self.width, self.plain_width);
        let chosen: Vec<u32> = e.prompt.iter().chain(&e.chosen).copied().collect();
        let rejected: Vec<u32> = e.prompt.iter().chain(&e.rejected).copied().collect();
        // Packed row: chosen[..shared] | chosen[shared..] | rejected[shared..]
        let rejected_start = chosen.len();
        let mut segment = vec![PAD; l];
        for (q, &tok) in chosen.iter().enumerate() {
            self.tokens[b * l + q] = tok as i64;
            self.positions[b * l + q] = q;
            segment[q] = if q < shared { SHARED } else { CHOSEN };
        }
        for (j, &tok) in rejected[shared..].iter().enumerate() {
            let q = rejected_start + j;
            self.tokens[b * l + q] = tok as i64;
            self.positions[b * l + q] = shared + j;
            segment[q] = REJECTED;
        }
        // Which packed position holds plain token t of each row.
        let chosen_at = |t: usize| t;
        let rejected_at = |t: usize| if t < shared { t } else { rejected_start + t - shared };
        for t in 0..chosen.len() - 1 {
            self.chosen_targets[b * l + chosen_at(t)] = chosen[t + 1] as i64;
            self.chosen_index[b * w + t] = chosen_at(t) as i64;
        }
        for t in 0..rejected.len() - 1 {
            self.rejected_targets[b * l + rejected_at(t)] = rejected[t + 1] as i64;
            self.rejected_index[b * w + t] = rejected_at(t) as i64;
        }
        for q in 0..l {
            for k in 0..=q {
                let visible = match (segment[q], segment[k]) {
                    (PAD, _) => k == 0, // padding attends somewhere, so no row is all masked
                    (_, SHARED) => true,
                    (query, key) => query == key,
                };
                if visible {
                    self.masked[(b * l + q) * l + k] = false;
                }
            }
        }
    }
}

/// The layout's tensors on one device.
pub struct PackedBatch {
    pub tokens: Tensor<2, Int>,
    pub positions: Vec<usize>,
    /// [B, 1, L, L], true = masked.
    pub masked: Tensor<4, Bool>,
    pub chosen_targets: Tensor<2, Int>,
    pub rejected_targets: Tensor<2, Int>,
    pub chosen_index: Tensor<2, Int>,
    pub rejected_index: Tensor<2, Int>,
    /// As `PackedLayout::first_target`.
    pub first_target: usize,
}

impl PackedLayout {
    pub fn to_device(&self, device: &Device) -> PackedBatch {
        let (b, l, w) = (self.batch, self.width, self.plain_width);
        let ints = |v: &[i64], cols: usize| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [b, cols]), device);
        PackedBatch {
            tokens: ints(&self.tokens, l),
            positions: self.positions.clone(),
            masked: Tensor::<4, Bool>::from_data(TensorData::new(self.masked.clone(), [b, 1, l, l]), device),
            chosen_targets: ints(&self.chosen_targets, l),
            rejected_targets: ints(&self.rejected_targets, l),
            chosen_index: ints(&self.chosen_index, w),
            rejected_index: ints(&self.rejected_index, w),
            first_target: self.first_target,
        }
    }
}
