//! Rotary position embedding in the Hugging Face `rotate_half` layout: the first and
//! second halves of each head form the rotated pairs (burn's RotaryEncoding pairs
//! adjacent features instead, which would not match HF checkpoints).

use burn::tensor::{Tensor, TensorData};

/// Precomputed cos/sin tables, kept as plain values so the same tables serve the policy
/// (autodiff device) and the frozen reference (plain device).
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    max_positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            // HF concatenates the frequencies twice: emb = cat(freqs, freqs).
            for i in 0..head_dim {
                let inv_freq = 1.0 / theta.powf((2 * (i % half)) as f64 / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { head_dim, max_positions, cos, sin }
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// x: [batch, heads, seq, head_dim], positions 0..seq.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.apply_from(x, 0)
    }

    /// x: [batch, heads, seq, head_dim] at positions offset..offset+seq (decoding with a
    /// KV cache continues where the cached tokens end).
    pub fn apply_from(&self, x: Tensor<4>, offset: usize) -> Tensor<4> {
        let [_, _, seq, head_dim] = x.dims();
        let end = offset + seq;
        assert!(end <= self.max_positions, "position {end} exceeds the model's {} positions", self.max_positions);
        let device = x.device();
        let table = |values: &[f32]| {
            let data = TensorData::new(values[offset * head_dim..end * head_dim].to_vec(), [1, 1, seq, head_dim]);
            Tensor::<4>::from_data(data, &device)
        };
        let (cos, sin) = (table(&self.cos), table(&self.sin));
        let half = head_dim / 2;
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        debug_assert_eq!(head_dim, self.head_dim);
        x * cos + rotated * sin
    }
}
