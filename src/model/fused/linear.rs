//! The matrix product of a projection, x [n, in] · w [in, out], as one autodiff op on the CPU
//! default (burn-flex, f32). burn-flex's matmul writes into a zero-filled buffer that is then
//! copied once more to align it; here gemm writes straight into the output, and the backward
//! runs the two products it needs (dx = dy·wᵀ, dw = xᵀ·dy) the same way, reading the
//! transposes through strides. Other backends and dtypes use burn's `matmul`.
//!
//! A frozen weight kept in its checkpoint's bf16/f16 (`load_frozen_model`) is widened to f32
//! for each product and the f32 copy dropped right after, in the backward too: only the
//! stored copy stays resident, and the product is the one an f32 copy of it would give
//! (the widening is exact and gemm sees the same layout).

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, FloatDType, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use super::dispatch::{AutodiffFlex, record, run_fused};
use crate::kernels::{Buffer, View, contiguous, dense, gemm_parallel, matrix};

/// x [n, in] · w [in, out] -> [n, out].
pub fn matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if w.dtype() != DType::F32 {
        return frozen_matmul(x, w);
    }
    let fused = run_fused([&x, &w], MatmulBackward::default(), |[x, w], keep_state| {
        let y = product(&x, &w);
        (y, keep_state.then_some((x, w)))
    });
    fused.unwrap_or_else(|| x.matmul(w))
}

/// a [m, k] · b [k, n] into a new contiguous [m, n] tensor.
pub(super) fn product(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (m, k, n) = (a.layout().shape()[0], a.layout().shape()[1], b.layout().shape()[1]);
    assert_eq!(k, b.layout().shape()[0], "matmul: inner dimensions differ");
    let mut out = Buffer::new(m * n);
    // SAFETY: the views read the live tensors a [m, k] and b [k, n] through their strides,
    // `out` holds m·n elements, and gemm writes all of them before `filled` reads them.
    unsafe {
        gemm_parallel(m, n, k, out.out().ptr(), n, false, matrix(a), matrix(b));
        contiguous(out.filled(), Shape::new([m, n]))
    }
}

/// dx = dy·wᵀ and dw = xᵀ·dy, the latter registered, or left to `defer_weight_grad`.
#[derive(Debug, Default)]
struct MatmulBackward {
    defer_weight_grad: Option<DeferredWeightGrad>,
}

impl Backward<Flex, 2> for MatmulBackward {
    /// x and w as the product reads it ([k, n]).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let (x, w) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, product(&dy, &w.transpose(0, 1)));
        }
        match (node_w, self.defer_weight_grad) {
            (None, _) => {}
            (Some(node), None) => grads.register::<Flex>(node.id, product(&x.transpose(0, 1), &dy)),
            (Some(_), Some(slot)) => slot.leave(x, dy),
        }
    }
}

/// x (f32) · w stored in bf16 or f16 and frozen -> f32.
fn frozen_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if super::enabled()
        && x.dtype() == DType::F32
        && matches!(w.dtype(), DType::BF16 | DType::F16)
        && !w.is_require_grad()
    {
        if let (Ok(xp), Ok(wp)) =
            (x.clone().try_into_primitive::<AutodiffFlex>(), w.clone().try_into_primitive::<AutodiffFlex>())
        {
            let w = wp.into_primitive();
            let y = record(FrozenMatmulBackward, [xp], |[x], keep_state| {
                (frozen_product(&x, &w, WIDEN_BLOCK), keep_state.then_some(w))
            });
            return Tensor::from_primitive::<AutodiffFlex>(y);
        }
        if let (Ok(xp), Ok(wp)) = (x.clone().try_into_primitive::<Flex>(), w.clone().try_into_primitive::<Flex>()) {
            return Tensor::from_primitive::<Flex>(frozen_product(&xp, &wp, WIDEN_BLOCK));
        }
    }
    #[cfg(feature = "tch")]
    #[allow(deprecated)] // burn-tch's LibTorch is deprecated; it is the libtorch backend we build
    if let Some(y) = frozen_matmul_recorded::<burn::backend::LibTorch>(&x, &w) {
        return y;
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = frozen_matmul_recorded::<burn::backend::Cube>(&x, &w) {
        return y;
    }
    // Without autodiff the f32 copy is dropped right after the product.
    x.matmul(w.cast(FloatDType::F32))
}

