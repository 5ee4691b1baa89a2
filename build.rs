//! Only does something with the `tch` feature: the binary gets an rpath to `$LIBTORCH/lib`, so it
//! runs without LD_LIBRARY_PATH, and the trainer learns whether that libtorch has CUDA.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo::rustc-check-cfg=cfg(libtorch_cuda)");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    let Some(libtorch) = std::env::var_os("LIBTORCH").filter(|v| !v.is_empty()) else {
        panic!(
            "feature `tch` needs LIBTORCH set to a libtorch 2.9.0 folder. For the CPU one: \
             run `setup/libtorch-cpu.sh`, then the `export LIBTORCH=...` line it prints"
        );
    };
    let lib = Path::new(&libtorch).join("lib");
    if !lib.join("libtorch_cpu.so").exists() {
        panic!(
            "LIBTORCH={} has no lib/libtorch_cpu.so; run `setup/libtorch-cpu.sh` to assemble a CPU libtorch",
            lib.parent().unwrap().display()
        );
    }
    let lib = lib.canonicalize().expect("canonical LIBTORCH/lib");
    // Applies to the `host` binary and to test executables alike.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // burn-tch panics on any CUDA device unless it was built against a libtorch with CUDA.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-cfg=libtorch_cuda");
    }
}
