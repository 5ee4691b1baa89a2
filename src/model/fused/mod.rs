//! Hand-fused ops for the CPU default (burn-flex, f32): each is one autodiff op with a
//! hand-written backward where burn would record a chain of small ops. On other backends
//! and dtypes they run the same maths in burn ops. `tests/fused_ops.rs` checks values and
//! gradients against burn's own ops.

pub mod attention;
pub mod elementwise;

pub use attention::{fuses, grouped_attention};
pub use elementwise::{rms_norm, rope, swiglu, target_logps};
