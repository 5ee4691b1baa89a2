//! The matrix product of a projection, x [n, in] · w [in, out], as one autodiff op on the CPU
//! default (burn-flex, f32). burn-flex's matmul writes into a zero-filled buffer that is then
//! copied once more to align it; here gemm writes straight into the output, and the backward
//! runs the two products it needs (dx = dy·wᵀ, dw = xᵀ·dy) the same way, reading the
//! transposes through strides. Other backends and dtypes use burn's `matmul`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Shape, Tensor};

use super::elementwise::{On, locate};
use super::kernels::{Buffer, contiguous, gemm_parallel, matrix};

type AutodiffFlex = Autodiff<Flex, NoCheckpointing>;

/// x [n, in] · w [in, out] -> [n, out].
pub fn matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    match locate([&x, &w]) {
        Some(On::Tracked([xp, wp])) => Tensor::from_primitive::<AutodiffFlex>(tracked(xp, wp)),
        Some(On::Plain([xp, wp])) => Tensor::from_primitive::<Flex>(product(&xp, &wp)),
        None => x.matmul(w),
    }
}

/// a [m, k] · b [k, n] into a new contiguous [m, n] tensor.
fn product(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (m, k, n) = (a.layout().shape()[0], a.layout().shape()[1], b.layout().shape()[1]);
    assert_eq!(k, b.layout().shape()[0], "matmul: inner dimensions differ");
    let mut out = Buffer::new(m * n);
    // SAFETY: the views come from live tensors of these shapes; gemm writes all m·n outputs.
    unsafe {
        gemm_parallel(m, n, k, out.out().ptr(), n, false, matrix(a), matrix(b));
        contiguous(out.filled(), Shape::new([m, n]))
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    /// x and w.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let (x, w) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, product(&dy, &w.transpose(0, 1)));
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, product(&x.transpose(0, 1), &dy));
        }
    }
}

fn tracked(x: FloatTensor<AutodiffFlex>, w: FloatTensor<AutodiffFlex>) -> FloatTensor<AutodiffFlex> {
    match MatmulBackward.prepare::<NoCheckpointing>([x.node(), w.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (xp, wp) = (x.into_primitive(), w.into_primitive());
            let y = product(&xp, &wp);
            prep.finish((xp, wp), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(product(&x.into_primitive(), &w.into_primitive())),
    }
}
