//! A training step captured once and replayed as a graph (`burn::tensor::capture`): the
//! forward and backward passes, the global-norm clip and AdamW's update, on CUDA one graph
//! launch per step instead of the host issuing thousands of kernels (torch.compile's
//! "reduce-overhead" mode does the same with CUDA graphs). Backends without graphs re-run
//! the step.
//!
//! A replay re-runs the recorded kernels on the buffers they used when captured, so the
//! step keeps everything it carries from one step to the next in device buffers that it
//! updates in place:
//! - the batch, written between replays;
//! - the parameters and AdamW's moments ([`Optimizer::step_with`] with device coefficients);
//! - the step counter, from which the bias corrections follow on the device;
//! - the learning rate, written between replays.
//!
//! The clip factor is computed on the device, and each replay's only read is the loss with
//! the gradient norm. Nothing in the step may transfer from the host, so the model keeps
//! RoPE's frequencies on the device (`Qwen3::rope_freq`).
//!
//! Burn's capture runs the step three times to warm up and once to record it. The recording
//! does not execute, so the capture trains three steps on the first batch (four on a backend
//! without graphs, where the recording run is an ordinary one). Used by `ember bench train
//! --graph` to tell the host's share of a step from the device's; not by the stages yet.

use std::cell::RefCell;
use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{capture, Int, Tensor, TensorData};

use crate::optim::{grad_sq_norm, write_into, Coefs, DeviceCoefs, Optimizer};

/// What the step carries from one replay to the next.
struct State<M> {
    model: Option<M>,
    optimizer: Optimizer,
    /// `[batch, seq]` inputs and targets.
    x: Tensor<2, Int>,
    y: Tensor<2, Int>,
    /// `[1, 1]`: steps taken, as a float (the bias corrections' exponent).
    t: Tensor<2>,
    /// `[1, 1]`: the learning rate.
    lr: Tensor<2>,
}

/// One step's loss and gradient norm before clipping.
#[derive(Clone, Copy, Debug)]
pub struct GraphStep {
    pub loss: f64,
    pub grad_norm: f64,
}

/// A model training through a captured step.
pub struct CapturedTraining<M, F>
where
    M: Module,
    F: FnMut() -> Tensor<1>,
{
    state: std::rc::Rc<RefCell<State<M>>>,
    graph: burn::tensor::Graph<Tensor<1>, F>,
    /// Seconds the capture took: its warm-up runs and the recording.
    pub capture_secs: f64,
    /// Steps taken, the capture's included (their losses and gradient norms are not read).
    pub steps: u64,
}

/// The loss of a batch: `(model, inputs, targets)` to a `[1]` tensor.
pub type LossFn<M> = dyn Fn(&M, Tensor<2, Int>, Tensor<2, Int>) -> Tensor<1>;

