//! A training step captured once and replayed as a graph (`burn::tensor::capture`): the
//! forward and backward passes over every micro-batch, the global-norm clip and the
//! optimizer's update (AdamW, Muon or StableAdamW), on CUDA one graph launch per step
//! instead of the host issuing thousands of kernels (torch.compile's "reduce-overhead" mode
//! does the same with CUDA graphs).
//! Backends without graphs re-run the step.
//!
//! A replay re-runs the recorded kernels on the buffers they used when captured, so the
//! step keeps everything it carries from one step to the next in device buffers that it
//! updates in place:
//! - the micro-batches, written between replays;
//! - the parameters and the optimizer's moments ([`Optimizer::step_with`] with device
//!   coefficients);
//! - the step counter, from which the bias corrections follow on the device;
//! - the learning rate, written between replays.
//!
//! The clip factor is computed on the device, and each replay's only read is the loss with
//! the gradient norm. On wgpu a recording may not write from the host at all, so the model
//! keeps RoPE's frequencies on the device ([`TrainModel::for_capture`]).
//!
//! Burn's capture runs the step three times to warm up and once to record it. Those runs
//! train on the first step's batches, so the parameters, the moments and the counter are
//! put back afterwards (written into the same buffers): the capture trains nothing, and a
//! captured run takes the eager run's steps.
//!
//! Between replays the model and the optimizer are lent back to the caller ([`Trainer`]
//! evaluates and checkpoints them as usual); they must come back with the same tensors.
//!
//! [`Trainer`]: crate::trainer::Trainer
//! [`TrainModel::for_capture`]: crate::trainer::TrainModel::for_capture

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{capture, Graph, Int, Tensor, TensorData};
use ember_models::layers::{to_dtype, write_into};

use crate::optim::{grad_sq_norm, on_host, remap, Coefs, DeviceCoefs, Optimizer};
use crate::pretrain::DeviceBatch;

/// The loss of a micro-batch on the device, as a `[1]` tensor.
pub type LossFn<M> = dyn Fn(&M, &DeviceBatch) -> Tensor<1>;

/// What the step carries from one replay to the next.
struct State<M> {
    model: Option<M>,
    optimizer: Option<Optimizer>,
    batches: Vec<DeviceBatch>,
    /// `[1, 1]`: steps taken, as a float (the bias corrections' exponent).
    t: Tensor<2>,
    /// `[1, 1]`: the learning rate.
    lr: Tensor<2>,
}

/// One step's mean loss and its gradient norm before clipping.
#[derive(Clone, Copy, Debug)]
pub struct GraphStep {
    pub loss: f64,
    pub grad_norm: f64,
}

type StepFn = Box<dyn FnMut() -> Tensor<1>>;

/// A training step captured for one model and optimizer.
pub struct CapturedStep<M: Module> {
    state: Rc<RefCell<State<M>>>,
    graph: Graph<Tensor<1>, StepFn>,
    /// Seconds the capture took: its warm-up runs and the recording.
    pub capture_secs: f64,
}

/// A `[1, 1]` float on `device`.
fn scalar(v: f64, device: &burn::tensor::Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(vec![v as f32], [1, 1]), device)
}

/// A copy of `t` in a buffer of its own: a view of a shared buffer (inputs and targets
/// sliced from one row) could not be refreshed in place.
fn own(t: Tensor<2, Int>) -> Tensor<2, Int> {
    write_into(Tensor::zeros(t.dims(), &t.device()), t)
}

fn own_batch(b: DeviceBatch) -> DeviceBatch {
    DeviceBatch {
        inputs: own(b.inputs),
        targets: own(b.targets),
        positions: own(b.positions),
        segments: b.segments.map(own),
        weights: b.weights.map(|w| w.zeros_like() + w),
    }
}

