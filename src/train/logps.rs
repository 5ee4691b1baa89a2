//! Per-token log-probabilities of the target tokens, zero outside the completion.

use burn::tensor::{Int, Tensor};

use super::chunked::{ChunkedHead, chunked_target_logps};
use crate::data::SequenceBatch;
use crate::data::packed::{PackedBatch, PackedLayout};
use crate::model::Llama;

/// [N, W] log p(target_t | tokens_<t) where the mask is 1, else 0.
pub fn token_logps(model: &Llama, batch: &SequenceBatch) -> Tensor<2> {
    let logits = model.forward(batch.inputs.clone());
    pick(logits, batch.targets.clone()) * batch.mask.clone()
}

fn pick(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    crate::model::fused::target_logps(logits, targets)
}

/// Per-token log-probs of a preference batch laid out as `collate_pairs` lays it out
/// ([2B, W]: chosen rows, then rejected rows; zero outside the completions), computed from
/// packed rows that hold each pair's shared prefix once. `mask` is the plain batch's.
pub fn packed_pair_logps(model: &Llama, layout: &PackedLayout, mask: Tensor<2>) -> Tensor<2> {
    let packed = layout.to_device(&mask.device());
    let logits = model.forward_packed(packed.tokens.clone(), &packed.positions, packed.masked.clone());
    let (chosen, rejected) =
        (pick(logits.clone(), packed.chosen_targets.clone()), pick(logits, packed.rejected_targets.clone()));
    unpack(&packed, chosen, rejected) * mask
}

/// Packed per-position log-probs of each row's chosen and rejected targets, laid back out
/// as the plain batch's [2B, W] rows.
fn unpack(packed: &PackedBatch, chosen: Tensor<2>, rejected: Tensor<2>) -> Tensor<2> {
    let chosen = chosen.gather(1, packed.chosen_index.clone());
    let rejected = rejected.gather(1, packed.rejected_index.clone());
    Tensor::cat(vec![chosen, rejected], 0)
}

/// How a step computes its log-probs: plain rows or packed pairs (prefix sharing), and
/// all logits at once or `chunk` positions at a time (then the returned head computes the
/// model's gradients). Every combination gives the same values.
pub fn batch_logps(
    model: &Llama,
    batch: &SequenceBatch,
    packed: Option<&PackedLayout>,
    chunk: Option<usize>,
) -> (Tensor<2>, Option<ChunkedHead>) {
    let mask = batch.mask.clone();
    match (packed, chunk) {
        (None, None) => (token_logps(model, batch), None),
        (Some(layout), None) => (packed_pair_logps(model, layout, mask), None),
        (None, Some(chunk)) => {
            let hidden = model.hidden_states(batch.inputs.clone());
            let (mut picked, head) = chunked_target_logps(model, hidden, vec![batch.targets.clone()], chunk);
            (picked.remove(0) * mask, head)
        }
        (Some(layout), Some(chunk)) => {
            let packed = layout.to_device(&mask.device());
            let hidden = model.hidden_states_packed(packed.tokens.clone(), &packed.positions, packed.masked.clone());
            let targets = vec![packed.chosen_targets.clone(), packed.rejected_targets.clone()];
            let (picked, head) = chunked_target_logps(model, hidden, targets, chunk);
            let [chosen, rejected]: [Tensor<2>; 2] = picked.try_into().expect("two target sets");
            (unpack(&packed, chosen, rejected) * mask, head)
        }
    }
}

/// Sum over each row: [N, W] -> [N].
pub fn row_sums(t: Tensor<2>) -> Tensor<1> {
    t.sum_dim(1).squeeze_dim::<1>(1)
}
