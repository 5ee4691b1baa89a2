//! AdamW (torch.optim.AdamW / burn's AdamW maths) with the update of each parameter as
//! one pass on the CPU default. burn's AdamW runs about 14 element-wise tensor ops per
//! parameter, each a pass over a model-sized buffer with a fresh allocation; on burn-flex
//! f32 this does moments, bias correction, decay and update in one loop, in place where the
//! buffers are not shared. Each value is rounded exactly as burn's op chain rounds it, so
//! both paths give bit-identical weights (tests/optimizer.rs). Other backends and dtypes run
//! the same maths in burn ops. The state is burn's `AdamWState`, so checkpoints are the same.
//!
//! [`ModelAdamW`] applies it to a whole model and owns the moments, so that a checkpoint
//! streams them to disk a tensor at a time (burn's `ModuleOptimizer::save` first copies all
//! of them into one record: 1 GB at 135M parameters, on top of the run's memory).

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleMapper, Param, ParamGroup, ParamId};
use burn::optim::{
    AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer, RecordState,
    StateSource,
};
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_pack::Scalar;
use rayon::prelude::*;

use crate::kernels::dense;
use crate::model::Llama;
use crate::model::llama::param_id;

/// Whether the parameter with this HF name gets weight decay, by transformers' rule
/// (Trainer.get_decay_parameter_names, which TRL's trainers inherit): not when its module's
/// lower-cased name matches "bias", "layernorm", "rmsnorm", "(^|\.)norm($|\.)" or
/// "_norm($|\.)", nor when the parameter itself is a bias.
pub fn decays(name: &str) -> bool {
    let (module, param) = name.rsplit_once('.').unwrap_or(("", name));
    let module = module.to_lowercase();
    let dotted_norm =
        module == "norm" || module.starts_with("norm.") || module.ends_with(".norm") || module.contains(".norm.");
    let suffixed_norm = module.ends_with("_norm") || module.contains("_norm.");
    let norm_or_bias =
        ["bias", "layernorm", "rmsnorm"].iter().any(|word| module.contains(word)) || dotted_norm || suffixed_norm;
    !norm_or_bias && !param.contains("bias")
}

/// The ids of `model`'s parameters that get no weight decay (see [`decays`]).
fn undecayed_ids(model: &Llama) -> impl Iterator<Item = ParamId> {
    model.parameter_names().into_iter().filter(|name| !decays(name)).map(|name| param_id(&name))
}

/// torch's AdamW defaults are lr-free here: the learning rate comes with each step.
#[derive(Clone, Debug)]
pub struct FusedAdamW {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl FusedAdamW {
    pub fn new(beta_1: f64, beta_2: f64, epsilon: f64, weight_decay: f64) -> Self {
        Self {
            beta_1: beta_1 as f32,
            beta_2: beta_2 as f32,
            epsilon: epsilon as f32,
            weight_decay: weight_decay as f32,
        }
    }

    /// A whole-module optimizer (burn's type-erased wrapper, with its state records).
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }

    /// The optimizer for `model` as transformers' Trainer builds it: weight decay on every
    /// parameter except biases and norm weights (see [`decays`]).
    pub fn for_model(self, model: &Llama) -> ModuleOptimizer {
        let undecayed: Vec<ParamId> = undecayed_ids(model).collect();
        let without_decay = Self { weight_decay: 0.0, ..self.clone() };
        let optimizer = self.init();
        if undecayed.is_empty() {
            optimizer
        } else {
            optimizer.with_group(ParamGroup::from_ids(undecayed), without_decay, None)
        }
    }

    /// The per-step scalars, each computed as burn's AdamW computes it (f32 or f64 as there).
    fn scalars(&self, lr: LearningRate, time: usize, grad_scale: f64) -> Scalars {
        let t = time as i32;
        Scalars {
            // mul_scalar casts its f64 factor to the tensor's f32.
            grad_scale: grad_scale as f32,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            factor_1: 1.0 - self.beta_1,
            factor_2: 1.0 - self.beta_2,
            correction_1: 1f32 - self.beta_1.powi(t),
            correction_2: 1f32 - self.beta_2.powi(t),
            epsilon: self.epsilon,
            // burn scales by the f64 (1 - lr·wd) and the f64 lr, cast to f32 by mul_scalar.
            keep: (1.0 - lr * self.weight_decay as f64) as f32,
            decays: self.weight_decay != 0.0,
            lr: lr as f32,
        }
    }
}

