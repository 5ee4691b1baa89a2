//! SwiGLU's silu(gate)·up as one autodiff op on the CPU default (burn-flex, f32): burn's
//! autodiff records silu and the product as separate element-wise ops, each a pass over
//! the activations with its own buffer and backward step; here the forward is one pass and
//! the backward one pass computing both gradients, from the gate and up kept by the forward.

use burn::backend::Flex;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::dispatch::run_fused;
use super::linear::product;
use crate::kernels::{self, Buffer, contiguous_like, dense, sigmoid, vectorised};

/// Elements per parallel task.
const CHUNK: usize = 4096;

/// silu(gate) · up, element-wise: gate and up of one shape -> that shape.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    let fused = run_fused([&gate, &up], SwigluBackward, |[gate, up], keep_state| {
        let (gate, up) = (dense(gate), dense(up));
        let y = swiglu_forward(&gate, &up);
        (y, keep_state.then_some((gate, up)))
    });
    fused.unwrap_or_else(|| silu(gate) * up)
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
    let y = kernels::par_fill(gs.len(), CHUNK, |i, y| {
        swiglu_chunk(y, &gs[i * CHUNK..][..y.len()], &us[i * CHUNK..][..y.len()])
    });
    contiguous_like(y, g)
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// gate and up (contiguous).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let (g, u) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        register_gate_up_grads(grads, [node_g, node_u].map(|n| n.map(|n| n.id)), &g, &u, &dy);
    }
}

/// Registers dgate and dup of silu(gate)·up for its output's gradient `dy`, those whose
/// node is given.
fn register_gate_up_grads(
    grads: &mut Gradients,
    [node_g, node_u]: [Option<NodeId>; 2],
    g: &FlexTensor,
    u: &FlexTensor,
    dy: &FlexTensor,
) {
    let (gs, us, dys) = (g.storage::<f32>(), u.storage::<f32>(), dy.storage::<f32>());
    let n = gs.len();
    // Both gradients in one pass where both are needed (the usual case); a gradient not
    // needed gets an empty buffer.
    let (want_g, want_u) = (node_g.is_some(), node_u.is_some());
    let (mut dg, mut du) = (Buffer::new(if want_g { n } else { 0 }), Buffer::new(if want_u { n } else { 0 }));
    let (dg_out, du_out) = (dg.out(), du.out());
    (0..n.div_ceil(CHUNK)).into_par_iter().for_each(|i| {
        let len = CHUNK.min(n - i * CHUNK);
        // SAFETY: elements i·CHUNK..i·CHUNK+len of each wanted buffer (n long) belong to
        // this task alone; an unwanted buffer is given as an empty slice.
        let (dgc, duc) = unsafe {
            (
                kernels::to_write(dg_out.at(i * CHUNK), if want_g { len } else { 0 }),
                kernels::to_write(du_out.at(i * CHUNK), if want_u { len } else { 0 }),
            )
        };
        swiglu_grad_chunk(dgc, duc, &gs[i * CHUNK..][..len], &us[i * CHUNK..][..len], &dys[i * CHUNK..][..len]);
    });
    // SAFETY: the tasks' chunks cover 0..n, and swiglu_grad_chunk wrote every element of
    // each non-empty slice; an unwanted buffer has no elements.
    let (dg, du) = unsafe { (dg.filled(), du.filled()) };
    if let Some(node) = node_g {
        grads.register::<Flex>(node, contiguous_like(dg, g));
    }
    if let Some(node) = node_u {
        grads.register::<Flex>(node, contiguous_like(du, u));
    }
}

/// (silu(gate) · up) · w for gate, up [n, inter] and an f32 weight w [inter, out] -> [n, out]:
/// SwiGLU and the down projection as one op. The product silu(gate)·up, a layer's widest
/// activation, is not kept for the backward but computed again there from gate and up
/// (which the SwiGLU backward keeps anyway); the values are those of the two ops, bit for
/// bit. Falls back to the two ops (e.g. for a 16-bit frozen w).
pub fn swiglu_matmul(gate: Tensor<2>, up: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let fused = run_fused([&gate, &up, &w], SwigluMatmulBackward, |[gate, up, w], keep_state| {
        let (gate, up) = (dense(gate), dense(up));
        let y = product(&swiglu_forward(&gate, &up), &w);
        (y, keep_state.then_some((gate, up, w)))
    });
    fused.unwrap_or_else(|| super::linear::matmul(swiglu(gate, up), w))
}

#[derive(Debug)]
struct SwigluMatmulBackward;

impl Backward<Flex, 3> for SwigluMatmulBackward {
    /// gate and up (contiguous), w.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u, node_w] = ops.parents;
        let (g, u, w) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        if node_g.is_some() || node_u.is_some() {
            let dh = dense(product(&dy, &w.transpose(0, 1)));
            register_gate_up_grads(grads, [node_g, node_u].map(|n| n.map(|n| n.id)), &g, &u, &dh);
        }
        if let Some(node) = node_w {
            let h = swiglu_forward(&g, &u);
            grads.register::<Flex>(node.id, product(&h.transpose(0, 1), &dy));
        }
    }
}
