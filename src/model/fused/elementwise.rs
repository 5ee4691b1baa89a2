//! RMSNorm, SwiGLU's silu(gate)·up, rotate_half RoPE and the target tokens' log-softmax as
//! single autodiff ops on the CPU
//! default (burn-flex, f32). burn's autodiff records each as a chain of 3 to 7 element-wise
//! ops, each a pass over the activations with its own buffer and backward step; here the
//! forward is one pass and the backward one pass, from the inputs kept by the forward.
//! Other backends and dtypes use the same maths in burn ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Int, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{self, sigmoid, vectorised};

type AutodiffFlex = Autodiff<Flex, NoCheckpointing>;

/// Where a set of tensors lives, as far as the fused kernels care.
enum On<const N: usize> {
    Tracked([FloatTensor<AutodiffFlex>; N]),
    Plain([FlexTensor; N]),
}

fn locate<const N: usize, const D: usize>(tensors: [&Tensor<D>; N]) -> Option<On<N>> {
    if !super::enabled() || tensors.iter().any(|t| t.dtype() != DType::F32) {
        return None;
    }
    let tracked: Vec<_> = tensors.iter().filter_map(|t| (*t).clone().try_into_primitive::<AutodiffFlex>().ok()).collect();
    if tracked.len() == N {
        return tracked.try_into().ok().map(On::Tracked);
    }
    let plain: Vec<_> = tensors.iter().filter_map(|t| (*t).clone().try_into_primitive::<Flex>().ok()).collect();
    if plain.len() == N {
        return plain.try_into().ok().map(On::Plain);
    }
    None
}

/// Contiguous f32 values of a flex tensor (copied only if it is a strided view).
fn dense(t: FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn from_vec(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    kernels::contiguous(values, like.layout().shape().clone())
}

// ---------------------------------------------------------------- RMSNorm

/// x · rsqrt(mean(x²) + eps) · gamma over the last dimension (HF's LlamaRMSNorm in f32).
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    match locate([&x]).zip(locate([&gamma])) {
        Some((On::Tracked([xp]), On::Tracked([gp]))) => Tensor::from_primitive::<AutodiffFlex>(rms_tracked(xp, gp, eps)),
        Some((On::Plain([xp]), On::Plain([gp]))) => Tensor::from_primitive::<Flex>(rms_forward(&dense(xp), &dense(gp), eps).0),
        _ => {
            let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
            (x / rms) * gamma.unsqueeze()
        }
    }
}

/// y and the per-row 1/rms.
fn rms_forward(x: &FlexTensor, gamma: &FlexTensor, eps: f64) -> (FlexTensor, Vec<f32>) {
    let (xs, gs) = (x.storage::<f32>(), gamma.storage::<f32>());
    let d = gs.len();
    let mut y = vec![0.0f32; xs.len()];
    let mut rstd = vec![0.0f32; xs.len() / d];
    y.par_chunks_mut(d).zip(xs.par_chunks(d)).zip(rstd.par_iter_mut()).for_each(|((yr, xr), r)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        *r = 1.0 / (ms + eps as f32).sqrt();
        yr.iter_mut().zip(xr).zip(gs).for_each(|((y, x), g)| *y = x * *r * g);
    });
    (from_vec(y, x), rstd)
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_g] = ops.parents;
        let (x, gamma, rstd) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let (xs, gs, dys) = (x.storage::<f32>(), gamma.storage::<f32>(), dy.storage::<f32>());
        let d = gs.len();
        if let Some(node) = node_x {
            let mut dx = vec![0.0f32; xs.len()];
            dx.par_chunks_mut(d).zip(xs.par_chunks(d)).zip(dys.par_chunks(d)).zip(rstd.par_iter()).for_each(|(((dxr, xr), dyr), r)| {
                // dx = r·(dy·g − x·r²·mean(dy·g·x))
                let mean = dyr.iter().zip(gs).zip(xr).map(|((dy, g), x)| dy * g * x).sum::<f32>() / d as f32;
                let k = r * r * mean;
                dxr.iter_mut().zip(dyr).zip(gs).zip(xr).for_each(|(((dx, dy), g), x)| *dx = r * (dy * g - x * k));
            });
            grads.register::<Flex>(node.id, from_vec(dx, &x));
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
            grads.register::<Flex>(node.id, from_vec(dg, &gamma));
        }
    }
}

fn rms_tracked(x: FloatTensor<AutodiffFlex>, gamma: FloatTensor<AutodiffFlex>, eps: f64) -> FloatTensor<AutodiffFlex> {
    match RmsNormBackward.prepare::<NoCheckpointing>([x.node(), gamma.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (xp, gp) = (dense(x.into_primitive()), dense(gamma.into_primitive()));
            let (y, rstd) = rms_forward(&xp, &gp, eps);
            prep.finish((xp, gp, rstd), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(rms_forward(&dense(x.into_primitive()), &dense(gamma.into_primitive()), eps).0),
    }
}

// ---------------------------------------------------------------- SwiGLU

/// silu(gate) · up, element-wise (same shapes).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    match locate([&gate, &up]) {
        Some(On::Tracked([g, u])) => Tensor::from_primitive::<AutodiffFlex>(swiglu_tracked(g, u)),
        Some(On::Plain([g, u])) => Tensor::from_primitive::<Flex>(swiglu_forward(&dense(g), &dense(u))),
        None => silu(gate) * up,
    }
}

