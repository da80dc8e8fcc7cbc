//! Gated DeltaNet as transformers' Qwen3Next lays it out (`Qwen3NextGatedDeltaNet`):
//! `in_proj_qkvz` grouped per key head as [q | k | v (r heads) | z (r heads)],
//! `in_proj_ba` as [b (r) | a (r)] with r = value heads / key heads; a short causal conv
//! (then SiLU) over [q | k | v]; q and k L2-normalised and shared by the r value heads of
//! their group; β = sigmoid(b), g = −exp(A_log)·softplus(a + dt_bias); the gated delta rule
//! ([`super::delta_rule`]); a per-head RMSNorm times silu(z); `out_proj`.

use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu, softplus};
use burn::tensor::{DType, Device, Tensor};

use super::delta_rule::{self, DeltaInputs};
use super::{
    causal_conv_silu, conv_param, export_conv, l2_normalize, repeat_heads, Documents,
    RecurrentState,
};
use crate::layers::linear::{linear_fused, Linear};
use crate::layers::to_dtype;
use crate::weights::{export, param, Init, WeightSink, WeightSource};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeltaDims {
    pub hidden: usize,
    pub k_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
    pub conv_kernel: usize,
    /// Tokens per chunk of the chunked form.
    pub chunk: usize,
    pub eps: f64,
}

impl DeltaDims {
    pub fn key_dim(&self) -> usize {
        self.k_heads * self.dk
    }
    pub fn value_dim(&self) -> usize {
        self.v_heads * self.dv
    }
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

/// Decoding state: conv history over [q | k | v] and the delta-rule state
/// `[batch, v_heads, dk, dv]`.
pub type DeltaState = RecurrentState;

impl DeltaDims {
    pub fn zero_state(&self, batch: usize, device: &Device) -> DeltaState {
        RecurrentState::zeros(
            batch,
            self.conv_kernel,
            self.conv_dim(),
            [self.v_heads, self.dk, self.dv],
            device,
        )
    }
}

#[derive(Module, Debug)]
pub struct GatedDeltaNet {
    pub in_proj_qkvz: Linear,
    pub in_proj_ba: Linear,
    /// `[conv_dim, kernel]`.
    pub conv_weight: Param<Tensor<2>>,
    pub dt_bias: Param<Tensor<1>>,
    pub a_log: Param<Tensor<1>>,
    pub norm_weight: Param<Tensor<1>>,
    pub out_proj: Linear,
    #[module(skip)]
    pub dims: DeltaDims,
}

impl GatedDeltaNet {
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: DeltaDims,
        std: f64,
        device: &Device,
    ) -> Result<Self> {
        let (kd, vd, cd, k) = (d.key_dim(), d.value_dim(), d.conv_dim(), d.conv_kernel);
        let conv_weight = conv_param(src, &format!("{prefix}.conv1d.weight"), cd, k, device)?;
        Ok(Self {
            in_proj_qkvz: Linear::load(
                src,
                &format!("{prefix}.in_proj_qkvz"),
                d.hidden,
                2 * kd + 2 * vd,
                false,
                std,
                device,
            )?,
            in_proj_ba: Linear::load(
                src,
                &format!("{prefix}.in_proj_ba"),
                d.hidden,
                2 * d.v_heads,
                false,
                std,
                device,
            )?,
            conv_weight,
            dt_bias: param(
                src,
                &format!("{prefix}.dt_bias"),
                [d.v_heads],
                Init::Ones,
                device,
            )?,
            a_log: param(
                src,
                &format!("{prefix}.A_log"),
                [d.v_heads],
                Init::LogArange,
                device,
            )?,
            norm_weight: param(
                src,
                &format!("{prefix}.norm.weight"),
                [d.dv],
                Init::Ones,
                device,
            )?,
            out_proj: Linear::load(
                src,
                &format!("{prefix}.out_proj"),
                vd,
                d.hidden,
                false,
                std,
                device,
            )?,
            dims: d,
        })
    }

    pub fn save(&self, prefix: &str, out: &mut WeightSink) {
        self.in_proj_qkvz
            .save(&format!("{prefix}.in_proj_qkvz"), out);
        self.in_proj_ba.save(&format!("{prefix}.in_proj_ba"), out);
        export_conv(out, &format!("{prefix}.conv1d.weight"), &self.conv_weight);
        export(out, &format!("{prefix}.dt_bias"), &self.dt_bias);
        export(out, &format!("{prefix}.A_log"), &self.a_log);
        export(out, &format!("{prefix}.norm.weight"), &self.norm_weight);
        self.out_proj.save(&format!("{prefix}.out_proj"), out);
    }

