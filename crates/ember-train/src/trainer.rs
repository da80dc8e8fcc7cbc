//! The optimisation step shared by every stage: micro-batch accumulation, one global-norm
//! clip, a divergence check, and the optimizer update. A stage supplies only the loss of a
//! micro-batch.

use std::path::Path;

use anyhow::{bail, Result};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Int, Tensor};
use ember_models::hf::SaveOptions;
use ember_models::hybrid::stack::HybridLM;
use ember_models::layers::linear::linear;
use ember_models::modernbert::ModernBert;
use ember_models::qwen3::Qwen3;

use crate::captured::{capture_step, CapturedStep, LossFn};
use crate::optim::{grad_norm, Optimizer};
use crate::pretrain::DeviceBatch;
use crate::schedule::LrPlan;

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// The mean micro-batch loss.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// Where the host thread spent the step.
    pub host: HostTimeline,
}

/// The host thread's time through one step, in seconds. The device runs what the host
/// issues asynchronously, so a step that spends nearly all its time issuing work and little
/// waiting for the two reads is bound by the host (kernel launches, burn-fusion's
/// bookkeeping), and one that waits long is bound by the device.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostTimeline {
    /// Issuing the forward and backward passes of every micro-batch.
    pub issue: f64,
    /// Reading the loss back: waiting for the device to finish what was issued (and for
    /// burn-fusion to launch what it still held).
    pub loss_wait: f64,
    /// Issuing the gradient norm and reading it back.
    pub norm_wait: f64,
    /// Issuing the optimizer step, which the device runs while the next step is issued.
    pub update: f64,
}

/// A loss that is not finite: the run stops, and nothing after the step is saved.
#[derive(Debug)]
pub struct Diverged {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Whether the update had been applied (a captured step reads its loss afterwards).
    pub applied: bool,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: loss is {} (grad norm {}); the update was {}",
            self.step + 1,
            self.loss,
            self.grad_norm,
            if self.applied {
                "applied in memory, not saved"
            } else {
                "not applied"
            }
        )
    }
}

impl std::error::Error for Diverged {}

/// What the shared loop needs of a model family besides being a module.
pub trait TrainModel: Module + 'static {
    fn param_count(&self) -> usize;
    /// Training FLOPs per token at sequence length `seq`, for MFU.
    fn flops_per_token(&self, seq: usize) -> f64;
    /// Writes the model as an HF directory (config.json + safetensors).
    fn save_hf(&self, dir: &Path) -> Result<()>;
    /// Applied after every optimizer step (Nemotron-Flash's weight normalisation).
    fn after_step(self) -> Self {
        self
    }
    /// [`Self::after_step`] inside a captured step: every weight it changes is written into
    /// its own buffer.
    fn after_step_in_place(self) -> Self {
        self
    }
    /// The model made ready for a captured step; an error says why this family cannot have
    /// one.
    fn for_capture(self) -> Result<Self> {
        bail!("this model family has no captured step")
    }
}

/// A model trained on next-token loss over packed rows.
pub trait NextTokenModel: TrainModel {
    /// The final norm's output `[batch, seq, hidden]` over packed rows: `positions` restart
    /// and attention stays inside each document when `segments` are given.
    fn packed_hidden(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3>;

    /// The LM head's matrix, `[vocab, hidden]`.
    fn head_weight(&self) -> Tensor<2>;

    /// Logits `[batch, seq, vocab]` of whole rows, positions counted from 0.
    fn logits(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let positions = Tensor::<1, Int>::arange(0..s as i64, &ids.device())
            .reshape([1, s])
            .expand([b, s]);
        self.packed_logits(ids, positions, None)
    }

    /// Logits `[batch, seq, vocab]` of packed rows.
    fn packed_logits(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        linear(
            self.packed_hidden(ids, positions, segments),
            self.head_weight(),
            None,
        )
    }
}

impl NextTokenModel for Qwen3 {
    fn packed_hidden(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        self.forward_packed_hidden(ids, positions, segments)
    }