/// Captures the training step of `model` (AdamW with `optimizer`'s configuration and state,
/// clipping the global gradient norm at `clip` when positive) on the batch `(x, y)`, which
/// its warm-up and recorded runs train on, at the learning rate `lr`.
pub fn capture_training<M: Module + 'static>(
    model: M,
    optimizer: Optimizer,
    (x, y): (Tensor<2, Int>, Tensor<2, Int>),
    lr: f64,
    clip: f64,
    loss_of: Box<LossFn<M>>,
) -> Result<CapturedTraining<M, impl FnMut() -> Tensor<1>>> {
    if optimizer.config.optimizer != crate::optim::OptimizerKind::Adamw {
        bail!("a captured training step uses AdamW only");
    }
    let device = x.device();
    let steps = optimizer.steps;
    let scalar = |v: f64| Tensor::<2>::from_data(TensorData::new(vec![v as f32], [1, 1]), &device);
    // Buffers of their own: views of a shared one (inputs and targets sliced from one row)
    // could not be refreshed in place.
    let own = |t: Tensor<2, Int>| {
        let [b, n] = t.dims();
        Tensor::<2, Int>::zeros([b, n], &device).slice_assign([0..b, 0..n], t)
    };
    let (x, y) = (own(x), own(y));
    let state = std::rc::Rc::new(RefCell::new(State {
        model: Some(model),
        optimizer,
        x,
        y,
        t: scalar(steps as f64),
        lr: scalar(lr),
    }));
    let st = state.clone();
    let step = move || {
        let mut guard = st.borrow_mut();
        let s = &mut *guard;
        let model = s.model.take().expect("model present between steps");
        let loss = loss_of(&model, s.x.clone(), s.y.clone());
        let value = loss.clone().inner();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm = grad_sq_norm(&model, &grads)
            .map(|sq| sq.sqrt())
            .unwrap_or_else(|| Tensor::zeros([1], &value.device()));
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
        let cfg = &s.optimizer.config;
        let correction = |beta: f64| t.clone().mul_scalar(beta.ln()).exp().neg().add_scalar(1.0);
        let coefs = DeviceCoefs {
            lr: s.lr.clone(),
            bc1: correction(cfg.beta1),
            bc2: correction(cfg.beta2),
            grad_scale,
        };
        s.t.inplace(|old| write_into(old, t));
        let model = s
            .optimizer
            .step_with(model, grads, Coefs::Device(Box::new(coefs)));
        s.model = Some(model);
        Tensor::cat(vec![value, norm], 0)
    };
    let t0 = Instant::now();
    // The graph records the backend's launches: on the autodiff device it would not open.
    let graph = capture(&device.clone().without_autodiff(), step);
    let capture_secs = t0.elapsed().as_secs_f64();
    // A recording does not execute: its step is taken by the first replay.
    let taken = if graph.is_hardware() { 3 } else { 4 };
    state.borrow_mut().optimizer.steps = steps + taken;
    Ok(CapturedTraining {
        state,
        graph,
        capture_secs,
        steps: steps + taken,
    })
}

impl<M: Module, F: FnMut() -> Tensor<1>> CapturedTraining<M, F> {
    /// Whether the step replays as a recorded graph; false where the backend has none and
    /// the step simply re-runs.
    pub fn replayed(&self) -> bool {
        self.graph.is_hardware()
    }

    /// One step on the batch `(x, y)` (the shapes of the captured one) at the rate `lr`.
    pub fn step(&mut self, x: Tensor<2, Int>, y: Tensor<2, Int>, lr: f64) -> Result<GraphStep> {
        {
            let mut s = self.state.borrow_mut();
            if x.dims() != s.x.dims() || y.dims() != s.y.dims() {
                bail!(
                    "captured training step: batch {:?} differs from the captured {:?}",
                    x.dims(),
                    s.x.dims()
                );
            }
            let device = s.x.device();
            let lr = Tensor::<2>::from_data(TensorData::new(vec![lr as f32], [1, 1]), &device);
            let [b, n] = x.dims();
            s.x.inplace(|old| old.slice_assign([0..b, 0..n], x));
            s.y.inplace(|old| old.slice_assign([0..b, 0..n], y));
            s.lr.inplace(|old| write_into(old, lr));
        }
        // Safety: every buffer the step touches lives in `state` (the model, the optimizer's
        // moments, the batch, the counter and the rate) or in `graph` (its output), all of
        // which outlive the replay; its output is read (a wait for the device) before the
        // next refresh or replay, on this thread's stream.
        let out = unsafe { self.graph.replay() }.clone();
        let v: Vec<f32> = out
            .try_into_data()
            .map_err(|e| anyhow::anyhow!("device error: {e:?}"))?
            .iter::<f32>()
            .collect();
        self.steps += 1;
        self.state.borrow_mut().optimizer.steps = self.steps;
        Ok(GraphStep {
            loss: v[0] as f64,
            grad_norm: v[1] as f64,
        })
    }

    /// The model as trained so far.
    pub fn model(&self) -> std::cell::Ref<'_, M> {
        std::cell::Ref::map(self.state.borrow(), |s| {
            s.model.as_ref().expect("model present between steps")
        })
    }
}
