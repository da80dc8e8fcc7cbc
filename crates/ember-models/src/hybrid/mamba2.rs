//! The Mamba2 mixer (transformers `Mamba2Mixer` / `NemotronHMamba2Mixer`): `in_proj` to
//! [z | xBC | dt], a causal depthwise conv (then SiLU) over xBC, the selective state space
//! with A = −exp(A_log) and dt = softplus(dt + dt_bias), a gated RMSNorm (× silu(z), then
//! normalised in `n_groups` groups) and `out_proj`.
//!
//! Training and prefill run the chunked SSD form (the state-space dual: quadratic attention-
//! like products inside chunks of `chunk_size`, a linear recurrence over chunk states);
//! decoding runs the recurrent single-step update. Both read and write a [`Mamba2State`].

use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softplus};
use burn::tensor::{DType, Device, Tensor};

use super::{
    causal_conv_silu, conv_param, export_conv, repeat_heads, segment_decay, Documents,
    RecurrentState,
};
use crate::layers::linear::Linear;
use crate::layers::to_dtype;
use crate::weights::{export, param, Init, WeightSink, WeightSource};

/// What the SSM scans, per head: x `[b, l, heads, head_dim]`, dt `[b, l, heads]`, A
/// `[heads]`, B and C `[b, l, heads, state]`, in f32.
struct SsmInputs {
    x: Tensor<4>,
    dt: Tensor<3>,
    a: Tensor<1>,
    bm: Tensor<4>,
    cm: Tensor<4>,
}

/// Shape and numerics of one mixer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mamba2Dims {
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub state: usize,
    pub groups: usize,
    pub conv_kernel: usize,
    pub chunk: usize,
    pub eps: f64,
    /// dt is clamped to [min, max] after the softplus.
    pub dt_limit: (f64, f64),
    pub conv_bias: bool,
    pub proj_bias: bool,
}

impl Mamba2Dims {
    /// The SSM's inner width, heads × head_dim.
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Channels the conv runs over: x, B and C.
    pub fn conv_dim(&self) -> usize {
        self.inner() + 2 * self.groups * self.state
    }
}

/// A mixer's decoding state: the last `conv_kernel − 1` conv inputs and the SSM state
/// `[batch, heads, head_dim, state]`.
pub type Mamba2State = RecurrentState;

impl Mamba2Dims {
    pub fn zero_state(&self, batch: usize, device: &Device) -> Mamba2State {
        RecurrentState::zeros(
            batch,
            self.conv_kernel,
            self.conv_dim(),
            [self.heads, self.head_dim, self.state],
            device,
        )
    }
}

#[derive(Module, Debug)]
pub struct Mamba2Mixer {
    pub in_proj: Linear,
    /// `[conv_dim, kernel]` (transformers stores `[conv_dim, 1, kernel]`).
    pub conv_weight: Param<Tensor<2>>,
    pub conv_bias: Option<Param<Tensor<1>>>,
    pub dt_bias: Param<Tensor<1>>,
    pub a_log: Param<Tensor<1>>,
    pub d: Param<Tensor<1>>,
    pub norm_weight: Param<Tensor<1>>,
    pub out_proj: Linear,
    #[module(skip)]
    pub dims: Mamba2Dims,
}