/// AdamW over a whole model, as burn's `ModuleOptimizer` runs [`FusedAdamW`] (each
/// parameter with a gradient updated on the inner backend, its autodiff settings put back;
/// no decay on biases and norms), with every parameter's moments owned here. A checkpoint
/// so writes them one tensor at a time, in the burnpack layout `ModuleOptimizer::save`
/// writes (same names, scalars and paths: tests/optimizer.rs), and reads either back.
pub struct ModelAdamW {
    decayed: FusedAdamW,
    undecayed: FusedAdamW,
    no_decay: HashSet<ParamId>,
    states: HashMap<ParamId, Moments>,
}

/// One parameter's state: burn's `AdamWState<D>` for its rank, and its module path.
struct Moments {
    path: String,
    rank: usize,
    state: Box<dyn Any + Send + Sync>,
}

/// burn's key for a parameter's rank in the record (`ModuleOptimizer::to_record`).
const RANK_KEY: &str = "__rank";

impl ModelAdamW {
    /// AdamW for `model` as transformers' Trainer builds it: weight decay on every parameter
    /// except biases and norm weights (see [`decays`]).
    pub fn for_model(adamw: FusedAdamW, model: &Llama) -> Self {
        let no_decay = undecayed_ids(model).collect();
        let undecayed = FusedAdamW { weight_decay: 0.0, ..adamw.clone() };
        Self { decayed: adamw, undecayed, no_decay, states: HashMap::new() }
    }

    /// One update of every parameter that has a gradient in `grads`, each gradient taken
    /// times `grad_scale` (global-norm clipping's factor, 1 for none): the same values as
    /// scaling the gradients first, without a pass of their own over them.
    pub fn step<M: Module>(&mut self, lr: LearningRate, module: M, mut grads: GradientsParams, grad_scale: f64) -> M {
        module.map(&mut StepMapper { optimizer: self, grads: &mut grads, lr, grad_scale, path: Vec::new() })
    }

    /// Writes the moments to `path` (burnpack), each tensor copied out only when the writer
    /// reaches it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        let mut writer_scalars = Vec::new();
        let mut paths = Vec::new();
        for (id, moments) in &self.states {
            let prefix = id.val().to_string();
            let time = match moments.rank {
                1 => moments.declare::<1>(id, &prefix, &mut tensors),
                2 => moments.declare::<2>(id, &prefix, &mut tensors),
                rank => bail!("AdamW state of rank {rank} (only 1 and 2 are saved)"),
            };
            writer_scalars.push((format!("{prefix}.{RANK_KEY}"), Scalar::from(moments.rank)));
            writer_scalars.push((format!("{prefix}.momentum.time"), Scalar::from(time)));
            paths.push((prefix, moments.path.clone()));
        }
        let mut writer = burn_pack::Writer::new(tensors);
        for (key, value) in &writer_scalars {
            writer = writer.with_scalar(key, *value);
        }
        for (key, value) in &paths {
            writer = writer.with_metadata(key, value);
        }
        writer.write_to_file(path).map_err(|e| anyhow::anyhow!("writing {}: {e:?}", path.display()))
    }

    /// Reads back the moments `save` (or burn's `ModuleOptimizer::save`) wrote to `path`.
    pub fn load(mut self, path: &Path, device: &Device) -> Result<Self> {
        let corrupt = |e: burn_pack::Error| anyhow::anyhow!("{}: corrupt optimizer state: {e:?}", path.display());
        let reader = burn_pack::Reader::from_file(path).map_err(corrupt)?;
        let scalars = reader.scalars().clone();
        let paths = reader.metadata().clone();
        let mut ranks = BTreeMap::new();
        for (name, value) in &scalars {
            if let Some(id) = name.strip_suffix(&format!(".{RANK_KEY}")) {
                let rank = usize::try_from(*value).ok();
                ranks
                    .insert(id.to_string(), rank.with_context(|| format!("{}: {name} is not a rank", path.display()))?);
            }
        }
        let mut source = StateSource::new(scalars);
        for tensor in reader.into_tensors().map_err(corrupt)? {
            let (name, dtype, shape, _, bytes) = tensor.into_parts().map_err(corrupt)?;
            source.insert_tensor(name, TensorData::from_bytes(bytes, shape, dtype));
        }
        self.states.clear();
        for (prefix, rank) in ranks {
            let id = ParamId::from(
                prefix.parse::<u64>().with_context(|| format!("{}: parameter id {prefix}", path.display()))?,
            );
            let state = match rank {
                1 => unflatten::<1>(&prefix, &mut source, device),
                2 => unflatten::<2>(&prefix, &mut source, device),
                _ => bail!("{}: parameter {prefix} has an AdamW state of rank {rank}", path.display()),
            };
            let state =
                state.with_context(|| format!("{}: parameter {prefix}: AdamW state incomplete", path.display()))?;
            let path = paths.get(&prefix).cloned().unwrap_or_default();
            self.states.insert(id, Moments { path, rank, state });
        }
        Ok(self)
    }
}

