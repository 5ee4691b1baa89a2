#![allow(dead_code)]
//! Shared helpers: the repo root, the built `host` binary, throwaway experiment folders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository: where the test was built, or `PREFHOST_TEST_REPO` when a built test
/// binary runs elsewhere (setup/gpu-check.sh on a GPU machine).
pub fn repo() -> PathBuf {
    std::env::var_os("PREFHOST_TEST_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `host` binary built with the tests, or `PREFHOST_TEST_HOST` (as `repo`).
pub fn host_binary() -> PathBuf {
    std::env::var_os("PREFHOST_TEST_HOST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_host")))
}

pub fn host() -> Command {
    let mut cmd = Command::new(host_binary());
    cmd.current_dir(repo());
    cmd
}

pub fn run_host(args: &[&str]) -> Output {
    host().args(args).output().expect("host runs")
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A folder with scripts/ and a copy of the repo's plugins/, so a test can edit files
/// freely. Paths inside scripts (model, data) stay relative to the repo root.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_dir(&repo().join("plugins"), &dir.path().join("plugins"));
        std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
        Self { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file by rename, as editors do.
    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = path.with_extension("tmp-write");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A small preference config on the shipped model and pairs, as Rhai source.
pub fn small_config(extra: &str) -> String {
    format!(
        r#"#{{
    model: "models/tiny-math",
    data: "data/arithmetic/pairs.jsonl",
    batch_size: 8,
    log_every: 1,
    progress: false,
    {extra}
}}"#
    )
}

/// The metrics.jsonl lines of a run folder that are step metrics (not events).
pub fn loss_lines(dir: &Path) -> Vec<serde_json::Value> {
    read_lines(&dir.join("metrics.jsonl")).into_iter().filter(|l| l.get("loss").is_some()).collect()
}

