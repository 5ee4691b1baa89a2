//! Resets a script can schedule (LoRR's "reset", after MARR and shrink-and-perturb): the
//! trainable parameters under the named modules move back toward the run's initial weights,
//! θ ← α·θ + (1 − α)·θ₀. α = 0 puts them back exactly (with LoRA: the adapters restart from
//! their initial values, B = 0), α = 1 leaves them as they are.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use rhai::{Dynamic, Map};

use crate::model::Llama;

/// Module names a reset may select: HF's, as the parameters are named in checkpoints.
pub const RESETTABLE: [&str; 15] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "q_norm",
    "k_norm",
];

/// `#{ factor: α, modules: [...] }` from the script's `on_step`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ResetRequest {
    pub factor: f64,
    /// Module names, or ["all"] for every trainable parameter.
    pub modules: Vec<String>,
}

impl ResetRequest {
    pub fn from_map(map: &Map) -> Result<Self, String> {
        for key in map.keys() {
            if key.as_str() != "factor" && key.as_str() != "modules" {
                return Err(format!("reset.{key}: unknown field (expected factor, modules)"));
            }
        }
        let factor = match map.get("factor") {
            Some(v) => v
                .as_float()
                .ok()
                .or_else(|| v.as_int().ok().map(|i| i as f64))
                .ok_or_else(|| format!("reset.factor must be a number, got {v}"))?,
            None => return Err("reset.factor is missing (α in θ ← α·θ + (1 − α)·θ₀, in [0, 1])".into()),
        };
        if !(0.0..=1.0).contains(&factor) {
            return Err(format!("reset.factor must be in [0, 1], got {factor}"));
        }
        let modules: Vec<String> = match map.get("modules") {
            None => vec!["all".to_string()],
            Some(v) => {
                let list = v
                    .clone()
                    .try_cast::<rhai::Array>()
                    .ok_or_else(|| format!("reset.modules must be an array of module names, got {v}"))?;
                list.iter()
                    .map(|m| m.clone().into_string().map_err(|_| format!("reset.modules: {m} is not a string")))
                    .collect::<Result<_, _>>()?
            }
        };
        for m in &modules {
            if m != "all" && !RESETTABLE.contains(&m.as_str()) {
                return Err(format!(
                    "reset.modules: unknown module \"{m}\" (expected \"all\" or some of {})",
                    RESETTABLE.join(", ")
                ));
            }
        }
        if modules.is_empty() {
            return Err("reset.modules is empty".into());
        }
        Ok(Self { factor, modules })
    }

    /// The event logged for it.
    pub fn describe(&self, parameters: usize) -> serde_json::Value {
        serde_json::json!({ "factor": self.factor, "modules": self.modules, "parameters": parameters })
    }
}

/// The script's `on_step` result: `()` for nothing to do, or `#{ reset: #{...} }`.
pub fn requested_reset(value: &Dynamic) -> Result<Option<ResetRequest>, String> {
    if value.is_unit() {
        return Ok(None);
    }
    let map = value.clone().try_cast::<Map>().ok_or_else(|| {
        format!("on_step must return () or a map like #{{ reset: #{{ factor, modules }} }}, got {}", value.type_name())
    })?;
    let mut reset = None;
    for (key, v) in &map {
        match key.as_str() {
            "reset" => {
                let m = v
                    .clone()
                    .try_cast::<Map>()
                    .ok_or_else(|| format!("reset must be a map #{{ factor, modules }}, got {v}"))?;
                reset = Some(ResetRequest::from_map(&m)?);
            }
            other => return Err(format!("on_step returned `{other}`; it understands only `reset`")),
        }
    }
    Ok(reset)
}

/// Collects the initial values (flattened) of the parameters under the selected modules.
struct Initial<'a> {
    modules: &'a [String],
    path: Vec<String>,
    values: HashMap<ParamId, Tensor<1>>,
}

impl ModuleVisitor for Initial<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let selected = self.modules.iter().any(|m| m == "all" || self.path.iter().any(|p| p == m));
        if selected {
            let t = param.val().detach();
            let n: usize = t.dims().iter().product();
            self.values.insert(param.id, t.reshape([n]));
        }
    }
}

/// Blends the policy's trainable parameters that have an initial value toward it.
struct Blend {
    factor: f64,
    initial: HashMap<ParamId, Tensor<1>>,
    count: usize,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(start) = self.initial.get(&param.id).cloned() else { return param };
        if !param.val().is_require_grad() {
            return param; // frozen (the LoRA base): already its initial value
        }
        self.count += 1;
        let factor = self.factor;
        param.map(|t| {
            let dims = t.dims();
            let blended = t.detach().mul_scalar(factor) + start.reshape(dims).mul_scalar(1.0 - factor);
            blended.detach().require_grad()
        })
    }
}

/// θ ← α·θ + (1 − α)·θ₀ for the trainable parameters of `policy` under the requested
/// modules, θ₀ taken from `initial` (the same model as built at the start of the run).
/// Returns the policy and how many parameter tensors moved.
pub fn shrink_toward_initial(policy: Llama, initial: &Llama, request: &ResetRequest) -> (Llama, usize) {
    let mut collect = Initial { modules: &request.modules, path: Vec::new(), values: HashMap::new() };
    initial.visit(&mut collect);
    let mut blend = Blend { factor: request.factor, initial: collect.values, count: 0 };
    let policy = policy.map(&mut blend);
    (policy, blend.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(source: &str) -> Dynamic {
        rhai::Engine::new().eval::<Dynamic>(source).unwrap()
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        assert_eq!(requested_reset(&Dynamic::UNIT).unwrap(), None);
        let ok = requested_reset(&map("#{ reset: #{ factor: 0.5, modules: [\"down_proj\"] } }")).unwrap().unwrap();
        assert_eq!(ok, ResetRequest { factor: 0.5, modules: vec!["down_proj".into()] });
        let all = requested_reset(&map("#{ reset: #{ factor: 0 } }")).unwrap().unwrap();
        assert_eq!(all.modules, vec!["all".to_string()]);
        for (source, expected) in [
            ("#{ reset: #{ factor: 1.5 } }", "reset.factor"),
            ("#{ reset: #{ modules: [\"down_proj\"] } }", "reset.factor"),
            ("#{ reset: #{ factor: 0.5, modules: [\"mlp\"] } }", "reset.modules"),
            ("#{ reset: #{ factor: 0.5, scale: 2 } }", "reset.scale"),
            ("#{ rest: #{ factor: 0.5 } }", "`rest`"),
            ("42", "on_step must return"),
        ] {
            let e = requested_reset(&map(source)).unwrap_err();
            assert!(e.contains(expected), "{source}: {e}");
        }
    }
}
