//! The boundary between the trainer and the script's `loss(batch, params)`: building the
//! batch map, reading what the loss returned, and checking it before it is used.

use burn::tensor::Tensor;
use rhai::{Dynamic, FLOAT, INT, Map};

use crate::script::ScriptTensor;

/// What a loss returned, checked.
pub struct LossOutput {
    pub loss: Tensor<1>,
    pub chosen_rewards: Option<Vec<f32>>,
    pub rejected_rewards: Option<Vec<f32>>,
    pub state: Option<Map>,
    pub metrics: Vec<(String, f64)>,
}

pub fn put1(map: &mut Map, name: &str, t: Tensor<1>) {
    map.insert(name.into(), Dynamic::from(ScriptTensor::Rank1(t)));
}

pub fn put2(map: &mut Map, name: &str, t: Tensor<2>) {
    map.insert(name.into(), Dynamic::from(ScriptTensor::Rank2(t)));
}

/// Keys the host sets in the `params` a loss sees; the config's `params` may not use them.
pub const RESERVED_PARAMS: [&str; 4] = ["step", "total_steps", "state", "rng_seed"];

/// `params` as the loss sees them: the config's params plus step, total_steps, state and
/// rng_seed (for the script's seeded draws: `random_normal`, `sample_without_replacement`).
pub fn loss_params(params: &Map, step: usize, total: usize, state: &Map, rng_seed: INT) -> Map {
    let mut p = params.clone();
    p.insert("step".into(), Dynamic::from_int(step as INT));
    p.insert("total_steps".into(), Dynamic::from_int(total as INT));
    p.insert("state".into(), Dynamic::from_map(state.clone()));
    p.insert("rng_seed".into(), Dynamic::from_int(rng_seed));
    p
}

fn tensor_field(map: &Map, name: &str) -> Result<Option<ScriptTensor>, String> {
    match map.get(name) {
        None => Ok(None),
        Some(v) if v.is::<ScriptTensor>() => Ok(Some(v.clone().cast::<ScriptTensor>())),
        Some(v) => Err(format!("loss returned {name} as {}, expected a Tensor", v.type_name())),
    }
}

pub fn read_loss_output(value: Dynamic, batch_size: usize) -> Result<LossOutput, String> {
    let (loss, map) = if value.is::<ScriptTensor>() {
        (value.cast::<ScriptTensor>(), Map::new())
    } else if let Some(map) = value.clone().try_cast::<Map>() {
        let loss = tensor_field(&map, "loss")?.ok_or("loss returned a map without a `loss` tensor")?;
        (loss, map)
    } else {
        return Err(format!("loss must return a Tensor or a map with `loss`, got {}", value.type_name()));
    };
    if loss.numel() != 1 {
        return Err(format!("loss must be a scalar (one element), got shape {:?}; take mean() over the batch", loss.shape()));
    }
    let loss = loss.into_scalar_tensor().map_err(|e| e.to_string())?;
    if loss.is_autodiff() && !loss.is_tracked() {
        return Err("loss does not depend on the model (no gradient): was every term detached?".into());
    }
    let rewards = |name: &str| -> Result<Option<Vec<f32>>, String> {
        match tensor_field(&map, name)? {
            None => Ok(None),
            Some(t) if t.shape() == [batch_size] => Ok(Some(t.values())),
            Some(t) => Err(format!("{name} must have shape [{batch_size}], got {:?}", t.shape())),
        }
    };
    let state = match map.get("state") {
        None => None,
        Some(s) => Some(s.clone().try_cast::<Map>().ok_or("loss returned `state` that is not a map")?),
    };
    let mut metrics = Vec::new();
    if let Some(m) = map.get("metrics") {
        let m = m.clone().try_cast::<Map>().ok_or("loss returned `metrics` that is not a map")?;
        for (k, v) in m {
            let number = if let Some(f) = v.clone().try_cast::<FLOAT>() {
                f
            } else if let Some(i) = v.clone().try_cast::<INT>() {
                i as f64
            } else if v.is::<ScriptTensor>() {
                v.cast::<ScriptTensor>().scalar().map_err(|e| format!("metric {k}: {e}"))?
            } else {
                return Err(format!("metric {k} is {}, expected a number", v.type_name()));
            };
            metrics.push((k.to_string(), number));
        }
    }
    Ok(LossOutput {
        loss,
        chosen_rewards: rewards("chosen_rewards")?,
        rejected_rewards: rewards("rejected_rewards")?,
        state,
        metrics,
    })
}

/// DPO's sigmoid loss computed in Rust from the same batch map the script gets: the
/// baseline `host bench` times the script's loss against (no Rhai call at all).
pub fn rust_dpo_loss(map: &Map, beta: f64) -> Result<LossOutput, String> {
    let get = |name: &str| match map.get(name).map(|v| v.clone().cast::<ScriptTensor>()) {
        Some(ScriptTensor::Rank1(t)) => Ok(t),
        _ => Err(format!("the batch has no [B] tensor {name}")),
    };
    let chosen = get("chosen_logps")? - get("ref_chosen_logps")?;
    let rejected = get("rejected_logps")? - get("ref_rejected_logps")?;
    let margin = (chosen.clone() - rejected.clone()).mul_scalar(beta);
    let loss = burn::tensor::activation::log_sigmoid(margin).neg().mean();
    Ok(LossOutput {
        loss,
        chosen_rewards: Some(crate::model::values(chosen.detach().mul_scalar(beta))),
        rejected_rewards: Some(crate::model::values(rejected.detach().mul_scalar(beta))),
        state: None,
        metrics: Vec::new(),
    })
}