/// Polls `cond` every 20 ms for up to two minutes.
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs `script` whole, and again killed with SIGKILL after its first checkpoint (saved at
/// `first_save`) and resumed: the metrics must be the same step for step. Returns the
/// resumed run's folder.
pub fn assert_resume_reproduces(sb: &Sandbox, name: &str, script: &str, steps: usize, first_save: usize) -> PathBuf {
    let path = sb.write(&format!("scripts/{name}.rhai"), script);
    let (whole, killed) = (sb.path(&format!("{name}-whole")), sb.path(&format!("{name}-killed")));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", whole.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let mut child = host()
        .args(["run", path.to_str().unwrap(), "--no-watch", "--run-dir", killed.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the first checkpoint", || killed.join(format!("checkpoint-{first_save}/trainer_state.json")).is_file());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(loss_lines(&killed).len() < steps, "{name}: the run finished before it was killed");
    let out = run_host(&["run", "--resume", killed.to_str().unwrap(), "--no-watch"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resuming"), "{}", text(&out));
    let (a, b) = (loss_lines(&whole), loss_lines(&killed));
    assert_eq!(a.len(), steps);
    assert_eq!(a, b, "{name}: the resumed run must reproduce the uninterrupted one step for step");
    killed
}

/// The JSON lines of a file. Wall-clock values of metrics.jsonl (throughput:
/// `prefhost::train::metrics::WALL_CLOCK_KEYS`) are left out, so that two runs of one
/// script compare equal.
pub fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .map(|mut line: serde_json::Value| {
            if let Some(fields) = line.as_object_mut() {
                fields.retain(|k, _| !prefhost::train::metrics::WALL_CLOCK_KEYS.contains(&k.as_str()));
            }
            line
        })
        .collect()
}

/// One row of a fixture's expected.json: token ids, where the completion starts, and the
/// values the generating script recorded (read with `floats`).
pub struct FixtureRow {
    pub ids: Vec<u32>,
    pub prompt_length: usize,
    pub fields: serde_json::Value,
}

impl FixtureRow {
    pub fn floats(&self, key: &str) -> Vec<f64> {
        self.fields[key].as_array().unwrap_or_else(|| panic!("no {key}")).iter().map(|x| x.as_f64().unwrap()).collect()
    }
}

pub fn fixture_rows(dir: &Path) -> Vec<FixtureRow> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| FixtureRow {
            ids: r["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            prompt_length: r["prompt_length"].as_u64().unwrap() as usize,
            fields: r.clone(),
        })
        .collect()
}

/// prefhost's per-token completion log-probs of each row, all rows in one padded batch.
pub fn completion_logps(
    model: &prefhost::model::Llama,
    rows: &[FixtureRow],
    device: &burn::tensor::Device,
) -> Vec<Vec<f32>> {
    let seqs: Vec<(&[u32], &[u32])> =
        rows.iter().map(|r| (&r.ids[..r.prompt_length], &r.ids[r.prompt_length..])).collect();
    let batch = prefhost::data::batch::collate(&seqs, 2, device);
    let width = batch.mask.dims()[1];
    let flat = prefhost::tensor::values(prefhost::train::logps::token_logps(model, &batch));
    rows.iter()
        .enumerate()
        .map(|(i, r)| flat[i * width + r.prompt_length - 1..i * width + r.ids.len() - 1].to_vec())
        .collect()
}

/// log-probs of `batch` as `batch_logps` computes them (packed rows and/or chunked logits),
/// and the gradients of the 2-D parameters `params` under a loss that weighs every token
/// differently (so a misplaced log-prob would show): (values, one gradient per param).
pub fn weighted_logps_and_grads(
    model: &prefhost::model::Llama,
    batch: &prefhost::data::batch::SequenceBatch,
    packed: Option<&prefhost::data::packed::PackedLayout>,
    chunk: Option<usize>,
    params: &[burn::module::ParamId],
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let [n, w] = batch.mask.dims();
    let ramp: Vec<f32> = (0..n * w).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
    let weights = burn::tensor::Tensor::<1>::from_floats(ramp.as_slice(), &batch.mask.device()).reshape([n, w]);
    let (logps, head) = prefhost::train::logps::batch_logps(model, batch, packed, chunk);
    let values = prefhost::tensor::values(logps.clone());
    let loss = (logps * weights).sum();
    let grads = match head {
        Some(head) => head.gradients(loss.backward(), model),
        None => burn::optim::GradientsParams::from_grads(loss.backward(), model),
    };
    (
        values,
        params
            .iter()
            .map(|id| prefhost::tensor::values(grads.get::<2>(*id).expect("a gradient for each asked parameter")))
            .collect(),
    )
}

/// The Python the tests run helpers with ($PREFHOST_PYTHON, else python3) if it can import
/// `module`. Without it the caller skips, except under CI, which installs it (.ci/run).
pub fn python_with(module: &str) -> Option<String> {
    let python = std::env::var("PREFHOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: {python} has no {module} (.ci/run installs it and sets PREFHOST_PYTHON)"
        );
        eprintln!("skipped: {python} has no {module} (set PREFHOST_PYTHON)");
        return None;
    }
    Some(python)
}

/// Headless Chromium and its WebDriver, for the dashboard's browser tests: chromedriver
/// ($PREFHOST_CHROMEDRIVER, else `chromedriver`) and the browser ($PREFHOST_CHROMIUM, else
/// `chromium`), if both run. Without them the caller skips, except under CI, which installs
/// Debian's `chromium` and `chromium-driver` (.ci/run).
pub fn chromium_with_driver() -> Option<(String, String)> {
    let driver = std::env::var("PREFHOST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let browser = std::env::var("PREFHOST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let runs =
        |program: &str| std::process::Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    if !runs(&driver) || !runs(&browser) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: {browser} or {driver} is missing (.ci/run installs Debian's chromium and chromium-driver)"
        );
        eprintln!(
            "skipped: no {browser} with {driver} (apt-get install chromium chromium-driver, or set PREFHOST_CHROMIUM and PREFHOST_CHROMEDRIVER)"
        );
        return None;
    }
    Some((browser, driver))
}

/// A training process that is killed when the test ends, passing or failing.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls the JSON lines of `metrics` every 50 ms until `pred` holds (up to four minutes).
pub fn wait_for(metrics: &Path, what: &str, pred: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
    let start = std::time::Instant::now();
    loop {
        let lines = read_lines(metrics);
        if pred(&lines) {
            return lines;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(240),
            "timed out waiting for {what}; last metrics: {:?}",
            &lines[lines.len().saturating_sub(3)..]
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// tiny-math after a few DPO steps at a high learning rate, saved as a model folder in `sb`
/// (`trained`): a second checkpoint for `host diff`, quickly.
pub fn trained_tiny_model(sb: &Sandbox) -> PathBuf {
    let trained = sb.path("trained");
    let script = format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n",
        small_config(&format!(
            "max_steps: 4, seed: 3, lr: 3e-3, params: #{{ beta: 0.1 }}, save_model_to: \"{}\",",
            trained.display()
        ))
    );
    let path = sb.write("scripts/train.rhai", &script);
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", sb.path("run").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    trained
}

/// The first `n` rows of data/arithmetic/pairs.jsonl, as `pairs.jsonl` in `sb`.
pub fn arithmetic_pairs(sb: &Sandbox, n: usize) -> PathBuf {
    let lines: Vec<String> = std::fs::read_to_string(repo().join("data/arithmetic/pairs.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(str::to_string)
        .collect();
    sb.write("pairs.jsonl", &(lines.join("\n") + "\n"))
}

/// `host diff A B --data DATA --out OUT --top TOP`.
pub fn host_diff(a: &Path, b: &Path, data: &Path, out: &Path, top: usize) -> Output {
    let top = top.to_string();
    let paths = [a, b, data, out].map(|p| p.to_str().unwrap().to_string());
    run_host(&["diff", &paths[0], &paths[1], "--data", &paths[2], "--out", &paths[3], "--top", &top])
}

/// A LoRA model on `dir`'s checkpoint, loaded as f32 copies or with the stored dtypes kept,
/// with the same A and the same non-zero B either way (a fresh B is zero, which would leave
/// the adapters out of the log-probs). Both are set here rather than drawn: the seeded RNG
/// is burn-flex's, one per process, and a test running beside this one may draw from it
/// between the seed and the draw.
pub fn lora_model(
    dir: &Path,
    frozen: bool,
    precision: prefhost::model::MixedPrecision,
    device: &burn::tensor::Device,
) -> prefhost::model::Llama {
    prefhost::model::seed_model_draws(device, 11);
    let (_, base) =
        if frozen { prefhost::model::load_frozen_model(dir, device) } else { prefhost::model::load_model(dir, device) }
            .unwrap();
    let lora: prefhost::model::LoraConfig =
        serde_json::from_value(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})).unwrap();
    let model = base.with_lora(&lora, device).unwrap();
    let mut tensors = model.adapter_tensors();
    for (key, (_, values)) in tensors.iter_mut() {
        let (period, step) = if key.contains("lora_B") { (7, 0.02) } else { (11, 0.05) };
        values.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % period) as f32 - (period / 2) as f32) * step);
    }
    model.set_adapters(&mut tensors, device).unwrap().with_precision(precision)
}

pub fn adapter_ids(model: &prefhost::model::Llama) -> Vec<burn::module::ParamId> {
    model.projections().iter().flat_map(|(_, _, p)| p.lora.as_ref().map(|a| [a.a.id, a.b.id])).flatten().collect()
}

/// Largest |a − b| / max(|b|, 1e-30) over two lists of values.
pub fn max_relative(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs() / (*y as f64).abs().max(1e-30)).fold(0.0, f64::max)
}
