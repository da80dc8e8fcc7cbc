//! RLP's pieces (arXiv 2510.01265): the information-gain reward of a thought, its
//! group advantage, and the EMA baseline model.
//!
//! A thought c before position t earns r(c) = log p_θ(x_t | x_<t, c) − log p_φ(x_t | x_<t),
//! where φ is an EMA of θ that does not think; the G thoughts of one position get
//! A_i = G/(G−1)·(r_i − mean r), with no standard-deviation scaling.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// The information gain of each thought: its log-prob of the next tokens minus the
/// no-thought baseline's.
pub fn information_gain(with_thought: &[f64], baseline: f64) -> Vec<f64> {
    with_thought.iter().map(|lp| lp - baseline).collect()
}

/// G/(G−1)·(r_i − mean r), which is RLOO's r_i − mean of the others written with the
/// inclusive mean (0 for a single thought).
pub fn rlp_advantages(r: &[f64]) -> Vec<f64> {
    super::grpo::rloo(r)
}

/// Flattened copies of every float parameter, in visiting order.
struct Collect(Vec<Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

/// φ ← τφ + (1−τ)θ for each parameter, θ taken in the same visiting order.
struct Blend {
    theta: std::vec::IntoIter<Tensor<1>>,
    tau: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, phi, mapper) = param.consume();
        let theta = self
            .theta
            .next()
            .expect("the EMA and the model have the same parameters");
        let dims = phi.dims();
        let theta = theta.reshape(dims).to_device(&phi.device());
        let blended = phi * self.tau + theta * (1.0 - self.tau);
        Param::from_mapped_value(id, blended, mapper)
    }
}

/// One EMA step of `ema` towards `model` (which may carry autodiff; its values are used):
/// φ ← τφ + (1−τ)θ.
pub fn ema_update<M: Module>(ema: M, model: &M, tau: f64) -> M {
    let mut c = Collect(Vec::new());
    model.valid().visit(&mut c);
    ema.map(&mut Blend {
        theta: c.0.into_iter(),
        tau,
    })
}
