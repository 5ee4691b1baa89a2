#![cfg(feature = "tch")]
//! Backend "tch-cpu" (libtorch 2.9.0) against "cpu" (burn-flex): the same seed, model and
//! batches give the same training curve. Only built with `--features tch` (needs LIBTORCH;
//! see setup/libtorch-cpu.sh).

mod common;

use std::path::Path;

use common::{Sandbox, read_lines, run_host, small_config, text};

const STEPS: usize = 4;
const TOLERANCE: f64 = 1e-4;
const COMPARED: [&str; 3] = ["loss", "logps/chosen", "logps/rejected"];

fn train(sb: &Sandbox, backend: &str) -> Vec<serde_json::Value> {
    let script = format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{\n    dpo::loss(b, p)\n}}\ntrain({});\n",
        small_config(&format!("backend: \"{backend}\", max_steps: {STEPS}, seed: 3, params: #{{ beta: 0.1 }},"))
    );
    let path = sb.write(&format!("scripts/{backend}.rhai"), &script);
    let dir = sb.path(backend);
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "backend {backend}: {}", text(&out));
    loss_lines(&dir)
}

fn loss_lines(dir: &Path) -> Vec<serde_json::Value> {
    read_lines(&dir.join("metrics.jsonl")).into_iter().filter(|l| l.get("loss").is_some()).collect()
}

#[test]
fn tch_cpu_trains_like_cpu() {
    let sb = Sandbox::new();
    let (flex, tch) = (train(&sb, "cpu"), train(&sb, "tch-cpu"));
    assert_eq!(flex.len(), STEPS, "{flex:?}");
    assert_eq!(tch.len(), STEPS, "{tch:?}");
    for (step, (a, b)) in flex.iter().zip(&tch).enumerate() {
        for key in COMPARED {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= TOLERANCE, "step {}: {key} cpu {x} vs tch-cpu {y} (|diff| {:e})", step + 1, (x - y).abs());
        }
    }
    // The losses must move, or matching them would prove little.
    let first = flex[0]["loss"].as_f64().unwrap();
    assert!(flex.iter().any(|l| (l["loss"].as_f64().unwrap() - first).abs() > 1e-3), "{flex:?}");
}

#[test]
fn tch_cuda_is_an_error_not_a_panic_without_cuda() {
    // On a CPU-only libtorch (or a machine without a GPU) the run must stop with a message.
    let sb = Sandbox::new();
    let path = sb.write("scripts/cuda.rhai", &format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n",
        small_config("backend: \"tch-cuda\", max_steps: 1,")
    ));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", sb.path("cuda").to_str().unwrap()]);
    if out.status.success() {
        return; // a CUDA libtorch on a GPU machine
    }
    let t = text(&out);
    assert!(t.contains("tch-cuda") && !t.contains("panicked"), "{t}");
}
