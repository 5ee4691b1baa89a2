//! rotate_half RoPE as one autodiff op on the CPU default (burn-flex, f32): burn's autodiff
//! records the halves, their negation, the concatenation and the products as separate ops;
//! here the forward is one pass that reads x through its strides, and the backward one pass
//! of the transposed rotation. The cos/sin tables are constants.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::dispatch::run_fused;
use crate::kernels::{self, dense, vectorised};

/// x·cos + rotate_half(x)·sin for x [batch, heads, seq, d] and tables [batch or 1, 1, seq, d]
/// (constants: no gradient flows to them). rotate_half(x) = [−x₂, x₁] by halves of d.
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let tables = (cos.clone().inner().try_into_primitive::<Flex>(), sin.clone().inner().try_into_primitive::<Flex>());
    if let (Ok(cos), Ok(sin)) = tables {
        let fused = run_fused([&x], RopeBackward, |[x], keep_state| {
            let (cos, sin) = (dense(cos), dense(sin));
            let layout = dense_strides_like(&x);
            let y = rope_apply(&x, &cos, &sin, false, layout);
            (y, keep_state.then_some((cos, sin, layout)))
        });
        if let Some(y) = fused {
            return y;
        }
    }
    let half = x.dims()[3] / 2;
    let rotated = Tensor::cat(vec![x.clone().narrow(3, half, half).neg(), x.clone().narrow(3, 0, half)], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Forward (y = x·cos + rot(x)·sin) or its transpose for the backward
/// (dx = dy·cos + rotᵀ(dy·sin), rotᵀ(z) = [z₂, −z₁]). x is read through its strides (rows of
/// d contiguous, else it is copied first); the result is stored with strides `out_strides`.
fn rope_apply(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    transpose: bool,
    out_strides: [usize; 4],
) -> FlexTensor {
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
        // SAFETY: `out_strides` (from dense_strides_like) lays the [batch, heads, seq, d] elements out
        // densely, one to one, in the buffer's batch·heads·seq·d: row (b, h, pos) is d
        // contiguous elements that this task alone writes.
        let yr =
            unsafe { kernels::to_write(y_out.at(b * out_strides[0] + h * out_strides[1] + pos * out_strides[2]), d) };
        rope_row(yr, xr, &cs[t..t + d], &ss[t..t + d], transpose);
    });
    // SAFETY: the batch·heads·seq rows of d elements cover the whole buffer, each written in full.
    kernels::strided(unsafe { y.filled() }, dims, out_strides.iter().map(|s| *s as isize).collect())
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
fn dense_strides_like(t: &FlexTensor) -> [usize; 4] {
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
