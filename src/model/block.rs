//! One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)).

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{Bool, Tensor};

use super::attention::{Attention, KvCache};
use super::fused::rms_norm;
use super::mlp::Mlp;
use super::rope::{Rope, RotaryTables};

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn forward(&self, x: Tensor<3>, rotary: &RotaryTables, hidden: Option<Tensor<4, Bool>>, is_causal: bool) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(norm(&self.input_layernorm, x), rotary, hidden, is_causal);
        x.clone() + self.mlp.forward(norm(&self.post_attention_layernorm, x))
    }

    pub fn forward_cached(&self, x: Tensor<3>, rope: &Rope, cache: &mut KvCache) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward_cached(norm(&self.input_layernorm, x), rope, cache);
        x.clone() + self.mlp.forward(norm(&self.post_attention_layernorm, x))
    }
}

/// burn's RmsNorm parameters through the fused op.
pub fn norm<const D: usize>(layer: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    rms_norm(x, layer.gamma.val(), layer.epsilon)
}
