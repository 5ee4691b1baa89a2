//! `host logps --shard K/N` and `--merge`: reference log-probs computed in parts (on several
//! machines) and merged equal the one-pass file byte for byte; a missing, repeated or foreign
//! shard is refused, naming the file, and nothing is written then, nor after a failed write.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// The first `rows` pairs of the shipped data, as a file in the sandbox.
fn data(sb: &Sandbox, name: &str, rows: usize) -> PathBuf {
    let text: Vec<&str> = include_str!("../data/arithmetic/pairs.jsonl").lines().take(rows).collect();
    sb.write(name, &(text.join("\n") + "\n"))
}

fn logps(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args =
        vec!["logps", "--model", "models/tiny-math", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_host(&args)
}

/// Writes shard `shard` ("K/N") of `data` to `out`.
fn shard(data: &Path, out: &Path, shard: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--shard", shard];
    args.extend_from_slice(extra);
    let run = logps(data, out, &args);
    assert!(run.status.success(), "--shard {shard}: {}", text(&run));
    out.to_path_buf()
}

fn merge(shards: &[&Path], out: &Path) -> std::process::Output {
    let mut args = vec!["logps", "--merge"];
    args.extend(shards.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", out.to_str().unwrap()]);
    run_host(&args)
}

#[test]
fn shards_merged_equal_the_one_pass_file_byte_for_byte() {
    let sb = Sandbox::new();
    // 100 rows in batches of 8: 13 batches, split 4 + 4 + 5 (the last batch holds 4 rows).
    let data = data(&sb, "pairs100.jsonl", 100);
    let whole = sb.path("whole.jsonl");
    let run = logps(&data, &whole, &[]);
    assert!(run.status.success(), "{}", text(&run));
    let parts: Vec<PathBuf> =
        (0..3).map(|k| shard(&data, &sb.path(&format!("part{k}.jsonl")), &format!("{k}/3"), &[])).collect();
    let header = &read_lines(&parts[1])[0]["host_logps_shard"];
    assert_eq!(
        (header["shard"]["index"].as_u64(), header["first_row"].as_u64(), header["end_row"].as_u64()),
        (Some(1), Some(32), Some(64)),
        "{header}"
    );
    assert_eq!(header["source"]["data_rows"], 100);
    assert_eq!(header["source"]["data_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(read_lines(&parts[1]).len(), 1 + 32);

    // Given in any order.
    let merged = sb.path("merged.jsonl");
    let run = merge(&[&parts[2], &parts[0], &parts[1]], &merged);
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        std::fs::read(&whole).unwrap() == std::fs::read(&merged).unwrap(),
        "the merged shards differ from the one-pass file"
    );

    // More shards than batches: 3 batches of 40 over 4 shards, one of them empty.
    let whole40 = sb.path("whole40.jsonl");
    assert!(logps(&data, &whole40, &["--batch-size", "40"]).status.success());
    let parts40: Vec<PathBuf> = (0..4)
        .map(|k| shard(&data, &sb.path(&format!("b40-{k}.jsonl")), &format!("{k}/4"), &["--batch-size", "40"]))
        .collect();
    assert_eq!(parts40.iter().map(|p| read_lines(p).len() - 1).collect::<Vec<_>>(), [0, 40, 40, 20]);
    let refs: Vec<&Path> = parts40.iter().map(PathBuf::as_path).collect();
    let merged40 = sb.path("merged40.jsonl");
    let run = merge(&refs, &merged40);
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        std::fs::read(&whole40).unwrap() == std::fs::read(&merged40).unwrap(),
        "the merged shards (one empty) differ from the one-pass file"
    );

    // A shard is not a reference file by itself.
    let script = sb.write(
        "scripts/shard.rhai",
        &format!(
            "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n",
            small_config(&format!(
                "data: \"{}\", ref_logps: \"{}\", max_steps: 1,",
                data.display(),
                parts[0].display()
            ))
            .replace("data: \"data/arithmetic/pairs.jsonl\",", "")
        ),
    );
    let run = run_host(&[
        "run",
        script.to_str().unwrap(),
        "--no-watch",
        "--run-dir",
        sb.path("runs/shard").to_str().unwrap(),
    ]);
    assert!(!run.status.success(), "{}", text(&run));
    assert!(
        text(&run).contains("part0.jsonl:1: this is one shard (0/3)") && text(&run).contains("--merge"),
        "{}",
        text(&run)
    );
}

#[test]
fn missing_overlapping_and_foreign_shards_are_refused_naming_the_file() {
    let sb = Sandbox::new();
    let data = data(&sb, "pairs40.jsonl", 40);
    let parts: Vec<PathBuf> =
        (0..3).map(|k| shard(&data, &sb.path(&format!("part{k}.jsonl")), &format!("{k}/3"), &[])).collect();
    let [p0, p1, p2] = [parts[0].as_path(), parts[1].as_path(), parts[2].as_path()];
    let out = sb.path("merged.jsonl");
    let refused = |shards: &[&Path], wanted: &[&str]| {
        let run = merge(shards, &out);
        let t = text(&run);
        assert!(!run.status.success(), "merged {shards:?}: {t}");
        for w in wanted {
            assert!(t.contains(w), "expected \"{w}\" in: {t}");
        }
        assert!(
            !out.exists() && !sb.path("merged.jsonl.partial").exists(),
            "nothing is written when the shards are refused"
        );
    };

    refused(&[p0, p2], &["shard 1/3 missing", "part0.jsonl is 0/3", "part2.jsonl is 2/3"]);
    let again = sb.path("again.jsonl");
    std::fs::copy(p1, &again).unwrap();
    refused(&[p0, p1, p2, &again], &["part1.jsonl and ", "again.jsonl are both shard 1/3"]);

    // Shard 1 of other data (one row changed), of other settings, of another split.
    let other_rows = std::fs::read_to_string(&data).unwrap().replacen("\"prompt\":\"", "\"prompt\":\"Q: ", 1);
    let other_data = sb.write("other.jsonl", &other_rows);
    let foreign = shard(&other_data, &sb.path("foreign.jsonl"), "1/3", &[]);
    refused(&[p0, &foreign, p2], &["foreign.jsonl: data_sha256 is", "part0.jsonl's is"]);
    let longer = shard(&data, &sb.path("longer.jsonl"), "1/3", &["--max-length", "200"]);
    refused(&[p0, &longer, p2], &["longer.jsonl: max_length is 200", "part0.jsonl's is 256"]);
    let halves = shard(&data, &sb.path("half.jsonl"), "1/2", &[]);
    refused(&[p0, &halves, p2], &["half.jsonl: shard count is 2", "part0.jsonl's is 3"]);

    // A one-pass file, a shard cut short, and the output over a shard.
    let whole = sb.path("whole.jsonl");
    assert!(logps(&data, &whole, &[]).status.success());
    refused(&[p0, &whole, p2], &["whole.jsonl:1: not a shard file"]);
    let cut = sb.path("cut.jsonl");
    let text1 = std::fs::read_to_string(p1).unwrap();
    std::fs::write(&cut, text1.lines().take(3).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    refused(&[p0, &cut, p2], &["cut.jsonl: holds 2 rows, its header says 16"]);
    let folder = sb.path("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let run = merge(&[p0, p1, p2], &folder);
    assert!(!run.status.success() && text(&run).contains("a-folder: not written"), "{}", text(&run));
    assert!(!sb.path("a-folder.partial").exists(), "a failed write leaves no partial file");
    let run = merge(&[p0, p1, p2], p2);
    assert!(
        !run.status.success() && text(&run).contains("part2.jsonl: the output would overwrite a shard"),
        "{}",
        text(&run)
    );

    // Bad --shard values, before anything is computed.
    for bad in ["3/3", "1", "a/2", "0/0"] {
        let run = logps(&data, &sb.path("bad.jsonl"), &["--shard", bad]);
        assert!(
            !run.status.success()
                && text(&run).contains(&format!(
                    "--shard takes K/N with 0 <= K < N (shard K of N, counted from 0), got \"{bad}\""
                )),
            "{bad}: {}",
            text(&run)
        );
        assert!(!sb.path("bad.jsonl").exists());
    }
}