/// x · w for a frozen 16-bit w under autodiff on another backend (libtorch, CUDA), recorded
/// as one op that keeps w as stored and widens it again in its backward. burn's own
/// `x.matmul(w.cast(F32))` would keep the f32 copy from the forward to the backward: an f32
/// copy of every frozen weight at a LoRA step's peak. None when x and w are not both on
/// `B` under autodiff.
#[cfg(any(feature = "tch", feature = "cuda"))]
fn frozen_matmul_recorded<B: burn::backend::Backend>(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>>
where
    burn::tensor::Float: burn::tensor::BackendPrimitive<
            burn::backend::Autodiff<B>,
            Primitive = burn::backend::tensor::FloatTensor<burn::backend::Autodiff<B>>,
        >,
    burn::backend::DispatchTensor: burn::backend::DispatchKindConversion<burn::backend::Autodiff<B>>,
{
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::ops::OpsKind;
    if x.dtype() != DType::F32 || w.is_require_grad() {
        return None;
    }
    let xp = x.clone().try_into_primitive::<Autodiff<B>>().ok()?;
    let wp = w.clone().try_into_primitive::<Autodiff<B>>().ok()?.into_primitive();
    let product =
        |x: B::FloatTensorPrimitive, w: B::FloatTensorPrimitive| B::float_matmul(x, B::float_cast(w, FloatDType::F32));
    let out = match WidenedMatmulBackward.prepare::<NoCheckpointing>([xp.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(wp.clone(), product(xp.into_primitive(), wp)),
        OpsKind::UnTracked(prep) => prep.finish(product(xp.into_primitive(), wp)),
    };
    Some(Tensor::from_primitive::<Autodiff<B>>(out))
}

/// dx = dy · wᵀ with w widened again, on backends other than burn-flex.
#[cfg(any(feature = "tch", feature = "cuda"))]
#[derive(Debug)]
struct WidenedMatmulBackward;

#[cfg(any(feature = "tch", feature = "cuda"))]
impl<B: burn::backend::Backend> Backward<B, 1> for WidenedMatmulBackward {
    /// w as stored.
    type State = B::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            let w = B::float_cast(ops.state, FloatDType::F32);
            grads.register::<B>(node.id, B::float_matmul(dy, B::float_transpose(w)));
        }
    }
}

/// How many elements of a frozen weight are widened to f32 at a time (8 MB): a larger
/// weight (a vocabulary projection) is multiplied a block of output columns at a time.
const WIDEN_BLOCK: usize = 1 << 21;
/// The narrowest band of columns `frozen_product` multiplies at once.
const MIN_BAND: usize = 64;

/// a [m, k] (f32) · b [k, n] (bf16/f16, any strides) into a new contiguous [m, n] f32
/// tensor, widening at most `block` elements of b at a time. Each block is a band of whole
/// columns of b, so every output still sums over all of k in one gemm call.
fn frozen_product(a: &FlexTensor, b: &FlexTensor, block: usize) -> FlexTensor {
    let (m, k, n) = (a.layout().shape()[0], a.layout().shape()[1], b.layout().shape()[1]);
    assert_eq!(k, b.layout().shape()[0], "matmul: inner dimensions differ");
    // Bands of at least 64 columns, a multiple of 16: gemm's narrow-product paths sum in
    // another order (bands of 1 to 4 columns were measured to differ, 8 and more not).
    let cols = (block / k.max(1)).max(MIN_BAND) / 16 * 16;
    let mut out = Buffer::new(m * n);
    let dst = out.out();
    let mut start = 0;
    while start < n {
        // A narrow remainder joins the last band.
        let width = if n - start < cols + MIN_BAND { n - start } else { cols };
        let (values, view) = widen_columns(b, start, width);
        // SAFETY: `a` is a live [m, k] tensor, `values` holds the [k, width] block `view`
        // reads (alive until the drop below), and columns start..start+width of the m rows
        // of dst (n apart) lie inside its m·n elements.
        unsafe { gemm_parallel(m, width, k, dst.at(start), n, false, matrix(a), view) };
        drop(values);
        start += width;
    }
    // SAFETY: the bands cover all n columns of all m rows, so every element was written.
    unsafe { contiguous(out.filled(), Shape::new([m, n])) }
}

