//! CPU building blocks of the fused ops: strided matrix products straight into our own
//! buffers (burn-flex's matmul zero-fills its output and then copies it once more to align
//! it), output buffers that are written before they are read (no zero-fill), and an exp that
//! the compiler vectorises, compiled for AVX-512 and AVX2 and picked at run time.

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{Bytes, DType, Shape};
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

// Views only point into buffers that outlive the parallel loops using them, and each task
// writes a disjoint part of its output.
unsafe impl Send for View {}
unsafe impl Sync for View {}

/// A mutable base pointer shared by parallel tasks that write disjoint rows.
#[derive(Clone, Copy, Debug)]
pub struct Out(pub *mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
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
pub unsafe fn gemm(m: usize, n: usize, k: usize, dst: *mut f32, dst_stride: usize, accumulate: bool, a: View, b: View) {
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
pub unsafe fn gemm_parallel(m: usize, n: usize, k: usize, dst: *mut f32, dst_stride: usize, accumulate: bool, a: View, b: View) {
    let threads = rayon::current_num_threads();
    if m * n * k < 192 * 192 * 192 || threads == 1 {
        return unsafe { gemm(m, n, k, dst, dst_stride, accumulate, a, b) };
    }
    let (long, bands) = (m.max(n), threads);
    let band = long.div_ceil(bands).next_multiple_of(16);
    let out = Out(dst);
    (0..long.div_ceil(band)).into_par_iter().for_each(|i| {
        let (start, len) = (i * band, band.min(long - i * band));
        unsafe {
            if m >= n {
                gemm(len, n, k, out.at(start * dst_stride), dst_stride, accumulate, a.down(start), b);
            } else {
                gemm(m, len, k, out.at(start), dst_stride, accumulate, a, b.right(start));
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on(parallelism: gemm::Parallelism, m: usize, n: usize, k: usize, dst: *mut f32, dst_stride: usize, accumulate: bool, a: View, b: View) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                unsafe { std::ptr::write_bytes(dst.add(r * dst_stride), 0, n) };
            }
        }
        return;
    }
    unsafe {
        gemm::gemm(
            m, n, k,
            dst, 1, dst_stride as isize, accumulate,
            a.ptr, a.col_stride, a.row_stride,
            b.ptr, b.col_stride, b.row_stride,
            1.0, 1.0, false, false, false,
            parallelism,
        )
    }
}

/// A buffer of `n` f32 that the caller fills completely before reading (a fresh `vec![0.0; n]`
/// would be zeroed first, on the calling thread while the pool waits).
pub struct Buffer(Vec<f32>);

impl Buffer {
    pub fn new(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    pub fn out(&mut self) -> Out {
        Out(self.0.as_mut_ptr())
    }

    /// # Safety
    /// Every one of the `n` elements has been written.
    pub unsafe fn filled(mut self) -> Vec<f32> {
        let n = self.0.capacity();
        unsafe { self.0.set_len(n) };
        self.0
    }
}

/// `len` not yet written f32 from `ptr`, to be written.
///
/// # Safety
/// The range is inside one allocation, and no one else touches it while the slice lives.
pub unsafe fn to_write<'a>(ptr: *mut f32, len: usize) -> &'a mut [MaybeUninit<f32>] {
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

/// A 2-D flex tensor read as a matrix view (any strides).
pub fn matrix(t: &FlexTensor) -> View {
    let st = t.layout().strides();
    View { ptr: t.storage::<f32>().as_ptr().wrapping_add(t.layout().start_offset()), row_stride: st[0], col_stride: st[1] }
}

/// A contiguous flex tensor over `values`.
pub fn contiguous(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(shape), DType::F32)
}

/// A flex tensor over `values` with the given shape and strides.
pub fn tensor(values: Vec<f32>, shape: Shape, strides: Vec<isize>) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::new(shape, strides, 0), DType::F32)
}

/// Runs `$body` compiled for AVX-512, for AVX2+FMA or for the baseline, whichever this CPU
/// has: the loops inside vectorise to the widest registers available.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use vectorised;

/// e^x in f32 to about 2 ulp, written so loops over it vectorise: x = n·ln2 + r with
/// |r| ≤ ln2/2, e^r by its degree-6 polynomial, 2^n put into the exponent bits. Exactly 0
/// below −87.3 (where f32 turns subnormal), so masked scores (−∞) give 0; above 88.37 it
/// stays at e^88.37 ≈ 2.5e38 (2^n must fit the exponent; f32 ends at e^88.72). NaN gives NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let clamped = x.clamp(-87.3, 88.37);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n's bits are the low bits of `shifted` (whose ulp is 1); integer ops keep this
    // vectorised where `n as i32` would not be (its saturating conversion is scalar).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < -87.3 { 0.0 } else { er * two_n }
}

const LANES: usize = 16;

vectorised! {
    /// The largest value of `xs` (−∞ when empty or all −∞).
    pub fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a = a.max(*x);
            }
        }
        tail.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |m, a| m.max(*a)), |m, x| m.max(*x))
    }
}