    fn head_weight(&self) -> Tensor<2> {
        Qwen3::head_weight(self)
    }

    fn logits(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward(ids)
    }
}

impl TrainModel for HybridLM {
    fn param_count(&self) -> usize {
        self.num_params()
    }
    fn flops_per_token(&self, seq: usize) -> f64 {
        HybridLM::flops_per_token(self, seq)
    }
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save_pretrained(dir, &SaveOptions::default())
    }
    fn after_step(self) -> Self {
        if self.config.weight_normalization {
            ember_models::hybrid::weight_norm::normalize(self)
        } else {
            self
        }
    }
    fn after_step_in_place(self) -> Self {
        if self.config.weight_normalization {
            ember_models::hybrid::weight_norm::normalize_in_place(self)
        } else {
            self
        }
    }
    fn for_capture(self) -> Result<Self> {
        Ok(self.with_device_rope())
    }
}

impl NextTokenModel for HybridLM {
    fn packed_hidden(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        HybridLM::packed_hidden(self, ids, positions, segments)
    }

    fn head_weight(&self) -> Tensor<2> {
        HybridLM::head_weight(self)
    }
}

impl TrainModel for Qwen3 {
    fn param_count(&self) -> usize {
        self.config.num_params()
    }
    fn flops_per_token(&self, seq: usize) -> f64 {
        crate::metrics::flops_per_token(&self.config, seq)
    }
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save_pretrained(dir, &SaveOptions::default())
    }
    fn for_capture(self) -> Result<Self> {
        Ok(self.with_device_rope())
    }
}

impl TrainModel for ModernBert {
    fn param_count(&self) -> usize {
        self.config.num_params()
    }
    fn flops_per_token(&self, seq: usize) -> f64 {
        self.config.flops_per_token(seq)
    }
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save_pretrained(dir, &SaveOptions::default())
    }
}

pub struct Trainer<M: TrainModel> {
    model: Option<M>,
    pub optimizer: Optimizer,
    pub schedule: LrPlan,
    /// Optimizer steps completed.
    pub step: u64,
    pub clip_grad_norm: f64,
    /// The captured step, once [`Self::train_captured`] has made it.
    captured: Option<CapturedStep<M>>,
}

impl<M: TrainModel> Trainer<M> {
    pub fn new(
        model: M,
        optimizer: Optimizer,
        schedule: impl Into<LrPlan>,
        clip_grad_norm: f64,
    ) -> Self {
        Self {
            model: Some(model),
            optimizer,
            schedule: schedule.into(),
            step: 0,
            clip_grad_norm,
            captured: None,
        }
    }

    pub fn model(&self) -> &M {
        self.model.as_ref().expect("model present between steps")
    }

