//! Causal self-attention with grouped-query heads (GQA).

use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use super::fused::attention::scaled_attention;
use super::lora::Projection;
use super::norm::{Normed, RmsNorm};
use super::rope::{Rope, RotaryTables};
use crate::tensor::from_column;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's (every layer) or gemma2's (sliding layers) window: a token sees at most
    /// this many tokens (0: no window).
    pub window: usize,
    /// Qwen3: RMSNorm of each query and key head (over head_dim) before RoPE.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// Scores are q·kᵀ times this (1/√head_dim, or gemma2's query_pre_attn_scalar^-1/2).
    #[module(skip)]
    pub scale: f64,
    /// Gemma2: scores become c·tanh(scores / c) before the mask and softmax.
    #[module(skip)]
    pub softcap: Option<f64>,
}

impl Attention {
    /// x: the input norm's [batch, seq, hidden] -> [batch, seq − keep_from, hidden], each
    /// token rotated by `rotary`, attending where `masked` ([batch or 1, 1, seq, seq], true =
    /// masked) is false, and causally when `is_causal` (packed rows carry their own mask
    /// instead). Every token is a key, but only columns `keep_from..` go through the output
    /// projection (see `DecoderLayer::forward`).
    pub fn forward(
        &self,
        x: &Normed,
        rotary: &RotaryTables,
        masked: Option<Tensor<4, Bool>>,
        is_causal: bool,
        keep_from: usize,
    ) -> Tensor<3> {
        let (q, k, v) = self.project(x, rotary);
        self.attend(q, k, v, masked, is_causal, keep_from)
    }

    /// Like `forward`, continuing after the tokens in `cache` and appending this call's
    /// keys and values to it. After the first call, one token at a time (greedy decoding).
    pub fn forward_cached(&self, x: &Normed, rope: &Rope, cache: &mut KvCache) -> Tensor<3> {
        let [_, seq, _] = x.input().dims();
        let offset = cache.len();
        assert!(offset == 0 || seq == 1, "a KV cache continues one token at a time");
        let positions: Vec<usize> = (offset..offset + seq).collect();
        let rotary = rope.tables(&positions, 1, seq, &x.input().device());
        let (q, k, v) = self.project(x, &rotary);
        let (k, v) = cache.append(k, v);
        let positions_k: Vec<usize> = (0..offset + seq).collect();
        let masked = self.window_mask(&positions, &positions_k, 1, &q.device());
        // A single new token may attend to every cached one, so only the first call is causal.
        self.attend(q, k, v, masked, offset == 0, 0)
    }

    /// Keys beyond the sliding window of each query ([batch, 1, q, k], true = masked), or
    /// None when no query has keys that far back. Positions are per query/key row.
    pub fn window_mask(
        &self,
        positions_q: &[usize],
        positions_k: &[usize],
        batch: usize,
        device: &burn::tensor::Device,
    ) -> Option<Tensor<4, Bool>> {
        let window = self.window;
        let (sq, sk) = (positions_q.len() / batch, positions_k.len() / batch);
        let far = |q: usize, k: usize| q >= k + window;
        if window == 0 || !positions_q.iter().any(|&q| positions_k.iter().any(|&k| far(q, k))) {
            return None;
        }
        let mut masked = vec![false; batch * sq * sk];
        for b in 0..batch {
            for i in 0..sq {
                for j in 0..sk {
                    masked[(b * sq + i) * sk + j] = far(positions_q[b * sq + i], positions_k[b * sk + j]);
                }
            }
        }
        Some(Tensor::from_data(burn::tensor::TensorData::new(masked, [batch, 1, sq, sk]), device))
    }

    /// Query, key and value heads ([batch, heads, seq, head_dim]), RoPE applied.
    fn project(&self, x: &Normed, rotary: &RotaryTables) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [batch, seq, _] = x.input().dims();
        let heads = |t: Tensor<3>, n: usize, head_norm: Option<&RmsNorm>| {
            let t = t.reshape([batch, seq, n, self.head_dim]);
            let t = match head_norm {
                Some(layer) => layer.forward(t),
                None => t,
            };
            t.swap_dims(1, 2)
        };
        let q = rotary.rotate(heads(self.q_proj.forward_normed(x), self.num_heads, self.q_norm.as_ref()));
        let k = rotary.rotate(heads(self.k_proj.forward_normed(x), self.num_kv_heads, self.k_norm.as_ref()));
        let v = heads(self.v_proj.forward_normed(x), self.num_kv_heads, None);
        (q, k, v)
    }

    fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        masked: Option<Tensor<4, Bool>>,
        is_causal: bool,
        keep_from: usize,
    ) -> Tensor<3> {
        let [batch, _, seq, _] = q.dims();
        let out = scaled_attention(q, k, v, masked, is_causal, self.scale, self.softcap);
        let out = out.swap_dims(1, 2).reshape([batch, seq, self.num_heads * self.head_dim]);
        self.o_proj.forward(from_column(out, keep_from))
    }
}

/// Keys and values of the tokens seen so far ([batch, kv_heads, seq, head_dim], after RoPE).
#[derive(Default)]
pub struct KvCache {
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let join = |old: Option<Tensor<4>>, new: Tensor<4>| match old {
            Some(old) => Tensor::cat(vec![old, new], 2),
            None => new,
        };
        let (k, v) = (join(self.keys.take(), k), join(self.values.take(), v));
        self.keys = Some(k.clone());
        self.values = Some(v.clone());
        (k, v)
    }
}
