//! One decoder layer. Pre-norm (llama, mistral, qwen): h = x + attn(norm(x)), then
//! h + mlp(norm(h)). Gemma2 also normalises each block's output before the residual add:
//! x + norm(attn(norm(x))), then x + norm(mlp(norm(x))).

use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use super::attention::{Attention, KvCache};
use super::mlp::Mlp;
use super::norm::{Normed, RmsNorm};
use super::rope::{Rope, RotaryTables};
use crate::tensor::from_column;

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// Pre-norm families: the MLP's input norm. Gemma2: the attention output's norm.
    pub post_attention_layernorm: RmsNorm,
    /// Gemma2 only: the MLP's input norm and its output's norm.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// x [batch, seq, hidden] -> the layer's output at columns `keep_from..`,
    /// [batch, seq − keep_from, hidden]. Every column is still a key and value of the
    /// attention; the output projection, residual and MLP run only on the kept ones (the
    /// last layer's, when only the completions' log-probs are read).
    pub fn forward(
        &self,
        x: Tensor<3>,
        rotary: &RotaryTables,
        masked: Option<Tensor<4, Bool>>,
        is_causal: bool,
        keep_from: usize,
    ) -> Tensor<3> {
        self.around(x, keep_from, |y| self.self_attn.forward(y, rotary, masked, is_causal, keep_from))
    }

    pub fn forward_cached(&self, x: Tensor<3>, rope: &Rope, cache: &mut KvCache) -> Tensor<3> {
        self.around(x, 0, |y| self.self_attn.forward_cached(y, rope, cache))
    }

    /// This layer's norms by HF module name (relative to the layer), in checkpoint order.
    pub fn norm_names(&self) -> Vec<(&'static str, &RmsNorm)> {
        let mut out = vec![
            ("input_layernorm", &self.input_layernorm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
        ];
        if let Some(n) = &self.pre_feedforward_layernorm {
            out.push(("pre_feedforward_layernorm", n));
        }
        if let Some(n) = &self.post_feedforward_layernorm {
            out.push(("post_feedforward_layernorm", n));
        }
        if let Some(n) = &self.self_attn.q_norm {
            out.push(("self_attn.q_norm", n));
        }
        if let Some(n) = &self.self_attn.k_norm {
            out.push(("self_attn.k_norm", n));
        }
        out
    }

    /// The residual structure around the attention `attend` and the MLP, each given its
    /// input norm's input with the norm (see `Normed`); `attend` returns columns
    /// `keep_from..` only, and so does this.
    fn around(&self, x: Tensor<3>, keep_from: usize, attend: impl FnOnce(&Normed) -> Tensor<3>) -> Tensor<3> {
        let attended = attend(&Normed::new(x.clone(), &self.input_layernorm));
        let x = from_column(x, keep_from);
        match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let x = x + self.post_attention_layernorm.forward(attended);
                x.clone() + post.forward(self.mlp.forward(&Normed::new(x, pre)))
            }
            _ => {
                let x = x + attended;
                x.clone() + self.mlp.forward(&Normed::new(x, &self.post_attention_layernorm))
            }
        }
    }
}
