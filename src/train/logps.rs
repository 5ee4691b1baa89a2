//! Per-token log-probabilities of the target tokens, zero outside the completion.

use burn::tensor::{Int, Tensor, activation::log_softmax};

use crate::data::SequenceBatch;
use crate::data::packed::PackedLayout;
use crate::model::Llama;

/// [N, W] log p(target_t | tokens_<t) where the mask is 1, else 0.
pub fn token_logps(model: &Llama, batch: &SequenceBatch) -> Tensor<2> {
    let logits = model.forward(batch.inputs.clone());
    let logp = log_softmax(logits, 2);
    let picked = logp.gather(2, batch.targets.clone().unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
    picked * batch.mask.clone()
}

/// Sum over each row: [N, W] -> [N].
pub fn row_sums(t: Tensor<2>) -> Tensor<1> {
    t.sum_dim(1).squeeze_dim::<1>(1)
}

/// Per-token log-probs of a preference batch laid out as `collate_pairs` lays it out
/// ([2B, W]: chosen rows, then rejected rows; zero outside the completions), computed from
/// packed rows that hold each pair's shared prefix once. `mask` is the plain batch's.
pub fn packed_pair_logps(model: &Llama, layout: &PackedLayout, mask: Tensor<2>) -> Tensor<2> {
    let packed = layout.to_device(&mask.device());
    let logits = model.forward_packed(packed.tokens, &packed.positions, packed.hidden);
    let logp = log_softmax(logits, 2);
    let pick = |targets: Tensor<2, Int>, index: Tensor<2, Int>| {
        let at_packed = logp.clone().gather(2, targets.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
        at_packed.gather(1, index)
    };
    let chosen = pick(packed.chosen_targets, packed.chosen_index);
    let rejected = pick(packed.rejected_targets, packed.rejected_index);
    Tensor::cat(vec![chosen, rejected], 0) * mask
}
