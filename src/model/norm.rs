//! RMSNorm over the last dimension, x / rms(x) · g, through the fused op. The weight is
//! kept as the checkpoint stores it: the gain itself (llama, mistral, qwen), or w for a
//! gain of 1 + w (gemma2), formed in f32 at each forward as transformers forms it.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use super::fused::rms_norm;

#[derive(Module, Debug)]
pub struct RmsNorm {
    /// [size], as stored.
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub epsilon: f64,
    /// Added to `weight` to give the gain: 1 for gemma2, else 0.
    #[module(skip)]
    pub offset: f64,
}

impl RmsNorm {
    /// x [..., size] -> the same shape.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let weight = self.weight.val();
        let gain = if self.offset == 0.0 { weight } else { weight.add_scalar(self.offset) };
        rms_norm(x, gain, self.epsilon)
    }
}
