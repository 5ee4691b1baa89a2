//! Attention as one autodiff op on the CPU default (burn-flex, f32).
//!
//! burn's autodiff runs `attention` as its decomposition: matmul, scale, mask fills, max,
//! subtract, exp, sum, divide, matmul. Each is a pass over [batch, heads, seq, seq] with
//! its own buffer and its own backward step. Here the forward is two batched matmuls
//! around one masked-softmax pass, keeping only the probabilities P for the backward:
//!   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = dS·K,  dK = dSᵀ·Q.
//! Grouped-query heads need no repeated K/V: the G query heads of one KV head are laid out
//! as G·seq rows, [b, kv, G·s, d], so one batched matmul serves the group and dK, dV sum
//! over it by themselves. Other backends, dtypes and layouts use burn's `attention`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Shape, Tensor};
use rayon::prelude::*;

type AutodiffFlex = Autodiff<Flex, NoCheckpointing>;

/// softmax(q·kᵀ/√d, masked)·v for q [b, heads, s, d] and k, v [b, kv_heads, s, d];
/// `hidden` ([b or 1, 1, s, s], true = masked) and/or causal. Returns [b, heads, s, d].
pub fn grouped_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, hidden: Option<Tensor<4, Bool>>, is_causal: bool) -> Tensor<4> {
    let f32s = [q.dtype(), k.dtype(), v.dtype()].iter().all(|d| *d == DType::F32);
    // Self-attention only: a decoding step (one query, cached keys) takes burn's path.
    if f32s && q.dims()[2] == k.dims()[2] && super::enabled() {
        let mask = match &hidden {
            None => Some(None),
            Some(m) => flex_mask(m).map(Some),
        };
        if let Some(mask) = mask {
            let p = Plan::new(&q, &k, mask, is_causal);
            if let (Ok(qp), Ok(kp), Ok(vp)) = (q.clone().try_into_primitive::<AutodiffFlex>(), k.clone().try_into_primitive::<AutodiffFlex>(), v.clone().try_into_primitive::<AutodiffFlex>()) {
                return Tensor::from_primitive::<AutodiffFlex>(tracked(qp, kp, vp, p));
            }
            if let (Ok(qp), Ok(kp), Ok(vp)) = (q.clone().try_into_primitive::<Flex>(), k.clone().try_into_primitive::<Flex>(), v.clone().try_into_primitive::<Flex>()) {
                return Tensor::from_primitive::<Flex>(forward(qp, kp, vp, &p).0);
            }
        }
    }
    fallback(q, k, v, hidden, is_causal)
}

/// A bool mask's burn-flex storage, on the autodiff device or the plain one.
fn flex_mask(m: &Tensor<4, Bool>) -> Option<FlexTensor> {
    m.clone().try_into_primitive::<AutodiffFlex>().or_else(|_| m.clone().try_into_primitive::<Flex>()).ok()
}

/// Whether `grouped_attention` takes the fused path for a query like `q` and this mask
/// (f32 on burn-flex, with or without autodiff).
pub fn fuses(q: &Tensor<4>, hidden: Option<&Tensor<4, Bool>>) -> bool {
    super::enabled()
        && q.dtype() == DType::F32
        && (q.clone().try_into_primitive::<AutodiffFlex>().is_ok() || q.clone().try_into_primitive::<Flex>().is_ok())
        && hidden.is_none_or(|m| flex_mask(m).is_some())
}

/// burn's attention, after repeating each KV head for its query heads.
fn fallback(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, hidden: Option<Tensor<4, Bool>>, is_causal: bool) -> Tensor<4> {
    let [b, heads, s, _] = q.dims();
    let repeat = |t: Tensor<4>| {
        let [b, kv, s, d] = t.dims();
        let groups = heads / kv;
        if groups == 1 { t } else { t.unsqueeze_dim::<5>(2).expand([b, kv, groups, s, d]).reshape([b, kv * groups, s, d]) }
    };
    let (k, v) = (repeat(k), repeat(v));
    let hidden = hidden.map(|m| m.expand([b, heads, s, k.dims()[2]]));
    attention(q, k, v, hidden, None, AttentionModuleOptions { scale: None, softcap: None, is_causal })
}

/// Shapes, scale and mask of one call.
#[derive(Clone, Debug)]
struct Plan {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    scale: f32,
    causal: bool,
    /// [mask_batch, seq, seq] bytes, nonzero = masked; mask_batch is 1 or `batch`.
    mask: Option<(Vec<u8>, usize)>,
}

impl Plan {
    fn new(q: &Tensor<4>, k: &Tensor<4>, mask: Option<FlexTensor>, causal: bool) -> Self {
        let [batch, heads, seq, head_dim] = q.dims();
        let kv_heads = k.dims()[1];
        let mask = mask.map(|m| {
            let m = m.to_contiguous();
            let dims = m.layout().shape().clone();
            assert!(dims[1] == 1 && dims[2] == seq && dims[3] == seq, "attention mask must be [b or 1, 1, s, s]");
            (m.storage::<u8>().to_vec(), dims[0])
        });
        Self { batch, heads, kv_heads, seq, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), causal, mask }
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// [b, heads, s, d] <-> [b, kv, G·s, d]: the same contiguous memory.
    fn grouped(&self) -> Shape {
        Shape::new([self.batch, self.kv_heads, self.groups() * self.seq, self.head_dim])
    }

