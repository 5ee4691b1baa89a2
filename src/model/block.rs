//! One decoder layer. Pre-norm (llama, mistral, qwen): h = x + attn(norm(x)), then
//! h + mlp(norm(h)). Gemma2 also normalises each block's output before the residual add:
//! x + norm(attn(norm(x))), then x + norm(mlp(norm(x))).

use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use super::attention::{Attention, KvCache};
use super::mlp::Mlp;
use super::norm::{Normed, RmsNorm};
use super::rope::{Rope, RotaryTables};

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
    pub fn forward(
        &self,
        x: Tensor<3>,
        rotary: &RotaryTables,
        masked: Option<Tensor<4, Bool>>,
        is_causal: bool,
    ) -> Tensor<3> {
        self.around(x, |y| self.self_attn.forward(y, rotary, masked, is_causal))
    }

    pub fn forward_cached(&self, x: Tensor<3>, rope: &Rope, cache: &mut KvCache) -> Tensor<3> {
        self.around(x, |y| self.self_attn.forward_cached(y, rope, cache))
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
    /// input norm's input with the norm (see `Normed`).
    fn around(&self, x: Tensor<3>, attend: impl FnOnce(&Normed) -> Tensor<3>) -> Tensor<3> {
        let attended = attend(&Normed::new(x.clone(), &self.input_layernorm));
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
