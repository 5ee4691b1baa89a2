//! One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)).

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{Bool, Tensor};

use super::attention::{Attention, KvCache};
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
        let x = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), rotary, hidden, is_causal);
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }

    pub fn forward_cached(&self, x: Tensor<3>, rope: &Rope, cache: &mut KvCache) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward_cached(self.input_layernorm.forward(x), rope, cache);
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }
}
