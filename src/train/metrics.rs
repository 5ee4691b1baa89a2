//! TRL-named metrics, averaged over each logging interval, printed and written as JSON
//! lines (one per log step, plus event lines such as reloads) and as TensorBoard scalars
//! and text; throughput as HF Trainer reports it. A line the disk cannot take (ENOSPC, EIO,
//! EFBIG) is taken back whole, so the log always parses line by line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::loss_call::LossOutput;
use crate::data::Example;
use crate::report::tensorboard::EventWriter;

pub struct MetricsLog {
    file: File,
    path: PathBuf,
    /// The file's length after the last line written whole.
    good_len: u64,
    sums: BTreeMap<String, (f64, usize)>,
    /// The same scalars and events for TensorBoard (`RUN_DIR/tb/`).
    tensorboard: Option<EventWriter>,
}

/// The order TRL users read them in; script-defined metrics follow.
pub const TRL_ORDER: &[&str] = &[
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
];

impl MetricsLog {
    pub fn create(path: &Path) -> Result<Self> {
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        // Appending, so that after a line is taken back the next one starts at the cut.
        Self::append(path)
    }

    /// Continues an existing log (a resumed run).
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let good_len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
        Ok(Self { file, path: path.to_path_buf(), good_len, sums: BTreeMap::new(), tensorboard: None })
    }

    /// Also writes every flushed scalar and every event to `writer`.
    pub fn with_tensorboard(mut self, writer: EventWriter) -> Self {
        self.tensorboard = Some(writer);
        self
    }

    /// Drops what was added since the last flush (a skipped step).
    pub fn discard(&mut self, name: &str) {
        self.sums.remove(name);
    }

    pub fn add(&mut self, name: &str, value: f64) {
        let entry = self.sums.entry(name.to_string()).or_insert((0.0, 0));
        entry.0 += value;
        entry.1 += 1;
    }

    /// Averages since the last flush, written as one line; returns them.
    pub fn flush(&mut self, step: usize, epoch: f64) -> Result<BTreeMap<String, f64>> {
        let means: BTreeMap<String, f64> = self.sums.iter().map(|(k, (s, n))| (k.clone(), s / *n as f64)).collect();
        self.sums.clear();
        let mut line = serde_json::Map::new();
        line.insert("step".into(), json!(step));
        line.insert("epoch".into(), json!((epoch * 1000.0).round() / 1000.0));
        for (k, v) in &means {
            line.insert(k.clone(), json!(v));
        }
        self.write(&Value::Object(line))?;
        if let Some(tensorboard) = &mut self.tensorboard {
            tensorboard.scalars(step, &means)?;
        }
        Ok(means)
    }

    pub fn event(&mut self, step: usize, event: &str, fields: Value) -> Result<()> {
        let mut line = serde_json::Map::new();
        line.insert("step".into(), json!(step));
        line.insert("event".into(), json!(event));
        if let Value::Object(extra) = fields {
            line.extend(extra);
        }
        let line = Value::Object(line);
        self.write(&line)?;
        if let Some(tensorboard) = &mut self.tensorboard {
            // TensorBoard's text plugin renders markdown: the line as a code block.
            tensorboard.text(
                step,
                &format!("events/{event}"),
                &format!("```\n{}\n```", serde_json::to_string_pretty(&line)?),
            )?;
        }
        Ok(())
    }

    /// The line and its newline in one `write_all`; if that fails part way (a full disk
    /// takes what fits, then refuses), the file is cut back to its last whole line.
    fn write(&mut self, value: &Value) -> Result<()> {
        let line = format!("{value}\n");
        match self.file.write_all(line.as_bytes()) {
            Ok(()) => {
                self.good_len += line.len() as u64;
                Ok(())
            }
            Err(error) => {
                let cut = self.file.set_len(self.good_len);
                let after = match cut {
                    Ok(()) => "the log was cut back to its last whole line".to_string(),
                    Err(e) => {
                        format!("cutting it back to its last whole line failed too ({e}); the last line may be torn")
                    }
                };
                let run_dir = self.path.parent().unwrap_or(Path::new("."));
                Err(error).with_context(|| {
                    format!(
                        "{}: cannot write a metrics line ({after}); the run stops: free space, then continue from its last checkpoint with: host run --resume {}",
                        self.path.display(), run_dir.display()
                    )
                })
            }
        }
    }
}

