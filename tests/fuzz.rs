//! Property tests: arbitrary JSON lines given to the data loader and arbitrary calls into
//! the script tensor API end in Ok or a clear error, never a panic. Seeded, so a failure
//! names a reproducible case; kept short enough for CI.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use prefhost::data::{TextTokenizer, Truncation, load_examples};
use prefhost::rng::SplitMix64;
use prefhost::script::{Limits, ScriptEngine, set_script_device};

const PIECES: &[&str] = &[
    "\"prompt\"", "\"chosen\"", "\"rejected\"", "\"completion\"", "\"x\"", ":", ",", "{", "}", "[", "]",
    "\"2+2=\"", "\"4\"", "\"\"", "null", "true", "17", "-3.5e9", "\"\\u00e9\\u4e2d\"", "\"\\n\"", " ",
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
                rng.pick(&value), rng.pick(&value), rng.pick(&value)
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
                    assert!(format!("{e:#}").contains(&format!("case{case}.jsonl")), "case {case}: error without the file name: {e:#}");
                }
                Err(_) => panic!("case {case} panicked the loader; input: {:?}", String::from_utf8_lossy(&bytes)),
            }
            // Skipping bad rows: every non-blank line is either loaded or listed.
            let lenient = catch_unwind(AssertUnwindSafe(|| load_examples(&file, &tokenizer, preference, limits, true)));
            let non_blank = bytes.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).count();
            match lenient {
                Ok(Ok((examples, report))) => assert_eq!(examples.len() + report.skipped.len(), non_blank, "case {case}"),
                Ok(Err(e)) => assert!(format!("{e:#}").contains(&format!("case{case}.jsonl")), "case {case}: {e:#}"),
                Err(_) => panic!("case {case} panicked the lenient loader; input: {:?}", String::from_utf8_lossy(&bytes)),
            }
        }
    }
    // Both outcomes must occur, or the generator has stopped exploring. (One bad row
    // refuses its whole file, so most files are refused.)
    assert!(loaded >= 10 && refused >= 30, "degenerate inputs: {loaded} loaded, {refused} refused");
}

const TENSORS: &[&str] = &[
    "tensor([1.0, -2.0, 3.0])", "tensor([0.5])", "tensor([[1.0, 2.0], [3.0, 4.0]])", "tensor([[1.0, 2.0, 3.0]])",
    "tensor([])", "tensor([[]])", "tensor(2)", "tensor(-0.0)", "tensor([1e30, -1e30])",
];
const SCALARS: &[&str] = &["0.0", "1.5", "-2", "1e308", "()", "\"text\"", "[1, 2]", "#{a: 1}", "true"];
const UNARY: &[&str] = &[
    "log_sigmoid", "sigmoid", "softplus", "relu", "exp", "log", "abs", "sqrt", "square", "tanh", "detach",
    "softmax", "log_softmax", "zeros_like", "ones_like", "sum", "mean", "min", "max", "std", "item", "to_array",
    "len", "numel", "tensor", "-",
];
const BINARY: &[&str] = &["+", "-", "*", "/", "min", "max", "gt", "ge", "lt", "le", "pow", "sum", "mean", "clamp_min", "clamp_max", "full_like"];

fn random_expr(rng: &mut SplitMix64, depth: u32) -> String {
    if depth == 0 || rng.range(0, 3) == 0 {
        return if rng.range(0, 2) == 0 { rng.pick(TENSORS).to_string() } else { rng.pick(SCALARS).to_string() };
    }
    match rng.range(0, 3) {
        0 => format!("{}({})", rng.pick(UNARY), random_expr(rng, depth - 1)),
        1 => {
            let op = *rng.pick(BINARY);
            let (a, b) = (random_expr(rng, depth - 1), random_expr(rng, depth - 1));
            if op.chars().all(|c| c.is_alphabetic() || c == '_') { format!("{op}({a}, {b})") } else { format!("({a} {op} {b})") }
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
