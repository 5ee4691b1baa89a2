//! RMSNorm over the last dimension, x / rms(x) · g, through the fused op. The weight is
//! kept as the checkpoint stores it: the gain itself (llama, mistral, qwen), or w for a
//! gain of 1 + w (gemma2), formed in f32 at each forward as transformers forms it.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use std::cell::OnceCell;

use super::fused::{normed_matmul, rms_norm};

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
        rms_norm(x, self.gain(), self.epsilon)
    }

    /// The gain: the weight, plus 1 for gemma2.
    fn gain(&self) -> Tensor<1> {
        let weight = self.weight.val();
        if self.offset == 0.0 { weight } else { weight.add_scalar(self.offset) }
    }
}

/// A norm's input with the norm, as the projections right after it take it. On the fused
/// path each projection forms norm(x)·w from x itself (`normed_matmul`), so the normalised
/// [batch, seq, size] copy is not kept for the backward pass; elsewhere they share one.
pub struct Normed<'a> {
    x: Tensor<3>,
    norm: &'a RmsNorm,
    value: OnceCell<Tensor<3>>,
}

impl<'a> Normed<'a> {
    pub fn new(x: Tensor<3>, norm: &'a RmsNorm) -> Self {
        Self { x, norm, value: OnceCell::new() }
    }

    /// The norm's input, [batch, seq, size].
    pub fn input(&self) -> &Tensor<3> {
        &self.x
    }

    /// norm(x), formed once.
    pub fn value(&self) -> Tensor<3> {
        self.value.get_or_init(|| self.norm.forward(self.x.clone())).clone()
    }

    /// norm(x) · w ([size, out]) -> [batch, seq, out] as one fused op, or None where the
    /// fused kernels do not apply.
    pub fn matmul(&self, w: &Tensor<2>) -> Option<Tensor<3>> {
        let [b, s, d] = self.x.dims();
        let y = normed_matmul(&self.x.clone().reshape([b * s, d]), &self.norm.gain(), w, self.norm.epsilon)?;
        let out = y.dims()[1];
        Some(y.reshape([b, s, out]))
    }
}
