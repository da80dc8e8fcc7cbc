//! Nemotron-Flash's weight normalisation (§3.3): after every optimizer step, matrices that
//! read the residual stream (q, k, v, β, gate and up projections, SSM and DeltaNet input
//! projections) get unit-norm rows, and matrices that write to it (o, down and out
//! projections) unit-norm columns. Embeddings and the LM head are left alone.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

const READ: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "b_proj",
    "gate_proj",
    "up_proj",
    "in_proj",
    "in_proj_qkvz",
    "in_proj_ba",
];
const WRITE: [&str; 3] = ["o_proj", "down_proj", "out_proj"];

struct Normalize {
    path: Vec<String>,
    /// Write each result into the weight's own buffer (a captured training step's graph
    /// keeps reading and writing those buffers).
    in_place: bool,
}

impl ModuleMapper for Normalize {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let n = self.path.len();
        let owner = match (n >= 2).then(|| (&self.path[n - 2], &self.path[n - 1])) {
            Some((o, l)) if D == 2 && l == "weight" => o.as_str(),
            _ => return param,
        };
        // Linear weights are [out, in]: a row reads the input, a column writes one input unit.
        let axis = if READ.contains(&owner) {
            1
        } else if WRITE.contains(&owner) {
            0
        } else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let is_autodiff = tensor.device().is_autodiff();
        let w = if is_autodiff { tensor.inner() } else { tensor };
        let norm = w.clone().square().sum_dim(axis).sqrt().clamp_min(1e-12);
        let mut out = if self.in_place {
            let value = w.clone() / norm;
            crate::layers::write_into(w, value)
        } else {
            w / norm
        };
        if is_autodiff {
            out = out.autodiff();
        }
        if require_grad {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
}

/// Projects every reading matrix to unit rows and every writing matrix to unit columns.
pub fn normalize<M: Module>(model: M) -> M {
    model.map(&mut Normalize {
        path: Vec::new(),
        in_place: false,
    })
}

/// [`normalize`], writing every new weight into its old buffer.
pub fn normalize_in_place<M: Module>(model: M) -> M {
    model.map(&mut Normalize {
        path: Vec::new(),
        in_place: true,
    })
}
