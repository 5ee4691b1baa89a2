//! Mixed precision, as `torch.autocast` / accelerate's `mixed_precision="bf16"` do it: the weights
//! stay f32 (the master copy AdamW updates), and every matrix product against a weight (the
//! projections, LoRA adapters and the vocabulary head) casts both operands to bf16 and its
//! result back to f32. Norms, attention scores, softmax, log-probs and the loss stay f32.
//! The casts are autodiff ops, so the weight gradients come back as f32.
//! Where a backend has bf16 kernels (libtorch, CUDA) the products run in bf16; burn-flex
//! converts bf16 operands to f32 inside its matmul, so on "cpu" it only rounds like bf16.

use anyhow::{Result, bail};
use burn::tensor::{FloatDType, Tensor};
use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// Weight products in bf16, f32 master weights and everything else.
    Bf16,
}

impl MixedPrecision {
    /// The script's `mixed_precision` value ("no" or "bf16"; accelerate's names).
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "no" => Ok(Self::No),
            "bf16" => Ok(Self::Bf16),
            "fp16" => bail!("mixed_precision \"fp16\" needs loss scaling, which prefhost does not do; use \"bf16\""),
            other => bail!("mixed_precision must be \"no\" or \"bf16\", got \"{other}\""),
        }
    }

    /// x [rows, in] · w [in, out] -> [rows, out] in f32. `w` may be a frozen weight in its
    /// stored bf16/f16: under "no" it is widened to f32 for the product (exactly), under
    /// "bf16" a bf16 one is used as it is.
    pub fn matmul(self, x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
        match self {
            Self::No => super::fused::linear::matmul(x, w),
            Self::Bf16 => x.cast(FloatDType::BF16).matmul(w.cast(FloatDType::BF16)).cast(FloatDType::F32),
        }
    }

    /// x [batch, seq, in] · w [in, out] -> [batch, seq, out], as one 2-D product.
    pub fn matmul3(self, x: Tensor<3>, w: Tensor<2>) -> Tensor<3> {
        let [batch, seq, d_in] = x.dims();
        let d_out = w.dims()[1];
        self.matmul(x.reshape([batch * seq, d_in]), w).reshape([batch, seq, d_out])
    }
}