/// The keys whose values are wall-clock measurements, not functions of the run's inputs:
/// two runs of one script differ in these only.
pub const WALL_CLOCK_KEYS: &[&str] =
    &["train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second"];

/// Throughput as HF Trainer reports it (`train_runtime`, `train_samples_per_second`,
/// `train_steps_per_second`, and `train_tokens_per_second` as with its
/// `include_tokens_per_second`): per logging interval, and over the steps this process ran.
/// A sample is a row of the data (a preference pair); its tokens are the prompt's and each
/// completion's, without padding.
pub struct Throughput {
    run_start: Instant,
    interval_start: Instant,
    interval: Counts,
    run: Counts,
    loss_sum: f64,
}

#[derive(Default)]
struct Counts {
    steps: usize,
    samples: usize,
    tokens: usize,
}

impl Counts {
    fn add(&mut self, samples: usize, tokens: usize) {
        self.steps += 1;
        self.samples += samples;
        self.tokens += tokens;
    }

    fn rates(&self, seconds: f64) -> [(&'static str, f64); 3] {
        let per_second = |n: usize| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
        [
            ("train_samples_per_second", per_second(self.samples)),
            ("train_steps_per_second", per_second(self.steps)),
            ("train_tokens_per_second", per_second(self.tokens)),
        ]
    }
}

impl Default for Throughput {
    fn default() -> Self {
        let now = Instant::now();
        Self { run_start: now, interval_start: now, interval: Counts::default(), run: Counts::default(), loss_sum: 0.0 }
    }
}

impl Throughput {
    /// One optimizer step applied over `samples` rows holding `tokens` tokens.
    pub fn step(&mut self, samples: usize, tokens: usize, loss: f64) {
        self.interval.add(samples, tokens);
        self.run.add(samples, tokens);
        self.loss_sum += loss;
    }

    /// The rates since the previous call, added to `log` for its coming flush.
    pub fn add_interval_rates(&mut self, log: &mut MetricsLog) {
        for (name, rate) in self.interval.rates(self.interval_start.elapsed().as_secs_f64()) {
            log.add(name, rate);
        }
        self.interval = Counts::default();
        self.interval_start = Instant::now();
    }

    /// HF Trainer's end-of-training metrics over the steps this process ran (a resumed run:
    /// since the resume), with `train_loss` their mean loss.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        let seconds = self.run_start.elapsed().as_secs_f64();
        let mut out: BTreeMap<String, f64> =
            self.run.rates(seconds).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        out.insert("train_runtime".into(), seconds);
        out.insert("train_loss".into(), if self.run.steps > 0 { self.loss_sum / self.run.steps as f64 } else { 0.0 });
        out
    }
}

/// `loss=0.6931 rewards/chosen=...` in TRL order, then the rest alphabetically.
pub fn format_line(step: usize, total: usize, means: &BTreeMap<String, f64>) -> String {
    let mut parts = vec![format!("step {step}/{total}")];
    for k in TRL_ORDER {
        if let Some(v) = means.get(*k) {
            parts.push(format!("{k}={}", fmt_value(*v)));
        }
    }
    for (k, v) in means {
        if !TRL_ORDER.contains(&k.as_str()) {
            parts.push(format!("{k}={}", fmt_value(*v)));
        }
    }
    parts.join("  ")
}

fn fmt_value(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) { format!("{v:.3e}") } else { format!("{v:.4}") }
}