impl Moments {
    /// Adds this rank-`D` state's two moments to `tensors` (copied out when the writer
    /// reaches them); returns its step count.
    fn declare<const D: usize>(&self, id: &ParamId, prefix: &str, tensors: &mut Vec<burn_pack::Tensor>) -> usize {
        let state = self.state.downcast_ref::<AdamWState<D>>().expect("the state's rank is recorded beside it");
        let momentum = &state.momentum;
        for (leaf, moment) in [("moment_1", &momentum.moment_1), ("moment_2", &momentum.moment_2)] {
            let (shape, dtype, moment) = (moment.shape().to_vec(), moment.dtype(), moment.clone());
            let bytes = shape.iter().product::<usize>() * dtype.size();
            let provider = move || Ok(moment.to_data().into_bytes());
            let name = format!("{prefix}.momentum.{leaf}");
            tensors.push(burn_pack::Tensor::deferred(name, dtype, shape, Some(id.val()), bytes, provider));
        }
        momentum.time
    }
}

/// burn's reading of a rank-`D` AdamW state from a record.
fn unflatten<const D: usize>(
    prefix: &str,
    source: &mut StateSource,
    device: &Device,
) -> Option<Box<dyn Any + Send + Sync>> {
    AdamWState::<D>::state_unflatten(prefix, source, device).map(|state| Box::new(state) as Box<_>)
}

/// The module walk of one AdamW step (burn's ModuleOptimizerMapper without groups, clipping
/// or devices: the trainer clips before and runs on one device).
struct StepMapper<'a> {
    optimizer: &'a mut ModelAdamW,
    grads: &'a mut GradientsParams,
    lr: LearningRate,
    grad_scale: f64,
    path: Vec<String>,
}

impl ModuleMapper for StepMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        // What autodiff knows of the parameter, put back on the updated value.
        let (require_grad, checkpointing) = (tensor.is_require_grad(), tensor.gradient_checkpointing_strategy());
        let optimizer = &mut *self.optimizer;
        // A state read from a file is on the default device until its first step here.
        let state = optimizer.states.remove(&id).map(|moments| {
            let state = *moments.state.downcast::<AdamWState<D>>().expect("a parameter keeps its rank between steps");
            <FusedAdamW as Optimizer>::to_device(state, &grad.device())
        });
        let adamw = if optimizer.no_decay.contains(&id) { &optimizer.undecayed } else { &optimizer.decayed };
        let (updated, state) = adamw.step_scaled(self.lr, tensor.inner(), grad, self.grad_scale, state);
        if let Some(state) = state {
            optimizer.states.insert(id, Moments { path: self.path.join("."), rank: D, state: Box::new(state) });
        }
        let mut updated = Tensor::from_inner(updated);
        if let Some(strategy) = checkpointing {
            updated = updated.with_gradient_checkpointing_strategy(strategy);
        }
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

#[derive(Clone, Copy)]
struct Scalars {
    grad_scale: f32,
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    keep: f32,
    decays: bool,
    lr: f32,
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        self.step_scaled(lr, tensor, grad, 1.0, state)
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

impl FusedAdamW {
    /// `Optimizer::step` for the gradient times `grad_scale` (as `grad.mul_scalar(grad_scale)`
    /// would round it), folded into the update's one pass on the CPU default.
    pub fn step_scaled<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        grad_scale: f64,
        state: Option<AdamWState<D>>,
    ) -> (Tensor<D>, Option<AdamWState<D>>) {
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        let s = self.scalars(lr, time, grad_scale);
        let fused = crate::model::fused::enabled()
            && is_flex_f32(&tensor)
            && is_flex_f32(&grad)
            && state.as_ref().is_none_or(|st| {
                st.momentum.max_moment_2.is_none()
                    && is_flex_f32(&st.momentum.moment_1)
                    && is_flex_f32(&st.momentum.moment_2)
            });
        if fused {
            let first = state.is_none();
            let (m, v) = match state {
                Some(st) => (st.momentum.moment_1, st.momentum.moment_2),
                None => (tensor.zeros_like(), tensor.zeros_like()),
            };
            // Moved, not cloned, so that unshared buffers are updated in place.
            let (p, m, v) = fused_update(flex(tensor), &flex(grad), flex(m), flex(v), s, first);
            let momentum = AdaptiveMomentumState {
                time,
                moment_1: Tensor::from_primitive::<Flex>(m),
                moment_2: Tensor::from_primitive::<Flex>(v),
                max_moment_2: None,
            };
            return (Tensor::from_primitive::<Flex>(p), Some(AdamWState { momentum }));
        }
        let grad = if grad_scale == 1.0 { grad } else { grad.mul_scalar(grad_scale) };
        self.step_in_tensor_ops(s, time, tensor, grad, state)
    }

