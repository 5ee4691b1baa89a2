//! Property tests: arbitrary JSON lines given to the data loader and arbitrary calls into
//! the script tensor API end in Ok or a clear error, never a panic. Seeded, so a failure
//! names a reproducible case; kept short enough for CI.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use prefhost::data::{TextTokenizer, Truncation, load_examples};
use prefhost::rng::SplitMix64;
use prefhost::script::{Limits, ScriptEngine, set_script_device};

const PIECES: &[&str] = &[
    "\"prompt\"",
    "\"chosen\"",
    "\"rejected\"",
    "\"completion\"",
    "\"x\"",
    ":",
    ",",
    "{",
    "}",
    "[",
    "]",
    "\"2+2=\"",
    "\"4\"",
    "\"\"",
    "null",
    "true",
    "17",
    "-3.5e9",
    "\"\\u00e9\\u4e2d\"",
    "\"\\n\"",
    " ",
];

fn random_line(rng: &mut SplitMix64) -> String {
    match rng.range(0, 4) {
        // A well-formed row, sometimes with a long completion.
        0 => {
            let long = "step ".repeat(rng.range(0, 300) as usize);
            format!("{{\"prompt\": \"Q{}\", \"chosen\": \" A{long}\", \"rejected\": \" B\"}}", rng.range(0, 99))
        }
        // Rows with wrong types, missing or extra fields.
        1 => {
            let value = ["1", "null", "[]", "{}", "\"ok\"", "\"\""];
            format!(
                "{{\"prompt\": {}, \"chosen\": {}, \"rejected\": {}}}",
                rng.pick(&value),
                rng.pick(&value),
                rng.pick(&value)
            )
        }
        // Token soup.
        2 => (0..rng.range(0, 25)).map(|_| *rng.pick(PIECES)).collect(),
        // A valid row cut short.
        3 => {
            let row = "{\"prompt\": \"What is 2+2?\", \"chosen\": \" 4\", \"rejected\": \" 5\"}";
            row[..rng.range(0, row.len() as i64 - 1) as usize].to_string()
        }
        _ => String::new(),
    }
}

#[test]
fn arbitrary_json_lines_never_panic_the_loader() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer = TextTokenizer::load(&repo.join("models/tiny-math/tokenizer.json"), Some(1), Some(2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(2026);
    let limits = Truncation { max_length: 64, max_prompt_length: 16 };
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..300 {
        let lines: Vec<String> = (0..rng.range(0, 6)).map(|_| random_line(&mut rng)).collect();
        let mut bytes = lines.join("\n").into_bytes();
        if rng.range(0, 9) == 0 {
            bytes.extend([0xff, 0xfe, b'\n']); // not UTF-8
        }
        let file = dir.path().join(format!("case{case}.jsonl"));
        std::fs::write(&file, &bytes).unwrap();
        for preference in [true, false] {
            let result = catch_unwind(AssertUnwindSafe(|| load_examples(&file, &tokenizer, preference, limits, false)));
            match result {
                Ok(Ok((examples, _))) => {
                    loaded += 1;
                    assert!(examples.iter().all(|e| e.prompt.len() + e.chosen.len().max(e.rejected.len()) <= 64))
                }
                Ok(Err(e)) => {
                    refused += 1;
                    assert!(
                        format!("{e:#}").contains(&format!("case{case}.jsonl")),
                        "case {case}: error without the file name: {e:#}"
                    );
                }
                Err(_) => panic!("case {case} panicked the loader; input: {:?}", String::from_utf8_lossy(&bytes)),
            }
            // Skipping bad rows: every non-blank line is either loaded or listed.
            let lenient = catch_unwind(AssertUnwindSafe(|| load_examples(&file, &tokenizer, preference, limits, true)));
            let non_blank = bytes.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).count();
            match lenient {
                Ok(Ok((examples, report))) => {
                    assert_eq!(examples.len() + report.skipped.len(), non_blank, "case {case}")
                }
                Ok(Err(e)) => assert!(format!("{e:#}").contains(&format!("case{case}.jsonl")), "case {case}: {e:#}"),
                Err(_) => {
                    panic!("case {case} panicked the lenient loader; input: {:?}", String::from_utf8_lossy(&bytes))
                }
            }
        }
    }
    // Both outcomes must occur, or the generator has stopped exploring. (One bad row
    // refuses its whole file, so most files are refused.)
    assert!(loaded >= 10 && refused >= 30, "degenerate inputs: {loaded} loaded, {refused} refused");
}

const TENSORS: &[&str] = &[
    "tensor([1.0, -2.0, 3.0])",
    "tensor([0.5])",
    "tensor([[1.0, 2.0], [3.0, 4.0]])",
    "tensor([[1.0, 2.0, 3.0]])",
    "tensor([])",
    "tensor([[]])",
    "tensor(2)",
    "tensor(-0.0)",
    "tensor([1e30, -1e30])",
];
const SCALARS: &[&str] = &["0.0", "1.5", "-2", "1e308", "()", "\"text\"", "[1, 2]", "#{a: 1}", "true"];
const UNARY: &[&str] = &[
    "log_sigmoid",
    "sigmoid",
    "softplus",
    "relu",
    "exp",
    "log",
    "abs",
    "sqrt",
    "square",
    "tanh",
    "detach",
    "softmax",
    "log_softmax",
    "zeros_like",
    "ones_like",
    "sum",
    "mean",
    "min",
    "max",
    "std",
    "item",
    "to_array",
    "len",
    "numel",
    "tensor",
    "-",
];
const BINARY: &[&str] = &[
    "+",
    "-",
    "*",
    "/",
    "min",
    "max",
    "gt",
    "ge",
    "lt",
    "le",
    "pow",
    "sum",
    "mean",
    "clamp_min",
    "clamp_max",
    "full_like",
];

