//! Rewards defined in the experiment script, hot-reloaded with it like `loss`. A script
//! defines one of
//!
//! - `fn reward(prompt, completion, row)` → number, one sample at a time (`row` is the
//!   prompt's data row as a map, e.g. its `answer`), or `fn reward(prompt, completion)`;
//! - `fn rewards(prompts, completions, rows)` → array of numbers, all samples at once, as
//!   TRL's reward functions `reward_func(prompts, completions, **columns)` are called.
//!
//! What comes back is checked before anything uses it: a value that is not a number, NaN
//! or ±inf, or a batch of the wrong length, is an error naming the script's definition
//! (file:line) and the sample; an error thrown inside carries Rhai's file:line:col.

use rhai::Dynamic;

use super::program::{ScriptError, ScriptHost, ScriptVersion};

/// One completion to score, with the prompt and data row it was sampled for.
pub struct Sample<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// The prompt's row from the prompts file (all its fields).
    pub row: &'a serde_json::Value,
}

/// Whether `version` defines a reward in one of the accepted forms.
pub fn defines_reward(version: &ScriptVersion) -> bool {
    version.has_fn("rewards", 3) || version.has_fn("reward", 3) || version.has_fn("reward", 2)
}

/// The reward of each sample, in order.
pub fn score(host: &ScriptHost, version: &ScriptVersion, samples: &[Sample]) -> Result<Vec<f64>, ScriptError> {
    let row = |s: &Sample| {
        rhai::serde::to_dynamic(s.row)
            .map_err(|e| ScriptError(format!("a data row cannot be passed to the script: {e}")))
    };
    if version.has_fn("rewards", 3) {
        let prompts: rhai::Array = samples.iter().map(|s| Dynamic::from(s.prompt.to_string())).collect();
        let completions: rhai::Array = samples.iter().map(|s| Dynamic::from(s.completion.to_string())).collect();
        let rows = samples.iter().map(row).collect::<Result<rhai::Array, _>>()?;
        let out = host.call(version, "rewards", vec![prompts.into(), completions.into(), rows.into()])?;
        let at = || version.fn_location("rewards");
        let values = out.into_array().map_err(|kind| {
            ScriptError(format!("{}: rewards() returned {kind}, expected an array of numbers", at()))
        })?;
        if values.len() != samples.len() {
            return Err(ScriptError(format!(
                "{}: rewards() returned {} values for {} samples",
                at(),
                values.len(),
                samples.len()
            )));
        }
        return values.into_iter().enumerate().map(|(i, v)| number(v, &format!("{}: rewards()[{i}]", at()))).collect();
    }
    let with_row = version.has_fn("reward", 3);
    if !with_row && !version.has_fn("reward", 2) {
        return Err(ScriptError(format!(
            "{}: no reward: define fn reward(prompt, completion, row), fn reward(prompt, completion) or fn rewards(prompts, completions, rows)",
            version.display_path()
        )));
    }
    let at = version.fn_location("reward");
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut args = vec![Dynamic::from(s.prompt.to_string()), Dynamic::from(s.completion.to_string())];
            if with_row {
                args.push(row(s)?);
            }
            let out = host.call(version, "reward", args).map_err(|e| ScriptError(format!("sample {i}: {e}")))?;
            number(out, &format!("{at}: reward() for sample {i}"))
        })
        .collect()
}

/// A finite number from a script value (an integer counts), or an error saying what it was.
fn number(value: Dynamic, what: &str) -> Result<f64, ScriptError> {
    let x = if let Ok(f) = value.as_float() {
        f
    } else if let Ok(i) = value.as_int() {
        i as f64
    } else {
        return Err(ScriptError(format!("{what} returned {}, expected a number", value.type_name())));
    };
    if !x.is_finite() {
        return Err(ScriptError(format!("{what} returned {x}, expected a finite number")));
    }
    Ok(x)
}
