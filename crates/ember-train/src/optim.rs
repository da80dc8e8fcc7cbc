//! AdamW and Muon over a module's parameters, keyed by parameter path.
//!
//! Burn's own optimizers key their state by random `ParamId`s and clip per tensor. This one
//! keys state by the module path (`layers.3.mlp.up_proj.weight`), so a checkpoint's
//! optimizer state is a plain safetensors file that survives a rebuild of the model, and it
//! applies one global-norm clipping factor folded into the update.
//!
//! Parameter groups follow common practice (nanoGPT, torchtitan): no weight decay on
//! vectors (norm weights, biases) and embeddings; with `muon`, 2-D hidden matrices get Muon
//! and everything else (embeddings, head, vectors) AdamW.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor, TensorData};
use ember_models::layers::{to_dtype, write_into};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    /// AdamW whose step size per tensor is divided by max(1, RMS(g²/v̂)) (Wortsman et al.
    /// 2023), ModernBERT's optimizer: a tensor whose second moment lags a gradient spike
    /// takes a smaller step instead of a huge one, with no global clipping needed.
    Stableadamw,
    Muon,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    #[serde(default = "adamw")]
    pub optimizer: OptimizerKind,
    #[serde(default = "beta1")]
    pub beta1: f64,
    #[serde(default = "beta2")]
    pub beta2: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    #[serde(default = "wd")]
    pub weight_decay: f64,
    /// Muon's momentum (Nesterov).
    #[serde(default = "muon_momentum")]
    pub muon_momentum: f64,
    /// Newton–Schulz iterations for Muon's orthogonalisation.
    #[serde(default = "ns_steps")]
    pub muon_ns_steps: usize,
}

fn adamw() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.95
}
fn eps() -> f64 {
    1e-8
}
fn wd() -> f64 {
    0.1
}
fn muon_momentum() -> f64 {
    0.95
}
fn ns_steps() -> usize {
    5
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            optimizer: adamw(),
            beta1: beta1(),
            beta2: beta2(),
            eps: eps(),
            weight_decay: wd(),
            muon_momentum: muon_momentum(),
            muon_ns_steps: ns_steps(),
        }
    }
}

/// An optimizer's moments on the host ([`Optimizer::snapshot`]).
pub struct Moments(BTreeMap<String, (TensorData, Option<TensorData>)>);

/// Per-parameter state: AdamW's two moments, or Muon's momentum buffer alone.
#[derive(Clone, Debug)]
struct Slot {
    m: Tensor<2>,
    v: Option<Tensor<2>>,
}

pub struct Optimizer {
    pub config: OptimConfig,
    /// Optimizer steps taken (AdamW's bias correction counts from 1).
    pub steps: u64,
    state: BTreeMap<String, Slot>,
}

/// How one parameter is updated.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rule {
    AdamW { decay: bool },
    Muon,
}

fn rule(cfg: &OptimConfig, path: &str, dims: &[usize]) -> Rule {
    let embedding = path.contains("embed");
    let head = path.starts_with("lm_head");
    let matrix = dims.len() == 2;
    if cfg.optimizer == OptimizerKind::Muon && matrix && !embedding && !head {
        Rule::Muon
    } else {
        Rule::AdamW {
            decay: matrix && !embedding,
        }
    }
}

/// Tracks the dotted module path while a visitor or mapper walks a module.
#[derive(Default)]
struct PathTracker(Vec<String>);

impl PathTracker {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0.join(".")
    }
}

/// Sum of squared gradients over all parameters, as one device scalar.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let g = to_dtype(g, DType::F32);
            let s = (g.clone() * g).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

/// The sum of all squared gradients as a `[1]` device tensor (no host sync); None when no
/// parameter has a gradient.
pub fn grad_sq_norm<M: Module>(model: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    let mut v = SquaredNorm { grads, total: None };
    model.visit(&mut v);
    v.total
}

/// The global L2 norm of all gradients (one host sync).
pub fn grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> Result<f64> {
    match grad_sq_norm(model, grads) {
        Some(t) => Ok(crate::trainer::scalar(t)?.sqrt()),
        None => Ok(0.0),
    }
}

/// The step's learning rate, bias corrections and gradient scale: host numbers for an eager
/// step, or `[1, 1]` device tensors for a captured one, whose replays must not bake in the
/// values of the step that was recorded.
#[derive(Clone, Debug)]
pub enum Coefs {
    Host {
        lr: f64,
        /// Multiplies every gradient: global-norm clipping and accumulation scaling.
        grad_scale: f64,
    },
    Device(Box<DeviceCoefs>),
}

