//! Gated feed-forward block: down(act(gate(x)) * up(x)) — SwiGLU (silu) for llama, mistral
//! and qwen, GeGLU (gelu, tanh approximation) for gemma2.

use burn::module::Module;
use burn::tensor::Tensor;

use super::fused::{swiglu, swiglu_matmul};
use super::lora::Projection;
use super::norm::Normed;
use super::precision::MixedPrecision;

/// The gate's activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// silu(x) = x·σ(x), through the fused silu·up op.
    #[default]
    Silu,
    /// transformers' "gelu_pytorch_tanh": 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluTanh,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
    #[module(skip)]
    pub activation: Activation,
}

impl Mlp {
    /// x: the input norm's [batch, seq, hidden] -> [batch, seq, hidden].
    pub fn forward(&self, x: &Normed) -> Tensor<3> {
        let (gate, up) = (self.gate_proj.forward_normed(x), self.up_proj.forward_normed(x));
        let down = &self.down_proj;
        match self.activation {
            // A plain down projection takes SwiGLU with it as one op, which does not keep
            // the product silu(gate)·up for the backward (see `swiglu_matmul`).
            Activation::Silu
                if down.lora.is_none() && down.base.bias.is_none() && down.precision == MixedPrecision::No =>
            {
                let [b, s, inter] = gate.dims();
                let flat = |t: Tensor<3>| t.reshape([b * s, inter]);
                let y = swiglu_matmul(flat(gate), flat(up), down.base.weight.val());
                let out = y.dims()[1];
                y.reshape([b, s, out])
            }
            Activation::Silu => down.forward(swiglu(gate, up)),
            Activation::GeluTanh => down.forward(gelu_tanh(gate) * up),
        }
    }
}

/// GELU with the tanh approximation, in plain tensor ops (autodiff differentiates it).
fn gelu_tanh(x: Tensor<3>) -> Tensor<3> {
    let cubed = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cubed.mul_scalar(0.044715)).mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.mul_scalar(0.5) * (inner.tanh() + 1.0)
}
