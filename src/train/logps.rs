//! Per-token log-probabilities of the target tokens, zero outside the completion.

use burn::tensor::{Tensor, activation::log_softmax};

use crate::data::SequenceBatch;
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
