//! setup/gpu-check.sh, where there is no GPU: it checks the staged files, then stops where it
//! needs a GPU with a message and exit status 3, having run nothing and written no folder.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// PATH without any folder that holds nvidia-smi, plus `extra` first.
fn path_without_nvidia_smi(extra: Option<&Path>) -> String {
    let dirs = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter(|d| !d.join("nvidia-smi").exists())
        .collect::<Vec<_>>();
    let dirs: Vec<PathBuf> = extra.map(Path::to_path_buf).into_iter().chain(dirs).collect();
    std::env::join_paths(dirs).unwrap().into_string().unwrap()
}

fn gpu_check(bin: &Path, out: &Path, path: &str) -> Output {
    Command::new("bash")
        .arg(repo().join("setup/gpu-check.sh"))
        .arg(out)
        .env("PREFHOST_GPU_BIN", bin)
        .env("PATH", path)
        .output()
        .expect("bash runs")
}

/// A staged folder as `--build cuda` leaves it, with this build's host and a `backends`
/// that records being run (it must not be, without a GPU).
fn staged(dir: &Path) -> PathBuf {
    let bin = dir.join("gpu-check");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(host_binary(), bin.join("host")).unwrap();
    let marker = dir.join("backends-ran");
    std::fs::write(bin.join("backends"), format!("#!/bin/sh\ntouch '{}'\n", marker.display())).unwrap();
    std::process::Command::new("chmod").args(["+x", bin.join("backends").to_str().unwrap()]).status().unwrap();
    std::fs::write(bin.join("features"), "cuda\n").unwrap();
    bin
}

#[test]
fn without_a_gpu_it_stops_where_one_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let bin = staged(dir.path());
    let out = dir.path().join("figures");
    let run = gpu_check(&bin, &out, &path_without_nvidia_smi(None));
    let t = text(&run);
    assert_eq!(run.status.code(), Some(3), "{t}");
    assert!(
        t.contains(
            "no NVIDIA GPU here (nvidia-smi is not on PATH): the backend matrix on cuda and host bench-gpu need one"
        ),
        "{t}"
    );
    assert!(t.contains("tch-cuda not built"), "{t}");
    assert!(
        !dir.path().join("backends-ran").exists() && !out.exists(),
        "nothing runs and no folder is written without a GPU"
    );

    // An nvidia-smi that cannot reach a driver stops it the same way.
    let fake = dir.path().join("fake-bin");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(
        fake.join("nvidia-smi"),
        "#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n",
    )
    .unwrap();
    std::process::Command::new("chmod").args(["+x", fake.join("nvidia-smi").to_str().unwrap()]).status().unwrap();
    let run = gpu_check(&bin, &out, &path_without_nvidia_smi(Some(&fake)));
    let t = text(&run);
    assert_eq!(run.status.code(), Some(3), "{t}");
    assert!(t.contains("nvidia-smi finds no usable GPU: NVIDIA-SMI has failed"), "{t}");
    assert!(!dir.path().join("backends-ran").exists() && !out.exists());
}

#[test]
fn without_staged_binaries_it_says_how_to_build_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = gpu_check(&dir.path().join("nothing"), &dir.path().join("figures"), &path_without_nvidia_smi(None));
    let t = text(&run);
    assert_eq!(run.status.code(), Some(2), "{t}");
    assert!(t.contains("nothing/host: missing; build and stage first: setup/gpu-check.sh --build cuda"), "{t}");

    // A build with no GPU backend has nothing to check.
    let bin = staged(dir.path());
    std::fs::write(bin.join("features"), "\n").unwrap();
    let run = gpu_check(&bin, &dir.path().join("figures"), &path_without_nvidia_smi(None));
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(text(&run).contains("no GPU backend (tch-cuda or cuda) to check"), "{}", text(&run));
}
