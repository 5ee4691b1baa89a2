//! How a fused op reaches its kernels: its inputs must all be f32 on burn-flex, all under
//! autodiff or all without. Under autodiff the op is recorded as one node whose backward is
//! the op's own; otherwise only the forward runs. Anything else (another backend or dtype,
//! a mix, or `PREFHOST_UNFUSED=1`) is left to the caller's burn ops.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor};

/// burn's autodiff over burn-flex without a checkpointing strategy: the training device on
/// the CPU, and the only autodiff backend the fused ops record on.
pub type AutodiffFlex = Autodiff<Flex, NoCheckpointing>;

/// A float tensor of any rank, as the dispatch reads it.
pub(super) trait Operand {
    fn dtype(&self) -> DType;
    /// Its primitive if it lives on burn-flex under autodiff.
    fn on_autodiff_flex(&self) -> Option<FloatTensor<AutodiffFlex>>;
    /// Its primitive if it lives on plain burn-flex.
    fn on_flex(&self) -> Option<FlexTensor>;
}

impl<const D: usize> Operand for Tensor<D> {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }

    fn on_autodiff_flex(&self) -> Option<FloatTensor<AutodiffFlex>> {
        self.clone().try_into_primitive::<AutodiffFlex>().ok()
    }

    fn on_flex(&self) -> Option<FlexTensor> {
        self.clone().try_into_primitive::<Flex>().ok()
    }
}

/// The burn-flex primitives of a fused op's inputs.
pub(super) enum FlexInputs<const N: usize> {
    /// All under autodiff: the op is recorded for the backward pass.
    Autodiff([FloatTensor<AutodiffFlex>; N]),
    /// All on plain burn-flex: the forward alone.
    Plain([FlexTensor; N]),
}

/// `tensors` as burn-flex primitives when the fused kernels can take them: the fused ops
/// on, all f32, and all on burn-flex under autodiff or all on plain burn-flex.
pub(super) fn flex_f32_inputs<const N: usize>(tensors: [&dyn Operand; N]) -> Option<FlexInputs<N>> {
    if !super::enabled() || tensors.iter().any(|t| t.dtype() != DType::F32) {
        return None;
    }
    let tracked: Vec<_> = tensors.iter().filter_map(|t| t.on_autodiff_flex()).collect();
    if tracked.len() == N {
        return tracked.try_into().ok().map(FlexInputs::Autodiff);
    }
    let plain: Vec<_> = tensors.iter().filter_map(|t| t.on_flex()).collect();
    if plain.len() == N {
        return plain.try_into().ok().map(FlexInputs::Plain);
    }
    None
}

/// One fused op on `tensors`, or None when the kernels cannot take them (see
/// `flex_f32_inputs`) and the caller runs burn's ops instead. `forward(inputs, keep_state)`
/// computes the op's output and, when `keep_state`, the state its `backward` needs; see
/// `record` for when the state is kept.
pub(super) fn run_fused<Op, const N: usize, const D: usize>(
    tensors: [&dyn Operand; N],
    backward: Op,
    forward: impl FnOnce([FlexTensor; N], bool) -> (FlexTensor, Option<Op::State>),
) -> Option<Tensor<D>>
where
    Op: Backward<Flex, N>,
{
    Some(match flex_f32_inputs(tensors)? {
        FlexInputs::Autodiff(inputs) => Tensor::from_primitive::<AutodiffFlex>(record(backward, inputs, forward)),
        FlexInputs::Plain(inputs) => Tensor::from_primitive::<Flex>(forward(inputs, false).0),
    })
}

/// Runs `forward` on autodiff inputs as one autodiff node. When an input needs a gradient,
/// the state `forward` keeps is handed to `backward` in the backward pass; otherwise the
/// output is recorded without a backward step and nothing is kept.
pub(super) fn record<Op, const N: usize>(
    backward: Op,
    inputs: [FloatTensor<AutodiffFlex>; N],
    forward: impl FnOnce([FlexTensor; N], bool) -> (FlexTensor, Option<Op::State>),
) -> FloatTensor<AutodiffFlex>
where
    Op: Backward<Flex, N>,
{
    let nodes = inputs.each_ref().map(|t| t.node());
    match backward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (output, state) = forward(inputs.map(|t| t.into_primitive()), true);
            prep.finish(state.expect("a fused op keeps its backward's state when asked to"), output)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(inputs.map(|t| t.into_primitive()), false).0),
    }
}