    /// One optimizer step over `micro` micro-batches; `loss_of(model, i)` returns the mean
    /// loss of micro-batch `i`. The gradients are averaged over the micro-batches.
    pub fn train_step(
        &mut self,
        micro: usize,
        mut loss_of: impl FnMut(&M, usize) -> Result<Tensor<1>>,
    ) -> Result<StepStats> {
        let lr = self.schedule.lr_at(self.step);
        let model = self.model.take().expect("model present between steps");
        let mut host = HostTimeline::default();
        let mut clock = std::time::Instant::now();
        let mut lap = || {
            let now = std::time::Instant::now();
            let secs = (now - clock).as_secs_f64();
            clock = now;
            secs
        };
        let mut acc = GradientsAccumulator::<M>::new();
        let mut total: Option<Tensor<1>> = None;
        let mut single = None;
        for i in 0..micro {
            let loss = match loss_of(&model, i) {
                Ok(l) => l,
                Err(e) => {
                    self.model = Some(model);
                    return Err(e);
                }
            };
            let value = loss.clone().inner();
            total = Some(match total.take() {
                Some(t) => t + value,
                None => value,
            });
            let grads = loss.div_scalar(micro as f64).backward();
            let grads = GradientsParams::from_grads(grads, &model);
            if micro == 1 {
                single = Some(grads);
            } else {
                acc.accumulate(&model, grads);
            }
        }
        let grads = single.unwrap_or_else(|| acc.grads());
        host.issue = lap();
        let measured = total
            .map(|t| scalar(t).map(|l| l / micro as f64))
            .unwrap_or(Ok(f64::NAN))
            .and_then(|loss| {
                host.loss_wait = lap();
                let norm = grad_norm(&model, &grads)?;
                host.norm_wait = lap();
                Ok((loss, norm))
            });
        let (loss, norm) = match measured {
            Ok(v) => v,
            Err(e) => {
                self.model = Some(model);
                return Err(e);
            }
        };
        if !loss.is_finite() || !norm.is_finite() {
            self.model = Some(model);
            bail!(Diverged {
                step: self.step,
                loss,
                grad_norm: norm,
                applied: false,
            });
        }
        let scale = if self.clip_grad_norm > 0.0 && norm > self.clip_grad_norm {
            self.clip_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.model = Some(self.optimizer.step(model, grads, lr, scale).after_step());
        host.update = lap();
        self.step += 1;
        Ok(StepStats {
            loss,
            grad_norm: norm,
            lr,
            host,
        })
    }

    /// One optimizer step through a captured step (`crate::captured`) over the micro-batches
    /// `batches`, whose layout every later call must keep; `loss_of` gives a micro-batch's
    /// mean loss and is used by the first call, which captures the step (the capture trains
    /// nothing). The gradients are averaged over the micro-batches, as by
    /// [`Self::train_step`]. A divergence is found after the update has been applied.
    pub fn train_captured(
        &mut self,
        batches: Vec<DeviceBatch>,
        loss_of: impl FnOnce() -> Box<LossFn<M>>,
    ) -> Result<StepStats> {
        let lr = self.schedule.lr_at(self.step);
        let graph = match &mut self.captured {
            Some(g) => g,
            None => {
                let model = self.model.take().expect("model present between steps");
                self.model = Some(model.for_capture()?);
                let g = capture_step(
                    &mut self.model,
                    &mut self.optimizer,
                    batches.clone(),
                    self.clip_grad_norm,
                    loss_of(),
                    M::after_step_in_place,
                )?;
                self.captured.insert(g)
            }
        };
        let t0 = std::time::Instant::now();
        let out = graph.step(&mut self.model, &mut self.optimizer, batches, lr)?;
        // Writing the batch, one launch and the wait for it: the replay is not split further.
        let host = HostTimeline {
            loss_wait: t0.elapsed().as_secs_f64(),
            ..Default::default()
        };
        if !out.loss.is_finite() || !out.grad_norm.is_finite() {
            bail!(Diverged {
                step: self.step,
                loss: out.loss,
                grad_norm: out.grad_norm,
                applied: true,
            });
        }
        self.step += 1;
        Ok(StepStats {
            loss: out.loss,
            grad_norm: out.grad_norm,
            lr,
            host,
        })
    }

    /// Whether steps replay a recorded graph (false before the first captured step, and on
    /// backends without graphs).
    pub fn replays_graph(&self) -> bool {
        self.captured.as_ref().is_some_and(|g| g.replayed())
    }

    /// Seconds the capture took, once made.
    pub fn capture_secs(&self) -> Option<f64> {
        self.captured.as_ref().map(|g| g.capture_secs)
    }

    pub fn into_model(self) -> M {
        self.model.expect("model present between steps")
    }
}

/// A one-element tensor's value on the host. A failure of the device (out of memory, a
/// kernel error) surfaces here, as an error rather than a panic.
pub fn scalar(t: Tensor<1>) -> Result<f64> {
    let d = t
        .try_into_data()
        .map_err(|e| anyhow::anyhow!("device error: {}", format!("{e:?}").replace('\n', " ")))?;
    Ok(d.convert::<f64>()
        .try_to_vec::<f64>()
        .map(|v| v[0])
        .unwrap_or(f64::NAN))
}
