//! Global gradient norm and clipping across all parameters (torch's clip_grad_norm_, as
//! TRL uses through max_grad_norm; burn's built-in clipping works per tensor). The clip's
//! factor is applied by the optimizer as it reads each gradient, not in a pass of its own.

use burn::backend::Flex;
use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::model::Llama;
use crate::model::llama::param_id;

/// Σ g² of each parameter with a gradient, in the module's visiting order (a fixed order,
/// so the global sum is the same bits every time).
struct SquaredNorms<'a> {
    grads: &'a GradientsParams,
    per_param: Vec<(ParamId, f64)>,
}

impl ModuleVisitor for SquaredNorms<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.per_param.push((param.id, squared_sum(g)));
        }
    }
}

fn squared_norms<M: Module>(model: &M, grads: &GradientsParams) -> Vec<(ParamId, f64)> {
    let mut visitor = SquaredNorms { grads, per_param: Vec::new() };
    model.visit(&mut visitor);
    visitor.per_param
}

/// Σ g². On the CPU default one pass over the gradient in f64, summed in fixed blocks so the
/// result does not depend on the thread split; elsewhere burn's square().sum() in f32.
fn squared_sum<const D: usize>(g: Tensor<D>) -> f64 {
    if crate::model::fused::enabled()
        && g.dtype() == DType::F32
        && let Ok(t) = g.clone().try_into_primitive::<Flex>()
    {
        let t = t.to_contiguous();
        if let Some(values) = t.as_slice::<f32>() {
            let partials: Vec<f64> = values.par_chunks(1 << 15).map(sum_of_squares).collect();
            return partials.iter().sum();
        }
    }
    g.square().sum().into_scalar::<f32>() as f64
}

crate::kernels::vectorised! {
    /// Σ x² in f64, in eight fixed lanes (the same order on every CPU).
    fn sum_of_squares(xs: &[f32]) -> f64 {
        let mut lanes = [0.0f64; 8];
        let chunks = xs.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
        for c in chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l += (x as f64) * (x as f64);
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

/// Each parameter's gradient norm under its checkpoint name (parameters without a
/// gradient, the frozen ones, are left out).
pub fn norms_by_name(model: &Llama, grads: &GradientsParams) -> BTreeMap<String, f64> {
    let squared: std::collections::HashMap<ParamId, f64> = squared_norms(model, grads).into_iter().collect();
    model
        .parameter_names()
        .into_iter()
        .filter_map(|name| squared.get(&param_id(&name)).map(|s| (name, s.sqrt())))
        .collect()
}

pub fn global_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    squared_norms(model, grads).iter().map(|(_, s)| s).sum::<f64>().sqrt()
}

/// What clipping to `max_norm` (0 = off) multiplies every gradient by, torch's
/// clip_grad_norm_ factor: max_norm / (norm + 1e-6) when the norm exceeds it, else 1. The
/// optimizer applies it in its own pass over the gradients (`ModelAdamW::step`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
}
