//! `host diff A B --data F`: per-token log-prob changes between two model folders. Checked
//! against `host logps` of each model (the summed changes), against itself (by-position
//! means and the largest changes recomputed from the per-token changes it reports), on a
//! model against itself (all zero), and refused for models with other tokenizers.

mod common;
use common::*;

use std::path::Path;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn diff_reports_what_training_changed() {
    let sb = Sandbox::new();
    // A few DPO steps at a high learning rate, saved as a model folder: model B.
    let trained = trained_tiny_model(&sb);
    let data = arithmetic_pairs(&sb, 24);
    let base = repo().join("models/tiny-math");
    let report_path = sb.path("diff.json");
    let out = host_diff(&base, &trained, &data, &report_path, 15);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("by offset from the first chosen/rejected difference")
            && text(&out).contains("largest changes"),
        "{}",
        text(&out)
    );
    let report = json(&report_path);
    let rows = report["per_row"].as_array().unwrap();
    assert_eq!(rows.len(), 24);

    // Summed per row, the changes are what `host logps` gives for each model.
    let logps = |model: &Path, name: &str| {
        let file = sb.path(name);
        let out = run_host(&[
            "logps",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        read_lines(&file)
    };
    let (a, b) = (logps(&base, "a.jsonl"), logps(&trained, "b.jsonl"));
    let mut moved = 0.0f64;
    for (row, (a, b)) in rows.iter().zip(a.iter().zip(&b)) {
        assert_eq!(row["line"], a["line"]);
        for side in ["chosen", "rejected"] {
            let summed: f64 = floats(&row[side]).iter().sum();
            let expected = b[format!("{side}_logps")].as_f64().unwrap() - a[format!("{side}_logps")].as_f64().unwrap();
            assert!((summed - expected).abs() < 1e-4, "line {}: {side} {summed} vs {expected}", row["line"]);
            assert_eq!(floats(&row[side]).len(), a[format!("{side}_tokens")].as_u64().unwrap() as usize);
            moved += summed.abs();
        }
    }
    assert!(moved > 1.0, "training moved the log-probs: {moved}");

    // By position: means over the tokens at each offset from the first difference.
    for bucket in report["by_position"].as_array().unwrap() {
        let name = bucket["offset"].as_str().unwrap();
        for side in ["chosen", "rejected"] {
            let (mut sum, mut count) = (0.0, 0);
            for row in rows {
                let Some(first) = row["first_difference"].as_u64() else { continue };
                for (p, d) in floats(&row[side]).iter().enumerate() {
                    let offset = p as i64 - first as i64;
                    let here = match name {
                        "earlier" => offset < -4,
                        "later" => offset > 8,
                        n => offset == n.parse::<i64>().unwrap(),
                    };
                    if here {
                        sum += d;
                        count += 1;
                    }
                }
            }
            assert_eq!(bucket[format!("{side}_tokens")].as_u64().unwrap() as usize, count, "{name} {side}");
            if count > 0 {
                assert!(
                    (bucket[format!("{side}_mean")].as_f64().unwrap() - sum / count as f64).abs() < 1e-6,
                    "{name} {side}"
                );
            }
        }
    }

    // The largest changes are the 15 largest |B − A| of all tokens, largest first.
    let mut every: Vec<f64> = rows
        .iter()
        .flat_map(|r| floats(&r["chosen"]).into_iter().chain(floats(&r["rejected"])))
        .map(f64::abs)
        .collect();
    every.sort_by(|x, y| y.total_cmp(x));
    let largest = report["largest"].as_array().unwrap();
    assert_eq!(largest.len(), 15);
    for (t, want) in largest.iter().zip(&every) {
        assert!((t["delta"].as_f64().unwrap().abs() - want).abs() < 1e-6, "{t} vs {want}");
        let (pa, pb) = (t["logp_a"].as_f64().unwrap(), t["logp_b"].as_f64().unwrap());
        assert!(
            (pb - pa - t["delta"].as_f64().unwrap()).abs() < 1e-5 && !t["token"].as_str().unwrap().is_empty(),
            "{t}"
        );
        let row = rows.iter().find(|r| r["line"] == t["line"]).unwrap();
        let at = floats(&row[t["completion"].as_str().unwrap()])[t["position"].as_u64().unwrap() as usize];
        assert!((at - t["delta"].as_f64().unwrap()).abs() < 1e-6, "{t}: the row's change there is {at}");
    }
}

#[test]
fn a_model_against_itself_changes_nothing_and_other_tokenizers_are_refused() {
    let sb = Sandbox::new();
    let base = repo().join("models/tiny-math");
    let data = repo().join("data/arithmetic/pairs.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&data).unwrap().lines().take(8).map(str::to_string).collect();
    let data = sb.write("pairs.jsonl", &(lines.join("\n") + "\n"));
    let out_path = sb.path("same.json");
    let out = run_host(&[
        "diff",
        base.to_str().unwrap(),
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&out_path);
    for row in report["per_row"].as_array().unwrap() {
        assert!(floats(&row["chosen"]).iter().chain(&floats(&row["rejected"])).all(|d| *d == 0.0), "{row}");
    }

    let other = sb.path("other");
    copy_dir(&base, &other);
    let tokenizer = std::fs::read_to_string(other.join("tokenizer.json")).unwrap();
    std::fs::write(other.join("tokenizer.json"), tokenizer + " ").unwrap();
    let refused = sb.path("refused.json");
    let out = run_host(&[
        "diff",
        base.to_str().unwrap(),
        other.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        refused.to_str().unwrap(),
    ]);
    assert!(!out.status.success() && text(&out).contains("tokenizer.json differ"), "{}", text(&out));
    assert!(text(&out).contains(&other.join("tokenizer.json").display().to_string()), "{}", text(&out));
    assert!(!refused.exists(), "nothing written");
}