vectorised! {
    /// xs[i] = e^(xs[i] − shift); returns their sum.
    pub fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0.0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = exp(*x - shift);
                *a += *x;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - shift);
            sum += *x;
        }
        sum
    }
}

vectorised! {
    /// Σ e^(xs[i] − shift), leaving xs as it is.
    pub fn sum_exp_shifted(xs: &[f32], shift: f32) -> f32 {
        let mut acc = [0.0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += exp(*x - shift);
            }
        }
        acc.iter().sum::<f32>() + tail.iter().map(|x| exp(*x - shift)).sum::<f32>()
    }
}

vectorised! {
    /// Σ a[i]·b[i].
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

vectorised! {
    /// xs[i] = −∞ where `hidden[i]` is nonzero, else xs[i]·factor.
    pub fn scale_unhidden(xs: &mut [f32], hidden: &[u8], factor: f32) {
        xs.iter_mut().zip(hidden).for_each(|(x, h)| *x = if *h != 0 { f32::NEG_INFINITY } else { *x * factor });
    }
}

vectorised! {
    /// The softmax backward in place: p[i] = factor·p[i]·(dp[i] − dot), dot = Σ dp·p.
    pub fn softmax_grad(p: &mut [f32], dp: &[f32], dot: f32, factor: f32) {
        p.iter_mut().zip(dp).for_each(|(p, dp)| *p = factor * *p * (*dp - dot));
    }
}

vectorised! {
    /// dst[i] = factor·e^(xs[i] − shift).
    pub fn scaled_exp_shifted(dst: &mut [MaybeUninit<f32>], xs: &[f32], shift: f32, factor: f32) {
        dst.iter_mut().zip(xs).for_each(|(d, x)| {
            d.write(factor * exp(*x - shift));
        });
    }
}

/// 1 / (1 + e^−x), vectorisable.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

vectorised! {
    /// xs[i] *= factor.
    pub fn scale(xs: &mut [f32], factor: f32) {
        xs.iter_mut().for_each(|x| *x *= factor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm_and_zero_far_below() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.37 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(88.7).is_finite() && exp(88.7) > 2.0e38 && exp(f32::INFINITY).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn vectorised_reductions_match_plain_loops() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0).collect();
        assert_eq!(max(&xs), xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let plain: f32 = xs.iter().map(|x| (x - 1.0).exp()).sum();
        assert!((sum_exp_shifted(&xs, 1.0) - plain).abs() < 1e-5 * plain);
        let mut ys = xs.clone();
        assert!((exp_shifted_sum(&mut ys, 1.0) - plain).abs() < 1e-5 * plain);
        assert!(ys.iter().zip(&xs).all(|(y, x)| (y - (x - 1.0).exp()).abs() < 1e-6 * y.max(1.0)));
        let d: f32 = xs.iter().map(|x| x * x).sum();
        assert!((dot(&xs, &xs) - d).abs() < 1e-5 * d);
    }
}
