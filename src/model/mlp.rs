//! Gated feed-forward block: down(act(gate(x)) * up(x)) — SwiGLU (silu) for llama, mistral
//! and qwen, GeGLU (gelu, tanh approximation) for gemma2.

use burn::module::Module;
use burn::tensor::Tensor;

use super::fused::swiglu;
use super::lora::Projection;

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
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (gate, up) = (self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        let hidden = match self.activation {
            Activation::Silu => swiglu(gate, up),
            Activation::GeluTanh => gelu_tanh(gate) * up,
        };
        self.down_proj.forward(hidden)
    }
}

/// GELU with the tanh approximation, in plain tensor ops (autodiff differentiates it).
fn gelu_tanh(x: Tensor<3>) -> Tensor<3> {
    let cubed = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cubed.mul_scalar(0.044715)).mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.mul_scalar(0.5) * (inner.tanh() + 1.0)
}
