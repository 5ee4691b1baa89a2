//! LoRA adapters in PEFT's layout: a frozen projection plus a trainable low-rank update,
//! y = x·W + b + s·dropout(x)·A·B with s = alpha / r (or alpha / √r with rsLoRA).
//!
//! Written here rather than with burn's `apply_lora`, which composes the dense W + s·A·B on
//! every forward (a weight-sized tensor and gradient per projection) and has no dropout:
//! applying A·B to the activations keeps training memory at the adapters' size.
//! The frozen base is the model's own weights, so the reference of a LoRA run is the same
//! model with its adapters left out, and no second copy is ever made.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::llama::{Llama, named_param};
use super::norm::Normed;
use super::precision::MixedPrecision;
use super::weights::{NamedTensors, PendingTensor};

/// The projections an adapter can sit on, in PEFT's names.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The script's `lora: #{ ... }`, with PEFT's field names and defaults.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of A·B.
    #[serde(default = "d_rank")]
    pub r: usize,
    #[serde(default = "d_alpha", deserialize_with = "number")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input (the frozen path sees x unchanged).
    #[serde(default, deserialize_with = "number")]
    pub lora_dropout: f64,
    /// Module names, or "all-linear" for every projection (PEFT's default for Llama-family
    /// models is q_proj and v_proj).
    #[serde(default = "d_targets")]
    pub target_modules: Targets,
    /// Scale by alpha / √r instead of alpha / r (rank-stabilised LoRA).
    #[serde(default)]
    pub use_rslora: bool,
    /// A PEFT adapter folder the adapters start from instead of a fresh initialisation
    /// (PEFT's `PeftModel.from_pretrained(..., is_trainable=True)`); its r, lora_alpha,
    /// target_modules and use_rslora must be these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Targets {
    Names(Vec<String>),
    One(String),
}

/// A float that may be written as an integer (`lora_alpha: 16` in a script).
fn number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Float(f64),
        Int(i64),
    }
    Ok(match Number::deserialize(d)? {
        Number::Float(f) => f,
        Number::Int(i) => i as f64,
    })
}

fn d_rank() -> usize {
    8
}
fn d_alpha() -> f64 {
    8.0
}
fn d_targets() -> Targets {
    Targets::Names(vec!["q_proj".into(), "v_proj".into()])
}

impl LoraConfig {
    /// Checks the values; `at` names the config field in errors (e.g. "train(config): lora").
    pub fn validate(&self, at: &str) -> Result<()> {
        if self.r == 0 {
            bail!("{at}.r must be at least 1");
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            bail!("{at}.lora_alpha must be a positive number, got {}", self.lora_alpha);
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("{at}.lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        self.modules().map_err(|e| anyhow::anyhow!("{at}.target_modules: {e}"))?;
        Ok(())
    }

    /// The targeted module names, each one of `TARGETS`.
    pub fn modules(&self) -> Result<Vec<&'static str>> {
        let names: Vec<&str> = match &self.target_modules {
            Targets::One(name) if name == "all-linear" => return Ok(TARGETS.to_vec()),
            Targets::One(name) => vec![name.as_str()],
            Targets::Names(list) => list.iter().map(String::as_str).collect(),
        };
        if names.is_empty() {
            bail!("no modules named (choose from {} or \"all-linear\")", TARGETS.join(", "));
        }
        if let Some(unknown) = names.iter().find(|n| !TARGETS.contains(n)) {
            bail!("unknown module \"{unknown}\" (choose from {} or \"all-linear\")", TARGETS.join(", "));
        }
        // In TARGETS order, so two configs naming the same modules compare equal.
        Ok(TARGETS.iter().copied().filter(|t| names.contains(t)).collect())
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }
}

/// The trainable low-rank update of one projection.
#[derive(Module, Debug)]
pub struct Adapter {
    /// [in, r]: PEFT's lora_A.weight, transposed as burn's Linear is.
    pub a: Param<Tensor<2>>,
    /// [r, out]: PEFT's lora_B.weight, transposed.
    pub b: Param<Tensor<2>>,
    pub dropout: Dropout,
    pub scale: f64,
}

impl Adapter {
    /// s·dropout(x)·A·B for x [batch, seq, in].
    fn forward(&self, x: Tensor<3>, precision: MixedPrecision) -> Tensor<3> {
        let down = precision.matmul3(self.dropout.forward(x), self.a.val());
        precision.matmul3(down, self.b.val()).mul_scalar(self.scale)
    }