/// Columns start..start+width of a 2-D bf16/f16 flex tensor as f32, laid out as the tensor
/// is (column-major stays column-major), and the view that reads them.
fn widen_columns(t: &FlexTensor, start: usize, width: usize) -> (Vec<f32>, View) {
    let rows = t.layout().shape()[0];
    let st = t.layout().strides();
    let (rs, cs) = (st[0], st[1]);
    let column_major = rs.unsigned_abs() < cs.unsigned_abs();
    // The block is written line by line along its smaller stride: columns if column-major, else rows.
    let (len, line_stride, step) = if column_major { (rows, cs, rs) } else { (width, rs, cs) };
    let base = t.layout().start_offset() as isize + start as isize * cs;
    let mut values = vec![0f32; rows * width];
    fn fill<E: Copy + Sync + Into<f32>>(
        src: &[E],
        dst: &mut [f32],
        len: usize,
        base: isize,
        line_stride: isize,
        step: isize,
        convert: fn(&[E], &mut [f32]),
    ) {
        dst.par_chunks_mut(len).enumerate().for_each(|(line, out)| {
            let first = base + line as isize * line_stride;
            if step == 1 {
                convert(&src[first as usize..first as usize + len], out);
            } else {
                out.iter_mut().enumerate().for_each(|(i, o)| *o = src[(first + i as isize * step) as usize].into());
            }
        });
    }
    match t.dtype() {
        DType::BF16 => {
            fill(t.storage::<half::bf16>(), &mut values, len, base, line_stride, step, |s, d| s.convert_to_f32_slice(d))
        }
        DType::F16 => {
            fill(t.storage::<half::f16>(), &mut values, len, base, line_stride, step, |s, d| s.convert_to_f32_slice(d))
        }
        other => unreachable!("widen: {other:?} is not a 16-bit float"),
    }
    let view = if column_major {
        View { ptr: values.as_ptr(), row_stride: 1, col_stride: rows as isize }
    } else {
        View { ptr: values.as_ptr(), row_stride: width as isize, col_stride: 1 }
    };
    (values, view)
}

/// dx = dy · wᵀ, w widened again a block at a time: the backward keeps only the stored weight.
#[derive(Debug)]
struct FrozenMatmulBackward;

impl Backward<Flex, 1> for FrozenMatmulBackward {
    /// w as stored.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, frozen_product(&dy, &ops.state.transpose(0, 1), WIDEN_BLOCK));
        }
    }
}

/// x [m, k] · w [k, n] (or · wᵀ of a stored [n, k] when `transposed`: tied embeddings)
/// where w's gradient is handed over after the backward pass instead of registered in it.
/// The op's backward gives x its gradient as usual and leaves w's, xᵀ·dy, as its factors
/// (x and dy) when they are smaller than the product, else as the product. The vocabulary
/// projection's weight gradient ([hidden, vocab], the largest) would otherwise be made at
/// the start of the backward pass, while every layer's activations are still held, and kept
/// to its end; formed after it (`DeferredWeightGrad::add_to`), it is made where memory is
/// lowest. None unless x and w are f32 tensors on burn-flex under autodiff.
pub fn matmul_deferring_weight_grad(
    x: &Tensor<2>,
    w: &Tensor<2>,
    transposed: bool,
) -> Option<(Tensor<2>, DeferredWeightGrad)> {
    if !super::enabled() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    let xp = x.clone().try_into_primitive::<AutodiffFlex>().ok()?;
    let wp = w.clone().try_into_primitive::<AutodiffFlex>().ok()?;
    let slot = DeferredWeightGrad { parts: Arc::default(), transposed };
    let backward = MatmulBackward { defer_weight_grad: Some(slot.clone()) };
    let y = record(backward, [xp, wp], |[x, w], keep_state| {
        let w = if transposed { w.transpose(0, 1) } else { w };
        (product(&x, &w), keep_state.then_some((x, w)))
    });
    Some((Tensor::from_primitive::<AutodiffFlex>(y), slot))
}

