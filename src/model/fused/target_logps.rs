//! The target tokens' log-probabilities, log_softmax(logits)[target], as one autodiff op on
//! the CPU default (burn-flex, f32): burn's autodiff records the log-softmax over the whole
//! vocabulary and the gather as separate ops. Here the forward keeps the logits and each
//! row's log-sum-exp, and the backward is g·(onehot(target) − softmax) in one pass over the
//! vocabulary.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Int, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::dispatch::{AutodiffFlex, run_fused};
use crate::kernels::{self, contiguous_like, dense};

/// log_softmax(logits)[target] over the last dimension: logits [n, w, vocab] and
/// targets [n, w] -> [n, w].
pub fn target_logps(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [n, w, vocab] = logits.dims();
    let ids = targets
        .clone()
        .try_into_primitive::<AutodiffFlex>()
        .or_else(|_| targets.clone().try_into_primitive::<Flex>())
        .ok()
        .and_then(|t| int_values(&dense(t)));
    if let Some(ids) = ids {
        let fused: Option<Tensor<1>> = run_fused([&logits], TargetLogpsBackward, |[logits], keep_state| {
            let logits = dense(logits);
            let (picked, lse) = target_forward(&logits, &ids, vocab);
            (picked, keep_state.then_some((logits, ids, lse)))
        });
        if let Some(picked) = fused {
            return picked.reshape([n, w]);
        }
    }
    log_softmax(logits).gather(2, targets.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2)
}

/// log_softmax over the last dimension in burn's tensor ops, as burn's autodiff computes
/// it: (z − max) − log Σ exp(z − max), the max detached. Plain libtorch has a log_softmax
/// kernel of its own, whose sums round otherwise, so a policy (under autodiff) and its
/// frozen reference (outside it) would differ before any update; written out, both run
/// the same ops.
pub fn log_softmax<const D: usize>(logits: Tensor<D>) -> Tensor<D> {
    let last = D - 1;
    let shifted = logits.clone() - logits.detach().max_dim(last);
    let log_sum_exp = shifted.clone().exp().sum_dim(last).log();
    shifted - log_sum_exp
}

/// An integer flex tensor's values as indices (None for other dtypes).
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
    zs.par_chunks(vocab).zip(lse.par_iter_mut()).zip(picked.par_iter_mut()).zip(ids.par_iter()).for_each(
        |(((z, l), p), &t)| {
            let max = kernels::max(z);
            *l = max + kernels::sum_exp_shifted(z, max).ln();
            *p = z[t.min(vocab - 1)] - *l;
        },
    );
    let out = kernels::contiguous(picked, Shape::new([ids.len()]));
    (out, lse)
}

#[derive(Debug)]
struct TargetLogpsBackward;

impl Backward<Flex, 1> for TargetLogpsBackward {
    /// The logits (contiguous), the target ids, and each row's log-sum-exp.
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
            // SAFETY: scaled_exp_shifted just wrote every element of the row, d[t] among them.
            unsafe { *d[t].assume_init_mut() += g };
        });
        grads.register::<Flex>(node.id, contiguous_like(dz, &logits));
    }
}