    /// s·A·B as a weight update ([in, out]).
    fn delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

/// A linear projection that may carry an adapter.
#[derive(Module, Debug)]
pub struct Projection {
    pub base: Linear,
    pub lora: Option<Adapter>,
    /// How the products run (set for the whole model by `Llama::with_precision`).
    #[module(skip)]
    pub precision: MixedPrecision,
}

impl Projection {
    pub fn new(base: Linear) -> Self {
        Self { base, lora: None, precision: MixedPrecision::No }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // Always one [batch·seq, in] × [in, out] product: burn's Linear keeps narrow outputs
        // (the K/V projections) as one small product per sequence, each repacking the weight.
        let y = self.precision.matmul3(x.clone(), self.base.weight.val());
        let y = match &self.base.bias {
            Some(bias) => y + bias.val().unsqueeze::<3>(),
            None => y,
        };
        match &self.lora {
            None => y,
            Some(adapter) => y + adapter.forward(x, self.precision),
        }
    }

    /// The projection of a norm's output: one fused op with the norm for a plain f32
    /// weight (the normalised input is then not kept), else `forward` of the shared value.
    pub fn forward_normed(&self, x: &Normed) -> Tensor<3> {
        let plain = self.lora.is_none() && self.base.bias.is_none() && self.precision == MixedPrecision::No;
        if plain && let Some(y) = x.matmul(&self.base.weight.val()) {
            return y;
        }
        self.forward(x.value())
    }

    /// The weight ([in, out]) with the adapter folded in: what merge-and-save writes.
    pub fn merged_weight(&self) -> Tensor<2> {
        match &self.lora {
            None => self.base.weight.val(),
            // A frozen base may be stored in bf16/f16; the merged weight is f32.
            Some(adapter) => self.base.weight.val().cast(burn::tensor::FloatDType::F32) + adapter.delta(),
        }
    }
}

/// PEFT's tensor names: `base_model.model.<module path>.lora_A.weight` ([r, in]) and
/// `...lora_B.weight` ([out, r]).
pub(crate) fn peft_key(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.lora_{factor}.weight")
}

impl Llama {
    /// Every projection with its HF module path (e.g. `model.layers.0.self_attn.q_proj`)
    /// and short name (`q_proj`).
    pub fn projections(&self) -> Vec<(String, &'static str, &Projection)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for (name, p) in
                [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)]
            {
                out.push((format!("model.layers.{i}.self_attn.{name}"), name, p));
            }
            for (name, p) in [("gate_proj", &m.gate_proj), ("up_proj", &m.up_proj), ("down_proj", &m.down_proj)] {
                out.push((format!("model.layers.{i}.mlp.{name}"), name, p));
            }
        }
        out
    }