/// The weight gradient `matmul_deferring_weight_grad`'s backward left, once it has run.
#[derive(Clone, Debug)]
pub struct DeferredWeightGrad {
    parts: Arc<Mutex<Option<WeightGradParts>>>,
    /// The weight is stored as [n, k] and its gradient is wanted so.
    transposed: bool,
}

#[derive(Debug)]
enum WeightGradParts {
    /// x [m, k] and dy [m, n]: the gradient is xᵀ·dy.
    Factors { x: FlexTensor, dy: FlexTensor },
    /// xᵀ·dy [k, n] itself (m > k: the factors would be larger).
    Product(FlexTensor),
}

impl DeferredWeightGrad {
    /// Keeps xᵀ·dy for `add_to`: as its factors x [m, k] and dy [m, n] when they are the
    /// smaller, else as the product.
    fn leave(&self, x: FlexTensor, dy: FlexTensor) {
        let (m, k, n) = (x.layout().shape()[0], x.layout().shape()[1], dy.layout().shape()[1]);
        let parts = if m * (k + n) <= k * n {
            WeightGradParts::Factors { x, dy }
        } else {
            WeightGradParts::Product(product(&x.transpose(0, 1), &dy))
        };
        *self.parts.lock().expect("the deferred gradient's lock is never poisoned") = Some(parts);
    }