/// The log-probs a loss call saw, for its metrics: summed per row (TRL's `logps/*`; with
/// KTO, chosen = the desirable rows, rejected = the others) and the DPOP diagnostics.
pub struct BatchLogps {
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
    pub ref_chosen: Vec<f32>,
    /// The reference's rejected log-probs (pairs only), for DPO's implicit rewards.
    pub ref_rejected: Vec<f32>,
    /// Host-computed diagnostics of the DPO failure mode (preference pairs only).
    pub diagnostics: Vec<(&'static str, f64)>,
}

/// Adds one loss call's metrics: the loss, its rewards (TRL's `rewards/*`), the log-probs,
/// the diagnostics and what the script reported in `metrics`.
pub fn record_loss_call(log: &mut MetricsLog, loss_value: f64, loss: &LossOutput, logps: &BatchLogps) {
    let mean = |v: &[f32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    log.add("loss", loss_value);
    if let (Some(c), Some(r)) = (&loss.chosen_rewards, &loss.rejected_rewards) {
        log.add("rewards/chosen", mean(c));
        log.add("rewards/rejected", mean(r));
        let wins: Vec<f32> = c.iter().zip(r).map(|(c, r)| if c > r { 1.0 } else { 0.0 }).collect();
        log.add("rewards/accuracies", mean(&wins));
        let margins: Vec<f32> = c.iter().zip(r).map(|(c, r)| c - r).collect();
        log.add("rewards/margins", mean(&margins));
    }
    if !logps.chosen.is_empty() {
        log.add("logps/chosen", mean(&logps.chosen));
    }
    if !logps.rejected.is_empty() {
        log.add("logps/rejected", mean(&logps.rejected));
    }
    if !logps.rejected.is_empty() && !logps.chosen.is_empty() {
        // How far the policy's log p(chosen) moved from the reference: DPO's failure mode.
        let delta: Vec<f32> = logps.chosen.iter().zip(&logps.ref_chosen).map(|(p, r)| p - r).collect();
        log.add("logps/chosen_minus_ref", mean(&delta));
    }
    for (k, v) in &logps.diagnostics {
        log.add(k, *v);
    }
    for (k, v) in &loss.metrics {
        log.add(k, *v);
    }
}

/// What the DPOP paper looks at: does log p(chosen) fall below the reference, and do the
/// chosen tokens at and after the first token where the pair differs lose probability?
/// `policy`/`reference` are the chosen rows' per-token log-probs ([B, width], flattened).
pub fn failure_mode_diagnostics(
    examples: &[Example],
    policy: &[f32],
    reference: &[f32],
    width: usize,
    chosen_logps: &[f32],
    ref_chosen: &[f32],
) -> Vec<(&'static str, f64)> {
    let b = examples.len() as f64;
    let fell = chosen_logps.iter().zip(ref_chosen).filter(|(p, r)| p < r).count() as f64 / b;
    let (mut before, mut at, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for (row, example) in examples.iter().enumerate() {
        let Some(first) = example.first_difference() else { continue };
        // Completion token j of this row is predicted at position prompt_len - 1 + j.
        let start = row * width + example.prompt.len() - 1;
        for j in 0..example.chosen.len() {
            let delta = (policy[start + j] - reference[start + j]) as f64;
            match j.cmp(&first) {
                std::cmp::Ordering::Less => before.push(delta),
                std::cmp::Ordering::Equal => at.push(delta),
                std::cmp::Ordering::Greater => after.push(delta),
            }
        }
    }
    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    let distance = examples.iter().map(Example::normalised_edit_distance).sum::<f64>() / b;
    vec![
        ("diagnostics/chosen_fell_share", fell),
        ("diagnostics/token_delta_before_diff", mean(&before)),
        ("diagnostics/token_delta_at_diff", mean(&at)),
        ("diagnostics/token_delta_after_diff", mean(&after)),
        ("diagnostics/edit_distance", distance),
    ]
}