vectorised! {
    fn swiglu_chunk(y: &mut [f32], g: &[f32], u: &[f32]) {
        y.iter_mut().zip(g).zip(u).for_each(|((y, g), u)| *y = g * sigmoid(*g) * u);
    }
}

vectorised! {
    /// dg = dy·u·σ(g)·(1 + g·(1 − σ(g))) and du = dy·g·σ(g); either may be empty.
    fn swiglu_grad_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        if !dg.is_empty() && !du.is_empty() {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = dy[i] * g[i] * s;
            }
        } else if !dg.is_empty() {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        } else if !du.is_empty() {
            for i in 0..g.len() {
                du[i] = dy[i] * g[i] * sigmoid(g[i]);
            }
        }
    }
}

fn swiglu_forward(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
    let (gs, us) = (g.storage::<f32>(), u.storage::<f32>());
    let mut y = vec![0.0f32; gs.len()];
    y.par_chunks_mut(4096).zip(gs.par_chunks(4096)).zip(us.par_chunks(4096)).for_each(|((y, g), u)| swiglu_chunk(y, g, u));
    from_vec(y, g)
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let (g, u) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let (gs, us, dys) = (g.storage::<f32>(), u.storage::<f32>(), dy.storage::<f32>());
        let n = gs.len();
        let (mut dg, mut du) = (vec![0.0f32; if node_g.is_some() { n } else { 0 }], vec![0.0f32; if node_u.is_some() { n } else { 0 }]);
        const C: usize = 4096;
        let chunks = gs.par_chunks(C).zip(us.par_chunks(C)).zip(dys.par_chunks(C));
        match (node_g.is_some(), node_u.is_some()) {
            (true, true) => chunks.zip(dg.par_chunks_mut(C)).zip(du.par_chunks_mut(C)).for_each(|((((g, u), dy), dg), du)| swiglu_grad_chunk(dg, du, g, u, dy)),
            (true, false) => chunks.zip(dg.par_chunks_mut(C)).for_each(|(((g, u), dy), dg)| swiglu_grad_chunk(dg, &mut [], g, u, dy)),
            (false, true) => chunks.zip(du.par_chunks_mut(C)).for_each(|(((g, u), dy), du)| swiglu_grad_chunk(&mut [], du, g, u, dy)),
            (false, false) => {}
        }
        if let Some(node) = node_g {
            grads.register::<Flex>(node.id, from_vec(dg, &g));
        }
        if let Some(node) = node_u {
            grads.register::<Flex>(node.id, from_vec(du, &u));
        }
    }
}

