//! Fixture access shared by the test modules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors};

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn device() -> Device {
    Device::flex()
}

/// A tensor from a fixture file, as flat f64 values with its shape.
pub struct Fx {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

pub fn load_fixtures(model: &str) -> HashMap<String, Fx> {
    let bytes = std::fs::read(fixture_dir(model).join("fixtures.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let values: Vec<f64> = match v.dtype() {
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("unexpected dtype {d:?}"),
            };
            (
                name,
                Fx {
                    shape: v.shape().to_vec(),
                    values,
                },
            )
        })
        .collect()
}

impl Fx {
    pub fn ids(&self, device: &Device) -> Tensor<2, Int> {
        let v: Vec<i64> = self.values.iter().map(|&x| x as i64).collect();
        Tensor::from_data(TensorData::new(v, [self.shape[0], self.shape[1]]), device)
    }
    pub fn rows(&self) -> Vec<Vec<u32>> {
        self.values
            .chunks(self.shape[1])
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    }
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f32>().map(|x| x as f64).collect()
}

/// Largest absolute difference, optionally only where `keep[i]` holds.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

pub fn assert_close(what: &str, ours: &[f64], reference: &[f64], tol: f64) {
    let d = max_abs_diff(ours, reference);
    assert!(
        d <= tol,
        "{what}: max |ours - transformers| = {d:.3e} > {tol:.0e}"
    );
}

/// [`assert_close`], printing the difference first: the figure the book quotes.
pub fn assert_close_reported(what: &str, ours: &[f64], reference: &[f64], tol: f64) {
    eprintln!(
        "{what}: max |ours - reference| = {:.2e}",
        max_abs_diff(ours, reference)
    );
    assert_close(what, ours, reference, tol);
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// transformers' greedy `generate` on the fixture: (prompt ids, new ids, max_new_tokens).
pub fn fixture_generate(name: &str) -> (Vec<Vec<u32>>, Vec<Vec<u32>>, usize) {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir(name).join("generate.json")).unwrap(),
    )
    .unwrap();
    let rows = |k: &str| -> Vec<Vec<u32>> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    (
        rows("prompt_ids"),
        rows("new_ids"),
        v["max_new_tokens"].as_u64().unwrap() as usize,
    )
}