    fn projections_mut(&mut self) -> Vec<(String, &'static str, &mut Projection)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            for (name, p) in [
                ("q_proj", &mut a.q_proj),
                ("k_proj", &mut a.k_proj),
                ("v_proj", &mut a.v_proj),
                ("o_proj", &mut a.o_proj),
            ] {
                out.push((format!("model.layers.{i}.self_attn.{name}"), name, p));
            }
            for (name, p) in
                [("gate_proj", &mut m.gate_proj), ("up_proj", &mut m.up_proj), ("down_proj", &mut m.down_proj)]
            {
                out.push((format!("model.layers.{i}.mlp.{name}"), name, p));
            }
        }
        out
    }

    /// Freezes every weight and attaches fresh adapters to the targeted projections:
    /// A as PEFT initialises it (Kaiming-uniform, bound 1/√in), B at zero, so the model's
    /// output is unchanged until the first update. Parameter ids come from the PEFT names,
    /// so optimizer state saved by one run applies to the resumed one.
    pub fn with_lora(self, config: &LoraConfig, device: &Device) -> Result<Self> {
        let targets = config.modules()?;
        let mut model = self.no_grad();
        for (path, name, projection) in model.projections_mut() {
            if !targets.contains(&name) {
                continue;
            }
            let [d_in, d_out] = projection.base.weight.val().dims();
            let bound = 1.0 / (d_in as f64).sqrt();
            let a = super::llama::random_from_cpu([d_in, config.r], Distribution::Uniform(-bound, bound), device);
            let b = Tensor::zeros([config.r, d_out], device);
            projection.lora = Some(Adapter {
                a: named_param(&peft_key(&path, "A"), a),
                b: named_param(&peft_key(&path, "B"), b),
                dropout: DropoutConfig::new(config.lora_dropout).init(),
                scale: config.scale(),
            });
        }
        Ok(model)
    }

    /// The same model with its weight products in `precision` (the weights stay f32).
    pub fn with_precision(mut self, precision: MixedPrecision) -> Self {
        for (_, _, projection) in self.projections_mut() {
            projection.precision = precision;
        }
        self.precision = precision;
        self
    }

    /// The same model without its adapters: the frozen base, i.e. a LoRA run's reference.
    /// Shares the weights' storage; nothing is copied.
    pub fn without_adapters(mut self) -> Self {
        for (_, _, projection) in self.projections_mut() {
            projection.lora = None;
        }
        self
    }

    pub fn has_adapters(&self) -> bool {
        self.projections().iter().any(|(_, _, p)| p.lora.is_some())
    }

    /// Parameters that take gradients (all of them in full fine-tuning, the adapters in LoRA).
    pub fn num_trainable_params(&self) -> usize {
        struct Count(usize);
        impl ModuleVisitor for Count {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.val().is_require_grad() {
                    self.0 += param.val().shape().num_elements();
                }
            }
        }
        let mut count = Count(0);
        self.visit(&mut count);
        count.0
    }

    /// The adapters under their PEFT names and layout ([r, in] for A, [out, r] for B).
    pub fn adapter_tensors(&self) -> NamedTensors {
        super::weights::with_values(self.adapter_tensor_list())
    }

    /// The adapters under PEFT's names and layout, each made when asked for.
    pub fn adapter_tensor_list(&self) -> Vec<(String, PendingTensor<'_>)> {
        let mut out = Vec::new();
        for (path, _, projection) in self.projections() {
            if let Some(adapter) = &projection.lora {
                for (factor, t) in [("A", adapter.a.val()), ("B", adapter.b.val())] {
                    let [input, output] = t.dims();
                    out.push((
                        peft_key(&path, factor),
                        PendingTensor::matrix([output, input], move || t.clone().transpose()),
                    ));
                }
            }
        }
        out
    }

    /// Starts the adapters from the PEFT folder `dir`, whose settings must equal `config`'s.
    pub fn with_adapters_from(self, dir: &Path, config: &LoraConfig, device: &Device) -> Result<Self> {
        let mut files = super::read_adapter(dir)?;
        let at = dir.join(super::weights::ADAPTER_CONFIG);
        let (theirs, ours) = (&files.lora, config);
        let differing = [
            ("r", theirs.r.to_string(), ours.r.to_string()),
            ("lora_alpha", theirs.lora_alpha.to_string(), ours.lora_alpha.to_string()),
            ("target_modules", format!("{:?}", theirs.modules()?), format!("{:?}", ours.modules()?)),
            ("use_rslora", theirs.use_rslora.to_string(), ours.use_rslora.to_string()),
        ];
        if let Some((key, theirs, ours)) = differing.into_iter().find(|(_, a, b)| a != b) {
            bail!(
                "{}: {key} is {theirs}, but the script's lora.{key} is {ours} (lora.init_adapter must match the adapter)",
                at.display()
            );
        }
        self.set_adapters(&mut files.tensors, device)
            .with_context(|| dir.join(super::weights::ADAPTER_WEIGHTS).display().to_string())
    }

    /// Replaces the adapters' values with `tensors` (PEFT names and layout), which must hold
    /// exactly the adapters this model has, in their shapes.
    pub fn set_adapters(mut self, tensors: &mut NamedTensors, device: &Device) -> Result<Self> {
        for (path, _, projection) in self.projections_mut() {
            let Some(adapter) = projection.lora.as_mut() else { continue };
            for factor in ["A", "B"] {
                let key = peft_key(&path, factor);
                let param = if factor == "A" { &mut adapter.a } else { &mut adapter.b };
                let [d0, d1] = param.val().dims();
                let Some((shape, values)) = tensors.remove(&key) else {
                    bail!("adapter has no tensor \"{key}\" (expected shape [{d1}, {d0}])");
                };
                if shape != [d1, d0] {
                    bail!("adapter tensor \"{key}\" has shape {shape:?}, the LoRA config expects [{d1}, {d0}]");
                }
                let value = Tensor::<2>::from_data(burn::tensor::TensorData::new(values, [d1, d0]), device).transpose();
                *param = named_param(&key, value);
            }
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "adapter tensor \"{extra}\" has no matching module in this LoRA config (target_modules or layers differ)"
            );
        }
        Ok(self)
    }
}
