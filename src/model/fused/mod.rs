//! Hand-fused ops for the CPU default (burn-flex, f32): each is one autodiff op with a
//! hand-written backward where burn would record a chain of small ops. On other backends
//! and dtypes they run the same maths in burn ops. `tests/fused_ops.rs` checks values and
//! gradients against burn's own ops.
//!
//! One file per op; `dispatch.rs` decides whether an op's inputs can take the fused path
//! and records it under autodiff. The CPU kernels they share live in `crate::kernels`.

use std::sync::OnceLock;

pub mod attention;
mod dispatch;
pub mod linear;
mod rms_norm;
mod rope;
mod swiglu;
mod target_logps;

pub use attention::{fuses, grouped_attention};
pub use linear::{DeferredWeightGrad, matmul_deferring_weight_grad};
pub use rms_norm::{normed_matmul, rms_norm};
pub use rope::rope;
pub use swiglu::{swiglu, swiglu_matmul};
pub use target_logps::{log_softmax, target_logps};

/// The fused ops are on unless `PREFHOST_UNFUSED=1`: `host bench` times both side by side.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PREFHOST_UNFUSED").map_or(true, |v| v.is_empty() || v == "0"))
}