fn swiglu_tracked(g: FloatTensor<AutodiffFlex>, u: FloatTensor<AutodiffFlex>) -> FloatTensor<AutodiffFlex> {
    match SwigluBackward.prepare::<NoCheckpointing>([g.node(), u.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (gp, up) = (dense(g.into_primitive()), dense(u.into_primitive()));
            let y = swiglu_forward(&gp, &up);
            prep.finish((gp, up), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(swiglu_forward(&dense(g.into_primitive()), &dense(u.into_primitive()))),
    }
}

// ---------------------------------------------------------------- RoPE

/// x·cos + rotate_half(x)·sin for x [batch, heads, seq, d] and tables [batch or 1, 1, seq, d]
/// (constants: no gradient flows to them). rotate_half(x) = [−x₂, x₁] by halves of d.
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let tables = (cos.clone().inner().try_into_primitive::<Flex>(), sin.clone().inner().try_into_primitive::<Flex>());
    if let (Some(on), (Ok(c), Ok(s))) = (locate([&x]), tables) {
        let (c, s) = (dense(c), dense(s));
        return match on {
            On::Tracked([xp]) => Tensor::from_primitive::<AutodiffFlex>(rope_tracked(xp, c, s)),
            On::Plain([xp]) => Tensor::from_primitive::<Flex>(rope_apply(&dense(xp), &c, &s, false)),
        };
    }
    let half = x.dims()[3] / 2;
    let rotated = Tensor::cat(vec![x.clone().narrow(3, half, half).neg(), x.clone().narrow(3, 0, half)], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Forward (y = x·cos + rot(x)·sin) or its transpose for the backward
/// (dx = dy·cos + rotᵀ(dy·sin), rotᵀ(z) = [z₂, −z₁]).
fn rope_apply(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, transpose: bool) -> FlexTensor {
    let dims = x.layout().shape().clone();
    let (heads, seq, d) = (dims[1], dims[2], dims[3]);
    let table_batch = cos.layout().shape()[0];
    let (xs, cs, ss) = (x.storage::<f32>(), cos.storage::<f32>(), sin.storage::<f32>());
    let half = d / 2;
    let mut y = vec![0.0f32; xs.len()];
    y.par_chunks_mut(d).zip(xs.par_chunks(d)).enumerate().for_each(|(row, (yr, xr))| {
        let (b, pos) = (row / (heads * seq), row % seq);
        let t = ((if table_batch == 1 { 0 } else { b }) * seq + pos) * d;
        let (c, s) = (&cs[t..t + d], &ss[t..t + d]);
        for i in 0..half {
            let (x1, x2) = (xr[i], xr[i + half]);
            if transpose {
                yr[i] = x1 * c[i] + x2 * s[i + half];
                yr[i + half] = x2 * c[i + half] - x1 * s[i];
            } else {
                yr[i] = x1 * c[i] - x2 * s[i];
                yr[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    });
    from_vec(y, x)
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let (cos, sin) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, rope_apply(&dy, &cos, &sin, true));
        }
    }
}

fn rope_tracked(x: FloatTensor<AutodiffFlex>, cos: FlexTensor, sin: FlexTensor) -> FloatTensor<AutodiffFlex> {
    match RopeBackward.prepare::<NoCheckpointing>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = rope_apply(&dense(x.into_primitive()), &cos, &sin, false);
            prep.finish((cos, sin), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(rope_apply(&dense(x.into_primitive()), &cos, &sin, false)),
    }
}

// ---------------------------------------------------------------- target log-probs

/// log_softmax(logits)[target] over the last dimension: logits [n, w, vocab], targets [n, w].
/// The fused op keeps the logits and each row's log-sum-exp; its backward is
/// g · (onehot(target) − softmax) in one pass over the vocabulary.
pub fn target_logps(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [n, w, vocab] = logits.dims();
    let ids = targets.clone().try_into_primitive::<AutodiffFlex>().or_else(|_| targets.clone().try_into_primitive::<Flex>()).ok().and_then(|t| int_values(&dense(t)));
    match (locate([&logits]), ids) {
        (Some(On::Tracked([lp])), Some(ids)) => Tensor::<1>::from_primitive::<AutodiffFlex>(target_tracked(lp, ids, vocab)).reshape([n, w]),
        (Some(On::Plain([lp])), Some(ids)) => Tensor::<1>::from_primitive::<Flex>(target_forward(&dense(lp), &ids, vocab).0).reshape([n, w]),
        _ => burn::tensor::activation::log_softmax(logits, 2).gather(2, targets.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2),
    }
}

fn int_values(t: &FlexTensor) -> Option<Vec<usize>> {
    match t.dtype() {
        DType::I64 => Some(t.storage::<i64>().iter().map(|&v| v as usize).collect()),
        DType::I32 => Some(t.storage::<i32>().iter().map(|&v| v as usize).collect()),
        _ => None,
    }
}

/// Picked log-probs ([rows]) and each row's log-sum-exp.
fn target_forward(logits: &FlexTensor, ids: &[usize], vocab: usize) -> (FlexTensor, Vec<f32>) {
    let zs = logits.storage::<f32>();
    let mut lse = vec![0.0f32; ids.len()];
    let mut picked = vec![0.0f32; ids.len()];
    zs.par_chunks(vocab).zip(lse.par_iter_mut()).zip(picked.par_iter_mut()).zip(ids.par_iter()).for_each(|(((z, l), p), &t)| {
        let max = kernels::max(z);
        *l = max + kernels::sum_exp_shifted(z, max).ln();
        *p = z[t.min(vocab - 1)] - *l;
    });
    let out = kernels::contiguous(picked, Shape::new([ids.len()]));
    (out, lse)
}

#[derive(Debug)]
struct TargetBackward;

impl Backward<Flex, 1> for TargetBackward {
    type State = (FlexTensor, Vec<usize>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let (logits, ids, lse) = ops.state;
        let g = dense(grads.consume::<Flex>(&ops.node));
        let Some(node) = node else { return };
        let (zs, gs) = (logits.storage::<f32>(), g.storage::<f32>());
        let vocab = zs.len() / ids.len();
        let mut dz = vec![0.0f32; zs.len()];
        dz.par_chunks_mut(vocab).zip(zs.par_chunks(vocab)).zip(gs.par_iter()).zip(lse.par_iter()).zip(ids.par_iter()).for_each(|((((d, z), g), l), &t)| {
            if *g == 0.0 {
                return; // masked positions: the whole row's gradient is zero
            }
            kernels::scaled_exp_shifted(d, z, *l, -g);
            d[t.min(vocab - 1)] += g;
        });
        grads.register::<Flex>(node.id, from_vec(dz, &logits));
    }
}

fn target_tracked(logits: FloatTensor<AutodiffFlex>, ids: Vec<usize>, vocab: usize) -> FloatTensor<AutodiffFlex> {
    match TargetBackward.prepare::<NoCheckpointing>([logits.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let zp = dense(logits.into_primitive());
            let (out, lse) = target_forward(&zp, &ids, vocab);
            prep.finish((zp, ids, lse), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(target_forward(&dense(logits.into_primitive()), &ids, vocab).0),
    }
}