    /// burn's AdamW op chain, for backends without the fused loop.
    fn step_in_tensor_ops<const D: usize>(
        &self,
        s: Scalars,
        time: usize,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamWState<D>>,
    ) -> (Tensor<D>, Option<AdamWState<D>>) {
        let (m, v) = match state {
            Some(st) => (
                st.momentum.moment_1.mul_scalar(s.beta_1).add(grad.clone().mul_scalar(s.factor_1)),
                st.momentum.moment_2.mul_scalar(s.beta_2).add(grad.square().mul_scalar(s.factor_2)),
            ),
            None => (grad.clone().mul_scalar(s.factor_1), grad.square().mul_scalar(s.factor_2)),
        };
        let update =
            m.clone().div_scalar(s.correction_1).div(v.clone().div_scalar(s.correction_2).sqrt().add_scalar(s.epsilon));
        let decayed = if s.decays { tensor.mul_scalar(s.keep) } else { tensor };
        let tensor = decayed - update.mul_scalar(s.lr);
        (
            tensor,
            Some(AdamWState { momentum: AdaptiveMomentumState { time, moment_1: m, moment_2: v, max_moment_2: None } }),
        )
    }
}

/// Elements per rayon task: large enough to amortise the task, small enough to split a
/// 1M-element matrix over both cores.
const CHUNK: usize = 1 << 15;

/// One pass: new moments in place in `m`/`v`, the new weights in place in `p` (each copied
/// first only if shared). `first`: the moments start at zero (burn then skips the β terms;
/// with zeros they add exact zeros, so the values are the same).
fn fused_update(
    p: FlexTensor,
    g: &FlexTensor,
    m: FlexTensor,
    v: FlexTensor,
    s: Scalars,
    first: bool,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (mut p, mut m, mut v) = (dense(p), dense(m), dense(v));
    let g = dense(g.clone());
    let gs = g.storage::<f32>();
    let (ps, ms, vs) = (p.storage_mut::<f32>(), m.storage_mut::<f32>(), v.storage_mut::<f32>());
    assert!(
        ps.len() == gs.len() && ms.len() == gs.len() && vs.len() == gs.len(),
        "AdamW: parameter, gradient and moments differ in size"
    );
    ps.par_chunks_mut(CHUNK)
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(vs.par_chunks_mut(CHUNK))
        .zip(gs.par_chunks(CHUNK))
        .for_each(|(((pc, mc), vc), gc)| adamw_chunk(pc, mc, vc, gc, &s, first));
    (p, m, v)
}

crate::kernels::vectorised! {
    /// One AdamW update of a chunk, in burn's AdamW's order of operations (same bits).
    fn adamw_chunk(pc: &mut [f32], mc: &mut [f32], vc: &mut [f32], gc: &[f32], s: &Scalars, first: bool) {
        for (((p, m), v), &g) in pc.iter_mut().zip(mc.iter_mut()).zip(vc.iter_mut()).zip(gc) {
            // × 1 leaves every value as it was.
            let g = g * s.grad_scale;
            let (gm, gv) = (g * s.factor_1, (g * g) * s.factor_2);
            if first {
                (*m, *v) = (gm, gv);
            } else {
                *m = *m * s.beta_1 + gm;
                *v = *v * s.beta_2 + gv;
            }
            let update = (*m / s.correction_1) / ((*v / s.correction_2).sqrt() + s.epsilon);
            let decayed = if s.decays { *p * s.keep } else { *p };
            *p = decayed - update * s.lr;
        }
    }
}

/// f32 on burn-flex without autodiff: where the one-pass updates can run.
pub(super) fn is_flex_f32<const D: usize>(t: &Tensor<D>) -> bool {
    t.dtype() == DType::F32 && t.clone().try_into_primitive::<Flex>().is_ok()
}

fn flex<const D: usize>(t: Tensor<D>) -> FlexTensor {
    t.try_into_primitive::<Flex>().unwrap_or_else(|_| unreachable!("checked by is_flex_f32"))
}

#[cfg(test)]
mod tests {
    use super::decays;

    #[test]
    fn biases_and_norm_weights_are_not_decayed() {
        for name in [
            "model.layers.0.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.norm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.self_attn.q_proj.bias",
        ] {
            assert!(!decays(name), "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.normalizer.weight",
        ] {
            assert!(decays(name), "{name}");
        }
    }
}
