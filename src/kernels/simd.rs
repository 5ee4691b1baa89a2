//! Element-wise loops that vectorise: each is compiled for AVX-512, for AVX2+FMA and for the
//! baseline, and the widest the CPU has is picked at run time.

use std::mem::MaybeUninit;

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
                // SAFETY: unsafe to call on a CPU without these features; called only once they are detected below.
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                // SAFETY: unsafe to call on a CPU without these features; called only once they are detected below.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: this CPU has every feature v4 is compiled for (checked just above).
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: this CPU has every feature v3 is compiled for (checked just above).
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
    /// xs[i] = −∞ where `masked[i]` is nonzero, else xs[i]·factor.
    pub fn scale_unmasked(xs: &mut [f32], masked: &[u8], factor: f32) {
        xs.iter_mut().zip(masked).for_each(|(x, m)| *x = if *m != 0 { f32::NEG_INFINITY } else { *x * factor });
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
