//! Output buffers written before they are read (no zero-fill), and flex tensors over them.

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{Bytes, DType, Shape};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::gemm::SharedOut;

/// A buffer of `n` f32 that the caller fills completely before reading (a fresh `vec![0.0; n]`
/// would be zeroed first, on the calling thread while the pool waits).
pub struct Buffer(Vec<f32>);

impl Buffer {
    pub fn new(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// The buffer's base pointer, for tasks that write disjoint parts of it.
    pub fn out(&mut self) -> SharedOut {
        SharedOut(self.0.as_mut_ptr())
    }

    /// The values, once written.
    ///
    /// # Safety
    /// Every one of the `n` elements has been written.
    pub unsafe fn filled(mut self) -> Vec<f32> {
        let n = self.0.capacity();
        // SAFETY: the capacity is n, and the caller vouches that all n are initialised.
        unsafe { self.0.set_len(n) };
        self.0
    }
}

/// `len` not yet written f32 from `ptr`, to be written.
///
/// # Safety
/// The range is inside one allocation, and no one else touches it while the slice lives.
pub unsafe fn to_write<'a>(ptr: *mut f32, len: usize) -> &'a mut [MaybeUninit<f32>] {
    // SAFETY: the caller's contract; MaybeUninit<f32> has f32's layout, and a slice of it may
    // cover memory not yet written.
    unsafe { std::slice::from_raw_parts_mut(ptr.cast(), len) }
}

/// A new vector of `n` values, written by `fill(index, chunk)` over chunks of `chunk` values
/// in parallel; `fill` must write every value of its chunk.
pub fn par_fill(n: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send) -> Vec<f32> {
    let mut values = Vec::with_capacity(n);
    values.spare_capacity_mut()[..n].par_chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: `fill` wrote every chunk, and the chunks cover 0..n.
    unsafe { values.set_len(n) };
    values
}

/// `t`, or a contiguous copy where its last dimension is not unit-stride or a stride is
/// negative: what the kernels need to read rows through the remaining strides.
pub fn rows_readable(t: FlexTensor) -> FlexTensor {
    let st = t.layout().strides();
    if st[st.len() - 1] == 1 && st.iter().all(|s| *s >= 0) { t } else { t.to_contiguous() }
}

/// Contiguous values of a flex tensor (copied only if it is a strided view). Takes `t` by
/// value: burn-flex's `to_contiguous` borrows and clones the handle, so a caller that kept
/// its own would leave the buffer shared, and `storage_mut` would copy it.
pub fn dense(t: FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

/// A contiguous flex tensor over `values`.
pub fn contiguous(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(shape), DType::F32)
}

/// A contiguous flex tensor over `values`, shaped as `like`.
pub fn contiguous_like(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    contiguous(values, like.layout().shape().clone())
}

/// A flex tensor over `values` with the given shape and strides.
pub fn strided(values: Vec<f32>, shape: Shape, strides: Vec<isize>) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::new(shape, strides, 0), DType::F32)
}
