//! Target log-probs without the full [N, L, vocab] logits in memory (after Liger's chunked
//! loss). The vocabulary projection and log-softmax run a chunk of positions at a time
//! outside the autodiff graph; the picked log-probs become a leaf the loss differentiates.
//! The backward then does by hand what autodiff would have done for the projection:
//! d logits = g · (onehot(target) − softmax), chunk by chunk, giving the gradients of the
//! hidden states and of the projection weight, which a surrogate ⟨h, dh⟩ + ⟨W, dW⟩ carries
//! into the model's own backward pass (through gemma2's final soft cap too, when the model
//! has one). With mixed precision the four products run in bf16,
//! as autodiff would run them through the model's own head.

use burn::optim::GradientsParams;
use burn::tensor::activation::softmax;
use burn::tensor::{Gradients, Int, Tensor};

use crate::model::Llama;
use crate::model::fused::log_softmax;

/// What the backward pass needs after the loss's own backward.
pub struct ChunkedHead {
    hidden: Tensor<3>,
    targets: Vec<Tensor<2, Int>>,
    picked: Vec<Tensor<2>>,
    chunk: usize,
}

/// log p(target) at every position, for each target set ([N, L] each), computed `chunk`
/// positions at a time. On an autodiff device the results are gradient leaves and the
/// returned head computes the model's gradients from theirs; otherwise there is no head.
pub fn chunked_target_logps(
    model: &Llama,
    hidden: Tensor<3>,
    targets: Vec<Tensor<2, Int>>,
    chunk: usize,
) -> (Vec<Tensor<2>>, Option<ChunkedHead>) {
    let [n, l, d] = hidden.dims();
    let chunk = chunk.max(1);
    let flat = hidden.clone().inner().reshape([n * l, d]);
    let weight = model.head_weight().inner();
    let precision = model.precision;
    let flat_targets: Vec<Tensor<1, Int>> = targets.iter().map(|t| t.clone().inner().reshape([n * l])).collect();
    let mut pieces: Vec<Vec<Tensor<1>>> = vec![Vec::new(); targets.len()];
    for start in (0..n * l).step_by(chunk) {
        let len = chunk.min(n * l - start);
        let (logits, _) =
            capped(precision.matmul(flat.clone().narrow(0, start, len), weight.clone()), model.final_softcap);
        let logp = log_softmax(logits);
        for (k, t) in flat_targets.iter().enumerate() {
            let at = t.clone().narrow(0, start, len).unsqueeze_dim::<2>(1);
            pieces[k].push(logp.clone().gather(1, at).reshape([len]));
        }
    }
    let picked: Vec<Tensor<2>> = pieces.into_iter().map(|p| Tensor::cat(p, 0).reshape([n, l])).collect();
    if !hidden.is_autodiff() {
        return (picked, None);
    }
    let leaves: Vec<Tensor<2>> = picked.into_iter().map(|p| p.autodiff().require_grad()).collect();
    let head = ChunkedHead { hidden, targets, picked: leaves.clone(), chunk };
    (leaves, Some(head))
}

impl ChunkedHead {
    /// The model's gradients, given the gradients of a loss computed from the leaves.
    pub fn gradients(self, loss_grads: &Gradients, model: &Llama) -> GradientsParams {
        let [n, l, d] = self.hidden.dims();
        let flat = self.hidden.clone().inner().reshape([n * l, d]);
        let weight = model.head_weight().inner();
        let precision = model.precision;
        let vocab = weight.dims()[1];
        let device = flat.device();
        let upstream: Vec<Tensor<1>> = self
            .picked
            .iter()
            .map(|p| p.grad(loss_grads).map_or_else(|| Tensor::zeros([n * l], &device), |g| g.reshape([n * l])))
            .collect();
        let flat_targets: Vec<Tensor<1, Int>> =
            self.targets.iter().map(|t| t.clone().inner().reshape([n * l])).collect();
        // A frozen head (LoRA) needs only the hidden states' gradient.
        let train_head = model.head_trains();
        let mut hidden_grads = Vec::new();
        let mut weight_grad: Tensor<2> = Tensor::zeros([d, vocab], &device);
        for start in (0..n * l).step_by(self.chunk) {
            let len = self.chunk.min(n * l - start);
            let h = flat.clone().narrow(0, start, len);
            let (logits, slope) = capped(precision.matmul(h.clone(), weight.clone()), model.final_softcap);
            let probs = softmax(logits, 1);
            let mut dlogits = Tensor::zeros([len, vocab], &device);
            for (g, t) in upstream.iter().zip(&flat_targets) {
                let g = g.clone().narrow(0, start, len).unsqueeze_dim::<2>(1);
                let onehot = t.clone().narrow(0, start, len).one_hot::<2>(vocab).float();
                dlogits = dlogits + (onehot - probs.clone()) * g;
            }
            // Through gemma2's cap c·tanh(z/c), whose derivative is 1 − tanh²(z/c).
            if let Some(slope) = slope {
                dlogits = dlogits * slope;
            }
            hidden_grads.push(precision.matmul(dlogits.clone(), weight.clone().transpose()));
            if train_head {
                weight_grad = weight_grad + precision.matmul(h.transpose(), dlogits);
            }
        }
        let hidden_grad = Tensor::cat(hidden_grads, 0).reshape([n, l, d]).autodiff();
        let mut surrogate = (self.hidden * hidden_grad).sum();
        if train_head {
            surrogate = surrogate + (model.head_weight() * weight_grad.autodiff()).sum();
        }
        GradientsParams::from_grads(surrogate.backward(), model)
    }
}

/// The logits after the model's final soft cap, if it has one, with the cap's derivative.
fn capped(z: Tensor<2>, cap: Option<f64>) -> (Tensor<2>, Option<Tensor<2>>) {
    match cap {
        None => (z, None),
        Some(c) => {
            let t = z.div_scalar(c).tanh();
            (t.clone().mul_scalar(c), Some(t.clone().mul(t).neg().add_scalar(1.0)))
        }
    }
}
