//! The script's `backend` name -> a burn device. Backends other than "cpu" are cargo features:
//! `tch` (libtorch, see setup/libtorch-cpu.sh) and `cuda` (burn's CubeCL CUDA, see setup/llvm-cuda.sh).
//! Each GPU backend checks for a usable device first: the backends themselves panic in a device
//! thread on the first tensor op, which would kill the run without saying why.

use anyhow::{Result, bail};
use burn::tensor::Device;

/// The `backend` names this binary can run.
pub const BUILT_BACKENDS: &[&str] = match (cfg!(feature = "tch"), cfg!(feature = "cuda")) {
    (false, false) => &["cpu"],
    (true, false) => &["cpu", "tch-cpu", "tch-cuda"],
    (false, true) => &["cpu", "cuda"],
    (true, true) => &["cpu", "tch-cpu", "tch-cuda", "cuda"],
};

/// Picks the device named by the script's `backend`.
pub fn backend_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::flex()),
        #[cfg(feature = "tch")]
        "tch-cpu" => Ok(libtorch::cpu()),
        #[cfg(feature = "tch")]
        "tch-cuda" => libtorch::cuda(0),
        #[cfg(not(feature = "tch"))]
        "tch-cpu" | "tch-cuda" => not_built(name),
        #[cfg(feature = "cuda")]
        "cuda" => cubecl_cuda::device(0),
        #[cfg(not(feature = "cuda"))]
        "cuda" => not_built(name),
        other => bail!("unknown backend \"{other}\" (choose cpu, tch-cpu, tch-cuda or cuda)"),
    }
}

#[allow(dead_code)]
fn not_built(name: &str) -> Result<Device> {
    let feature = if name == "cuda" { "cuda" } else { "tch" };
    bail!(
        "backend \"{name}\" is not built into this binary (this build has: {}); rebuild with --features {feature}",
        BUILT_BACKENDS.join(", ")
    )
}

/// libtorch devices (cargo feature `tch`, linked against the folder in `LIBTORCH`; see
/// setup/libtorch-cpu.sh). burn marks burn-tch deprecated; it is the CPU/CUDA path we can build offline.
#[cfg(feature = "tch")]
#[allow(deprecated)]
mod libtorch {
    use anyhow::{Result, bail};
    use burn::tensor::Device;

    /// Whether the libtorch this binary was linked against has libtorch_cuda (cfg set by build.rs).
    const LINKED_WITH_CUDA: bool = cfg!(libtorch_cuda);

    pub fn cpu() -> Device {
        Device::libtorch()
    }

    /// burn-tch panics on the first tensor op when CUDA is missing (and always when it was
    /// built against a CPU-only libtorch), so check here and give an error instead.
    pub fn cuda(index: usize) -> Result<Device> {
        if !LINKED_WITH_CUDA {
            bail!(
                "backend \"tch-cuda\": this binary was linked against a CPU-only libtorch \
                 (no lib/libtorch_cuda.so in LIBTORCH at build time); use \"tch-cpu\", or rebuild \
                 with --features tch and LIBTORCH pointing at a CUDA libtorch 2.9.0"
            );
        }
        if !tch::Cuda::is_available() {
            bail!("backend \"tch-cuda\": libtorch finds no usable CUDA device (driver or GPU missing)");
        }
        let count = tch::Cuda::device_count();
        if (index as i64) >= count {
            bail!("backend \"tch-cuda\": CUDA device {index} requested, libtorch sees {count}");
        }
        Ok(Device::libtorch_cuda(index))
    }
}

/// burn's CubeCL CUDA backend (cargo feature `cuda`). It loads libcuda at run time, so the
/// binary builds without a CUDA toolkit; kernels are compiled by LLVM's NVPTX back end.
#[cfg(feature = "cuda")]
mod cubecl_cuda {
    use anyhow::{Result, bail};
    use burn::tensor::Device;
    use cudarc::driver::{result, sys};

    pub fn device(index: usize) -> Result<Device> {
        // SAFETY: only looks for and loads the driver library (libcuda.so).
        if !unsafe { sys::is_culib_present() } {
            bail!("backend \"cuda\": no CUDA driver library (libcuda.so) on this machine");
        }
        if let Err(e) = result::init() {
            bail!("backend \"cuda\": the CUDA driver did not initialise: {e}");
        }
        let count = result::device::get_count().map_err(|e| anyhow::anyhow!("backend \"cuda\": {e}"))?;
        if index as i32 >= count {
            bail!("backend \"cuda\": CUDA device {index} requested, the driver sees {count}");
        }
        Ok(Device::cuda(index))
    }
}
