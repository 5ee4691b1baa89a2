//! Seeded random draws for scripts: pure functions of their `seed` argument, so a loss that
//! samples (γ-PO's queue) stays a function of (batch, params) and repeats exactly on resume.
//! The trainer hands each loss call `params.rng_seed`, derived from the run's seed, the
//! step and the micro-batch.

use rhai::{Array, Dynamic, Engine, EvalAltResult, FLOAT, INT};

use crate::rng::SplitMix64;

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// `random_normal(n, seed)`: n independent standard normal draws (Box–Muller on SplitMix64).
fn random_normal(n: INT, seed: INT) -> RhaiResult<Array> {
    if n < 0 {
        return Err(format!("random_normal: n must be >= 0, got {n}").into());
    }
    let mut rng = SplitMix64::new(seed as u64);
    // 53 random bits in (0, 1]: never 0, so the logarithm is finite.
    let mut unit = || ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    Ok((0..n)
        .map(|_| {
            let (u, v) = (unit(), unit());
            Dynamic::from_float((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() as FLOAT)
        })
        .collect())
}

/// `sample_without_replacement(items, k, seed)`: k distinct elements of `items` chosen
/// uniformly at random (Python's `random.sample`), in the order drawn.
fn sample_without_replacement(items: Array, k: INT, seed: INT) -> RhaiResult<Array> {
    if k < 0 || k as usize > items.len() {
        return Err(format!("sample_without_replacement: k must be in 0..={}, got {k}", items.len()).into());
    }
    let mut rng = SplitMix64::new(seed as u64);
    let mut pool = items;
    // Partial Fisher–Yates: the first k slots end up holding the sample.
    for i in 0..k as usize {
        let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(k as usize);
    Ok(pool)
}

/// The seed of one loss call: distinct for every (run seed, step, micro-batch).
pub fn loss_call_seed(run_seed: u64, step: usize, micro_batch: usize) -> INT {
    let mut rng = SplitMix64::new(
        run_seed
            ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ (micro_batch as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7),
    );
    // Non-negative, so it prints and round-trips through JSON as a plain integer.
    (rng.next_u64() >> 1) as INT
}

pub fn register(engine: &mut Engine) {
    engine.register_fn("random_normal", random_normal);
    engine.register_fn("sample_without_replacement", sample_without_replacement);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_repeat_and_look_standard() {
        let a = random_normal(20_000, 7).unwrap();
        assert_eq!(a.len(), 20_000);
        let b = random_normal(20_000, 7).unwrap();
        let xs: Vec<f64> = a.iter().map(|v| v.as_float().unwrap()).collect();
        assert!(a.iter().zip(&b).all(|(x, y)| x.as_float().unwrap() == y.as_float().unwrap()));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        assert_ne!(random_normal(3, 8).unwrap()[0].as_float().unwrap(), xs[0]);
    }

    #[test]
    fn sampling_is_without_replacement_and_seeded() {
        let items: Array = (0..50).map(Dynamic::from_int).collect();
        let s = sample_without_replacement(items.clone(), 20, 3).unwrap();
        let mut got: Vec<INT> = s.iter().map(|v| v.as_int().unwrap()).collect();
        let again: Vec<INT> =
            sample_without_replacement(items.clone(), 20, 3).unwrap().iter().map(|v| v.as_int().unwrap()).collect();
        assert_eq!(got, again);
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 20, "distinct elements");
        let all: Vec<INT> =
            sample_without_replacement(items.clone(), 50, 9).unwrap().iter().map(|v| v.as_int().unwrap()).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "k = n is a permutation");
        assert!(sample_without_replacement(items, 51, 1).is_err());
    }

    #[test]
    fn call_seeds_differ_per_step_and_micro_batch() {
        let a = loss_call_seed(42, 3, 0);
        assert_eq!(a, loss_call_seed(42, 3, 0));
        assert_ne!(a, loss_call_seed(42, 4, 0));
        assert_ne!(a, loss_call_seed(42, 3, 1));
        assert_ne!(a, loss_call_seed(43, 3, 0));
        assert!(a >= 0);
    }
}