    fn per_head(&self) -> Shape {
        Shape::new([self.batch, self.heads, self.seq, self.head_dim])
    }

    /// Whether key j is hidden from query i of batch row `b`.
    fn masked(&self, b: usize, i: usize, j: usize) -> bool {
        (self.causal && j > i) || self.mask.as_ref().is_some_and(|(m, mb)| m[((if *mb == 1 { 0 } else { b }) * self.seq + i) * self.seq + j] != 0)
    }
}

/// The output and the attention probabilities P ([b, kv, G·s, s]).
fn forward(q: FlexTensor, k: FlexTensor, v: FlexTensor, p: &Plan) -> (FlexTensor, FlexTensor) {
    let q = Flex::float_reshape(q.to_contiguous(), p.grouped());
    let scores = Flex::float_matmul(q, Flex::float_swap_dims(k, 2, 3));
    let probs = masked_softmax(scores, p);
    let out = Flex::float_matmul(probs.clone(), v);
    (Flex::float_reshape(out.to_contiguous(), p.per_head()), probs)
}

/// Rows of [b, kv, G·s, s] scores: scale, mask, softmax in place. Fully masked rows become 0.
fn masked_softmax(scores: FlexTensor, p: &Plan) -> FlexTensor {
    let mut scores = scores.to_contiguous();
    let (s, rows_per_batch) = (p.seq, p.kv_heads * p.groups() * p.seq);
    scores.storage_mut::<f32>().par_chunks_mut(s).enumerate().for_each(|(row, values)| {
        let (b, i) = (row / rows_per_batch, row % s);
        let mut max = f32::NEG_INFINITY;
        for (j, x) in values.iter_mut().enumerate() {
            *x = if p.masked(b, i, j) { f32::NEG_INFINITY } else { *x * p.scale };
            max = max.max(*x);
        }
        if max == f32::NEG_INFINITY {
            values.fill(0.0);
            return;
        }
        let mut sum = 0.0;
        for x in values.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        values.iter_mut().for_each(|x| *x *= inv);
    });
    scores
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    /// q (grouped layout), k, v, P, plan.
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, Plan);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let (q, k, v, probs, p) = ops.state;
        let d_out = Flex::float_reshape(grads.consume::<Flex>(&ops.node).to_contiguous(), p.grouped());
        if let Some(node) = node_v {
            grads.register::<Flex>(node.id, Flex::float_matmul(Flex::float_swap_dims(probs.clone(), 2, 3), d_out.clone()));
        }
        if node_q.is_none() && node_k.is_none() {
            return;
        }
        let d_probs = Flex::float_matmul(d_out, Flex::float_swap_dims(v, 2, 3)).to_contiguous();
        let d_scores = softmax_backward(probs, d_probs, p.scale, p.seq);
        if let Some(node) = node_q {
            let dq = Flex::float_matmul(d_scores.clone(), k);
            grads.register::<Flex>(node.id, Flex::float_reshape(dq.to_contiguous(), p.per_head()));
        }
        if let Some(node) = node_k {
            grads.register::<Flex>(node.id, Flex::float_matmul(Flex::float_swap_dims(d_scores, 2, 3), q));
        }
    }
}

/// dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)), row by row, into dP's buffer.
fn softmax_backward(probs: FlexTensor, d_probs: FlexTensor, scale: f32, seq: usize) -> FlexTensor {
    let probs = probs.to_contiguous();
    let mut d = d_probs;
    let pv = probs.storage::<f32>();
    d.storage_mut::<f32>().par_chunks_mut(seq).zip(pv.par_chunks(seq)).for_each(|(dp, pr)| {
        let dot: f32 = dp.iter().zip(pr).map(|(a, b)| a * b).sum();
        dp.iter_mut().zip(pr).for_each(|(a, b)| *a = scale * b * (*a - dot));
    });
    d
}

fn tracked(q: FloatTensor<AutodiffFlex>, k: FloatTensor<AutodiffFlex>, v: FloatTensor<AutodiffFlex>, p: Plan) -> FloatTensor<AutodiffFlex> {
    match AttentionBackward.prepare::<NoCheckpointing>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (qp, kp, vp) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
            let q_grouped = Flex::float_reshape(qp.to_contiguous(), p.grouped());
            let (out, probs) = forward(q_grouped.clone(), kp.clone(), vp.clone(), &p);
            prep.finish((q_grouped, kp, vp, probs, p), out)
        }
        OpsKind::UnTracked(prep) => {
            let (out, _) = forward(q.into_primitive(), k.into_primitive(), v.into_primitive(), &p);
            prep.finish(out)
        }
    }
}