    /// `[batch, seq, hidden]` → the same; a state is continued and advanced (one token:
    /// the recurrent form; more: the chunked form). With `docs`, each document of a packed
    /// row starts from a zero state and an empty conv history.
    pub fn forward(
        &self,
        x: Tensor<3>,
        state: Option<&mut DeltaState>,
        docs: Option<&Documents>,
    ) -> Tensor<3> {
        let d = self.dims;
        let [b, l, _] = x.dims();
        let dtype = x.dtype();
        let r = d.v_heads / d.k_heads;
        let device = x.device();
        let qkvz = self.in_proj_qkvz.forward(x.clone()).reshape([
            b,
            l,
            d.k_heads,
            2 * d.dk + 2 * r * d.dv,
        ]);
        let part = |m: &Tensor<4>, at: usize, n: usize| m.clone().narrow(3, at, n);
        let q = part(&qkvz, 0, d.dk).reshape([b, l, d.key_dim()]);
        let k = part(&qkvz, d.dk, d.dk).reshape([b, l, d.key_dim()]);
        let v = part(&qkvz, 2 * d.dk, r * d.dv).reshape([b, l, d.value_dim()]);
        let z = part(&qkvz, 2 * d.dk + r * d.dv, r * d.dv).reshape([b, l, d.v_heads, d.dv]);
        let ba = self.in_proj_ba.forward(x).reshape([b, l, d.k_heads, 2 * r]);
        let beta = sigmoid(to_dtype(part(&ba, 0, r), DType::F32)).reshape([b, l, d.v_heads]);
        let a = to_dtype(part(&ba, r, r), DType::F32).reshape([b, l, d.v_heads]);
        let mut zero;
        let st = match state {
            Some(s) => s,
            None => {
                zero = d.zero_state(b, &device);
                &mut zero
            }
        };
        let mixed = causal_conv_silu(
            &mut st.conv,
            Tensor::cat(vec![q, k, v], 2),
            self.conv_weight.val(),
            None,
            docs,
        );
        let (kd, vd) = (d.key_dim(), d.value_dim());
        let heads = |m: Tensor<3>, g: usize, dim: usize| m.reshape([b, l, g, dim]);
        let q = repeat_heads(
            l2_normalize(heads(mixed.clone().narrow(2, 0, kd), d.k_heads, d.dk)),
            r,
        );
        let k = repeat_heads(
            l2_normalize(heads(mixed.clone().narrow(2, kd, kd), d.k_heads, d.dk)),
            r,
        );
        let v = heads(mixed.narrow(2, 2 * kd, vd), d.v_heads, d.dv);
        let dt = softplus(
            a + to_dtype(self.dt_bias.val(), DType::F32).reshape([1, 1, d.v_heads]),
            1.0,
        );
        let g = dt
            * to_dtype(self.a_log.val(), DType::F32)
                .exp()
                .neg()
                .reshape([1, 1, d.v_heads]);
        let to_bh = |m: Tensor<4>| m.swap_dims(1, 2);
        let inputs = DeltaInputs {
            q: to_bh(q),
            k: to_bh(k),
            v: to_bh(v),
            beta: beta.swap_dims(1, 2),
            g: Some(g.swap_dims(1, 2)),
        };
        let o = if l == 1 {
            delta_rule::recurrent(inputs, &mut st.state)
        } else {
            delta_rule::chunked(inputs, d.chunk, &mut st.state, docs)
        };
        let o = o.swap_dims(1, 2); // [b, l, v_heads, dv]
        let inv = (o.clone().square().mean_dim(3) + d.eps).sqrt().recip();
        let o = o
            * inv
            * to_dtype(self.norm_weight.val(), DType::F32).reshape([1, 1, 1, d.dv])
            * silu(to_dtype(z, DType::F32));
        self.out_proj
            .forward(to_dtype(o.reshape([b, l, vd]), dtype))
    }
}

/// DeltaNet as Nemotron-Flash uses it (FLA's `DeltaNet` layer, names included): separate
/// `q_proj`, `k_proj`, `v_proj`; a short causal conv (then SiLU) on each; q and k
/// L2-normalised; β = sigmoid(`b_proj`); the ungated delta rule; a per-head RMSNorm
/// (`o_norm`); `o_proj`. Keys and values have the same head count.
#[derive(Module, Debug)]
pub struct DeltaNet {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub b_proj: Linear,
    /// `[channels, kernel]` each.
    pub q_conv: Param<Tensor<2>>,
    pub k_conv: Param<Tensor<2>>,
    pub v_conv: Param<Tensor<2>>,
    pub o_norm: Param<Tensor<1>>,
    pub o_proj: Linear,
    #[module(skip)]
    pub dims: DeltaDims,
}