/// Writes `new` into the buffers of `old`, when the two have the same layout.
fn refresh(old: &mut DeviceBatch, new: DeviceBatch) -> Result<()> {
    let shape = |b: &DeviceBatch| {
        (
            b.inputs.dims(),
            b.segments.is_some(),
            b.weights.as_ref().map(|w| w.dims()),
        )
    };
    if shape(old) != shape(&new) {
        bail!(
            "a captured step trains on batches of one layout: [batch, seq], document \
             segments, loss weights {:?} differ from the captured {:?}",
            shape(&new),
            shape(old)
        );
    }
    let int = |buf: &mut Tensor<2, Int>, v| buf.inplace(|o| write_into(o, v));
    int(&mut old.inputs, new.inputs);
    int(&mut old.targets, new.targets);
    int(&mut old.positions, new.positions);
    if let (Some(o), Some(n)) = (old.segments.as_mut(), new.segments) {
        int(o, n);
    }
    if let (Some(o), Some(n)) = (old.weights.as_mut(), new.weights) {
        o.inplace(|o| write_into(o, n));
    }
    Ok(())
}

/// Every float parameter's values on the host, by id.
#[derive(Default)]
struct Snapshot(HashMap<ParamId, TensorData>);

impl ModuleVisitor for Snapshot {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.insert(param.id, on_host(param.val().into_data()));
    }
}

impl ModuleMapper for Snapshot {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(data) = self.0.remove(&param.id) else {
            return param;
        };
        remap(param, |p| {
            let value = to_dtype(Tensor::from_data(data, &p.device()), p.dtype());
            write_into(p, value)
        })
    }
}

