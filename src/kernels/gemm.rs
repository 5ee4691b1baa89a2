//! Strided f32 matrix products (the gemm crate) written straight into the caller's memory.

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

/// A row-major view into f32 memory: element (r, c) is at `ptr + r·row_stride + c·col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl View {
    pub fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self { ptr, row_stride: row_stride as isize, col_stride: 1 }
    }

    /// The same memory read as the transpose.
    pub fn t(self) -> Self {
        Self { ptr: self.ptr, row_stride: self.col_stride, col_stride: self.row_stride }
    }

    /// The view starting `cols` columns further right.
    pub fn right(self, cols: usize) -> Self {
        Self { ptr: self.ptr.wrapping_offset(cols as isize * self.col_stride), ..self }
    }

    /// The view starting `rows` rows further down.
    pub fn down(self, rows: usize) -> Self {
        Self { ptr: self.ptr.wrapping_offset(rows as isize * self.row_stride), ..self }
    }
}

// SAFETY: a View is only read through; the callers create views into buffers that outlive
// the parallel loops using them, and nothing writes those buffers while the loops run.
unsafe impl Send for View {}
// SAFETY: as for Send: shared views only read memory that no task writes meanwhile.
unsafe impl Sync for View {}

/// A mutable base pointer shared by parallel tasks that write disjoint rows.
#[derive(Clone, Copy, Debug)]
pub struct SharedOut(pub *mut f32);
// SAFETY: a SharedOut is only an address; the callers point it into a buffer that outlives
// the parallel loop, and the tasks sharing it write disjoint parts of it (or all only read).
unsafe impl Send for SharedOut {}
// SAFETY: as for Send.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn ptr(self) -> *mut f32 {
        self.0
    }

    pub fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// dst[m×n] (rows `dst_stride` apart) = a[m×k]·b[k×n], or dst + a·b when `accumulate`.
/// Single-threaded: callers parallelise over independent products.
///
/// # Safety
/// The views must cover m×k and k×n valid elements, and dst m×n writable ones.
#[allow(clippy::too_many_arguments)] // BLAS-style: sizes, destination, operands
pub unsafe fn gemm(m: usize, n: usize, k: usize, dst: *mut f32, dst_stride: usize, accumulate: bool, a: View, b: View) {
    // SAFETY: the caller's contract is this function's.
    unsafe { gemm_on(gemm::Parallelism::None, m, n, k, dst, dst_stride, accumulate, a, b) }
}

/// `gemm` on all of rayon's threads when the product is large enough to split (burn-flex's
/// threshold, 192³ multiply-adds): the longer side of dst is cut into one band per thread,
/// each a single-threaded product that packs its own operands. (gemm's own threading packs
/// part of the operands on the calling thread, which is not one of rayon's, while the pool
/// waits.)
///
/// # Safety
/// As for `gemm`.
#[allow(clippy::too_many_arguments)] // as `gemm`
pub unsafe fn gemm_parallel(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_stride: usize,
    accumulate: bool,
    a: View,
    b: View,
) {
    let threads = rayon::current_num_threads();
    if m * n * k < 192 * 192 * 192 || threads == 1 {
        // SAFETY: the caller's contract is this function's.
        return unsafe { gemm(m, n, k, dst, dst_stride, accumulate, a, b) };
    }
    let (long, bands) = (m.max(n), threads);
    let band = long.div_ceil(bands).next_multiple_of(16);
    let out = SharedOut(dst);
    (0..long.div_ceil(band)).into_par_iter().for_each(|i| {
        let (start, len) = (i * band, band.min(long - i * band));
        // SAFETY: band i covers rows (or columns) start..start+len of the caller's m×n
        // product, inside the views and dst the caller vouches for; the bands are disjoint,
        // so no two tasks write the same element of dst.
        unsafe {
            if m >= n {
                gemm(len, n, k, out.at(start * dst_stride), dst_stride, accumulate, a.down(start), b);
            } else {
                gemm(m, len, k, out.at(start), dst_stride, accumulate, a, b.right(start));
            }
        }
    });
}

/// # Safety
/// As for `gemm`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on(
    parallelism: gemm::Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_stride: usize,
    accumulate: bool,
    a: View,
    b: View,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: row r of dst holds n writable elements (the caller's contract).
                unsafe { std::ptr::write_bytes(dst.add(r * dst_stride), 0, n) };
            }
        }
        return;
    }
    // SAFETY: gemm reads m×k elements of a and k×n of b through their strides and writes m×n
    // of dst, all of which the caller vouches for.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A 2-D f32 flex tensor read as a matrix view (any strides); valid while `t` lives.
pub fn matrix(t: &FlexTensor) -> View {
    let st = t.layout().strides();
    View {
        ptr: t.storage::<f32>().as_ptr().wrapping_add(t.layout().start_offset()),
        row_stride: st[0],
        col_stride: st[1],
    }
}