impl DeltaNet {
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: DeltaDims,
        std: f64,
        device: &Device,
    ) -> Result<Self> {
        let (kd, vd, k) = (d.key_dim(), d.value_dim(), d.conv_kernel);
        let lin = |src: &mut dyn WeightSource, n: &str, i: usize, o: usize| {
            Linear::load(src, &format!("{prefix}.{n}"), i, o, false, std, device)
        };
        let conv = |src: &mut dyn WeightSource, n: &str, ch: usize| -> Result<Param<Tensor<2>>> {
            conv_param(src, &format!("{prefix}.{n}.weight"), ch, k, device)
        };
        Ok(Self {
            q_proj: lin(src, "q_proj", d.hidden, kd)?,
            k_proj: lin(src, "k_proj", d.hidden, kd)?,
            v_proj: lin(src, "v_proj", d.hidden, vd)?,
            b_proj: lin(src, "b_proj", d.hidden, d.v_heads)?,
            q_conv: conv(src, "q_conv1d", kd)?,
            k_conv: conv(src, "k_conv1d", kd)?,
            v_conv: conv(src, "v_conv1d", vd)?,
            o_norm: param(
                src,
                &format!("{prefix}.o_norm.weight"),
                [d.dv],
                Init::Ones,
                device,
            )?,
            o_proj: lin(src, "o_proj", vd, d.hidden)?,
            dims: d,
        })
    }

    pub fn save(&self, prefix: &str, out: &mut WeightSink) {
        for (n, l) in [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("b_proj", &self.b_proj),
            ("o_proj", &self.o_proj),
        ] {
            l.save(&format!("{prefix}.{n}"), out);
        }
        for (n, w) in [
            ("q_conv1d", &self.q_conv),
            ("k_conv1d", &self.k_conv),
            ("v_conv1d", &self.v_conv),
        ] {
            export_conv(out, &format!("{prefix}.{n}.weight"), w);
        }
        export(out, &format!("{prefix}.o_norm.weight"), &self.o_norm);
    }

    /// As [`GatedDeltaNet::forward`]; the state's conv history holds [q | k | v] channels.
    /// With `docs` (the documents of packed rows), the state does not cross from one document
    /// into the next.
    pub fn forward(
        &self,
        x: Tensor<3>,
        state: Option<&mut DeltaState>,
        docs: Option<&Documents>,
    ) -> Tensor<3> {
        let d = self.dims;
        let [b, l, _] = x.dims();
        let dtype = x.dtype();
        let device = x.device();
        let (kd, vd) = (d.key_dim(), d.value_dim());
        let mut zero;
        let st = match state {
            Some(s) => s,
            None => {
                zero = d.zero_state(b, &device);
                &mut zero
            }
        };
        // One conv history for the three convs, as [q | k | v] channels.
        let hist = |from: usize, n: usize, input: Tensor<3>, w: Tensor<2>| {
            let mut h = st.conv.clone().narrow(2, from, n);
            let y = causal_conv_silu(&mut h, input, w, None, docs);
            (y, h)
        };
        // One GEMM for the three projections where rows are many (see `linear_fused`).
        let [q, k, v]: [Tensor<3>; 3] =
            linear_fused(x.clone(), &[&self.q_proj, &self.k_proj, &self.v_proj])
                .try_into()
                .expect("three projections give three outputs");
        let (q, hq) = hist(0, kd, q, self.q_conv.val());
        let (k, hk) = hist(kd, kd, k, self.k_conv.val());
        let (v, hv) = hist(2 * kd, vd, v, self.v_conv.val());
        st.conv = Tensor::cat(vec![hq, hk, hv], 2);
        let beta = sigmoid(to_dtype(self.b_proj.forward(x), DType::F32));
        let heads = |m: Tensor<3>, dim: usize| m.reshape([b, l, d.v_heads, dim]).swap_dims(1, 2);
        let inputs = DeltaInputs {
            q: heads(
                l2_normalize(q.reshape([b, l, d.v_heads, d.dk])).reshape([b, l, kd]),
                d.dk,
            ),
            k: heads(
                l2_normalize(k.reshape([b, l, d.v_heads, d.dk])).reshape([b, l, kd]),
                d.dk,
            ),
            v: heads(v, d.dv),
            beta: beta.swap_dims(1, 2),
            g: None,
        };
        let o = if l == 1 {
            delta_rule::recurrent(inputs, &mut st.state)
        } else {
            delta_rule::chunked(inputs, d.chunk, &mut st.state, docs)
        };
        let o = o.swap_dims(1, 2);
        let inv = (o.clone().square().mean_dim(3) + d.eps).sqrt().recip();
        let o = o * inv * to_dtype(self.o_norm.val(), DType::F32).reshape([1, 1, 1, d.dv]);
        self.o_proj.forward(to_dtype(o.reshape([b, l, vd]), dtype))
    }
}
