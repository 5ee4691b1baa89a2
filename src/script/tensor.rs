//! The `Tensor` type scripts see: a rank-1 ([B]) or rank-2 ([B, T]) float tensor.
//!
//! Every operation is a burn op, so gradients flow from the value a loss script returns
//! back into the model. Ranks are kept small on purpose: a preference batch only has
//! per-sequence values ([B]) and per-token values ([B, T]).

use std::cell::RefCell;

use burn::tensor::{Device, Tensor, TensorData, activation};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FLOAT, INT, Position};

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

thread_local! {
    /// Device on which `tensor([...])` builds new tensors: the training device while a
    /// run is stepping (so script constants live beside the model's values).
    static SCRIPT_DEVICE: RefCell<Device> = RefCell::new(Device::flex().autodiff());
}

/// Sets the device used by script-side tensor constructors on this thread.
pub fn set_script_device(device: Device) {
    SCRIPT_DEVICE.with(|d| *d.borrow_mut() = device);
}

pub fn script_device() -> Device {
    SCRIPT_DEVICE.with(|d| d.borrow().clone())
}

#[derive(Clone, Debug)]
pub enum ScriptTensor {
    Rank1(Tensor<1>),
    Rank2(Tensor<2>),
}

fn err<T>(msg: impl Into<String>) -> RhaiResult<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(Dynamic::from(msg.into()), Position::NONE)))
}

/// Applies the same rank-generic burn expression to either rank.
macro_rules! each_rank {
    ($t:expr, |$x:ident| $body:expr) => {
        match $t {
            ScriptTensor::Rank1($x) => ScriptTensor::Rank1($body),
            ScriptTensor::Rank2($x) => ScriptTensor::Rank2($body),
        }
    };
}

