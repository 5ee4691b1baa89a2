//! Per-layer gradient checkpointing (transformers' `gradient_checkpointing`, which wraps each
//! decoder layer in torch.utils.checkpoint): a decoder layer runs as one autodiff op whose
//! forward keeps only its input, and whose backward runs the layer again under a fresh graph
//! and back-propagates through that, handing the input's and the parameters' gradients to
//! the outer graph. Peak activation memory falls from every layer's intermediates to the
//! layer inputs plus one layer's intermediates, for about one more forward pass.
//!
//! Why per layer and not burn's per-op `BalancedCheckpointing`: the CPU default's fused ops
//! (src/model/fused) are custom autodiff ops that keep their own state (attention keeps its
//! probabilities), which a per-op strategy cannot recompute, and a layer's intermediates are
//! what dominate memory at real sequence lengths.

use burn::backend::Autodiff;
use burn::backend::Backend;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Bool, Tensor};

use super::block::DecoderLayer;
use super::rope::RotaryTables;

thread_local! {
    static RECOMPUTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many layer recomputations backward passes on this thread have run (a check that
/// checkpointing is in effect; burn runs a backward on the thread that calls it).
pub fn layers_recomputed() -> usize {
    RECOMPUTED.with(|n| n.get())
}

/// `layer.forward(x, ...)`, recomputed in the backward pass instead of keeping its
/// intermediates. Outside autodiff it is the plain forward.
pub fn recomputed_layer(
    layer: &DecoderLayer,
    x: Tensor<3>,
    rotary: &RotaryTables,
    masked: Option<Tensor<4, Bool>>,
    is_causal: bool,
    keep_from: usize,
) -> Tensor<3> {
    if !x.is_autodiff() {
        return layer.forward(x, rotary, masked, is_causal, keep_from);
    }
    let input = LayerInput { x, rotary: rotary.clone(), masked, is_causal, keep_from };
    if let Some(y) = recomputed::<burn::backend::Flex>(layer, &input) {
        return y;
    }
    #[cfg(feature = "tch")]
    #[allow(deprecated)] // burn-tch: the libtorch backend this project builds offline
    if let Some(y) = recomputed::<burn::backend::LibTorch>(layer, &input) {
        return y;
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = recomputed::<burn::backend::Cube>(layer, &input) {
        return y;
    }
    panic!("gradient checkpointing: the layer input lives on a backend this build does not know");
}

/// What a layer's forward reads besides its parameters.
#[derive(Clone, Debug)]
struct LayerInput {
    x: Tensor<3>,
    rotary: RotaryTables,
    masked: Option<Tensor<4, Bool>>,
    is_causal: bool,
    /// The first output column (see `DecoderLayer::forward`).
    keep_from: usize,
}

impl LayerInput {
    /// The same input without autodiff (a plain forward records nothing).
    fn plain(&self) -> Self {
        Self {
            x: self.x.clone().inner(),
            rotary: self.rotary.map(Tensor::inner),
            masked: self.masked.clone().map(Tensor::inner),
            is_causal: self.is_causal,
            keep_from: self.keep_from,
        }
    }

    /// The plain input on the autodiff device again, as fresh leaves of a new graph.
    fn fresh_leaves(&self) -> Self {
        Self {
            x: self.x.clone().autodiff(),
            rotary: self.rotary.map(Tensor::autodiff),
            masked: self.masked.clone().map(Tensor::autodiff),
            is_causal: self.is_causal,
            keep_from: self.keep_from,
        }
    }

    fn run(&self, layer: &DecoderLayer) -> Tensor<3> {
        layer.forward(self.x.clone(), &self.rotary, self.masked.clone(), self.is_causal, self.keep_from)
    }
}

/// The conversions between burn's dispatch tensors and one backend's primitives that the op
/// needs (burn's own conversion traits are not public).
trait Native: Backend {
    fn tracked<const D: usize>(t: Tensor<D>) -> Option<FloatTensor<Autodiff<Self>>>;
    fn from_tracked<const D: usize>(p: FloatTensor<Autodiff<Self>>) -> Tensor<D>;
    fn plain<const D: usize>(t: Tensor<D>) -> FloatTensor<Self>;
    fn from_plain<const D: usize>(p: FloatTensor<Self>) -> Tensor<D>;
}

macro_rules! native {
    ($backend:ty) => {
        #[allow(deprecated)] // burn-tch's LibTorch is deprecated; it is the libtorch backend we build
        impl Native for $backend {
            fn tracked<const D: usize>(t: Tensor<D>) -> Option<FloatTensor<Autodiff<Self>>> {
                t.try_into_primitive::<Autodiff<Self>>().ok()
            }
            fn from_tracked<const D: usize>(p: FloatTensor<Autodiff<Self>>) -> Tensor<D> {
                Tensor::from_primitive::<Autodiff<Self>>(p)
            }
            fn plain<const D: usize>(t: Tensor<D>) -> FloatTensor<Self> {
                t.try_into_primitive::<Self>().expect("a plain tensor on the layer's backend")
            }
            fn from_plain<const D: usize>(p: FloatTensor<Self>) -> Tensor<D> {
                Tensor::from_primitive::<Self>(p)
            }
        }
    };
}

native!(burn::backend::Flex);
#[cfg(feature = "tch")]
native!(burn::backend::LibTorch);
#[cfg(feature = "cuda")]
native!(burn::backend::Cube);

/// The op on backend `B`, or None when the input does not live on `Autodiff<B>`.
fn recomputed<B: Native>(layer: &DecoderLayer, input: &LayerInput) -> Option<Tensor<3>> {
    let x = B::tracked(input.x.clone())?;
    // The op's inputs: x, then every parameter that takes a gradient (frozen ones are
    // constants of the recomputation, like the RoPE tables and the mask).
    let mut trainable = Trainable::<B> { tensors: Vec::new(), ids: Vec::new() };
    layer.visit(&mut trainable);
    let plain_layer = layer.valid();
    let plain_input = input.plain();
    let y = B::plain(plain_input.run(&plain_layer));
    let saved = Saved { layer: plain_layer, input: plain_input, params: trainable.ids };
    let mut parents = vec![x];
    parents.extend(trainable.tensors);
    // Backward's parent count is a constant: pad with an untracked constant, whose slot
    // the backward never fills (burn hands it over as None).
    let pad = B::tracked(Tensor::<1>::zeros([1], &input.x.device())).expect("a constant on the same device");
    let output = match parents.len() {
        n if n <= 8 => finish::<B, 8>(&parents, &pad, saved, y),
        n if n <= 16 => finish::<B, 16>(&parents, &pad, saved, y),
        n if n <= 32 => finish::<B, 32>(&parents, &pad, saved, y),
        n if n <= 64 => finish::<B, 64>(&parents, &pad, saved, y),
        n => panic!("gradient checkpointing: a decoder layer with {} trainable parameters (at most 63)", n - 1),
    };
    Some(B::from_tracked(output))
}

fn finish<B: Native, const N: usize>(
    parents: &[FloatTensor<Autodiff<B>>],
    pad: &FloatTensor<Autodiff<B>>,
    saved: Saved,
    y: FloatTensor<B>,
) -> FloatTensor<Autodiff<B>> {
    let nodes: [_; N] = std::array::from_fn(|i| parents.get(i).unwrap_or(pad).node());
    match RecomputeLayer.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(saved, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// What the backward needs to run the layer again: the layer and its input, without
/// autodiff (sharing the tensors' storage), and the ids of the parameters in parent order
/// (parent 0 is x).
#[derive(Clone, Debug)]
struct Saved {
    layer: DecoderLayer,
    input: LayerInput,
    params: Vec<ParamId>,
}

/// The layer's trainable parameters, in visiting order.
struct Trainable<B: Native> {
    tensors: Vec<FloatTensor<Autodiff<B>>>,
    ids: Vec<ParamId>,
}

impl<B: Native> ModuleVisitor for Trainable<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if value.is_require_grad() {
            self.tensors.push(B::tracked(value).expect("a trainable parameter on the layer's backend"));
            self.ids.push(param.id);
        }
    }
}

/// Puts a plain layer's parameters on the autodiff device as fresh leaves, the trainable
/// ones requiring gradients.
struct Leaves<'a> {
    trainable: &'a [ParamId],
}

impl ModuleMapper for Leaves<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let trains = self.trainable.contains(&param.id);
        param.map(|t| if trains { t.autodiff().require_grad() } else { t.autodiff() })
    }
}

