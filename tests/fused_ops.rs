//! The fused ops (src/model/fused/) against burn's own ops: attention on repeated K/V heads
//! (causal or masked, including a fully masked row, with and without grouped heads),
//! RMSNorm, silu(gate)·up and rotate_half RoPE give the same outputs and the same
//! gradients, on the autodiff and on the plain CPU device.

use burn::tensor::Int;
use burn::tensor::activation::log_softmax;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use prefhost::model::fused::{fuses, grouped_attention, linear, rms_norm, rope, swiglu, target_logps};
use prefhost::tensor::values;

fn repeat(t: Tensor<4>, heads: usize) -> Tensor<4> {
    let [b, kv, s, d] = t.dims();
    let g = heads / kv;
    t.unsqueeze_dim::<5>(2).expand([b, kv, g, s, d]).reshape([b, heads, s, d])
}

fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, hidden: Option<Tensor<4, Bool>>, causal: bool) -> Tensor<4> {
    let [b, heads, s, _] = q.dims();
    let hidden = hidden.map(|m| m.expand([b, heads, s, s]));
    attention(
        q,
        repeat(k, heads),
        repeat(v, heads),
        hidden,
        None,
        AttentionModuleOptions { scale: None, softcap: None, is_causal: causal },
    )
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
    // s = 150 spans three blocks of 64 queries (the last one partial), read through the
    // strides of a [b, s, heads, d] projection as the model passes them.
    for (heads, kv, causal, masked, s) in [
        (4, 4, true, false, 9),
        (6, 2, true, false, 9),
        (6, 3, false, true, 9),
        (4, 2, true, true, 9),
        (6, 2, true, false, 150),
        (4, 2, true, true, 150),
        (6, 3, false, true, 150),
    ] {
        let (b, d) = (2, 8);
        let strided = s > 9;
        let make = |h: usize| {
            Tensor::<4>::random(
                if strided { [b, s, h, d] } else { [b, h, s, d] },
                Distribution::Normal(0.0, 1.0),
                &device,
            )
            .require_grad()
        };
        let (q_leaf, k_leaf, v_leaf) = (make(heads), make(kv), make(kv));
        let heads_view = |t: &Tensor<4>| if strided { t.clone().swap_dims(1, 2) } else { t.clone() };
        let (q, k, v) = (heads_view(&q_leaf), heads_view(&k_leaf), heads_view(&v_leaf));
        let hidden = masked.then(|| mask(b, s, &device));
        let plain_mask = masked.then(|| mask(b, s, &Device::default()));
        assert!(
            fuses(&q, hidden.as_ref()) && fuses(&q.clone().inner(), plain_mask.as_ref()),
            "the CPU default must take the fused path"
        );
        let weights = Tensor::<4>::random([b, heads, s, d], Distribution::Normal(0.0, 1.0), &device);

        let fused = grouped_attention(q.clone(), k.clone(), v.clone(), hidden.clone(), causal);
        // Its own views: one backward consumes the graph nodes it passes through.
        let plain = reference(heads_view(&q_leaf), heads_view(&k_leaf), heads_view(&v_leaf), hidden.clone(), causal);
        let case = format!("heads {heads}, kv {kv}, causal {causal}, masked {masked}, seq {s}");
        let d_out = worst(fused.clone().inner(), plain.clone().inner());
        assert!(d_out < 1e-5, "{case}: outputs differ by {d_out}");

        let gf = (fused * weights.clone()).sum().backward();
        let gp = (plain * weights).sum().backward();
        for (name, t) in [("q", &q_leaf), ("k", &k_leaf), ("v", &v_leaf)] {
            let (a, b) = (t.grad(&gf).expect("fused grad"), t.grad(&gp).expect("burn grad"));
            let scale = values(b.clone()).iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let diff = worst(a, b);
            assert!(diff < 1e-4 * scale.max(1.0), "{case}: d{name} differs by {diff} (largest {scale})");
            assert!(scale > 1e-3, "{case}: d{name} is all zero");
        }

        // The plain (no-autodiff) device gives the same values.
        let inner = grouped_attention(
            q.clone().inner(),
            k.clone().inner(),
            v.clone().inner(),
            hidden.map(|m| m.inner()),
            causal,
        );
        let d_inner = worst(
            inner,
            reference(q.inner(), k.inner(), v.inner(), masked.then(|| mask(b, s, &Device::default())), causal),
        );
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

fn worst_n<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> (f32, f32) {
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    (a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max), scale)
}

/// Fused vs reference for one op: outputs, then gradients of every input under a random
/// upstream gradient, then the plain device's output.
fn check<const D: usize, const N: usize>(
    name: &str,
    inputs: [Tensor<D>; N],
    fused: impl Fn(&[Tensor<D>]) -> Tensor<D>,
    plain: impl Fn(&[Tensor<D>]) -> Tensor<D>,
) {
    let device = inputs[0].device();
    let inputs: Vec<Tensor<D>> = inputs.into_iter().map(|t| t.require_grad()).collect();
    assert!(inputs[0].is_autodiff());
    let (f, p) = (fused(&inputs), plain(&inputs));
    let (diff, scale) = worst_n(f.clone().inner(), p.clone().inner());
    assert!(diff <= 1e-5 * scale.max(1.0), "{name}: outputs differ by {diff}");
    let upstream = Tensor::<D>::random(f.dims(), Distribution::Normal(0.0, 1.0), &device);
    let (gf, gp) = ((f * upstream.clone()).sum().backward(), (p * upstream).sum().backward());
    for (i, t) in inputs.iter().enumerate() {
        let (a, b) = (t.grad(&gf).expect("fused grad"), t.grad(&gp).expect("burn grad"));
        let (diff, scale) = worst_n(a, b);
        assert!(scale > 1e-4, "{name}: gradient {i} is zero");
        assert!(diff <= 1e-4 * scale.max(1.0), "{name}: gradient {i} differs by {diff} (largest {scale})");
    }
    let inner: Vec<Tensor<D>> = inputs.iter().map(|t| t.clone().inner()).collect();
    let (diff, scale) = worst_n(fused(&inner), plain(&inner));
    assert!(diff <= 1e-5 * scale.max(1.0), "{name}: plain device differs by {diff}");
}

#[test]
fn fused_norm_swiglu_and_rope_match_burn_ops_and_their_gradients() {
    let device = Device::default().autodiff();
    let normal = |dims: [usize; 3]| Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.5), &device);
    let gamma = Tensor::<1>::random([16], Distribution::Normal(1.0, 0.3), &device).require_grad();
    {
        let gamma = gamma.clone();
        let g2 = gamma.clone();
        check(
            "rms_norm",
            [normal([3, 5, 16])],
            move |t| rms_norm(t[0].clone(), gamma.clone(), 1e-6),
            move |t| {
                let x = t[0].clone();
                let rms = (x.clone().square().mean_dim(2) + 1e-6).sqrt();
                (x / rms) * g2.clone().unsqueeze()
            },
        );
    }
    // gamma's own gradient, with x frozen.
    let x = normal([3, 5, 16]);
    let (yf, yp) = (rms_norm(x.clone(), gamma.clone(), 1e-6), {
        let rms = (x.clone().square().mean_dim(2) + 1e-6).sqrt();
        (x.clone() / rms) * gamma.clone().unsqueeze()
    });
    let up = normal([3, 5, 16]);
    let (gf, gp) = ((yf * up.clone()).sum().backward(), (yp * up).sum().backward());
    let (diff, scale) = worst_n(gamma.grad(&gf).unwrap(), gamma.grad(&gp).unwrap());
    assert!(scale > 1e-3 && diff <= 1e-4 * scale, "dgamma differs by {diff} (largest {scale})");

    check(
        "swiglu",
        [normal([2, 7, 33]), normal([2, 7, 33])],
        |t| swiglu(t[0].clone(), t[1].clone()),
        |t| silu(t[0].clone()) * t[1].clone(),
    );

    // RoPE with per-row tables (packed rows) and with one table for all rows, on a contiguous
    // input and on the [b, heads, s, d] view of a [b, s, heads, d] projection.
    for (table_batch, strided) in [(1, false), (2, false), (1, true), (2, true)] {
        let (b, h, s, d) = (2, 3, 6, 8);
        let angles = Tensor::<4>::random([table_batch, 1, s, d], Distribution::Uniform(-3.0, 3.0), &device);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let x = Tensor::<4>::random(
            if strided { [b, s, h, d] } else { [b, h, s, d] },
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let view = move |t: &Tensor<4>| if strided { t.clone().swap_dims(1, 2) } else { t.clone() };
        let (c2, s2) = (cos.clone(), sin.clone());
        check(
            &format!("rope (tables for {table_batch} rows, strided {strided})"),
            [x],
            move |t| rope(view(&t[0]), &cos, &sin),
            move |t| {
                let x = view(&t[0]);
                let half = d / 2;
                let rotated = Tensor::cat(vec![x.clone().narrow(3, half, half).neg(), x.clone().narrow(3, 0, half)], 3);
                x * c2.clone() + rotated * s2.clone()
            },
        );
    }
}

