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
use std::mem::MaybeUninit;

use super::kernels::{self, sigmoid, vectorised};

type AutodiffFlex = Autodiff<Flex, NoCheckpointing>;

/// Where a set of tensors lives, as far as the fused kernels care.
pub(super) enum On<const N: usize> {
    Tracked([FloatTensor<AutodiffFlex>; N]),
    Plain([FlexTensor; N]),
}

/// All f32 on burn-flex, with autodiff or all without (None otherwise, or when the fused ops
/// are off).
pub(super) fn locate<const N: usize, const D: usize>(tensors: [&Tensor<D>; N]) -> Option<On<N>> {
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
    let rstd: Vec<f32> = xs.par_chunks(d).map(|xr| 1.0 / (kernels::dot(xr, xr) / d as f32 + eps as f32).sqrt()).collect();
    let y = kernels::par_fill(xs.len(), d, |row, yr| rms_row(yr, &xs[row * d..][..d], gs, rstd[row]));
    (from_vec(y, x), rstd)
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
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_g] = ops.parents;
        let (x, gamma, rstd) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let (xs, gs, dys) = (x.storage::<f32>(), gamma.storage::<f32>(), dy.storage::<f32>());
        let d = gs.len();
        if let Some(node) = node_x {
            let dx = kernels::par_fill(xs.len(), d, |row, dxr| rms_grad_row(dxr, &xs[row * d..][..d], &dys[row * d..][..d], gs, rstd[row]));
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
    fn swiglu_chunk(y: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32]) {
        y.iter_mut().zip(g).zip(u).for_each(|((y, g), u)| {
            y.write(g * sigmoid(*g) * u);
        });
    }
}

vectorised! {
    /// dg = dy·u·σ(g)·(1 + g·(1 − σ(g))) and du = dy·g·σ(g); either may be empty.
    fn swiglu_grad_chunk(dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32], dy: &[f32]) {
        if !dg.is_empty() && !du.is_empty() {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                dg[i].write(dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
                du[i].write(dy[i] * g[i] * s);
            }
        } else if !dg.is_empty() {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                dg[i].write(dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
            }
        } else if !du.is_empty() {
            for i in 0..g.len() {
                du[i].write(dy[i] * g[i] * sigmoid(g[i]));
            }
        }
    }
}

