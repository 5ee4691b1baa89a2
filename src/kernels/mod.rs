//! CPU kernels over burn-flex f32 storage, shared by the fused model ops (`model::fused`)
//! and the trainer's gradient clipping and AdamW: strided matrix products written straight
//! into our own buffers (burn-flex's matmul zero-fills its output and then copies it once
//! more to align it), output buffers that are written before they are read (no zero-fill),
//! and element-wise loops (an exp among them) that the compiler vectorises, compiled for
//! AVX-512 and AVX2 and picked at run time.

mod buffer;
mod gemm;
mod simd;

pub use buffer::{Buffer, contiguous, contiguous_like, dense, par_fill, rows_readable, strided, to_write};
pub use gemm::{SharedOut, View, gemm, gemm_parallel, matrix};
pub(crate) use simd::vectorised;
pub use simd::{
    dot, exp, exp_shifted_sum, max, scale, scale_unmasked, scaled_exp_shifted, sigmoid, softmax_grad, sum_exp_shifted,
};
