//! The fused attention op (src/model/fused_attention.rs) against burn's own attention on
//! repeated K/V heads: the same outputs and the same gradients for q, k and v, causal or
//! masked (packed rows, including a fully masked row), with and without grouped heads,
//! on the autodiff and the plain CPU device.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use prefhost::model::fused_attention::{fuses, grouped_attention};
use prefhost::model::values;

fn repeat(t: Tensor<4>, heads: usize) -> Tensor<4> {
    let [b, kv, s, d] = t.dims();
    let g = heads / kv;
    t.unsqueeze_dim::<5>(2).expand([b, kv, g, s, d]).reshape([b, heads, s, d])
}

fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, hidden: Option<Tensor<4, Bool>>, causal: bool) -> Tensor<4> {
    let [b, heads, s, _] = q.dims();
    let hidden = hidden.map(|m| m.expand([b, heads, s, s]));
    attention(q, repeat(k, heads), repeat(v, heads), hidden, None, AttentionModuleOptions { scale: None, softcap: None, is_causal: causal })
}

fn worst(a: Tensor<4>, b: Tensor<4>) -> f32 {
    values(a).iter().zip(values(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A packed-rows style mask: row 0 sees a block-causal pattern, row 1 has a fully masked query.
fn mask(b: usize, s: usize, device: &Device) -> Tensor<4, Bool> {
    let mut m = vec![false; b * s * s];
    for r in 0..b {
        for i in 0..s {
            for j in 0..s {
                m[(r * s + i) * s + j] = j > i || (i >= s / 2 && j < s / 2 && r == 0) || (r == 1 && i == 2);
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, 1, s, s]), device)
}

#[test]
fn fused_attention_matches_burn_attention_and_its_gradients() {
    let device = Device::default().autodiff();
    for (heads, kv, causal, masked) in [(4, 4, true, false), (6, 2, true, false), (6, 3, false, true), (4, 2, true, true)] {
        let (b, s, d) = (2, 9, 8);
        let make = |h: usize| Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let (q, k, v) = (make(heads), make(kv), make(kv));
        assert!(fuses(&q) && fuses(&q.clone().inner()), "the CPU default must take the fused path");
        let hidden = masked.then(|| mask(b, s, &device));
        let weights = Tensor::<4>::random([b, heads, s, d], Distribution::Normal(0.0, 1.0), &device);

        let fused = grouped_attention(q.clone(), k.clone(), v.clone(), hidden.clone(), causal);
        let plain = reference(q.clone(), k.clone(), v.clone(), hidden.clone(), causal);
        let case = format!("heads {heads}, kv {kv}, causal {causal}, masked {masked}");
        let d_out = worst(fused.clone().inner(), plain.clone().inner());
        assert!(d_out < 1e-5, "{case}: outputs differ by {d_out}");

        let gf = (fused * weights.clone()).sum().backward();
        let gp = (plain * weights).sum().backward();
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (t.grad(&gf).expect("fused grad"), t.grad(&gp).expect("burn grad"));
            let scale = values(b.clone()).iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let diff = worst(a, b);
            assert!(diff < 1e-4 * scale.max(1.0), "{case}: d{name} differs by {diff} (largest {scale})");
            assert!(scale > 1e-3, "{case}: d{name} is all zero");
        }

        // The plain (no-autodiff) device gives the same values.
        let inner = grouped_attention(q.clone().inner(), k.clone().inner(), v.clone().inner(), hidden.map(|m| m.inner()), causal);
        let d_inner = worst(inner, reference(q.inner(), k.inner(), v.inner(), masked.then(|| mask(b, s, &Device::default())), causal));
        assert!(d_inner < 1e-5, "{case}: plain device differs by {d_inner}");
    }
}

#[test]
fn a_fully_masked_query_gets_zeros_not_nan() {
    let device = Device::default().autodiff();
    let (b, h, s, d) = (2, 2, 5, 4);
    let q = Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let k = Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let v = Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let out = grouped_attention(q.clone(), k, v, Some(mask(b, s, &device)), false);
    let row = values(out.clone().inner().narrow(0, 1, 1).narrow(2, 2, 1));
    assert!(row.iter().all(|x| *x == 0.0), "{row:?}");
    let grads = out.sum().backward();
    assert!(values(q.grad(&grads).unwrap()).iter().all(|x| x.is_finite()));
}
