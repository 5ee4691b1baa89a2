//! Every Rhai tensor op is a burn op: gradients computed through a script match central
//! differences of the same script, in f64 and f32, closely enough to catch a 1 % error.

use burn::tensor::{DType, Device, Tensor, TensorData};
use prefhost::script::{Limits, ScriptEngine, ScriptTensor, set_script_device};
use rhai::{Dynamic, Scope};

fn engine() -> ScriptEngine {
    ScriptEngine::new(&prefhost_repo().join("plugins"), &Limits::default())
}

fn prefhost_repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn eval_scalar(engine: &ScriptEngine, expr: &str, x: Tensor<2>, y: Tensor<1>) -> Tensor<1> {
    let mut scope = Scope::new();
    scope.push("x", ScriptTensor::Rank2(x));
    scope.push("y", ScriptTensor::Rank1(y));
    let out: Dynamic = engine.engine.eval_with_scope(&mut scope, expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
    out.cast::<ScriptTensor>().into_scalar_tensor().unwrap()
}

/// d expr / d x and d expr / d y by autodiff, compared with central differences, in f64
/// and in f32 (what training runs).
fn check_gradient(expr: &str) {
    check_gradient_in(expr, DType::F64);
    check_gradient_in(expr, DType::F32);
}

/// Each input's gap between autodiff and central differences, relative to the derivative
/// (or to 0.01 where it is smaller), must stay under a bound that a gradient 1 % off breaks
/// (an op's gradient scaled by 1.01 fails in both dtypes; the old h = 0.01, 2 % check passed it):
/// f64: step 1e-4 (truncation ~h² = 1e-8); measured worst 1.3e-8, bound 1e-6.
/// f32: Richardson's (4·D(h/2) − D(h))/3 with h = 0.02 cancels the h² term, leaving rounding
/// (~6e-8·|f|/h); measured worst 1.8e-4, bound 1e-3.
fn check_gradient_in(expr: &str, dtype: DType) {
    let device = Device::flex().autodiff();
    set_script_device(device.clone());
    let engine = engine();
    let (xs, ys) = (vec![0.3f64, -0.7, 1.2, 0.5, -1.5, 0.9], vec![0.4f64, -0.8]);
    let tensors = |xs: &[f64], ys: &[f64], device: &Device| {
        (
            Tensor::<2>::from_data(TensorData::new(xs.to_vec(), [2, 3]), (device, dtype)),
            Tensor::<1>::from_data(TensorData::new(ys.to_vec(), [2]), (device, dtype)),
        )
    };
    let floats = |t: Tensor<1>| -> Vec<f64> { t.into_data().iter::<f64>().collect() };
    let (x, y) = tensors(&xs, &ys, &device);
    let (x, y) = (x.require_grad(), y.require_grad());
    let grads = eval_scalar(&engine, expr, x.clone(), y.clone()).backward();
    let mut autodiff = floats(x.grad(&grads).expect("x has a gradient").reshape([6]));
    autodiff.extend(y.grad(&grads).map(floats).unwrap_or(vec![0.0; 2]));

    let plain = Device::flex();
    let f = |inputs: &[f64]| -> f64 {
        let (x, y) = tensors(&inputs[..6], &inputs[6..], &plain);
        floats(eval_scalar(&engine, expr, x, y))[0]
    };
    let central = |inputs: &[f64], i: usize, h: f64| {
        let (mut up, mut down) = (inputs.to_vec(), inputs.to_vec());
        up[i] += h;
        down[i] -= h;
        (f(&up) - f(&down)) / (2.0 * h)
    };
    let (inputs, tolerance) = ([xs, ys].concat(), if dtype == DType::F64 { 1e-6 } else { 1e-3 });
    for (i, g) in autodiff.iter().enumerate() {
        let numeric = match dtype {
            DType::F64 => central(&inputs, i, 1e-4),
            _ => (4.0 * central(&inputs, i, 0.01) - central(&inputs, i, 0.02)) / 3.0,
        };
        let gap = (numeric - g).abs() / (numeric.abs() + 0.01);
        assert!(gap < tolerance, "{expr} ({dtype:?}): d/d input {i}: autodiff {g} vs central differences {numeric}");
    }
}

#[test]
fn gradients_flow_through_arithmetic_with_broadcasting() {
    for expr in [
        "sum(x + y)",
        "sum(x - 2.0 * y)",
        "sum(x * y)",
        "sum(x / (y + 3.0))",
        "sum(-x * 1.5 + 1)",
        "mean(2 - x)",
        "sum(3.0 / (x + 4.0))",
        "sum(x * x) - sum(y)",
    ] {
        check_gradient(expr);
    }
}

#[test]
fn gradients_flow_through_elementwise_functions() {
    for expr in [
        "sum(log_sigmoid(x))",
        "sum(sigmoid(x))",
        "sum(softplus(x))",
        "sum(relu(x + 0.05))",
        "sum(exp(x))",
        "sum(log(x + 2.0))",
        "sum(abs(x + 0.05))",
        "sum(sqrt(x + 2.0))",
        "sum(pow(x + 2.0, 1.5))",
        "sum(clamp(x, -1.0, 1.0))",
        "sum(clamp_min(x, 0.0))",
        "sum(square(x)) + sum(tanh(y))",
        "sum(max(x, y))",
        "sum(min(x, 0.1))",
        "sum(softmax(x) * x)",
        "sum(log_softmax(x) * x)",
        "max(x) + min(y)",
        "std(x)",
        "sum(sum(x, 1) * y)",
        "sum(mean(x, 1) * y)",
    ] {
        check_gradient(expr);
    }
    // tensor() makes f32 values, which an f64 y cannot multiply.
    check_gradient_in("sum(tensor([1.0, 2.0]) * y) + mean(x)", DType::F32);
}

#[test]
fn detach_stops_the_gradient() {
    let device = Device::flex().autodiff();
    set_script_device(device.clone());
    let xs = vec![0.3f32, -0.7, 1.2, 0.5, -1.5, 0.9];
    let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [2, 3]), (&device, DType::F64)).require_grad();
    let y = Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 0.0], [2]), &device);
    // d/dx sum(x * detach(x)) = detach(x): only the first factor carries the gradient.
    let out = eval_scalar(&engine(), "sum(x * detach(x))", x.clone(), y);
    let grad = prefhost::tensor::values(x.grad(&out.backward()).unwrap());
    assert_eq!(grad, xs);
}