/// Hands the recomputed graph's parameter gradients to the outer graph's parent nodes.
struct Handover<'a, B: Native> {
    slots: &'a [(ParamId, NodeId)],
    inner: &'a burn::tensor::Gradients,
    outer: &'a mut Gradients,
    _backend: std::marker::PhantomData<B>,
}

#[derive(Debug)]
struct RecomputeLayer;

impl<B: Native, const N: usize> Backward<B, N> for RecomputeLayer {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        RECOMPUTED.with(|n| n.set(n.get() + 1));
        let saved = ops.state;
        let dy = B::from_plain::<3>(grads.consume::<B>(&ops.node));
        let input = saved.input.fresh_leaves();
        let x = if ops.parents[0].is_some() { input.x.clone().require_grad() } else { input.x.clone() };
        let input = LayerInput { x: x.clone(), ..input };
        let layer = saved.layer.map(&mut Leaves { trainable: &saved.params });
        // Σ y ⊙ dy has y's gradient dy exactly, so this backward gives the layer's
        // vector-Jacobian products for dy.
        let inner = (input.run(&layer) * dy.autodiff()).sum().backward();
        if let Some(node) = &ops.parents[0] {
            let dx = x.grad(&inner).expect("x took part in the recomputed forward");
            grads.register::<B>(node.id, B::plain(dx));
        }
        let slots: Vec<_> = saved
            .params
            .iter()
            .zip(&ops.parents[1..])
            .filter_map(|(id, node)| node.as_ref().map(|n| (*id, n.id)))
            .collect();
        layer.visit(&mut Handover::<B> {
            slots: &slots,
            inner: &inner,
            outer: grads,
            _backend: std::marker::PhantomData,
        });
    }
}

impl<B: Native> ModuleVisitor for Handover<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some((_, node)) = self.slots.iter().find(|(id, _)| *id == param.id)
            && let Some(g) = param.val().grad(self.inner)
        {
            self.outer.register::<B>(*node, B::plain(g));
        }
    }
}
