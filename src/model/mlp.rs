//! SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).

use burn::module::Module;
use burn::tensor::Tensor;

use super::fused::swiglu;
use super::lora::Projection;

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj.forward(swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x)))
    }
}