#[test]
fn values_items_and_shapes() {
    set_script_device(Device::flex());
    let engine = engine();
    let got: f64 = engine.engine.eval("item(sum(tensor([[1.0, 2.0], [3.0, 4.5]])))").unwrap();
    assert!((got - 10.5).abs() < 1e-6);
    let arr: rhai::Array = engine.engine.eval("to_array(tensor([1, 2]) * 2)").unwrap();
    assert_eq!(arr.iter().map(|v| v.as_float().unwrap()).collect::<Vec<_>>(), vec![2.0, 4.0]);
    let shape: rhai::Array = engine.engine.eval("tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).shape").unwrap();
    assert_eq!(shape.iter().map(|v| v.as_int().unwrap()).collect::<Vec<_>>(), vec![2, 3]);
    let mask: rhai::Array = engine.engine.eval("to_array(gt(tensor([1.0, -1.0, 2.0]), 0.0))").unwrap();
    assert_eq!(mask.iter().map(|v| v.as_float().unwrap()).collect::<Vec<_>>(), vec![1.0, 0.0, 1.0]);
    let err = engine.engine.eval::<Dynamic>("tensor([1.0, 2.0]) + tensor([1.0, 2.0, 3.0])").unwrap_err();
    assert!(err.to_string().contains("do not broadcast"), "{err}");
    let err = engine.engine.eval::<Dynamic>("item(tensor([1.0, 2.0]))").unwrap_err();
    assert!(err.to_string().contains("one element"), "{err}");
}

#[test]
fn runaway_script_is_stopped_by_the_operation_limit() {
    let engine =
        ScriptEngine::new(&prefhost_repo().join("plugins"), &Limits { max_operations: 100_000, ..Limits::default() });
    let err = engine.engine.eval::<Dynamic>("let i = 0; loop { i += 1; }").unwrap_err();
    assert!(err.to_string().to_lowercase().contains("too many operations"), "{err}");
    let err = engine.engine.eval::<Dynamic>("fn f(n) { f(n + 1) } f(0)").unwrap_err();
    assert!(err.to_string().contains("Stack overflow") || err.to_string().contains("call"), "{err}");
    let err = engine.engine.eval::<Dynamic>("eval(\"1\")").unwrap_err();
    assert!(!err.to_string().is_empty());
}