    /// `existing` (the weight's gradient from the backward pass, or None) plus the deferred
    /// one, shaped as the weight is stored. `existing` when the backward did not ask for
    /// the weight's gradient (a frozen weight) or never reached the op.
    pub fn add_to(self, existing: Option<Tensor<2>>) -> Option<Tensor<2>> {
        let transposed = self.transposed;
        let parts = self.parts.lock().expect("the deferred gradient's lock is never poisoned").take();
        let Some(parts) = parts else { return existing };
        let (x, dy) = match parts {
            WeightGradParts::Product(g) => {
                let g = Tensor::<2>::from_primitive::<Flex>(g);
                let g = if transposed { g.transpose() } else { g };
                return Some(match existing {
                    Some(e) => e + g,
                    None => g,
                });
            }
            WeightGradParts::Factors { x, dy } => (x, dy),
        };
        // (xᵀ·dy)ᵀ = dyᵀ·x.
        let (a, b) = if transposed { (matrix(&dy).t(), matrix(&x)) } else { (matrix(&x).t(), matrix(&dy)) };
        let (m, k, n) = (x.layout().shape()[0], x.layout().shape()[1], dy.layout().shape()[1]);
        let (rows, cols) = if transposed { (n, k) } else { (k, n) };
        let flex_existing = existing.map(|e| {
            e.try_into_primitive::<Flex>()
                .expect("a gradient of this op's weight lives on burn-flex, as the weight does")
        });
        let out = match flex_existing {
            // Added in place: a gradient has no other owner (storage_mut copies if it had).
            Some(e) => {
                let mut e = dense(e);
                let dst = e.storage_mut::<f32>();
                assert_eq!(dst.len(), rows * cols, "the deferred gradient's shape is the weight's");
                // SAFETY: dst holds rows × cols f32 of the contiguous gradient; the views read
                // the live x [m, k] and dy [m, n] through their strides.
                unsafe { gemm_parallel(rows, cols, m, dst.as_mut_ptr(), cols, true, a, b) };
                e
            }
            None => {
                let mut out = Buffer::new(rows * cols);
                // SAFETY: `out` holds rows × cols elements, all written by gemm; the views read
                // the live x and dy.
                unsafe {
                    gemm_parallel(rows, cols, m, out.out().ptr(), cols, false, a, b);
                    contiguous(out.filled(), Shape::new([rows, cols]))
                }
            }
        };
        Some(Tensor::from_primitive::<Flex>(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn flex(t: Tensor<2>) -> FlexTensor {
        t.try_into_primitive::<Flex>().expect("a flex tensor")
    }

    /// The deferred xᵀ·dy is added into the backward's gradient in its own buffer (a copy
    /// of the vocabulary projection's [hidden, vocab] gradient is as large as the weight),
    /// for a stored and a transposed (tied) weight, and the sum is the gradient's plus xᵀ·dy.
    #[test]
    fn deferred_weight_grad_is_added_in_place() {
        let device = burn::tensor::Device::flex();
        let (m, k, n) = (5, 48, 64);
        let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
        for transposed in [false, true] {
            let shape = if transposed { [n, k] } else { [k, n] };
            let existing = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let deferred = x.clone().transpose().matmul(dy.clone());
            let want = existing.clone() + if transposed { deferred.transpose() } else { deferred };
            let slot = DeferredWeightGrad { parts: Arc::default(), transposed };
            slot.leave(flex(x.clone()), flex(dy.clone()));
            let buffer = flex(existing.clone()).storage::<f32>().as_ptr();
            let got = slot.add_to(Some(existing)).expect("a gradient");
            assert_eq!(flex(got.clone()).storage::<f32>().as_ptr(), buffer, "transposed {transposed}: copied");
            for (g, w) in crate::tensor::values(got).iter().zip(crate::tensor::values(want)) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "transposed {transposed}: {g} vs {w}");
            }
        }
    }

    /// Widening a band of columns at a time gives the product of the f32 weight, bit for
    /// bit: each output still sums over all of k in one gemm call. Row- and column-major
    /// weights (a transposed checkpoint matrix is column-major), forward and transposed
    /// (the backward's wᵀ), bf16 and f16, bands of 64 columns up to the whole weight. (Bands
    /// of 1 to 4 columns were measured to differ: gemm's narrow paths sum in another order.)
    #[test]
    fn blockwise_widening_gives_the_f32_product_bit_for_bit() {
        let device = burn::tensor::Device::flex();
        let (m, k, n) = (37, 160, 300);
        let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let xt = Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
        for (dtype, float) in [(DType::BF16, FloatDType::BF16), (DType::F16, FloatDType::F16)] {
            let stored = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.1), &device).cast(float);
            // Column-major [k, n], as a checkpoint's [out, in] transposed, and row-major.
            let row_major =
                |t: Tensor<2>, dtype: DType| Tensor::<2>::from_data(t.transpose().into_data(), (&device, dtype));
            let wide = stored.clone().cast(FloatDType::F32);
            let layouts = [
                (stored.clone().transpose(), wide.clone().transpose()),
                (row_major(stored.clone(), dtype), row_major(wide.clone(), DType::F32)),
            ];
            for (w16, w32) in layouts {
                assert_eq!((w16.dtype(), w32.dtype()), (dtype, DType::F32));
                let want = product(&flex(x.clone()), &flex(w32.clone())).into_data();
                let want_t = product(&flex(xt.clone()), &flex(w32.clone().transpose())).into_data();
                // Forward: bands of 64 (64, 64, 64, 108) and 96 columns, and whole; the
                // transpose's 160 columns: 64 + 96, and whole.
                for block in [1, 64 * k, 96 * k, k * n] {
                    let got = frozen_product(&flex(x.clone()), &flex(w16.clone()), block).into_data();
                    assert!(
                        got.as_slice::<f32>().unwrap() == want.as_slice::<f32>().unwrap(),
                        "{dtype:?}, block {block}: differs"
                    );
                }
                for block in [1, 64 * n, n * k] {
                    let got = frozen_product(&flex(xt.clone()), &flex(w16.clone().transpose()), block).into_data();
                    assert!(
                        got.as_slice::<f32>().unwrap() == want_t.as_slice::<f32>().unwrap(),
                        "{dtype:?} transposed, block {block}: differs"
                    );
                }
            }
        }
    }
}