#[test]
fn fused_target_logps_match_log_softmax_and_gather() {
    let device = Device::default().autodiff();
    let (n, w, vocab) = (3, 5, 37);
    let logits = (Tensor::<3>::random([n, w, vocab], Distribution::Normal(0.0, 3.0), &device)).require_grad();
    let targets = Tensor::<2, Int>::random([n, w], Distribution::Uniform(0.0, vocab as f64), &device);
    let fused = target_logps(logits.clone(), targets.clone());
    let plain = log_softmax(logits.clone(), 2).gather(2, targets.clone().unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
    let (diff, _) = worst_n(fused.clone().inner(), plain.clone().inner());
    assert!(diff < 1e-5, "values differ by {diff}");
    // An upstream gradient with zeros, as the completion mask gives.
    let mut g = vec![0.0f32; n * w];
    for (i, v) in g.iter_mut().enumerate() {
        *v = if i % 3 == 0 { 0.0 } else { (i as f32 * 0.37).sin() };
    }
    let g = Tensor::<2>::from_data(TensorData::new(g, [n, w]), &device);
    let (gf, gp) = ((fused * g.clone()).sum().backward(), (plain * g).sum().backward());
    let (diff, scale) = worst_n(logits.grad(&gf).unwrap(), logits.grad(&gp).unwrap());
    assert!(scale > 1e-3 && diff < 1e-5 * scale.max(1.0), "gradients differ by {diff} (largest {scale})");
    let inner = target_logps(logits.clone().inner(), targets.clone().inner());
    let (diff, _) = worst_n(
        inner,
        log_softmax(logits.inner(), 2).gather(2, targets.inner().unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2),
    );
    assert!(diff < 1e-5, "plain device differs by {diff}");
}

#[test]
fn fused_projection_product_matches_burn_matmul_and_its_gradients() {
    let device = Device::default().autodiff();
    let normal = |dims: [usize; 2]| Tensor::<2>::random(dims, Distribution::Normal(0.0, 1.0), &device);
    // Large enough for gemm's threaded path (m·n·k ≥ 192³), and a small one.
    check(
        "matmul 300x200x150",
        [normal([300, 200]), normal([200, 150])],
        |t| linear::matmul(t[0].clone(), t[1].clone()),
        |t| t[0].clone().matmul(t[1].clone()),
    );
    check(
        "matmul 7x5x3",
        [normal([7, 5]), normal([5, 3])],
        |t| linear::matmul(t[0].clone(), t[1].clone()),
        |t| t[0].clone().matmul(t[1].clone()),
    );
    // A transposed weight (tied embeddings as the vocabulary head) is read through its strides.
    check(
        "matmul by a transposed view",
        [normal([9, 6]), normal([11, 6])],
        |t| linear::matmul(t[0].clone(), t[1].clone().transpose()),
        |t| t[0].clone().matmul(t[1].clone().transpose()),
    );
}

/// SwiGLU and the down projection as one op, which recomputes silu(gate)·up in its
/// backward instead of keeping it: the values and gradients of the two ops (fused SwiGLU,
/// then the fused product) bit for bit, and burn's ops within the usual tolerance.
#[test]
fn swiglu_with_the_down_projection_matches_the_two_ops() {
    use prefhost::model::fused::swiglu_matmul;
    let device = Device::default().autodiff();
    let normal = |dims: [usize; 2]| Tensor::<2>::random(dims, Distribution::Normal(0.0, 1.0), &device);
    // The weight as the model holds it: a transposed view of HF's [out, in].
    for (n, inter, out) in [(7, 12, 5), (300, 256, 96)] {
        let (gate, up, w) = (normal([n, inter]), normal([n, inter]), normal([out, inter]));
        check(
            "swiglu_matmul vs burn ops",
            [gate.clone(), up.clone(), w.clone()],
            |t| swiglu_matmul(t[0].clone(), t[1].clone(), t[2].clone().transpose()),
            |t| (silu(t[0].clone()) * t[1].clone()).matmul(t[2].clone().transpose()),
        );
        let inputs = [gate, up, w].map(|t| t.require_grad());
        let upstream = normal([n, out]);
        let run = |y: Tensor<2>| {
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let mut got = vec![values(y)];
            got.extend(inputs.iter().map(|t| values(t.grad(&grads).unwrap())));
            got
        };
        let [g, u, w] = inputs.clone();
        let one_op = run(swiglu_matmul(g.clone(), u.clone(), w.clone().transpose()));
        let two_ops = run(linear::matmul(swiglu(g, u), w.transpose()));
        assert!(one_op == two_ops, "{n}x{inter}x{out}: output or gradients differ from the two ops");
    }
}

/// RMSNorm and a projection as one op that recomputes the normalised input in its backward
/// instead of keeping it: the values and gradients of the two fused ops (norm, then product)
/// bit for bit; two projections of one norm (as q, k and v share it) against burn's ops
/// within the usual tolerance; and the forward alone on the plain device.
#[test]
fn norm_with_a_projection_matches_the_two_ops() {
    use prefhost::model::fused::normed_matmul;
    let device = Device::default().autodiff();
    let eps = 1e-5;
    let normal = |dims: [usize; 2], std: f64| Tensor::<2>::random(dims, Distribution::Normal(0.0, std), &device);
    let burn_norm = |x: Tensor<2>, g: Tensor<1>| {
        let rms = (x.clone().square().mean_dim(1) + eps).sqrt();
        (x / rms) * g.unsqueeze()
    };
    for (n, d, out) in [(7, 16, 5), (300, 96, 40)] {
        let x = normal([n, d], 1.5).require_grad();
        let gamma = (Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), &device)).require_grad();
        // The weight as the model holds it: a transposed view of HF's [out, in].
        let (w1, w2) = (normal([out, d], 0.2).require_grad(), normal([out, d], 0.2).require_grad());
        let upstream = normal([n, out], 1.0);
        let grads_of = |y: Tensor<2>, with: &[&Tensor<2>]| {
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let mut got = vec![values(y), values(gamma.grad(&grads).unwrap())];
            got.extend(with.iter().map(|t| values(t.grad(&grads).unwrap())));
            got
        };
        let one_op = grads_of(normed_matmul(&x, &gamma, &w1.clone().transpose(), eps).unwrap(), &[&x, &w1]);
        let two_ops =
            grads_of(linear::matmul(rms_norm(x.clone(), gamma.clone(), eps), w1.clone().transpose()), &[&x, &w1]);
        assert!(one_op == two_ops, "{n}x{d}x{out}: output or gradients differ from the two ops");

        let fused = normed_matmul(&x, &gamma, &w1.clone().transpose(), eps).unwrap()
            + normed_matmul(&x, &gamma, &w2.clone().transpose(), eps).unwrap().mul_scalar(0.5);
        let normed = burn_norm(x.clone(), gamma.clone());
        let plain =
            normed.clone().matmul(w1.clone().transpose()) + normed.matmul(w2.clone().transpose()).mul_scalar(0.5);
        let (a, b) = (grads_of(fused, &[&x, &w1, &w2]), grads_of(plain, &[&x, &w1, &w2]));
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(scale > 1e-4, "{n}x{d}x{out}: value {i} is zero");
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{n}x{d}x{out}: value {i} differs from burn's by {diff} (largest {scale})"
            );
        }

        let (xp, gp, wp) = (x.clone().inner(), gamma.clone().inner(), w1.clone().inner().transpose());
        let plain_device = values(normed_matmul(&xp, &gp, &wp, eps).unwrap());
        assert!(plain_device == values(linear::matmul(rms_norm(xp, gp, eps), wp)), "plain device differs");
    }
}

