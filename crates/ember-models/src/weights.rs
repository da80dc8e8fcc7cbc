//! Where parameters come from and where they go.
//!
//! A model is built by asking a [`WeightSource`] for each tensor by its HF name and shape.
//! The same constructor therefore serves random initialisation ([`RandomInit`]) and
//! checkpoint loading ([`crate::hf::Checkpoint`]), and a checkpoint whose names or shapes
//! disagree with the config fails at the tensor that disagrees. Saving walks the model and
//! emits `(HF name, data)` pairs in the same naming.

use anyhow::Result;
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use crate::rng::Rng;

/// How a freshly initialised tensor is filled.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Ones,
    Zeros,
    /// log(1), log(2), …, log(n): Mamba2's A_log, so head h decays at rate h + 1.
    LogArange,
    /// softplus⁻¹ of a time step drawn log-uniformly in [min, max]: Mamba2's dt_bias.
    InvSoftplusLogUniform(f64, f64),
}

pub trait WeightSource {
    /// The f32 data of tensor `name`, which must have exactly `shape`.
    fn take(&mut self, name: &str, shape: &[usize], init: Init) -> Result<TensorData>;
}

/// Named tensors on their way out (to safetensors), in f32.
pub type WeightSink = Vec<(String, TensorData)>;

/// Seeded host-side initialisation: the same seed gives the same weights on every backend,
/// so the same recipe can be compared across CPU, Vulkan and CUDA.
pub struct RandomInit {
    rng: Rng,
}

impl RandomInit {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
        }
    }
}

impl WeightSource for RandomInit {
    fn take(&mut self, _name: &str, shape: &[usize], init: Init) -> Result<TensorData> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = match init {
            Init::Normal(std) => (0..n).map(|_| (self.rng.normal() * std) as f32).collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::LogArange => (1..=n).map(|i| (i as f32).ln()).collect(),
            Init::InvSoftplusLogUniform(lo, hi) => (0..n)
                .map(|_| {
                    let dt = (lo.ln() + self.rng.uniform() * (hi.ln() - lo.ln())).exp();
                    (dt + (-(-dt).exp_m1()).ln()) as f32
                })
                .collect(),
        };
        Ok(TensorData::new(v, shape.to_vec()))
    }
}

/// Builds a trainable parameter from a source.
pub fn param<const D: usize>(
    src: &mut dyn WeightSource,
    name: &str,
    shape: [usize; D],
    init: Init,
    device: &Device,
) -> Result<Param<Tensor<D>>> {
    let data = src.take(name, &shape, init)?;
    Ok(Param::from_tensor(Tensor::from_data(data, device)))
}

/// Emits a parameter under its HF name, as f32.
pub fn export<const D: usize>(out: &mut WeightSink, name: &str, p: &Param<Tensor<D>>) {
    let t = crate::layers::to_dtype(p.val(), burn::tensor::DType::F32);
    out.push((name.to_string(), t.into_data()));
}

/// Builds a parameter of shape `shape` from a tensor stored as `stored` (same elements; a
/// conv weight `[c, 1, k]` kept as `[c, k]`).
pub fn param_as<const D: usize>(
    src: &mut dyn WeightSource,
    name: &str,
    stored: &[usize],
    shape: [usize; D],
    init: Init,
    device: &Device,
) -> Result<Param<Tensor<D>>> {
    let data = src.take(name, stored, init)?;
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
    Ok(Param::from_tensor(Tensor::from_data(
        TensorData::new(values, shape.to_vec()),
        device,
    )))
}

/// Emits a tensor under `name` with shape `shape` (the inverse of [`param_as`]), as f32.
pub fn export_as<const D: usize>(
    out: &mut WeightSink,
    name: &str,
    p: &Param<Tensor<D>>,
    shape: &[usize],
) {
    let t = crate::layers::to_dtype(p.val(), burn::tensor::DType::F32);
    let values: Vec<f32> = t.into_data().iter::<f32>().collect();
    out.push((name.to_string(), TensorData::new(values, shape.to_vec())));
}
