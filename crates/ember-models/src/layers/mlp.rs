//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use anyhow::Result;
use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use super::linear::Linear;
use crate::weights::{WeightSink, WeightSource};

#[derive(Module, Debug)]
pub struct SwiGlu {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl SwiGlu {
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        hidden: usize,
        inter: usize,
        std: f64,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(
                src,
                &format!("{prefix}.gate_proj"),
                hidden,
                inter,
                false,
                std,
                device,
            )?,
            up_proj: Linear::load(
                src,
                &format!("{prefix}.up_proj"),
                hidden,
                inter,
                false,
                std,
                device,
            )?,
            down_proj: Linear::load(
                src,
                &format!("{prefix}.down_proj"),
                inter,
                hidden,
                false,
                std,
                device,
            )?,
        })
    }

    pub fn save(&self, prefix: &str, out: &mut WeightSink) {
        self.gate_proj.save(&format!("{prefix}.gate_proj"), out);
        self.up_proj.save(&format!("{prefix}.up_proj"), out);
        self.down_proj.save(&format!("{prefix}.down_proj"), out);
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let up = self.up_proj.forward(x.clone());
        self.down_proj.forward(silu(self.gate_proj.forward(x)) * up)
    }
}
