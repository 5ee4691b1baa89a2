//! RMSNorm as one autodiff op on the CPU default (burn-flex, f32): burn's autodiff records
//! it as a chain of element-wise ops (square, mean, add, sqrt, divide, multiply), each a
//! pass over the activations with its own buffer and backward step; here the forward is one
//! pass and the backward one pass, from the input and each row's 1/rms kept by the forward.

use burn::backend::Flex;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::dispatch::run_fused;
use super::linear::product;
use crate::kernels::{self, contiguous_like, dense, vectorised};

/// x · rsqrt(mean(x²) + eps) · gamma over the last dimension (HF's LlamaRMSNorm in f32):
/// x [..., d], gamma [d] -> [..., d].
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    let fused = run_fused([&x, &gamma], RmsNormBackward, |[x, gamma], keep_state| {
        let (x, gamma) = (dense(x), dense(gamma));
        let (y, rstd) = rms_forward(&x, &gamma, eps);
        (y, keep_state.then_some((x, gamma, rstd)))
    });
    fused.unwrap_or_else(|| {
        let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
        (x / rms) * gamma.unsqueeze()
    })
}

/// y and the per-row 1/rms.
fn rms_forward(x: &FlexTensor, gamma: &FlexTensor, eps: f64) -> (FlexTensor, Vec<f32>) {
    let (xs, gs) = (x.storage::<f32>(), gamma.storage::<f32>());
    let d = gs.len();
    let rstd: Vec<f32> =
        xs.par_chunks(d).map(|xr| 1.0 / (kernels::dot(xr, xr) / d as f32 + eps as f32).sqrt()).collect();
    (normalise(x, gamma, &rstd), rstd)
}

/// x · r · gamma row by row, from each row's 1/rms `rstd`.
fn normalise(x: &FlexTensor, gamma: &FlexTensor, rstd: &[f32]) -> FlexTensor {
    let (xs, gs) = (x.storage::<f32>(), gamma.storage::<f32>());
    let d = gs.len();
    let y = kernels::par_fill(xs.len(), d, |row, yr| rms_row(yr, &xs[row * d..][..d], gs, rstd[row]));
    contiguous_like(y, x)
}

vectorised! {
    fn rms_row(y: &mut [MaybeUninit<f32>], x: &[f32], gamma: &[f32], r: f32) {
        y.iter_mut().zip(x).zip(gamma).for_each(|((y, x), g)| {
            y.write(x * r * g);
        });
    }
}

vectorised! {
    /// dx = r·(dy·g − x·r²·mean(dy·g·x)) for one row.
    fn rms_grad_row(dx: &mut [MaybeUninit<f32>], x: &[f32], dy: &[f32], gamma: &[f32], r: f32) {
        let mut lanes = [0.0f32; 16];
        let (cx, cdy, cg) = (x.chunks_exact(16), dy.chunks_exact(16), gamma.chunks_exact(16));
        let tail: f32 = cx.remainder().iter().zip(cdy.remainder()).zip(cg.remainder()).map(|((x, dy), g)| dy * g * x).sum();
        for ((x, dy), g) in cx.zip(cdy).zip(cg) {
            for i in 0..16 {
                lanes[i] += dy[i] * g[i] * x[i];
            }
        }
        let mean = (lanes.iter().sum::<f32>() + tail) / x.len() as f32;
        let k = r * r * mean;
        dx.iter_mut().zip(dy).zip(gamma).zip(x).for_each(|(((dx, dy), g), x)| {
            dx.write(r * (dy * g - x * k));
        });
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// x and gamma (contiguous), and each row's 1/rms.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_g] = ops.parents;
        let (x, gamma, rstd) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        register_rms_grads(&x, &gamma, &rstd, &dy, [node_x.map(|n| n.id), node_g.map(|n| n.id)], grads);
    }
}

/// The gradients of x and gamma from dy, the output's gradient, for the nodes that take one.
fn register_rms_grads(
    x: &FlexTensor,
    gamma: &FlexTensor,
    rstd: &[f32],
    dy: &FlexTensor,
    [node_x, node_g]: [Option<NodeId>; 2],
    grads: &mut Gradients,
) {
    let (xs, gs, dys) = (x.storage::<f32>(), gamma.storage::<f32>(), dy.storage::<f32>());
    let d = gs.len();
    if let Some(node) = node_x {
        let dx = kernels::par_fill(xs.len(), d, |row, dxr| {
            rms_grad_row(dxr, &xs[row * d..][..d], &dys[row * d..][..d], gs, rstd[row])
        });
        grads.register::<Flex>(node, contiguous_like(dx, x));
    }
    if let Some(node) = node_g {
        // dgamma = Σ_rows dy·x·r: partial sums over fixed blocks of rows, added in order,
        // so the result does not depend on how rayon splits the work (runs repeat exactly).
        const ROWS: usize = 64;
        let partials: Vec<Vec<f32>> = xs
            .par_chunks(d * ROWS)
            .zip(dys.par_chunks(d * ROWS))
            .zip(rstd.par_chunks(ROWS))
            .map(|((xb, dyb), rb)| {
                let mut acc = vec![0.0f32; d];
                for ((xr, dyr), r) in xb.chunks(d).zip(dyb.chunks(d)).zip(rb) {
                    acc.iter_mut().zip(xr).zip(dyr).for_each(|((a, x), dy)| *a += dy * x * r);
                }
                acc
            })
            .collect();
        let mut dg = vec![0.0f32; d];
        for p in partials {
            dg.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        grads.register::<Flex>(node, contiguous_like(dg, gamma));
    }
}

/// rms_norm(x, gamma) · w as one op that keeps x (the layer's residual input, kept anyway)
/// and each row's 1/rms, not the normalised x: its backward recomputes that for w's
/// gradient. A layer's projections after a norm (q, k, v; gate, up) each take it, which
/// saves the norm's [n, d] output per norm per layer for the cost of a norm per projection.
/// x [n, d], gamma [d], w [d, out] -> [n, out]; None when the fused kernels cannot take the
/// inputs (see `dispatch`), and the caller runs the norm and the product itself.
pub fn normed_matmul(x: &Tensor<2>, gamma: &Tensor<1>, w: &Tensor<2>, eps: f64) -> Option<Tensor<2>> {
    run_fused([x, gamma, w], NormedMatmulBackward, |[x, gamma, w], keep_state| {
        let (x, gamma) = (dense(x), dense(gamma));
        let (y, rstd) = rms_forward(&x, &gamma, eps);
        (product(&y, &w), keep_state.then_some((x, gamma, w, rstd)))
    })
}

#[derive(Debug)]
struct NormedMatmulBackward;

impl Backward<Flex, 3> for NormedMatmulBackward {
    /// x and gamma (contiguous), w, and each row's 1/rms.
    type State = (FlexTensor, FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_g, node_w] = ops.parents;
        let (x, gamma, w, rstd) = ops.state;
        let dout = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_w {
            // The normalised x again, exactly as the forward made it.
            let y = normalise(&x, &gamma, &rstd);
            grads.register::<Flex>(node.id, product(&y.transpose(0, 1), &dout));
        }
        if node_x.is_some() || node_g.is_some() {
            let dy = product(&dout, &w.transpose(0, 1));
            register_rms_grads(&x, &gamma, &rstd, &dy, [node_x.map(|n| n.id), node_g.map(|n| n.id)], grads);
        }
    }
}
