//! Loading whichever model a directory holds, on the requested device and dtype.

use std::path::Path;

use anyhow::{bail, Result};
use ember_models::burn::tensor::{DType, Device};
use ember_models::hf;
use ember_models::hybrid::stack::{HybridConfig, HybridLM};
use ember_models::modernbert::ModernBert;
use ember_models::qwen3::Qwen3;

/// Device and dtype flags shared by every command that runs a model.
#[derive(clap::Args, Clone, Debug)]
pub struct RunFlags {
    /// auto, cpu, vulkan, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (bf16 needs a device that supports it, e.g. CUDA).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl RunFlags {
    pub fn device(&self) -> Result<Device> {
        ember_models::device::select(&self.device)
    }

    pub fn dtype(&self, device: &Device) -> Result<DType> {
        let d = match self.dtype.as_str() {
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => bail!("--dtype: unknown dtype `{other}` (expected f32, bf16 or f16)"),
        };
        if !device.supports_dtype(d) {
            bail!("--dtype {}: not supported on device {device:?}", self.dtype);
        }
        Ok(d)
    }
}

/// Any model ember can load.
pub enum AnyModel {
    Qwen3(Box<Qwen3>),
    ModernBert(Box<ModernBert>),
    /// Mamba2, NemotronH or Nemotron-Flash.
    Hybrid(Box<HybridLM>),
}

/// Loads an HF model directory of any supported family for inference.
pub fn load_any(dir: &Path, flags: &RunFlags) -> Result<(AnyModel, Device)> {
    let device = flags.device()?;
    let dtype = flags.dtype(&device)?;
    let config = hf::read_config(dir)?;
    let model = match hf::model_type(&config, dir)?.as_str() {
        "qwen3" => AnyModel::Qwen3(Box::new(
            Qwen3::from_pretrained(dir, &device)?.into_inference_dtype(dtype),
        )),
        "modernbert" => AnyModel::ModernBert(Box::new(
            ModernBert::from_pretrained(dir, &device)?.into_inference_dtype(dtype),
        )),
        t if HybridConfig::is_hybrid_type(t) => AnyModel::Hybrid(Box::new(
            HybridLM::from_pretrained(dir, &device)?.into_inference_dtype(dtype),
        )),
        other => bail!(
            "{}: field `model_type` is `{other}`, which ember cannot load yet (supported: qwen3, modernbert, mamba2, nemotron_h, nemotron_flash)",
            dir.join(hf::CONFIG).display()
        ),
    };
    Ok((model, device))
}

/// A decoder ember can load: what generates and has next-token loss.
pub enum Decoder {
    Qwen3(Box<Qwen3>),
    Hybrid(Box<HybridLM>),
}

/// Loads an HF decoder directory of any family for inference (evaluation).
pub fn load_decoder(dir: &Path, flags: &RunFlags) -> Result<(Decoder, Device)> {
    match load_any(dir, flags)? {
        (AnyModel::Qwen3(m), device) => Ok((Decoder::Qwen3(m), device)),
        (AnyModel::Hybrid(m), device) => Ok((Decoder::Hybrid(m), device)),
        (AnyModel::ModernBert(_), _) => bail!(
            "{}: field `model_type` is `modernbert`, an encoder: it has MLM logits (ember forward) but cannot generate",
            dir.join(hf::CONFIG).display()
        ),
    }
}

/// Loads an HF Qwen3 directory for inference.
pub fn load(dir: &Path, flags: &RunFlags) -> Result<(Qwen3, Device)> {
    match load_decoder(dir, flags)? {
        (Decoder::Qwen3(m), device) => Ok((*m, device)),
        (Decoder::Hybrid(_), _) => bail!(
            "{}: a hybrid model works with `ember generate`, `ember eval` and `ember forward`, not this command yet",
            dir.join(hf::CONFIG).display()
        ),
    }
}