/// A captured step's coefficients, each `[1, 1]`, made inside the step from buffers
/// refreshed between replays (the rate) or updated by the step itself (the counter behind
/// the bias corrections).
#[derive(Clone, Debug)]
pub struct DeviceCoefs {
    pub lr: Tensor<2>,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub bc1: Tensor<2>,
    pub bc2: Tensor<2>,
    pub grad_scale: Tensor<2>,
}

impl Coefs {
    fn grad(&self, g: Tensor<2>) -> Tensor<2> {
        match self {
            Coefs::Host { grad_scale, .. } => g.mul_scalar(*grad_scale),
            Coefs::Device(c) => g * c.grad_scale.clone(),
        }
    }
    fn lr_times(&self, t: Tensor<2>) -> Tensor<2> {
        self.lr_times_scaled(t, 1.0)
    }
    /// `t·lr·factor`, the product formed on the host when the rate is there.
    fn lr_times_scaled(&self, t: Tensor<2>, factor: f64) -> Tensor<2> {
        match self {
            Coefs::Host { lr, .. } => t.mul_scalar(lr * factor),
            Coefs::Device(c) if factor == 1.0 => t * c.lr.clone(),
            Coefs::Device(c) => t.mul_scalar(factor) * c.lr.clone(),
        }
    }
    /// `p·(1 − lr·wd)`: decoupled weight decay.
    fn decay(&self, p: Tensor<2>, wd: f64) -> Tensor<2> {
        match self {
            Coefs::Host { lr, .. } => p.mul_scalar(1.0 - lr * wd),
            Coefs::Device(c) => p * c.lr.clone().mul_scalar(-wd).add_scalar(1.0),
        }
    }
    /// `m / (1 − β₁ᵗ)` and `v / (1 − β₂ᵗ)` at step `t`.
    fn unbias(&self, m: Tensor<2>, v: Tensor<2>, cfg: &OptimConfig, t: u64) -> [Tensor<2>; 2] {
        match self {
            Coefs::Host { .. } => {
                let t = t as i32;
                [
                    m.div_scalar(1.0 - cfg.beta1.powi(t)),
                    v.div_scalar(1.0 - cfg.beta2.powi(t)),
                ]
            }
            Coefs::Device(c) => [m / c.bc1.clone(), v / c.bc2.clone()],
        }
    }
}

struct Step<'a> {
    opt: &'a mut Optimizer,
    grads: GradientsParams,
    coefs: Coefs,
    path: PathTracker,
}

impl ModuleMapper for Step<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return param;
        };
        let path = self.path.path();
        let (opt, coefs) = (&mut *self.opt, &self.coefs);
        remap(param, |p| {
            let dims = p.dims();
            opt.update(&path, &dims, p, grad, coefs)
        })
    }
}

/// `param` with its value replaced by `f` of the inner (non-autodiff) tensor, keeping its
/// id, gradient requirement and checkpointing strategy.
pub fn remap<const D: usize>(
    param: Param<Tensor<D>>,
    f: impl FnOnce(Tensor<D>) -> Tensor<D>,
) -> Param<Tensor<D>> {
    let (id, tensor, mapper) = param.consume();
    let require_grad = tensor.is_require_grad();
    let strategy = tensor.gradient_checkpointing_strategy();
    let mut t = f(tensor.inner()).autodiff();
    if let Some(s) = strategy {
        t = t.with_gradient_checkpointing_strategy(s);
    }
    if require_grad {
        t = t.require_grad();
    }
    Param::from_mapped_value(id, t, mapper)
}

/// Stores `new` as a slot's moment: written into the old moment's own buffer for a captured
/// step (the slot lets go of the old tensor first, so the write is in place rather than a
/// copy), or simply replacing it.
fn keep(slot: &mut Tensor<2>, new: Tensor<2>, in_place: bool) {
    if in_place {
        let old = std::mem::replace(slot, new.clone());
        *slot = write_into(old, new);
    } else {
        *slot = new;
    }
}

/// Newton–Schulz quintic iteration (Keller Jordan's coefficients) towards the nearest
/// semi-orthogonal matrix of `g`.
fn newton_schulz(g: Tensor<2>, steps: usize) -> Tensor<2> {
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    let [rows, cols] = g.dims();
    let tall = rows > cols;
    let mut x = if tall { g.transpose() } else { g };
    let norm = x.clone().powi_scalar(2).sum().sqrt().add_scalar(1e-7);
    x = x / norm.unsqueeze();
    for _ in 0..steps {
        let xxt = x.clone().matmul(x.clone().transpose());
        let poly = xxt.clone().mul_scalar(b) + xxt.clone().matmul(xxt).mul_scalar(c);
        x = x.clone().mul_scalar(a) + poly.matmul(x);
    }
    if tall {
        x.transpose()
    } else {
        x
    }
}

