//! Named f32 tensors to and from a safetensors file (optimizer state).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Result};
use burn::tensor::TensorData;
use ember_models::hf::write_atomic;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

pub fn save(file: &Path, tensors: &[(String, TensorData)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, d)| {
            let v = d
                .clone()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow!("tensor `{k}`: {e:?}"))?;
            let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((k.clone(), d.shape().to_vec(), raw))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| Ok((k.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let out = safetensors::tensor::serialize(views, None)
        .map_err(|e| anyhow!("{}: cannot serialise ({e})", file.display()))?;
    write_atomic(file, &out)
}

pub fn load(file: &Path) -> Result<BTreeMap<String, TensorData>> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow!("{}: cannot read ({e})", file.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", file.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(anyhow!(
                "{}: tensor `{name}` is {:?}, expected F32",
                file.display(),
                view.dtype()
            ));
        }
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, TensorData::new(v, view.shape().to_vec()));
    }
    Ok(out)
}
