//! `ember forward`: logits for given ids, the tool for checking a port against a reference.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use ember_models::burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use ember_models::hf::write_atomic;
use ember_models::qwen3::{ForwardOptions, Qwen3};
use safetensors::tensor::{Dtype, TensorView};
use serde::Deserialize;

use crate::models::{self, AnyModel, RunFlags};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// JSON file: {"input_ids": [[...]], "attention_mask": [[...]]} (mask optional).
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file holding `logits`, f32 [batch, seq, vocab].
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    input_ids: Vec<Vec<i64>>,
    #[serde(default)]
    attention_mask: Option<Vec<Vec<i64>>>,
}

pub fn run(a: Args) -> Result<()> {
    let origin = a.input.display().to_string();
    let text =
        std::fs::read_to_string(&a.input).with_context(|| format!("{origin}: cannot read"))?;
    let input: Input = serde_json::from_str(&text).map_err(|e| anyhow!("{origin}: {e}"))?;
    let b = input.input_ids.len();
    let s = input.input_ids.first().map(Vec::len).unwrap_or(0);
    if b == 0 || s == 0 {
        bail!("{origin}: field `input_ids` is empty");
    }
    if let Some(i) = input.input_ids.iter().position(|r| r.len() != s) {
        bail!(
            "{origin}: field `input_ids` row {i} has {} ids, row 0 has {s}",
            input.input_ids[i].len()
        );
    }
    let mask = input.attention_mask.unwrap_or_else(|| vec![vec![1; s]; b]);
    if mask.len() != b || mask.iter().any(|r| r.len() != s) {
        bail!("{origin}: field `attention_mask` must have the shape of `input_ids` [{b}, {s}]");
    }

    let (model, device) = models::load_any(&a.model, &a.run)?;
    let vocab = match &model {
        AnyModel::Qwen3(m) => m.config.vocab_size,
        AnyModel::ModernBert(m) => m.config.vocab_size,
        AnyModel::Hybrid(m) => m.config.vocab_size,
    };
    if let Some(t) = input
        .input_ids
        .iter()
        .flatten()
        .find(|&&t| t < 0 || t as usize >= vocab)
    {
        bail!("{origin}: field `input_ids` holds {t}, outside the model's vocabulary of {vocab}");
    }
    let int = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), &device);
    let logits = match &model {
        AnyModel::Qwen3(m) => causal_logits(m, &mask, int(input.input_ids.concat()), &device),
        // An encoder: MLM logits at every position, padded ones included (as transformers).
        AnyModel::ModernBert(m) => m.forward(int(input.input_ids.concat()), int(mask.concat())),
        AnyModel::Hybrid(m) => {
            if mask.iter().flatten().any(|&v| v == 0) {
                bail!("{origin}: field `attention_mask` has padding, which a hybrid model's forward does not take (give unpadded rows)");
            }
            m.forward(int(input.input_ids.concat()), None)
        }
    };
    let v: Vec<f32> = logits.cast(DType::F32).into_data().iter::<f32>().collect();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![b, s, vocab], &bytes)?;
    let file = safetensors::tensor::serialize([("logits", view)], None)?;
    write_atomic(&a.out, &file)?;
    eprintln!("wrote logits [{b}, {s}, {vocab}] to {}", a.out.display());
    Ok(())
}

/// A decoder's logits: positions count real tokens, as transformers' generate() derives them
/// from the mask, and padded keys are hidden.
fn causal_logits(
    model: &Qwen3,
    mask: &[Vec<i64>],
    ids: Tensor<2, Int>,
    device: &Device,
) -> Tensor<3> {
    let [b, s] = ids.dims();
    let mut pos = Vec::with_capacity(b * s);
    let mut pad = Vec::with_capacity(b * s);
    for row in mask {
        let mut seen = 0i64;
        for &m in row {
            let real = m != 0;
            pad.push(!real);
            pos.push(if real { seen } else { 0 });
            seen += real as i64;
        }
    }
    let any_pad = pad.iter().any(|&p| p);
    model
        .forward_with(
            ids,
            Tensor::<2, Int>::from_data(TensorData::new(pos, [b, s]), device),
            any_pad.then(|| Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, s]), device)),
            None,
            ForwardOptions::default(),
        )
        .logits
}