/// A training step's vocabulary projection leaves its weight's gradient to be formed after
/// the backward pass (`HeadBackward::Deferred`): every parameter's gradient equals the one
/// burn's backward gives through the plain head, for a separate lm_head and for tied
/// embeddings (whose lookup gradient the projection's is added to), with few predicted
/// positions (kept as the two factors) and many (kept as their product).
#[test]
fn deferred_head_weight_gradient_equals_the_backward_passes() {
    use burn::optim::GradientsParams;
    use prefhost::data::batch::collate;
    use prefhost::model::llama::param_id;
    use prefhost::model::load_model;
    use prefhost::train::logps::{HeadBackward, batch_logps, token_logps};

    let device = Device::default().autodiff();
    let ids = |n: usize, seed: u32| (0..n as u32).map(|i| (i * 37 + seed * 11) % 96).collect::<Vec<u32>>();
    for fixture in ["llama", "llama_rope_scaled_tied"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(fixture);
        let (_, model) = load_model(&dir, &device).unwrap();
        // (prompt, completion) lengths: 6 predicted positions (factors), then 84 (product).
        for (rows, prompt, completion) in [(2, 10, 3), (4, 2, 20)] {
            let seqs: Vec<(Vec<u32>, Vec<u32>)> =
                (0..rows).map(|r| (ids(prompt, r as u32), ids(completion, r as u32 + 7))).collect();
            let seqs: Vec<(&[u32], &[u32])> = seqs.iter().map(|(p, c)| (&p[..], &c[..])).collect();
            let batch = collate(&seqs, 0, &device);
            let [n, w] = batch.mask.dims();
            let ramp: Vec<f32> = (0..n * w).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
            let weights = Tensor::<1>::from_floats(ramp.as_slice(), &device).reshape([n, w]);

            let plain = token_logps(&model, &batch);
            let want = GradientsParams::from_grads((plain.clone() * weights.clone()).sum().backward(), &model);
            let (deferred, head) = batch_logps(&model, &batch, None, None);
            let head = head.expect("a head whose weight gradient is deferred");
            assert!(matches!(head, HeadBackward::Deferred(_)));
            assert_eq!(values(deferred.clone()), values(plain), "{fixture}: log-probs");
            let got = head.gradients((deferred * weights).sum().backward(), &model);

            let at = format!("{fixture}, {rows} rows of {prompt} + {completion}");
            for name in model.parameter_names() {
                let id = param_id(&name);
                let (w, g) = if name.contains("norm") || name.ends_with(".bias") {
                    (want.get::<1>(id).map(values), got.get::<1>(id).map(values))
                } else {
                    (want.get::<2>(id).map(values), got.get::<2>(id).map(values))
                };
                let (Some(w), Some(g)) = (w, g) else { panic!("{at}: {name} has no gradient") };
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = w.iter().zip(&g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(scale > 0.0 && d <= 1e-6 * scale, "{at}: {name} differs by {d:e} (largest {scale:e})");
            }
        }
    }
}