impl Mamba2Mixer {
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: Mamba2Dims,
        std: f64,
        device: &Device,
    ) -> Result<Self> {
        let (inner, conv_dim, k) = (d.inner(), d.conv_dim(), d.conv_kernel);
        let conv_weight = conv_param(src, &format!("{prefix}.conv1d.weight"), conv_dim, k, device)?;
        let conv_bias = d
            .conv_bias
            .then(|| {
                param(
                    src,
                    &format!("{prefix}.conv1d.bias"),
                    [conv_dim],
                    Init::Zeros,
                    device,
                )
            })
            .transpose()?;
        let (lo, hi) = (d.dt_limit.0.max(1e-3), 0.1);
        Ok(Self {
            in_proj: Linear::load(
                src,
                &format!("{prefix}.in_proj"),
                d.hidden,
                inner + conv_dim + d.heads,
                d.proj_bias,
                std,
                device,
            )?,
            conv_weight,
            conv_bias,
            dt_bias: param(
                src,
                &format!("{prefix}.dt_bias"),
                [d.heads],
                Init::InvSoftplusLogUniform(lo, hi),
                device,
            )?,
            a_log: param(
                src,
                &format!("{prefix}.A_log"),
                [d.heads],
                Init::LogArange,
                device,
            )?,
            d: param(src, &format!("{prefix}.D"), [d.heads], Init::Ones, device)?,
            norm_weight: param(
                src,
                &format!("{prefix}.norm.weight"),
                [inner],
                Init::Ones,
                device,
            )?,
            out_proj: Linear::load(
                src,
                &format!("{prefix}.out_proj"),
                inner,
                d.hidden,
                d.proj_bias,
                std,
                device,
            )?,
            dims: d,
        })
    }

    pub fn save(&self, prefix: &str, out: &mut WeightSink) {
        self.in_proj.save(&format!("{prefix}.in_proj"), out);
        export_conv(out, &format!("{prefix}.conv1d.weight"), &self.conv_weight);
        if let Some(b) = &self.conv_bias {
            export(out, &format!("{prefix}.conv1d.bias"), b);
        }
        export(out, &format!("{prefix}.dt_bias"), &self.dt_bias);
        export(out, &format!("{prefix}.A_log"), &self.a_log);
        export(out, &format!("{prefix}.D"), &self.d);
        export(out, &format!("{prefix}.norm.weight"), &self.norm_weight);
        self.out_proj.save(&format!("{prefix}.out_proj"), out);
    }

    /// `[batch, seq, hidden]` → the same shape. With a state, the sequence continues it (the
    /// conv sees the previous inputs, the scan starts from the SSM state) and the state is
    /// advanced. One token takes the recurrent step, longer inputs the chunked scan.
    pub fn forward(&self, x: Tensor<3>, state: Option<&mut Mamba2State>) -> Tensor<3> {
        self.forward_masked(x, state, None, None)
    }

    /// As [`Mamba2Mixer::forward`], with `keep` `[batch, seq]` 0 at left padding: a padded
    /// position neither writes to nor decays the state (as transformers masks its inputs);
    /// and with `docs`, the documents of packed rows, whose state does not cross from one
    /// document into the next.
    pub fn forward_masked(
        &self,
        x: Tensor<3>,
        state: Option<&mut Mamba2State>,
        keep: Option<Tensor<2>>,
        docs: Option<&Documents>,
    ) -> Tensor<3> {
        let d = self.dims;
        let [b, l, _] = x.dims();
        let dtype = x.dtype();
        let (inner, conv_dim) = (d.inner(), d.conv_dim());
        let mask3 = |t: Tensor<3>| match &keep {
            Some(k) => t * to_dtype(k.clone(), DType::F32).reshape([b, l, 1]),
            None => t,
        };
        // A padded position's input is zero, as transformers masks it.
        let x = match &keep {
            Some(k) => x * k.clone().reshape([b, l, 1]).cast(dtype),
            None => x,
        };
        let proj = self.in_proj.forward(x);
        let gate = proj.clone().narrow(2, 0, inner);
        let xbc = proj.clone().narrow(2, inner, conv_dim);
        let dt = to_dtype(proj.narrow(2, inner + conv_dim, d.heads), DType::F32);
        let device = gate.device();
        let mut zero_state;
        let st = match state {
            Some(s) => s,
            None => {
                zero_state = d.zero_state(b, &device);
                &mut zero_state
            }
        };
        let xbc = mask3(causal_conv_silu(
            &mut st.conv,
            xbc,
            self.conv_weight.val(),
            self.conv_bias.as_ref().map(|b| b.val()),
            docs,
        ));
        let gs = d.groups * d.state;
        let xs = xbc
            .clone()
            .narrow(2, 0, inner)
            .reshape([b, l, d.heads, d.head_dim]);
        let bm = self.per_head(xbc.clone().narrow(2, inner, gs), b, l);
        let cm = self.per_head(xbc.narrow(2, inner + gs, gs), b, l);
        let dt = softplus(
            dt + to_dtype(self.dt_bias.val(), DType::F32).reshape([1, 1, d.heads]),
            1.0,
        )
        .clamp(d.dt_limit.0, d.dt_limit.1);
        let inputs = SsmInputs {
            x: xs,
            dt: mask3(dt),
            a: to_dtype(self.a_log.val(), DType::F32).exp().neg(),
            bm,
            cm,
        };
        let skip =
            inputs.x.clone() * to_dtype(self.d.val(), DType::F32).reshape([1, 1, d.heads, 1]);
        let y = skip
            + if l == 1 {
                self.step(inputs, st)
            } else {
                self.scan(inputs, st, docs)
            };
        let y = self.gated_norm(y.reshape([b, l, inner]), to_dtype(gate, DType::F32));
        self.out_proj.forward(to_dtype(y, dtype))
    }

    /// `[b, l, groups·state]` → `[b, l, heads, state]`: head h reads group h / (heads / groups).
    fn per_head(&self, t: Tensor<3>, b: usize, l: usize) -> Tensor<4> {
        let d = self.dims;
        repeat_heads(t.reshape([b, l, d.groups, d.state]), d.heads / d.groups)
    }

    fn gated_norm(&self, y: Tensor<3>, gate: Tensor<3>) -> Tensor<3> {
        let d = self.dims;
        let [b, l, inner] = y.dims();
        let y = y * silu(gate);
        let g = y.reshape([b, l, d.groups, inner / d.groups]);
        let inv = (g.clone().square().mean_dim(3) + d.eps).sqrt().recip();
        (g * inv).reshape([b, l, inner])
            * to_dtype(self.norm_weight.val(), DType::F32).reshape([1, 1, inner])
    }

    /// One token: h ← h·exp(dt·A) + dt·x⊗B, y = h·C. Inputs `[b, 1, ..]`.
    fn step(&self, i: SsmInputs, st: &mut Mamba2State) -> Tensor<4> {
        let SsmInputs { x, dt, a, bm, cm } = i;
        let d = self.dims;
        let [b, _, h, p] = x.dims();
        let n = d.state;
        let x = x.reshape([b, h, p]);
        let dt = dt.reshape([b, h]);
        let decay = (dt.clone() * a.reshape([1, h])).exp().reshape([b, h, 1, 1]);
        let dbx =
            (x.clone() * dt.reshape([b, h, 1])).reshape([b, h, p, 1]) * bm.reshape([b, h, 1, n]);
        st.state = st.state.clone() * decay + dbx;
        let y = st
            .state
            .clone()
            .matmul(cm.reshape([b, h, n, 1]))
            .reshape([b, h, p]);
        y.reshape([b, 1, h, p])
    }

    /// The chunked SSD scan over `[b, l, heads, ..]`, from and into `st.state`.
    fn scan(&self, i: SsmInputs, st: &mut Mamba2State, docs: Option<&Documents>) -> Tensor<4> {
        let SsmInputs { x, dt, a, bm, cm } = i;
        let d = self.dims;
        let [b, l, h, p] = x.dims();
        let n = d.state;
        let t = d.chunk;
        let c = l.div_ceil(t);
        let pad = c * t - l;
        let device = x.device();
        let pad_seq = |v: Tensor<4>| {
            if pad == 0 {
                v
            } else {
                let [b, _, x1, x2] = v.dims();
                Tensor::cat(vec![v, Tensor::zeros([b, pad, x1, x2], &device)], 1)
            }
        };
        // Discretised inputs, padded with zeros (a zero step neither decays nor adds).
        let xdt = pad_seq(x * dt.clone().reshape([b, l, h, 1]));
        let adt = pad_seq((dt * a.reshape([1, 1, h])).reshape([b, l, h, 1])).reshape([b, c, t, h]);
        let bm = pad_seq(bm);
        let cm = pad_seq(cm);
        // [b, c, h, t, ·]
        let xc = xdt.reshape([b, c, t, h, p]).permute([0, 1, 3, 2, 4]);
        let bc = bm.reshape([b, c, t, h, n]).permute([0, 1, 3, 2, 4]);
        let cc = cm.reshape([b, c, t, h, n]).permute([0, 1, 3, 2, 4]);
        let acum = adt.permute([0, 1, 3, 2]).cumsum(3); // [b, c, h, t]
        let masks = docs.map(|d| d.chunks(t));
        // Each decay below, times its mask: zero across a document boundary.
        let cut = |decay: Tensor<5>, mask: Option<Tensor<5>>| match mask {
            Some(m) => decay * m,
            None => decay,
        };
        // 1. Within chunks: y_l = Σ_{s≤l} (C_l·B_s) exp(A_l − A_s) x_s.
        let decay_in = cut(
            segment_decay(acum.clone()),
            masks
                .as_ref()
                .map(|m| m.within.clone().reshape([b, c, 1, t, t])),
        );
        let scores = cc.clone().matmul(bc.clone().swap_dims(3, 4)) * decay_in;
        let y_diag = scores.matmul(xc.clone());
        // 2. Each chunk's own end state: Σ_l exp(A_end − A_l) x_l ⊗ B_l  → [b, c, h, p, n].
        let last = acum.clone().narrow(3, t - 1, 1);
        let to_end = cut(
            (last.clone() - acum.clone()).exp().reshape([b, c, h, t, 1]),
            masks
                .as_ref()
                .map(|m| m.to_end.clone().reshape([b, c, 1, t, 1])),
        );
        let states = xc.swap_dims(3, 4).matmul(bc * to_end);
        // 3. Across chunks: the state entering chunk i, from the initial state and chunks < i.
        let init = st.state.clone().reshape([b, 1, h, p, n]);
        let all = Tensor::cat(vec![init, states], 1).reshape([b, c + 1, h, p * n]);
        let ends = last.reshape([b, c, h]).permute([0, 2, 1]); // [b, h, c]
        let ends = Tensor::cat(vec![Tensor::zeros([b, h, 1], &device), ends], 2).cumsum(2);
        let decay_across = cut(
            segment_decay(ends.reshape([b, h, 1, c + 1])),
            masks
                .as_ref()
                .map(|m| m.across.clone().reshape([b, 1, 1, c + 1, c + 1])),
        )
        .reshape([b, h, c + 1, c + 1]);
        let entering = decay_across.matmul(all.permute([0, 2, 1, 3])); // [b, h, c+1, p·n]
        st.state = entering.clone().narrow(2, c, 1).reshape([b, h, p, n]);
        let entering = entering
            .narrow(2, 0, c)
            .reshape([b, h, c, p, n])
            .permute([0, 2, 1, 3, 4]); // [b, c, h, p, n]
                                       // 4. The entering state's contribution: exp(A_l) C_l · state.
        let from_start = cut(
            acum.exp().reshape([b, c, h, t, 1]),
            masks.map(|m| m.from_start.reshape([b, c, 1, t, 1])),
        );
        let y_off = cc.matmul(entering.swap_dims(3, 4)) * from_start;
        let y = (y_diag + y_off)
            .permute([0, 1, 3, 2, 4])
            .reshape([b, c * t, h, p]);
        y.narrow(1, 0, l)
    }
}
