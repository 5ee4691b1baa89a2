//! Hand-fused ops for the CPU default (burn-flex, f32): each is one autodiff op with a
//! hand-written backward where burn would record a chain of small ops. On other backends
//! and dtypes they run the same maths in burn ops. `tests/fused_ops.rs` checks values and
//! gradients against burn's own ops.

use std::sync::OnceLock;

pub mod attention;
pub mod elementwise;
mod kernels;
pub(crate) use kernels::{scale, vectorised};
pub mod linear;

pub use attention::{fuses, grouped_attention};
pub use elementwise::{rms_norm, rope, swiglu, target_logps};

/// The fused ops are on unless `PREFHOST_UNFUSED=1`: `host bench` times both side by side.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PREFHOST_UNFUSED").map_or(true, |v| v.is_empty() || v == "0"))
}
