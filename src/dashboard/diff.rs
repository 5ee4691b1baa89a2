//! A line diff of two texts as a unified diff (`@@ -a,b +c,d @@` hunks with 3 lines of
//! context): the longest common subsequence of lines, after the common head and tail are
//! set aside (an edit of a script touches a few lines, so what is left is small).

/// One line of the alignment.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Same,
    Removed,
    Added,
}

/// Past this many cells the middle is shown as removed then added, not aligned.
const MAX_CELLS: usize = 4_000_000;

/// The alignment of `old` and `new` line by line: (op, old index, new index).
fn align(old: &[&str], new: &[&str]) -> Vec<(Op, usize, usize)> {
    let head = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let tail = old[head..].iter().rev().zip(new[head..].iter().rev()).take_while(|(a, b)| a == b).count();
    let (a, b) = (&old[head..old.len() - tail], &new[head..new.len() - tail]);
    let mut ops: Vec<(Op, usize, usize)> = (0..head).map(|i| (Op::Same, i, i)).collect();
    if a.len() * b.len() <= MAX_CELLS {
        // lcs[i][j]: the LCS length of a[i..] and b[j..].
        let w = b.len() + 1;
        let mut lcs = vec![0u32; (a.len() + 1) * w];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i * w + j] = if a[i] == b[j] {
                    lcs[(i + 1) * w + j + 1] + 1
                } else {
                    lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                ops.push((Op::Same, head + i, head + j));
                i += 1;
                j += 1;
            } else if j < b.len() && (i == a.len() || lcs[i * w + j + 1] >= lcs[(i + 1) * w + j]) {
                ops.push((Op::Added, head + i, head + j));
                j += 1;
            } else {
                ops.push((Op::Removed, head + i, head + j));
                i += 1;
            }
        }
    } else {
        ops.extend((0..a.len()).map(|i| (Op::Removed, head + i, head)));
        ops.extend((0..b.len()).map(|j| (Op::Added, head + a.len(), head + j)));
    }
    let (old_end, new_end) = (old.len() - tail, new.len() - tail);
    ops.extend((0..tail).map(|k| (Op::Same, old_end + k, new_end + k)));
    // Removed lines before added ones within each changed run, as diff prints them.
    let mut k = 0;
    while k < ops.len() {
        if ops[k].0 == Op::Same {
            k += 1;
            continue;
        }
        let end = ops[k..].iter().position(|o| o.0 == Op::Same).map_or(ops.len(), |p| k + p);
        ops[k..end].sort_by_key(|o| o.0 == Op::Added);
        k = end;
    }
    ops
}

/// `old` → `new` as unified-diff hunks (no file header); empty when they are equal.
pub fn unified(old: &str, new: &str, context: usize) -> String {
    let (old_lines, new_lines): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let ops = align(&old_lines, &new_lines);
    let changed: Vec<usize> = ops.iter().enumerate().filter(|(_, o)| o.0 != Op::Same).map(|(i, _)| i).collect();
    if changed.is_empty() {
        return String::new();
    }
    // Hunks: changed lines with `context` lines around them, merged when they touch.
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &i in &changed {
        let (start, end) = (i.saturating_sub(context), (i + context + 1).min(ops.len()));
        match hunks.last_mut() {
            Some(last) if start <= last.1 => last.1 = end,
            _ => hunks.push((start, end)),
        }
    }
    let mut out = String::new();
    for (start, end) in hunks {
        let slice = &ops[start..end];
        let old_count = slice.iter().filter(|o| o.0 != Op::Added).count();
        let new_count = slice.iter().filter(|o| o.0 != Op::Removed).count();
        // Line numbers from 1; a hunk with no lines on one side names the line before it.
        let old_start = slice.iter().find(|o| o.0 != Op::Added).map_or(slice[0].1, |o| o.1 + 1);
        let new_start = slice.iter().find(|o| o.0 != Op::Removed).map_or(slice[0].2, |o| o.2 + 1);
        out.push_str(&format!("@@ -{old_start},{old_count} +{new_start},{new_count} @@\n"));
        for &(op, i, j) in slice {
            match op {
                Op::Same => out.push_str(&format!(" {}\n", old_lines[i])),
                Op::Removed => out.push_str(&format!("-{}\n", old_lines[i])),
                Op::Added => out.push_str(&format!("+{}\n", new_lines[j])),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies a unified diff (as `unified` writes it) to `old`.
    fn apply(old: &str, diff: &str) -> String {
        let old: Vec<&str> = old.lines().collect();
        let mut out: Vec<String> = Vec::new();
        let mut at = 0;
        for line in diff.lines() {
            if let Some(header) = line.strip_prefix("@@ -") {
                let start: usize = header.split([',', ' ']).next().unwrap().parse().unwrap();
                let count: usize = header.split(',').nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
                let start = if count == 0 { start } else { start - 1 };
                out.extend(old[at..start].iter().map(|s| s.to_string()));
                at = start;
            } else if let Some(text) = line.strip_prefix(' ') {
                assert_eq!(old[at], text);
                out.push(text.to_string());
                at += 1;
            } else if let Some(text) = line.strip_prefix('-') {
                assert_eq!(old[at], text);
                at += 1;
            } else if let Some(text) = line.strip_prefix('+') {
                out.push(text.to_string());
            }
        }
        out.extend(old[at..].iter().map(|s| s.to_string()));
        out.join("\n")
    }

    #[test]
    fn an_edit_reads_as_diff_prints_it() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\n";
        let new = "a\nb\nc\nd\nE\nf\ng\nh\ni\n";
        assert_eq!(unified(old, new, 3), "@@ -2,7 +2,7 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n");
        assert_eq!(unified(old, old, 3), "");
        assert_eq!(unified("", "x\ny\n", 3), "@@ -0,0 +1,2 @@\n+x\n+y\n");
        assert_eq!(unified("x\n", "", 3), "@@ -1,1 +0,0 @@\n-x\n");
    }

    #[test]
    fn diffs_apply_back_to_the_new_text() {
        let mut rng = crate::rng::SplitMix64::new(7);
        for case in 0..300 {
            let words = ["fn", "let", "x", "}", "{", "beta", "loss"];
            let n = (rng.next_u64() % 30) as usize;
            let old: Vec<&str> = (0..n).map(|_| words[(rng.next_u64() % 7) as usize]).collect();
            let mut new = old.clone();
            for _ in 0..(rng.next_u64() % 5) {
                let at = (rng.next_u64() as usize) % (new.len() + 1);
                match rng.next_u64() % 3 {
                    0 => new.insert(at, words[(rng.next_u64() % 7) as usize]),
                    1 if at < new.len() => {
                        new.remove(at);
                    }
                    _ if at < new.len() => new[at] = "changed",
                    _ => {}
                }
            }
            let (old, new) = (old.join("\n"), new.join("\n"));
            for context in [0, 1, 3] {
                assert_eq!(apply(&old, &unified(&old, &new, context)), new, "case {case}, context {context}");
            }
        }
    }
}
