//! Per-token log-probabilities of the target tokens, zero outside the completion.

use burn::optim::GradientsParams;
use burn::tensor::{Gradients, Int, Tensor};

use super::chunked::{ChunkedHead, chunked_target_logps};
use crate::data::SequenceBatch;
use crate::data::packed::{PackedBatch, PackedLayout};
use crate::model::Llama;
use crate::model::fused::DeferredWeightGrad;
use crate::tensor::from_column;

/// [N, W] log p(target_t | tokens_<t) where the mask is 1, else 0.
///
/// The vocabulary projection runs only from the batch's first completion column on (what
/// TRL's `use_logits_to_keep` does, here always and exactly): earlier positions predict
/// prompt tokens, which no loss reads, and their logits would be most of the projection's
/// work and memory when prompts are long. For the same reason the last decoder layer forms
/// its output (attention output projection, residual, MLP) only from that column on; its
/// keys and values still cover every token.
pub fn token_logps(model: &Llama, batch: &SequenceBatch) -> Tensor<2> {
    completion_logps(model, batch, false).0
}

/// `token_logps`, and with `defer_head_grad` the projection weight's gradient deferred
/// past the backward pass where the projection trains and the fused op takes it (see
/// `Llama::head_deferring_weight_grad`); elsewhere the plain head.
fn completion_logps(
    model: &Llama,
    batch: &SequenceBatch,
    defer_head_grad: bool,
) -> (Tensor<2>, Option<DeferredWeightGrad>) {
    let first = batch.first_target;
    let hidden = model.hidden_states(batch.inputs.clone(), first);
    let deferred =
        (defer_head_grad && model.head_trains()).then(|| model.head_deferring_weight_grad(hidden.clone())).flatten();
    let (logits, weight_grad) = match deferred {
        Some((logits, grad)) => (logits, Some(grad)),
        None => (model.head(hidden), None),
    };
    let picked = pick(logits, from_column(batch.targets.clone(), first));
    (zeros_before(picked, first) * batch.mask.clone(), weight_grad)
}

fn pick(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    crate::model::fused::target_logps(logits, targets)
}

/// [N, W − first] -> [N, W]: `first` columns of zeros, then `t`.
fn zeros_before(t: Tensor<2>, first: usize) -> Tensor<2> {
    if first == 0 {
        return t;
    }
    let zeros = Tensor::<2>::zeros([t.dims()[0], first], &t.device());
    Tensor::cat(vec![zeros, t], 1)
}

/// Per-token log-probs of a preference batch laid out as `collate_pairs` lays it out
/// ([2B, W]: chosen rows, then rejected rows; zero outside the completions), computed from
/// packed rows that hold each pair's shared prefix once. `mask` is the plain batch's.
/// As in `token_logps`, the projection starts at the first completion position.
pub fn packed_pair_logps(model: &Llama, layout: &PackedLayout, mask: Tensor<2>) -> Tensor<2> {
    let packed = layout.to_device(&mask.device());
    let first = packed.first_target;
    let hidden = model.hidden_states_packed(packed.tokens.clone(), &packed.positions, packed.masked.clone(), first);
    let logits = model.head(hidden);
    let pick_from =
        |targets: &Tensor<2, Int>| zeros_before(pick(logits.clone(), from_column(targets.clone(), first)), first);
    let (chosen, rejected) = (pick_from(&packed.chosen_targets), pick_from(&packed.rejected_targets));
    unpack(&packed, chosen, rejected) * mask
}

/// Packed per-position log-probs of each row's chosen and rejected targets, laid back out
/// as the plain batch's [2B, W] rows.
fn unpack(packed: &PackedBatch, chosen: Tensor<2>, rejected: Tensor<2>) -> Tensor<2> {
    let chosen = chosen.gather(1, packed.chosen_index.clone());
    let rejected = rejected.gather(1, packed.rejected_index.clone());
    Tensor::cat(vec![chosen, rejected], 0)
}

/// What turns a loss's backward pass into the model's gradients when the vocabulary
/// projection's part is done outside it.
pub enum HeadBackward {
    /// Chunked logits: the projection's backward is run by hand, chunk by chunk.
    Chunked(Box<ChunkedHead>),
    /// The projection weight's gradient, formed after the backward pass.
    Deferred(DeferredWeightGrad),
}

impl HeadBackward {
    /// The model's gradients, given the backward pass of a loss computed from the
    /// log-probs `batch_logps` returned with this head.
    pub fn gradients(self, loss_grads: Gradients, model: &Llama) -> GradientsParams {
        match self {
            Self::Chunked(head) => head.gradients(&loss_grads, model),
            Self::Deferred(weight_grad) => {
                let mut grads = GradientsParams::from_grads(loss_grads, model);
                let id = model.head_param_id();
                if let Some(grad) = weight_grad.add_to(grads.remove::<2>(id)) {
                    grads.register(id, grad);
                }
                grads
            }
        }
    }
}

/// How a step computes its log-probs: plain rows or packed pairs (prefix sharing), and
/// all logits at once or `chunk` positions at a time. When a head is returned, its
/// `gradients` gives the model's gradients (burn's `GradientsParams::from_grads` would miss
/// the projection's). Every combination gives the same values.
pub fn batch_logps(
    model: &Llama,
    batch: &SequenceBatch,
    packed: Option<&PackedLayout>,
    chunk: Option<usize>,
) -> (Tensor<2>, Option<HeadBackward>) {
    let mask = batch.mask.clone();
    match (packed, chunk) {
        (None, None) => {
            let (logps, weight_grad) = completion_logps(model, batch, true);
            (logps, weight_grad.map(HeadBackward::Deferred))
        }
        (Some(layout), None) => (packed_pair_logps(model, layout, mask), None),
        (None, Some(chunk)) => {
            let first = batch.first_target;
            let hidden = model.hidden_states(batch.inputs.clone(), first);
            let targets = vec![from_column(batch.targets.clone(), first)];
            let (mut picked, head) = chunked_target_logps(model, hidden, targets, chunk);
            (zeros_before(picked.remove(0), first) * mask, head.map(|h| HeadBackward::Chunked(Box::new(h))))
        }
        (Some(layout), Some(chunk)) => {
            let packed = layout.to_device(&mask.device());
            let first = packed.first_target;
            let hidden =
                model.hidden_states_packed(packed.tokens.clone(), &packed.positions, packed.masked.clone(), first);
            let targets = [&packed.chosen_targets, &packed.rejected_targets].map(|t| from_column(t.clone(), first));
            let (picked, head) = chunked_target_logps(model, hidden, targets.to_vec(), chunk);
            let [chosen, rejected]: [Tensor<2>; 2] = picked.try_into().expect("two target sets");
            (
                unpack(&packed, zeros_before(chosen, first), zeros_before(rejected, first)) * mask,
                head.map(|h| HeadBackward::Chunked(Box::new(h))),
            )
        }
    }
}

/// Sum over each row: [N, W] -> [N].
pub fn row_sums(t: Tensor<2>) -> Tensor<1> {
    t.sum_dim(1).squeeze_dim::<1>(1)
}