fn swiglu_forward(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
    let (gs, us) = (g.storage::<f32>(), u.storage::<f32>());
    const C: usize = 4096;
    let y = kernels::par_fill(gs.len(), C, |i, y| swiglu_chunk(y, &gs[i * C..][..y.len()], &us[i * C..][..y.len()]));
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
        // Both gradients in one pass where both are needed (the usual case).
        const C: usize = 4096;
        let (mut dg, mut du) = (kernels::Buffer::new(if node_g.is_some() { n } else { 0 }), kernels::Buffer::new(if node_u.is_some() { n } else { 0 }));
        let (dg_out, du_out) = (dg.out(), du.out());
        let (want_g, want_u) = (node_g.is_some(), node_u.is_some());
        (0..n.div_ceil(C)).into_par_iter().for_each(|i| {
            let len = C.min(n - i * C);
            // SAFETY: chunk i of each buffer belongs to this task, and is written in full.
            let (dgc, duc) = unsafe { (kernels::to_write(dg_out.at(i * C), if want_g { len } else { 0 }), kernels::to_write(du_out.at(i * C), if want_u { len } else { 0 })) };
            swiglu_grad_chunk(dgc, duc, &gs[i * C..][..len], &us[i * C..][..len], &dys[i * C..][..len]);
        });
        // SAFETY: every chunk of a wanted buffer was written.
        let (dg, du) = unsafe { (dg.filled(), du.filled()) };
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
            On::Plain([xp]) => Tensor::from_primitive::<Flex>(rope_apply(&xp, &c, &s, false, dense_like(&xp))),
        };
    }
    let half = x.dims()[3] / 2;
    let rotated = Tensor::cat(vec![x.clone().narrow(3, half, half).neg(), x.clone().narrow(3, 0, half)], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Forward (y = x·cos + rot(x)·sin) or its transpose for the backward
/// (dx = dy·cos + rotᵀ(dy·sin), rotᵀ(z) = [z₂, −z₁]). x is read through its strides (rows of
/// d contiguous, else it is copied first); the result is stored with strides `out`.
fn rope_apply(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, transpose: bool, out: [usize; 4]) -> FlexTensor {
    let x = kernels::rows_readable(x.clone());
    let dims = x.layout().shape().clone();
    let (batch, heads, seq, d) = (dims[0], dims[1], dims[2], dims[3]);
    assert!(d % 2 == 0, "RoPE needs an even head dimension, got {d}");
    let st: Vec<usize> = x.layout().strides().iter().map(|s| *s as usize).collect();
    let table_batch = cos.layout().shape()[0];
    let (xs, cs, ss) = (&x.storage::<f32>()[x.layout().start_offset()..], cos.storage::<f32>(), sin.storage::<f32>());
    let mut y = kernels::Buffer::new(batch * heads * seq * d);
    let y_out = y.out();
    (0..batch * heads * seq).into_par_iter().with_min_len(64).for_each(|row| {
        let (b, h, pos) = (row / (heads * seq), row / seq % heads, row % seq);
        let t = ((if table_batch == 1 { 0 } else { b }) * seq + pos) * d;
        let xr = &xs[b * st[0] + h * st[1] + pos * st[2]..][..d];
        // SAFETY: each (b, h, pos) row of the output is written by this task alone, in full.
        let yr = unsafe { kernels::to_write(y_out.at(b * out[0] + h * out[1] + pos * out[2]), d) };
        rope_row(yr, xr, &cs[t..t + d], &ss[t..t + d], transpose);
    });
    // SAFETY: the rows cover the whole output.
    kernels::tensor(unsafe { y.filled() }, dims, out.iter().map(|s| *s as isize).collect())
}

vectorised! {
    fn rope_row(y: &mut [MaybeUninit<f32>], x: &[f32], c: &[f32], s: &[f32], transpose: bool) {
        let half = x.len() / 2;
        let (y1, y2) = y.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = c.split_at(half);
        let (s1, s2) = s.split_at(half);
        for i in 0..half {
            if transpose {
                y1[i].write(x1[i] * c1[i] + x2[i] * s2[i]);
                y2[i].write(x2[i] * c2[i] - x1[i] * s1[i]);
            } else {
                y1[i].write(x1[i] * c1[i] - x2[i] * s1[i]);
                y2[i].write(x2[i] * c2[i] + x1[i] * s2[i]);
            }
        }
    }
}

/// Strides of a dense tensor with `t`'s shape that orders its dimensions as `t` does: for the
/// [b, heads, s, d] view of a [b, s, heads, d] projection, that projection's own layout.
/// Anything else (broadcast or reversed dimensions) gets contiguous strides.
fn dense_like(t: &FlexTensor) -> [usize; 4] {
    let (shape, st) = (t.layout().shape(), t.layout().strides());
    let contiguous = [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1];
    if st[3] != 1 || st.iter().zip(shape.iter()).any(|(s, n)| *s <= 0 && *n > 1) {
        return contiguous;
    }
    let mut order = [0usize, 1, 2, 3];
    order.sort_by_key(|&i| (std::cmp::Reverse(st[i]), i));
    let mut out = [0usize; 4];
    let mut size = 1;
    for &i in order.iter().rev() {
        out[i] = size;
        size *= shape[i];
    }
    if out[3] == 1 { out } else { contiguous }
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// cos, sin, and the layout of x (the gradient takes it, so the projection it flows back
    /// to reads it without a copy).
    type State = (FlexTensor, FlexTensor, [usize; 4]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let (cos, sin, layout) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, rope_apply(&dy, &cos, &sin, true, layout));
        }
    }
}

fn rope_tracked(x: FloatTensor<AutodiffFlex>, cos: FlexTensor, sin: FlexTensor) -> FloatTensor<AutodiffFlex> {
    match RopeBackward.prepare::<NoCheckpointing>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let x = x.into_primitive();
            let layout = dense_like(&x);
            let y = rope_apply(&x, &cos, &sin, false, layout);
            prep.finish((cos, sin, layout), y)
        }
        OpsKind::UnTracked(prep) => {
            let x = x.into_primitive();
            prep.finish(rope_apply(&x, &cos, &sin, false, dense_like(&x)))
        }
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
        let dz = kernels::par_fill(zs.len(), vocab, |row, d| {
            let g = gs[row];
            if g == 0.0 {
                d.fill(MaybeUninit::new(0.0)); // masked positions: the whole row's gradient is zero
                return;
            }
            let t = ids[row].min(vocab - 1);
            kernels::scaled_exp_shifted(d, &zs[row * vocab..][..vocab], lse[row], -g);
            // SAFETY: the line above wrote the whole row.
            unsafe { *d[t].assume_init_mut() += g };
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