impl Optimizer {
    pub fn new(config: OptimConfig) -> Self {
        Self {
            config,
            steps: 0,
            state: BTreeMap::new(),
        }
    }

    /// Applies one update to every parameter with a gradient. `grad_scale` multiplies the
    /// gradients first (clipping factor).
    pub fn step<M: Module>(
        &mut self,
        model: M,
        grads: GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.step_with(model, grads, Coefs::Host { lr, grad_scale })
    }

    /// [`Self::step`] with the coefficients of either kind. With device coefficients (a
    /// captured step) every parameter and moment is written back into its own buffer, which
    /// the graph's replays read and write.
    pub fn step_with<M: Module>(&mut self, model: M, grads: GradientsParams, coefs: Coefs) -> M {
        self.steps += 1;
        let mut s = Step {
            opt: self,
            grads,
            coefs,
            path: PathTracker::default(),
        };
        model.map(&mut s)
    }

    fn update<const D: usize>(
        &mut self,
        path: &str,
        dims: &[usize; D],
        p: Tensor<D>,
        grad: Tensor<D>,
        coefs: &Coefs,
    ) -> Tensor<D> {
        let cfg = self.config.clone();
        // A captured step writes the new values into the parameter's own buffer: `p` stays
        // alive for that while a clone feeds the arithmetic.
        let in_place = matches!(coefs, Coefs::Device(_));
        let target = in_place.then(|| p.clone());
        // State is kept 2-D (vectors as one row) so one map holds every parameter.
        let (rows, cols) = match D {
            1 => (1, dims[0]),
            _ => (dims[0], dims[1..].iter().product()),
        };
        let dtype = p.dtype();
        let p2: Tensor<2> = to_dtype(p, DType::F32).reshape([rows, cols]);
        let g: Tensor<2> = coefs.grad(to_dtype(grad, DType::F32).reshape([rows, cols]));
        let device = g.device();
        let rule = rule(&cfg, path, dims);
        let slot = self.state.entry(path.to_string()).or_insert_with(|| Slot {
            m: Tensor::zeros([rows, cols], &device),
            v: match rule {
                Rule::Muon => None,
                Rule::AdamW { .. } => Some(Tensor::zeros([rows, cols], &device)),
            },
        });
        let decay = match rule {
            Rule::AdamW { decay } => decay,
            Rule::Muon => true,
        };
        let wd = if decay { cfg.weight_decay } else { 0.0 };
        let stable = cfg.optimizer == OptimizerKind::Stableadamw;
        // StableAdamW scales the decay with its step, so it is applied with the update.
        let p2 = if wd > 0.0 && !stable {
            coefs.decay(p2, wd)
        } else {
            p2
        };
        let new = match rule {
            Rule::AdamW { .. } => {
                let m =
                    slot.m.clone().mul_scalar(cfg.beta1) + g.clone().mul_scalar(1.0 - cfg.beta1);
                let v_old = slot.v.take().expect("AdamW slot has a second moment");
                // The old second moment's buffer, kept to be written in place (captured steps).
                let v_kept = in_place.then(|| v_old.clone());
                let v = v_old.mul_scalar(cfg.beta2)
                    + (g.clone() * g.clone()).mul_scalar(1.0 - cfg.beta2);
                let [m_hat, v_hat] = coefs.unbias(m.clone(), v.clone(), &cfg, self.steps);
                let denom = v_hat.clone().sqrt().add_scalar(cfg.eps);
                let upd = m_hat / denom;
                let new = if stable {
                    // lr_t = lr / max(1, sqrt(mean(g² / max(v̂, eps²)))), on the device.
                    let rms = (g.clone() * g / v_hat.clamp_min(cfg.eps * cfg.eps))
                        .mean()
                        .sqrt()
                        .clamp_min(1.0);
                    let lr_t = coefs.lr_times(rms.recip().reshape([1, 1]));
                    let kept = (lr_t.clone().mul_scalar(-wd)).add_scalar(1.0);
                    p2 * kept - upd * lr_t
                } else {
                    p2 - coefs.lr_times(upd)
                };
                keep(&mut slot.m, m, in_place);
                slot.v = Some(match v_kept {
                    Some(v_old) => write_into(v_old, v),
                    None => v,
                });
                new
            }
            Rule::Muon => {
                let mu = cfg.muon_momentum;
                let m = slot.m.clone().mul_scalar(mu) + g.clone();
                let nesterov = g + m.clone().mul_scalar(mu);
                keep(&mut slot.m, m.clone(), in_place);
                let o = newton_schulz(nesterov, cfg.muon_ns_steps);
                // Moonlight's scaling: the update's RMS matches AdamW's (≈0.2), so the
                // AdamW learning rate carries over.
                let scale = 0.2 * (rows.max(cols) as f64).sqrt();
                p2 - coefs.lr_times_scaled(o, scale)
            }
        };
        let new = to_dtype(new.reshape(*dims), dtype);
        match target {
            Some(p) => write_into(p, new),
            None => new,
        }
    }