fn random_expr(rng: &mut SplitMix64, depth: u32) -> String {
    if depth == 0 || rng.range(0, 3) == 0 {
        return if rng.range(0, 2) == 0 { rng.pick(TENSORS).to_string() } else { rng.pick(SCALARS).to_string() };
    }
    match rng.range(0, 3) {
        0 => format!("{}({})", rng.pick(UNARY), random_expr(rng, depth - 1)),
        1 => {
            let op = *rng.pick(BINARY);
            let (a, b) = (random_expr(rng, depth - 1), random_expr(rng, depth - 1));
            if op.chars().all(|c| c.is_alphabetic() || c == '_') {
                format!("{op}({a}, {b})")
            } else {
                format!("({a} {op} {b})")
            }
        }
        _ => format!("clamp({}, {}, {})", random_expr(rng, depth - 1), rng.pick(SCALARS), rng.pick(SCALARS)),
    }
}

#[test]
fn arbitrary_tensor_calls_never_panic() {
    set_script_device(burn::tensor::Device::flex().autodiff());
    let engine = ScriptEngine::new(&Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins"), &Limits::default());
    let mut rng = SplitMix64::new(7);
    let (mut ok, mut failed) = (0, 0);
    for case in 0..1500 {
        let expr = random_expr(&mut rng, 4);
        match catch_unwind(AssertUnwindSafe(|| engine.engine.eval::<rhai::Dynamic>(&expr))) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => failed += 1,
            Err(_) => panic!("case {case} panicked: {expr}"),
        }
    }
    assert!(ok >= 150 && failed >= 150, "degenerate expressions: {ok} evaluated, {failed} refused");
}

/// A valid file of each kind the run folder holds, to be cut short or mutated.
const RUN_FILES: &[(&str, &str)] = &[
    ("run.json", r#"{"script": "scripts/x.rhai", "arm": "a"}"#),
    (
        "trainer_state.json",
        r#"{"step": 2, "epoch": 0, "cursor": 4, "order": [1, 0], "rng": {"state": 5}, "loss_state": {}, "skipped_steps": 0, "replayed": [[0]]}"#,
    ),
    (
        "identity.json",
        r#"{"inputs": {"data": {"path": "d.jsonl", "size": 3, "sha256": "abcdef0123456789", "sampled": true}}}"#,
    ),
    (
        "manifest.json",
        r#"{"files": {"config.json": {"size": 2, "sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}}}"#,
    ),
    ("run.lock", r#"{"pid": 999999999, "host": "HOST"}"#),
];

fn mutate(rng: &mut SplitMix64, valid: &str) -> String {
    match rng.range(0, 4) {
        0 => valid.to_string(),
        1 => valid[..rng.range(0, valid.len() as i64) as usize].to_string(),
        2 => {
            // A piece of token soup spliced in at a character boundary.
            let at = rng.range(0, valid.len() as i64) as usize;
            let at = (0..=at).rev().find(|&i| valid.is_char_boundary(i)).unwrap_or(0);
            format!("{}{}{}", &valid[..at], rng.pick(PIECES), &valid[at..])
        }
        _ => (0..rng.range(0, 25)).map(|_| *rng.pick(PIECES)).collect(),
    }
}

/// run.json, trainer_state.json, identity.json, a checkpoint's manifest and the run lock,
/// valid, cut short, spliced or random: read back as Ok or an error naming the file (or,
/// for a manifest, the checkpoint file that does not match it).
#[test]
fn arbitrary_run_folder_files_never_panic_their_readers() {
    use prefhost::train::{checkpoint, identity::RunIdentity, lock::RunLock};
    let mut rng = SplitMix64::new(18);
    let host = prefhost::train::lock::hostname();
    for case in 0..400 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let (name, valid) = *rng.pick(RUN_FILES);
        let content = mutate(&mut rng, &valid.replace("HOST", &host));
        std::fs::write(dir.path().join(name), &content).unwrap();
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            let err = |e: anyhow::Error| format!("{e:#}");
            match name {
                "run.json" => checkpoint::read_run_info(dir.path()).map(drop).map_err(err),
                "trainer_state.json" => checkpoint::read_state(dir.path()).map(drop).map_err(err),
                "identity.json" => RunIdentity::read(dir.path())
                    .map(|read| {
                        if let Some(read) = read {
                            let _ = RunIdentity::default().changes_from(&read);
                            let _ = read.changes_from(&read);
                        }
                    })
                    .map_err(err),
                "manifest.json" => prefhost::model::weights::verify_manifest(dir.path()).map(drop).map_err(err),
                _ => RunLock::acquire(dir.path()).map(drop).map_err(err),
            }
        }));
        match result {
            Err(_) => panic!("case {case}: {name} {content:?} panicked its reader"),
            // The file itself, or (a manifest) the checkpoint file it lists.
            Ok(Err(message)) => assert!(
                message.contains(&dir.path().display().to_string()),
                "case {case}: {name} {content:?}: the error does not name the file: {message}"
            ),
            Ok(Ok(())) => {}
        }
    }
}