impl ScriptTensor {
    pub fn from_values(values: Vec<f32>) -> Self {
        let n = values.len();
        ScriptTensor::Rank1(Tensor::from_data(TensorData::new(values, [n]), &script_device()))
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            ScriptTensor::Rank1(t) => t.dims().to_vec(),
            ScriptTensor::Rank2(t) => t.dims().to_vec(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn values(&self) -> Vec<f32> {
        match self {
            ScriptTensor::Rank1(t) => crate::tensor::values(t.clone()),
            ScriptTensor::Rank2(t) => crate::tensor::values(t.clone()),
        }
    }

    /// The single value of a one-element tensor.
    pub fn scalar(&self) -> RhaiResult<f64> {
        if self.numel() != 1 {
            return err(format!("item() needs a tensor with one element, got shape {:?}", self.shape()));
        }
        Ok(self.values()[0] as f64)
    }

    /// A one-element tensor as rank 1, for returning reductions.
    pub fn into_scalar_tensor(self) -> RhaiResult<Tensor<1>> {
        if self.numel() != 1 {
            return err(format!("expected a scalar (one-element) tensor, got shape {:?}", self.shape()));
        }
        Ok(match self {
            ScriptTensor::Rank1(t) => t,
            ScriptTensor::Rank2(t) => t.reshape([1]),
        })
    }

    pub fn as_rank1(&self) -> RhaiResult<Tensor<1>> {
        match self {
            ScriptTensor::Rank1(t) => Ok(t.clone()),
            ScriptTensor::Rank2(t) => err(format!("expected a rank-1 tensor, got shape {:?}", t.dims())),
        }
    }
}

/// Makes two tensors the same rank and shape, torch-style, except that a rank-1 [B]
/// tensor meets a rank-2 [B, T] one row-wise (a per-sequence value applies to its row).
fn broadcast(a: ScriptTensor, b: ScriptTensor) -> RhaiResult<(ScriptTensor, ScriptTensor)> {
    use ScriptTensor::*;
    let (a, b) = match (a, b) {
        (Rank1(a), Rank2(b)) => (a.unsqueeze_dim::<2>(1), b),
        (Rank2(a), Rank1(b)) => (a, b.unsqueeze_dim::<2>(1)),
        (Rank1(a), Rank1(b)) => {
            let n = common_dim(a.dims()[0], b.dims()[0], &[a.dims()[0]], &[b.dims()[0]])?;
            return Ok((Rank1(a.expand([n])), Rank1(b.expand([n]))));
        }
        (Rank2(a), Rank2(b)) => (a, b),
    };
    let (da, db) = (a.dims(), b.dims());
    let rows = common_dim(da[0], db[0], &da, &db)?;
    let cols = common_dim(da[1], db[1], &da, &db)?;
    Ok((Rank2(a.expand([rows, cols])), Rank2(b.expand([rows, cols]))))
}

fn common_dim(x: usize, y: usize, a: &[usize], b: &[usize]) -> RhaiResult<usize> {
    match (x, y) {
        (x, y) if x == y => Ok(x),
        (1, y) => Ok(y),
        (x, 1) => Ok(x),
        _ => err(format!("tensor shapes {a:?} and {b:?} do not broadcast")),
    }
}

macro_rules! binary_op {
    ($a:expr, $b:expr, $op:ident) => {{
        let (a, b) = broadcast($a, $b)?;
        Ok(match (a, b) {
            (ScriptTensor::Rank1(a), ScriptTensor::Rank1(b)) => ScriptTensor::Rank1(a.$op(b)),
            (ScriptTensor::Rank2(a), ScriptTensor::Rank2(b)) => ScriptTensor::Rank2(a.$op(b)),
            _ => unreachable!("broadcast returns equal ranks"),
        })
    }};
}

fn add(a: ScriptTensor, b: ScriptTensor) -> RhaiResult<ScriptTensor> {
    binary_op!(a, b, add)
}
fn sub(a: ScriptTensor, b: ScriptTensor) -> RhaiResult<ScriptTensor> {
    binary_op!(a, b, sub)
}
fn mul(a: ScriptTensor, b: ScriptTensor) -> RhaiResult<ScriptTensor> {
    binary_op!(a, b, mul)
}
fn div(a: ScriptTensor, b: ScriptTensor) -> RhaiResult<ScriptTensor> {
    binary_op!(a, b, div)
}
fn max_pair(a: ScriptTensor, b: ScriptTensor) -> RhaiResult<ScriptTensor> {
    binary_op!(a, b, max_pair)
}
fn min_pair(a: ScriptTensor, b: ScriptTensor) -> RhaiResult<ScriptTensor> {
    binary_op!(a, b, min_pair)
}

/// Comparisons give 0/1 float masks; they carry no gradient.
fn compare(a: ScriptTensor, b: ScriptTensor, op: &str) -> RhaiResult<ScriptTensor> {
    let (a, b) = broadcast(a, b)?;
    macro_rules! cmp {
        ($x:expr, $y:expr) => {
            match op {
                "gt" => $x.detach().greater($y.detach()).float(),
                "ge" => $x.detach().greater_equal($y.detach()).float(),
                "lt" => $x.detach().lower($y.detach()).float(),
                _ => $x.detach().lower_equal($y.detach()).float(),
            }
        };
    }
    Ok(match (a, b) {
        (ScriptTensor::Rank1(x), ScriptTensor::Rank1(y)) => ScriptTensor::Rank1(cmp!(x, y)),
        (ScriptTensor::Rank2(x), ScriptTensor::Rank2(y)) => ScriptTensor::Rank2(cmp!(x, y)),
        _ => unreachable!("broadcast returns equal ranks"),
    })
}

fn scalar_like(t: &ScriptTensor, v: f64) -> ScriptTensor {
    each_rank!(t.clone(), |x| x.full_like(v as f32).detach())
}

fn reduce(t: ScriptTensor, op: &str) -> ScriptTensor {
    let flat = match t {
        ScriptTensor::Rank1(x) => x,
        ScriptTensor::Rank2(x) => {
            let n = x.dims().iter().product::<usize>();
            x.reshape([n])
        }
    };
    ScriptTensor::Rank1(match op {
        "sum" => flat.sum(),
        "mean" => flat.mean(),
        "min" => flat.min(),
        "max" => flat.max(),
        _ => {
            // Population standard deviation (divides by N), as used for z-scores.
            let dims = flat.dims();
            let centred = flat.clone() - flat.mean().expand(dims);
            centred.square().mean().sqrt()
        }
    })
}

fn reduce_dim(t: ScriptTensor, dim: INT, op: &str) -> RhaiResult<ScriptTensor> {
    match (t, dim) {
        (ScriptTensor::Rank2(x), 1) => {
            let r = if op == "sum" { x.sum_dim(1) } else { x.mean_dim(1) };
            Ok(ScriptTensor::Rank1(r.squeeze_dim::<1>(1)))
        }
        (ScriptTensor::Rank2(x), 0) => {
            let r = if op == "sum" { x.sum_dim(0) } else { x.mean_dim(0) };
            Ok(ScriptTensor::Rank1(r.squeeze_dim::<1>(0)))
        }
        (ScriptTensor::Rank1(x), 0) => Ok(reduce(ScriptTensor::Rank1(x), op)),
        (t, d) => err(format!("{op}(t, {d}): no dim {d} in a tensor of shape {:?}", t.shape())),
    }
}

fn to_f32_list(values: &Array, what: &str) -> RhaiResult<Vec<f32>> {
    values
        .iter()
        .map(|v| {
            if let Some(f) = v.clone().try_cast::<FLOAT>() {
                Ok(f as f32)
            } else if let Some(i) = v.clone().try_cast::<INT>() {
                Ok(i as f32)
            } else {
                err(format!("{what}: expected numbers, found {}", v.type_name()))
            }
        })
        .collect()
}

/// `tensor(x)`: numbers, an array of numbers, an array of equal-length arrays, or a tensor.
pub fn tensor_from_dynamic(value: Dynamic) -> RhaiResult<ScriptTensor> {
    if value.is::<ScriptTensor>() {
        return Ok(value.cast::<ScriptTensor>());
    }
    if let Some(f) = value.clone().try_cast::<FLOAT>() {
        return Ok(ScriptTensor::from_values(vec![f as f32]));
    }
    if let Some(i) = value.clone().try_cast::<INT>() {
        return Ok(ScriptTensor::from_values(vec![i as f32]));
    }
    let Some(array) = value.clone().try_cast::<Array>() else {
        return err(format!("tensor(): cannot build a tensor from {}", value.type_name()));
    };
    // Empty tensors have no meaning in a loss and make reductions undefined.
    if array.is_empty() {
        return err("tensor(): empty array");
    }
    if array.first().is_some_and(|v| v.is_array()) {
        let rows: Vec<Array> = array
            .into_iter()
            .map(|r| r.try_cast::<Array>().ok_or(()))
            .collect::<Result<_, _>>()
            .or_else(|_| err("tensor(): mixed rows and numbers"))?;
        let cols = rows[0].len();
        if cols == 0 {
            return err("tensor(): empty rows");
        }
        let mut values = Vec::with_capacity(rows.len() * cols);
        for (i, row) in rows.iter().enumerate() {
            if row.len() != cols {
                return err(format!("tensor(): row {i} has {} values, row 0 has {cols}", row.len()));
            }
            values.extend(to_f32_list(row, "tensor()")?);
        }
        let data = TensorData::new(values, [rows.len(), cols]);
        return Ok(ScriptTensor::Rank2(Tensor::from_data(data, &script_device())));
    }
    Ok(ScriptTensor::from_values(to_f32_list(&array, "tensor()")?))
}

fn to_array(t: ScriptTensor) -> Array {
    let shape = t.shape();
    let values = t.values();
    let as_dyn = |v: &f32| Dynamic::from_float(*v as FLOAT);
    if shape.len() == 1 {
        values.iter().map(as_dyn).collect()
    } else {
        values.chunks(shape[1].max(1)).map(|row| Dynamic::from_array(row.iter().map(as_dyn).collect())).collect()
    }
}

/// Registers `+ - * /` for (Tensor, Tensor), (Tensor, number) and (number, Tensor).
macro_rules! register_arith {
    ($engine:expr, $name:literal, $f:ident) => {
        $engine.register_fn($name, |a: ScriptTensor, b: ScriptTensor| $f(a, b));
        $engine.register_fn($name, |a: ScriptTensor, b: FLOAT| {
            let b = scalar_like(&a, b);
            $f(a, b)
        });
        $engine.register_fn($name, |a: FLOAT, b: ScriptTensor| $f(scalar_like(&b, a), b));
        $engine.register_fn($name, |a: ScriptTensor, b: INT| {
            let b = scalar_like(&a, b as f64);
            $f(a, b)
        });
        $engine.register_fn($name, |a: INT, b: ScriptTensor| $f(scalar_like(&b, a as f64), b));
    };
}

macro_rules! register_unary {
    ($engine:expr, $($name:literal => |$x:ident| $body:expr),* $(,)?) => {
        $( $engine.register_fn($name, |t: ScriptTensor| each_rank!(t, |$x| $body)); )*
    };
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptTensor>("Tensor");
    engine.register_fn("tensor", tensor_from_dynamic);

    register_arith!(engine, "+", add);
    register_arith!(engine, "-", sub);
    register_arith!(engine, "*", mul);
    register_arith!(engine, "/", div);
    register_arith!(engine, "max", max_pair);
    register_arith!(engine, "min", min_pair);
    for op in ["gt", "ge", "lt", "le"] {
        engine.register_fn(op, move |a: ScriptTensor, b: ScriptTensor| compare(a, b, op));
        engine.register_fn(op, move |a: ScriptTensor, b: FLOAT| {
            let b = scalar_like(&a, b);
            compare(a, b, op)
        });
        engine.register_fn(op, move |a: FLOAT, b: ScriptTensor| compare(scalar_like(&b, a), b, op));
    }

    register_unary!(engine,
        "-" => |x| x.neg(),
        "log_sigmoid" => |x| activation::log_sigmoid(x),
        "sigmoid" => |x| activation::sigmoid(x),
        "softplus" => |x| activation::softplus(x, 1.0),
        "relu" => |x| activation::relu(x),
        "exp" => |x| x.exp(),
        "log" => |x| x.log(),
        "abs" => |x| x.abs(),
        "sqrt" => |x| x.sqrt(),
        "square" => |x| x.square(),
        "tanh" => |x| x.tanh(),
        "detach" => |x| x.detach(),
        "softmax" => |x| activation::softmax(x, -1),
        "log_softmax" => |x| activation::log_softmax(x, -1),
        "zeros_like" => |x| x.zeros_like().detach(),
        "ones_like" => |x| x.ones_like().detach(),
    );
    engine.register_fn("pow", |t: ScriptTensor, p: FLOAT| each_rank!(t, |x| x.powf_scalar(p)));
    engine.register_fn("pow", |t: ScriptTensor, p: INT| each_rank!(t, |x| x.powf_scalar(p as f64)));
    engine.register_fn("clamp", |t: ScriptTensor, lo: FLOAT, hi: FLOAT| each_rank!(t, |x| x.clamp(lo, hi)));
    engine.register_fn("clamp_min", |t: ScriptTensor, lo: FLOAT| each_rank!(t, |x| x.clamp_min(lo)));
    engine.register_fn("clamp_max", |t: ScriptTensor, hi: FLOAT| each_rank!(t, |x| x.clamp_max(hi)));
    engine.register_fn("full_like", |t: ScriptTensor, v: FLOAT| scalar_like(&t, v));

    for op in ["sum", "mean", "min", "max", "std"] {
        engine.register_fn(op, move |t: ScriptTensor| reduce(t, op));
    }
    for op in ["sum", "mean"] {
        engine.register_fn(op, move |t: ScriptTensor, dim: INT| reduce_dim(t, dim, op));
    }

    engine.register_fn("item", |t: ScriptTensor| t.scalar());
    engine.register_fn("to_array", to_array);
    engine.register_fn("len", |t: ScriptTensor| t.shape()[0] as INT);
    engine.register_get("len", |t: &mut ScriptTensor| t.shape()[0] as INT);
    engine.register_fn("numel", |t: ScriptTensor| t.numel() as INT);
    engine.register_get("shape", |t: &mut ScriptTensor| {
        t.shape().into_iter().map(|d| Dynamic::from_int(d as INT)).collect::<Array>()
    });
    engine.register_fn("to_string", |t: &mut ScriptTensor| format_tensor(t));
    engine.register_fn("to_debug", |t: &mut ScriptTensor| format_tensor(t));
}

fn format_tensor(t: &ScriptTensor) -> String {
    let values = t.values();
    let shown: Vec<String> = values.iter().take(8).map(|v| format!("{v:.6}")).collect();
    let more = if values.len() > 8 { ", ..." } else { "" };
    format!("Tensor{:?}[{}{more}]", t.shape(), shown.join(", "))
}