    /// The moments on the host, by parameter path.
    pub fn snapshot(&self) -> Moments {
        Moments(
            self.state
                .iter()
                .map(|(k, s)| {
                    let v = s.v.as_ref().map(|v| on_host(v.to_data()));
                    (k.clone(), (on_host(s.m.to_data()), v))
                })
                .collect(),
        )
    }

    /// Writes `saved` back into the moments' own buffers; moments made since it was taken
    /// are zeroed, as a fresh optimizer would have them. A captured step's graph keeps
    /// reading and writing these buffers, so none is replaced.
    pub fn restore_in_place(&mut self, mut saved: Moments) {
        let write = |t: Tensor<2>, data: Option<TensorData>| {
            let value = match data {
                Some(d) => Tensor::from_data(d, &t.device()),
                None => t.zeros_like(),
            };
            write_into(t, value)
        };
        for (path, slot) in std::mem::take(&mut self.state) {
            let (m, v) = match saved.0.remove(&path) {
                Some((m, v)) => (Some(m), v),
                None => (None, None),
            };
            let slot = Slot {
                m: write(slot.m, m),
                v: slot.v.map(|old| write(old, v)),
            };
            self.state.insert(path, slot);
        }
    }

    /// Saves the state as safetensors (`<path>.m`, `<path>.v`, f32) atomically.
    pub fn save(&self, file: &Path) -> Result<()> {
        let mut tensors: Vec<(String, TensorData)> = Vec::new();
        for (k, s) in &self.state {
            tensors.push((format!("{k}.m"), s.m.clone().into_data()));
            if let Some(v) = &s.v {
                tensors.push((format!("{k}.v"), v.clone().into_data()));
            }
        }
        crate::tensors_io::save(file, &tensors)
    }

    /// Restores the state saved by [`Optimizer::save`], checking every shape against the
    /// model's parameters.
    pub fn load<M: Module>(&mut self, file: &Path, model: &M, device: &Device) -> Result<()> {
        let shapes = param_shapes(model);
        let mut loaded = crate::tensors_io::load(file)?;
        let mut state = BTreeMap::new();
        for (path, dims) in &shapes {
            let (rows, cols) = match dims.len() {
                1 => (1, dims[0]),
                _ => (dims[0], dims[1..].iter().product()),
            };
            let mut take = |suffix: &str| -> Result<Option<Tensor<2>>> {
                let name = format!("{path}.{suffix}");
                match loaded.remove(&name) {
                    None => Ok(None),
                    Some(d) => {
                        if d.shape().to_vec() != vec![rows, cols] {
                            bail!(
                                "{}: tensor `{name}` has shape {:?}, the model needs [{rows}, {cols}]",
                                file.display(),
                                d.shape().to_vec()
                            );
                        }
                        Ok(Some(Tensor::from_data(d, device)))
                    }
                }
            };
            let m = take("m")?;
            let v = take("v")?;
            if let Some(m) = m {
                state.insert(path.clone(), Slot { m, v });
            }
        }
        if let Some(k) = loaded.keys().next() {
            bail!(
                "{}: tensor `{k}` matches no parameter of the model",
                file.display()
            );
        }
        self.state = state;
        Ok(())
    }
}

/// `value` written into `buffer`'s own storage (a whole-tensor `slice_assign`, in place
/// while `buffer` is the only handle to it), so a captured graph's replays see the update.
/// A device read's values copied into host memory of their own. The data a read returns may
/// be fetched lazily, on first access; uploaded as it is, the device's own thread would
/// then fetch it while busy with the upload, and fail.
pub fn on_host(d: TensorData) -> TensorData {
    TensorData::from_bytes_vec(d.as_bytes().to_vec(), d.shape().clone(), d.dtype())
}

struct Shapes {
    path: PathTracker,
    out: Vec<(String, Vec<usize>)>,
}

impl ModuleVisitor for Shapes {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push((self.path.path(), param.shape().to_vec()));
    }
}

/// Every float parameter's path and shape, in visit order.
pub fn param_shapes<M: Module>(model: &M) -> Vec<(String, Vec<usize>)> {
    let mut v = Shapes {
        path: PathTracker::default(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}
