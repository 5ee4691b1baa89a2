//! The boundary between the trainer and the script's `loss(batch, params)`: building the
//! batch map, reading what the loss returned, and checking it before it is used.

use burn::tensor::{Device, Tensor};
use rhai::{Dynamic, FLOAT, INT, Map};

use super::config::Mode;
use super::logps::row_sums;
use crate::script::ScriptTensor;

/// What a loss returned, checked.
pub struct LossOutput {
    pub loss: Tensor<1>,
    pub chosen_rewards: Option<Vec<f32>>,
    pub rejected_rewards: Option<Vec<f32>>,
    pub state: Option<Map>,
    pub metrics: Vec<(String, f64)>,
}

/// The batch a loss is called with; [`LossBatch::into_map`] gives the Rhai map it sees.
pub struct LossBatch {
    /// B: pairs, SFT rows or KTO completions.
    pub batch_size: usize,
    pub rows: BatchRows,
}

/// What the rows hold, by mode.
// One per micro-batch, moved not copied: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum BatchRows {
    /// SFT: the targets (`chosen_*`, no reference) and their mean NLL per token.
    Sft { chosen: Sequences, chosen_nll: Tensor<1> },
    /// Preference pairs: row i of `chosen_*` and `rejected_*` share a prompt; `chosen_nll`
    /// is the mean NLL per chosen token (RPO, SimPER and others add it).
    Pairs { chosen: Sequences, rejected: Sequences, chosen_nll: Tensor<1> },
    /// Unpaired (KTO): `completion_*`, `labels` (1 = desirable), and the summed log-probs of
    /// the KL rows (each prompt with another row's completion) under policy and reference.
    Unpaired { completion: Sequences, labels: Tensor<1>, kl_logps: Tensor<1>, ref_kl_logps: Tensor<1> },
}

/// One side's log-probs (`{side}_*` keys of the map): chosen, rejected or completion.
pub struct Sequences {
    /// Summed log-probs of each row's completion, [B].
    pub logps: Tensor<1>,
    /// Per-token log-probs of the targets, [B, T] (zero off the completion).
    pub token_logps: Tensor<2>,
    /// 1 on completion tokens, [B, T].
    pub mask: Tensor<2>,
    /// Completion tokens per row, [B].
    pub lengths: Tensor<1>,
    /// The frozen reference's `(logps, token_logps)`; none in SFT training.
    pub reference: Option<(Tensor<1>, Tensor<2>)>,
}

impl Sequences {
    /// The policy's per-token log-probs with their mask and lengths, and the reference's
    /// when there is one; the summed log-probs are taken here.
    pub fn new(token_logps: Tensor<2>, mask: Tensor<2>, lengths: Tensor<1>, reference: Option<Tensor<2>>) -> Self {
        let logps = row_sums(token_logps.clone());
        let reference = reference.map(|tokens| (row_sums(tokens.clone()), tokens));
        Self { logps, token_logps, mask, lengths, reference }
    }

    fn insert_into(self, map: &mut Map, side: &str) {
        if let Some((logps, token_logps)) = self.reference {
            insert_tensor(map, &format!("ref_{side}_logps"), ScriptTensor::Rank1(logps));
            insert_tensor(map, &format!("ref_{side}_token_logps"), ScriptTensor::Rank2(token_logps));
        }
        insert_tensor(map, &format!("{side}_logps"), ScriptTensor::Rank1(self.logps));
        insert_tensor(map, &format!("{side}_token_logps"), ScriptTensor::Rank2(self.token_logps));
        insert_tensor(map, &format!("{side}_mask"), ScriptTensor::Rank2(self.mask));
        insert_tensor(map, &format!("{side}_lengths"), ScriptTensor::Rank1(self.lengths));
    }
}

impl LossBatch {
    /// Two pairs (or rows) of made-up log-probs with a gradient path, shaped like a real
    /// batch of `mode`: what an edited loss is dry-run on before it is swapped in.
    pub fn synthetic(device: &Device, mode: &Mode) -> Self {
        let token = |vals: [f32; 6]| Tensor::<1>::from_floats(vals, device).reshape([2, 3]).require_grad();
        let mask = Tensor::<1>::from_floats([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], device).reshape([2, 3]);
        let chosen = token([-0.5, -1.0, 0.0, -0.2, -0.7, -1.1]);
        let rejected = token([-0.9, -1.4, 0.0, -0.6, -0.3, -2.0]);
        let ref_chosen = chosen.clone().detach() - 0.1;
        let ref_rejected = rejected.clone().detach() + 0.1;
        let lengths = Tensor::<1>::from_floats([2.0, 3.0], device);
        let rows = match mode {
            Mode::Unpaired => BatchRows::Unpaired {
                labels: Tensor::<1>::from_floats([1.0, 0.0], device),
                kl_logps: row_sums(rejected.detach()),
                ref_kl_logps: row_sums(ref_rejected),
                completion: Sequences::new(chosen, mask, lengths, Some(ref_chosen)),
            },
            Mode::Preference => {
                let chosen_nll = row_sums(chosen.clone()).sum().neg() / 5.0;
                BatchRows::Pairs {
                    chosen: Sequences::new(chosen, mask.clone(), lengths.clone(), Some(ref_chosen)),
                    rejected: Sequences::new(rejected, mask, lengths, Some(ref_rejected)),
                    chosen_nll,
                }
            }
            Mode::Sft => {
                let chosen_nll = row_sums(chosen.clone()).sum().neg() / 5.0;
                BatchRows::Sft { chosen: Sequences::new(chosen, mask, lengths, Some(ref_chosen)), chosen_nll }
            }
        };
        Self { batch_size: 2, rows }
    }

    /// The one conversion to what the script's `loss(batch, params)` receives.
    pub fn into_map(self) -> Map {
        let mut map = Map::new();
        map.insert("batch_size".into(), Dynamic::from_int(self.batch_size as INT));
        match self.rows {
            BatchRows::Sft { chosen, chosen_nll } => {
                chosen.insert_into(&mut map, "chosen");
                insert_tensor(&mut map, "chosen_nll", ScriptTensor::Rank1(chosen_nll));
            }
            BatchRows::Pairs { chosen, rejected, chosen_nll } => {
                chosen.insert_into(&mut map, "chosen");
                rejected.insert_into(&mut map, "rejected");
                insert_tensor(&mut map, "chosen_nll", ScriptTensor::Rank1(chosen_nll));
            }
            BatchRows::Unpaired { completion, labels, kl_logps, ref_kl_logps } => {
                completion.insert_into(&mut map, "completion");
                insert_tensor(&mut map, "labels", ScriptTensor::Rank1(labels));
                insert_tensor(&mut map, "kl_logps", ScriptTensor::Rank1(kl_logps));
                insert_tensor(&mut map, "ref_kl_logps", ScriptTensor::Rank1(ref_kl_logps));
            }
        }
        map
    }
}

fn insert_tensor(map: &mut Map, name: &str, tensor: ScriptTensor) {
    map.insert(name.into(), Dynamic::from(tensor));
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
        return Err(format!(
            "loss must be a scalar (one element), got shape {:?}; take mean() over the batch",
            loss.shape()
        ));
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
        chosen_rewards: Some(crate::tensor::values(chosen.detach().mul_scalar(beta))),
        rejected_rewards: Some(crate::tensor::values(rejected.detach().mul_scalar(beta))),
        state: None,
        metrics: Vec::new(),
    })
}
