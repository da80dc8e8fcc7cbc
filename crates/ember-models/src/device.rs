//! Run-time backend choice: `--device auto|cpu|flex|vulkan|wgpu|cuda`.
//!
//! Every backend compiled in is reachable through one `Device`; `auto` takes the best one
//! that is both compiled in and present: CUDA, then a Vulkan/wgpu adapter that is a real GPU
//! (a software rasteriser such as lavapipe is slower than flex), then flex on the CPU.

use anyhow::{bail, Result};
#[allow(unused_imports)]
use burn::tensor::{Device, DeviceType};

/// Keeps compiled GPU kernels (CUDA's PTX) and autotune results on disk, under
/// `~/.cache/cubecl` or the directory `EMBER_KERNEL_CACHE` names, so that a second run skips
/// the first one's compilation; `EMBER_KERNEL_CACHE=off` turns it off. A `cubecl.toml` in
/// the working directory or above is read first, as cubecl would. Call it before any device
/// is used: the configuration is fixed at first use. Only with the opt-in `kernel-cache`
/// feature (see crates/ember-models/Cargo.toml for why it is not on by default).
pub fn configure_kernel_cache() {
    #[cfg(feature = "kernel-cache")]
    {
        use cubecl_runtime::config::cache::CacheConfig;
        use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
        let setting = std::env::var("EMBER_KERNEL_CACHE").unwrap_or_default();
        if setting == "off" {
            return;
        }
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.compilation.cache = true;
        config.environment.path = match setting.as_str() {
            "" => CacheConfig::Global,
            dir => CacheConfig::Directory(dir.into()),
        };
        // Another caller having fixed the configuration first is not an error.
        let _ = CubeClRuntimeConfig::try_set(config);
    }
}

/// A positive count from the environment variable `name`, for the tuning knobs that A/B runs
/// set without a rebuild (`EMBER_CE_CHUNK_ROWS`, `EMBER_FLASH_BLOCK`). Anything else set there
/// is ignored with a warning, so a typo does not silently change a run.
pub fn count_env(name: &str) -> Option<usize> {
    let v = std::env::var(name).ok()?;
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            eprintln!("warning: {name}={v} is not a positive count; ignored");
            None
        }
    }
}

/// Backends this binary was built with.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "vulkan") {
        v.push("vulkan");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}

/// Whether `device` is a CUDA device (of a CUDA build), autodiff or not.
pub fn is_cuda(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    return matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Cube(burn_cubecl::CubeDevice::Cuda(_))
    );
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// Runs a backend probe that may panic (no driver, no adapter) without printing the panic.
#[allow(dead_code)]
fn probe<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f).ok();
    std::panic::set_hook(hook);
    r
}

#[cfg(feature = "cuda")]
fn cuda() -> Option<Device> {
    probe(|| Device::enumerate(DeviceType::Cuda).into_iter().next()).flatten()
}

#[cfg(any(feature = "vulkan", feature = "wgpu"))]
fn gpu_adapter(kind: DeviceType, allow_software: bool) -> Option<Device> {
    probe(move || {
        Device::enumerate(kind).into_iter().find(|d| {
            let name = d
                .identity()
                .map(|i| i.name.to_lowercase())
                .unwrap_or_default();
            allow_software
                || !(name.contains("llvmpipe")
                    || name.contains("lavapipe")
                    || name.contains("swiftshader"))
        })
    })
    .flatten()
}

/// Parses a `--device` value into a device of a compiled-in, present backend.
pub fn select(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        "auto" => {
            #[cfg(feature = "cuda")]
            if let Some(d) = cuda() {
                return Ok(d);
            }
            #[cfg(feature = "vulkan")]
            if let Some(d) = gpu_adapter(DeviceType::Vulkan, false) {
                return Ok(d);
            }
            #[cfg(feature = "wgpu")]
            if let Some(d) = gpu_adapter(DeviceType::Wgpu, false) {
                return Ok(d);
            }
            Ok(Device::flex())
        }
        "cuda" => {
            #[cfg(feature = "cuda")]
            return cuda().ok_or_else(|| {
                anyhow::anyhow!(
                    "--device cuda: no CUDA device found (is the NVIDIA driver loaded?)"
                )
            });
            #[cfg(not(feature = "cuda"))]
            bail!(
                "--device cuda: this binary was built without the `cuda` feature (built with: {})",
                compiled_backends().join(", ")
            )
        }
        "vulkan" => {
            #[cfg(feature = "vulkan")]
            return gpu_adapter(DeviceType::Vulkan, true)
                .ok_or_else(|| anyhow::anyhow!("--device vulkan: no Vulkan adapter found"));
            #[cfg(not(feature = "vulkan"))]
            bail!("--device vulkan: this binary was built without the `vulkan` feature (built with: {})", compiled_backends().join(", "))
        }
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            return gpu_adapter(DeviceType::Wgpu, true)
                .ok_or_else(|| anyhow::anyhow!("--device wgpu: no wgpu adapter found"));
            #[cfg(not(feature = "wgpu"))]
            bail!(
                "--device wgpu: this binary was built without the `wgpu` feature (built with: {})",
                compiled_backends().join(", ")
            )
        }
        other => {
            bail!("--device: unknown device `{other}` (expected auto, cpu, vulkan, wgpu or cuda)")
        }
    }
}