/// Captures the training step of `model` with `optimizer` (its configuration and state), clipping the global gradient norm at `clip` when positive, over micro-batches
/// laid out as `batches`, with `loss_of` each micro-batch's mean loss and `after_step`
/// applied to the updated model (writing in place). The model and the optimizer come back
/// as they went in.
pub fn capture_step<M: Module + 'static>(
    model: &mut Option<M>,
    optimizer: &mut Optimizer,
    batches: Vec<DeviceBatch>,
    clip: f64,
    loss_of: Box<LossFn<M>>,
    after_step: fn(M) -> M,
) -> Result<CapturedStep<M>> {
    if batches.is_empty() {
        bail!("a captured training step needs at least one micro-batch");
    }
    let device = batches[0].inputs.device();
    let steps = optimizer.steps;
    let micro = batches.len();
    let m = model.take().expect("model present between steps");
    let mut snapshot = Snapshot::default();
    m.visit(&mut snapshot);
    let moments = optimizer.snapshot();
    let placeholder = Optimizer::new(optimizer.config.clone());
    let state = Rc::new(RefCell::new(State {
        model: Some(m),
        optimizer: Some(std::mem::replace(optimizer, placeholder)),
        batches: batches.into_iter().map(own_batch).collect(),
        t: scalar(steps as f64, &device),
        lr: scalar(0.0, &device),
    }));
    let st = state.clone();
    let step: StepFn = Box::new(move || {
        let mut guard = st.borrow_mut();
        let s = &mut *guard;
        let model = s.model.take().expect("model present between steps");
        let mut acc = GradientsAccumulator::<M>::new();
        let mut total: Option<Tensor<1>> = None;
        for b in &s.batches {
            let loss = loss_of(&model, b);
            let value = loss.clone().inner();
            total = Some(match total.take() {
                Some(t) => t + value,
                None => value,
            });
            let grads = loss.div_scalar(micro as f64).backward();
            acc.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let grads = acc.grads();
        let mean = total
            .expect("at least one micro-batch")
            .div_scalar(micro as f64);
        let norm = grad_sq_norm(&model, &grads)
            .map(|sq| sq.sqrt())
            .unwrap_or_else(|| Tensor::zeros([1], &mean.device()));
        let norm2 = norm.clone().reshape([1, 1]);
        let grad_scale = if clip > 0.0 {
            let over = norm2.clone().greater_elem(clip);
            norm2.ones_like().mask_where(
                over,
                norm2.clone().add_scalar(1e-6).recip().mul_scalar(clip),
            )
        } else {
            norm2.ones_like()
        };
        // The bias corrections 1 − βᵗ of the step being taken, from the counter.
        let t = s.t.clone().add_scalar(1.0);
        let optimizer = s.optimizer.as_mut().expect("optimizer present");
        let cfg = &optimizer.config;
        let correction = |beta: f64| t.clone().mul_scalar(beta.ln()).exp().neg().add_scalar(1.0);
        let coefs = DeviceCoefs {
            lr: s.lr.clone(),
            bc1: correction(cfg.beta1),
            bc2: correction(cfg.beta2),
            grad_scale,
        };
        s.t.inplace(|old| write_into(old, t));
        let model = optimizer.step_with(model, grads, Coefs::Device(Box::new(coefs)));
        s.model = Some(after_step(model));
        Tensor::cat(vec![mean, norm], 0)
    });
    let t0 = Instant::now();
    // The graph records the backend's launches: on the autodiff device it would not open.
    let graph = capture(&device.clone().without_autodiff(), step);
    let capture_secs = t0.elapsed().as_secs_f64();
    {
        // The warm-up steps are undone in place, so the graph's buffers stay the model's.
        let mut s = state.borrow_mut();
        let m = s.model.take().expect("model present after the capture");
        s.model = Some(m.map(&mut snapshot));
        let opt = s.optimizer.as_mut().expect("optimizer present");
        opt.restore_in_place(moments);
        opt.steps = steps;
        let back = scalar(steps as f64, &device);
        s.t.inplace(|old| write_into(old, back));
        *model = s.model.take();
        *optimizer = s.optimizer.take().expect("optimizer present");
    }
    Ok(CapturedStep {
        state,
        graph,
        capture_secs,
    })
}

impl<M: Module> CapturedStep<M> {
    /// Whether the step replays as a recorded graph; false where the backend has none and
    /// the step simply re-runs.
    pub fn replayed(&self) -> bool {
        self.graph.is_hardware()
    }

    /// One step of `model` and `optimizer` (those captured, lent back) on `batches` (laid
    /// out as the captured ones) at the rate `lr`.
    pub fn step(
        &mut self,
        model: &mut Option<M>,
        optimizer: &mut Optimizer,
        batches: Vec<DeviceBatch>,
        lr: f64,
    ) -> Result<GraphStep> {
        let before = optimizer.steps;
        {
            let mut s = self.state.borrow_mut();
            if batches.len() != s.batches.len() {
                bail!(
                    "a captured step has {} micro-batches, not {}",
                    s.batches.len(),
                    batches.len()
                );
            }
            let device = s.lr.device();
            for (old, new) in s.batches.iter_mut().zip(batches) {
                refresh(old, new)?;
            }
            let lr = scalar(lr, &device);
            s.lr.inplace(|old| write_into(old, lr));
            let placeholder = Optimizer::new(optimizer.config.clone());
            s.model = model.take();
            s.optimizer = Some(std::mem::replace(optimizer, placeholder));
        }
        // Safety: every buffer the step touches lives in `state` (the model, the optimizer's
        // moments, the batches, the counter and the rate) or in `graph` (its output), all of
        // which outlive the replay; its output is read (a wait for the device) before the
        // next refresh or replay, on this thread's stream.
        let out = unsafe { self.graph.replay() }.clone();
        let read = out
            .try_into_data()
            .map_err(|e| anyhow!("device error: {}", format!("{e:?}").replace('\n', " ")));
        {
            let mut s = self.state.borrow_mut();
            *model = s.model.take();
            let mut opt = s.optimizer.take().expect("optimizer present");
            // A replay does not run the closure that counts steps.
            opt.steps = before + 1;
            *optimizer = opt;
        }
        let v: Vec<f32> = read?.iter::<f32>().collect();
        Ok(GraphStep {
            loss: v[0] as f64,
            grad_norm: v[1] as f64,
        })
    }
}
