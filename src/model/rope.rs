//! Rotary position embedding in the Hugging Face `rotate_half` layout: the first and
//! second halves of each head form the rotated pairs (burn's RotaryEncoding pairs
//! adjacent features instead, which would not match HF checkpoints).

use burn::tensor::{Device, Tensor, TensorData};

use super::config::RopeScaling;

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
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> =
            (0..half).map(|i| scaled(1.0 / theta.powf((2 * i) as f64 / head_dim as f64), scaling)).collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            // HF concatenates the frequencies twice: emb = cat(freqs, freqs).
            for i in 0..head_dim {
                let angle = pos as f64 * inv_freq[i % half];
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
        let [_, _, seq, _] = x.dims();
        let positions: Vec<usize> = (offset..offset + seq).collect();
        let tables = self.tables(&positions, 1, seq, &x.device());
        tables.rotate(x)
    }

    /// cos/sin for tokens at `positions` ([batch * seq], row-major), built once per
    /// forward pass and shared by every layer.
    pub fn tables(&self, positions: &[usize], batch: usize, seq: usize, device: &Device) -> RotaryTables {
        assert_eq!(positions.len(), batch * seq, "one position per token");
        let d = self.head_dim;
        let pick = |values: &[f32]| {
            let mut out = Vec::with_capacity(positions.len() * d);
            for &pos in positions {
                assert!(
                    pos < self.max_positions,
                    "position {pos} exceeds the model's {} positions",
                    self.max_positions
                );
                out.extend_from_slice(&values[pos * d..(pos + 1) * d]);
            }
            Tensor::<4>::from_data(TensorData::new(out, [batch, 1, seq, d]), device)
        };
        RotaryTables { cos: pick(&self.cos), sin: pick(&self.sin) }
    }
}

/// cos/sin rows for one batch's token positions ([batch or 1, 1, seq, head_dim]).
#[derive(Clone, Debug)]
pub struct RotaryTables {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl RotaryTables {
    /// The same tables after `f` (e.g. moved on or off the autodiff device).
    pub fn map(&self, f: impl Fn(Tensor<4>) -> Tensor<4>) -> Self {
        Self { cos: f(self.cos.clone()), sin: f(self.sin.clone()) }
    }

    /// x: [batch, heads, seq, head_dim], rotated in the rotate_half layout.
    pub fn rotate(&self, x: Tensor<4>) -> Tensor<4> {
        super::fused::rope(x, &self.cos, &self.sin)
    }
}

/// One inverse frequency after HF's rope_scaling (transformers' `_compute_*_parameters`).
fn scaled(inv_freq: f64, scaling: &RopeScaling) -> f64 {
    match *scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            let (low_wavelen, high_wavelen) =
                (original_max_positions / low_freq_factor, original_max_positions / high_freq_factor);
            if wavelen < high_wavelen {
                inv_freq
            } else if wavelen > low_wavelen {
                inv_freq / factor
            } else {
                let smooth =
                    (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}
