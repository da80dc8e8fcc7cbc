//! The hybrid blocks against transformers (fixtures of `tests/fixtures/gen_hybrid.py`):
//! `Mamba2ForCausalLM` and `NemotronHForCausalLM` (Mamba2, relu² MLP, attention without
//! RoPE), every hidden state and the logits over 20 tokens (3 SSD chunks of 8), and cached
//! decoding: the prefill's last logits and two greedy steps through the state cache, against
//! transformers' own cached steps and against recomputing the whole sequence.

use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_models::hybrid::qwen3_next::{Qwen3Next, Qwen3NextCache};
use ember_models::hybrid::stack::{HybridCache, HybridLM};

use crate::common::*;

/// What the parity check needs of a model family.
trait Reference: Sized {
    type Cache;
    fn load(name: &str, dev: &Device) -> Self;
    fn layers(&self) -> usize;
    fn hidden(&self, ids: Tensor<2, Int>) -> Vec<Tensor<3>>;
    fn logits(&self, ids: Tensor<2, Int>, cache: Option<&mut Self::Cache>) -> Tensor<3>;
    fn cache(&self, batch: usize, max_len: usize, dev: &Device) -> Self::Cache;
}

impl Reference for HybridLM {
    type Cache = HybridCache;
    fn load(name: &str, dev: &Device) -> Self {
        HybridLM::from_pretrained(&fixture_dir(name), dev).unwrap()
    }
    fn layers(&self) -> usize {
        self.config.layers.len()
    }
    fn hidden(&self, ids: Tensor<2, Int>) -> Vec<Tensor<3>> {
        self.hidden_states(ids, None)
    }
    fn logits(&self, ids: Tensor<2, Int>, cache: Option<&mut HybridCache>) -> Tensor<3> {
        self.forward(ids, cache)
    }
    fn cache(&self, batch: usize, max_len: usize, dev: &Device) -> HybridCache {
        self.new_cache(batch, max_len, dev)
    }
}

impl Reference for Qwen3Next {
    type Cache = Qwen3NextCache;
    fn load(name: &str, dev: &Device) -> Self {
        Qwen3Next::from_pretrained(&fixture_dir(name), dev).unwrap()
    }
    fn layers(&self) -> usize {
        self.layers.len()
    }
    fn hidden(&self, ids: Tensor<2, Int>) -> Vec<Tensor<3>> {
        self.hidden_states(ids, None)
    }
    fn logits(&self, ids: Tensor<2, Int>, cache: Option<&mut Qwen3NextCache>) -> Tensor<3> {
        self.forward(ids, cache)
    }
    fn cache(&self, batch: usize, max_len: usize, dev: &Device) -> Qwen3NextCache {
        self.new_cache(batch, max_len, dev)
    }
}

fn check<M: Reference>(name: &str, tol_steps: f64) {
    let fx = load_fixtures(name);
    let dev = device();
    let model = M::load(name, &dev);
    let ids = fx["input_ids"].ids(&dev);
    let hidden: Vec<Vec<f64>> = model.hidden(ids.clone()).into_iter().map(values).collect();
    let n = model.layers();
    assert_eq!(hidden.len(), n + 1);
    // NemotronH lists the embeddings, each layer's input and the final norm's output, as
    // ours; Mamba2 lists each layer's output (no embeddings), then the final norm's output.
    let pairs: Vec<(usize, usize)> = if name == "mamba2" {
        (0..n - 1).map(|i| (i + 1, i)).chain([(n, n)]).collect()
    } else {
        (0..=n).map(|i| (i, i)).collect()
    };
    for (ours, theirs) in pairs {
        let key = format!("hidden_states.{theirs}");
        assert_close(
            &format!("{name} {key}"),
            &hidden[ours],
            &fx[&key].values,
            1e-4,
        );
    }
    let logits = values(model.logits(ids.clone(), None));
    assert_close_reported(
        &format!("{name} logits"),
        &logits,
        &fx["logits"].values,
        1e-4,
    );

    // Cached: prefill, then the reference's two greedy tokens one at a time.
    let [b, s] = ids.dims();
    let mut cache = model.cache(b, s + 2, &dev);
    let pre = model.logits(ids.clone(), Some(&mut cache));
    let vocab = pre.dims()[2];
    let last = values(pre.narrow(1, s - 1, 1).reshape([b, vocab]));
    assert_close(
        &format!("{name} prefill"),
        &last,
        &fx["decode.prefill_logits"].values,
        1e-4,
    );
    let toks = fx["decode.tokens"].rows();
    let mut steps = Vec::new();
    for j in 0..2 {
        let col: Vec<i64> = toks.iter().map(|r| r[j] as i64).collect();
        let t = Tensor::<2, Int>::from_data(TensorData::new(col, [b, 1]), &dev);
        steps.push(model.logits(t, Some(&mut cache)));
    }
    let steps = values(Tensor::cat(steps, 1));
    assert_close_reported(
        &format!("{name} decode steps"),
        &steps,
        &fx["decode.step_logits"].values,
        tol_steps,
    );
    // Against our own recomputation of all 22 tokens.
    let full_ids: Vec<i64> = fx["input_ids"]
        .rows()
        .iter()
        .zip(&toks)
        .flat_map(|(r, t)| r.iter().chain(t).map(|&x| x as i64).collect::<Vec<_>>())
        .collect();
    let full = model.logits(
        Tensor::<2, Int>::from_data(TensorData::new(full_ids, [b, s + 2]), &dev),
        None,
    );
    let tail = values(full.narrow(1, s, 2));
    assert_close(&format!("{name} decode vs recompute"), &steps, &tail, 1e-4);
    let reference_tail: Vec<f64> = fx["decode.full_logits"]
        .values
        .chunks(vocab)
        .enumerate()
        .filter(|(i, _)| i % (s + 2) >= s)
        .flat_map(|(_, c)| c.to_vec())
        .collect();
    assert_close(&format!("{name} recompute"), &tail, &reference_tail, 1e-4);
}

#[test]
fn mamba2_matches_transformers_prefill_and_decode() {
    check::<HybridLM>("mamba2", 1e-4);
}

#[test]
fn nemotron_h_matches_transformers_prefill_and_decode() {
    check::<HybridLM>("nemotron_h", 1e-4);
}

#[test]
fn qwen3_next_gated_deltanet_matches_transformers_prefill_and_decode() {
    check::<Qwen3Next>("qwen3_next", 1e-4);
}

/// A random mixer's chunked scan at several chunk sizes, its recurrent form token by token,
/// and a scan continued from a state part-way, all give the same outputs and final state.
#[test]
fn mamba2_chunked_and_recurrent_forms_agree() {
    use ember_models::hybrid::mamba2::{Mamba2Dims, Mamba2Mixer};
    use ember_models::weights::RandomInit;
    let dev = device();
    let dims = |chunk| Mamba2Dims {
        hidden: 32,
        heads: 4,
        head_dim: 8,
        state: 8,
        groups: 2,
        conv_kernel: 4,
        chunk,
        eps: 1e-5,
        dt_limit: (0.0, f64::INFINITY),
        conv_bias: true,
        proj_bias: false,
    };
    let mixer =
        |chunk| Mamba2Mixer::load(&mut RandomInit::new(7), "m", dims(chunk), 0.2, &dev).unwrap();
    let (b, l) = (2, 23);
    let x = Tensor::<3>::random(
        [b, l, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    // Recurrent reference: one token at a time.
    let m = mixer(8);
    let mut st = m.dims.zero_state(b, &dev);
    let steps: Vec<Tensor<3>> = (0..l)
        .map(|t| m.forward(x.clone().narrow(1, t, 1), Some(&mut st)))
        .collect();
    let recurrent = values(Tensor::cat(steps, 1));
    let final_state = values(st.state.clone());
    for chunk in [1, 3, 8, 16, 64] {
        let m = mixer(chunk);
        let mut st = m.dims.zero_state(b, &dev);
        let y = values(m.forward(x.clone(), Some(&mut st)));
        assert_close(&format!("chunk {chunk} vs recurrent"), &y, &recurrent, 1e-4);
        assert_close(
            &format!("chunk {chunk} final state"),
            &values(st.state),
            &final_state,
            1e-4,
        );
    }
    // A prefill of 10 tokens, then the other 13 as one chunked call from that state.
    let m = mixer(4);
    let mut st = m.dims.zero_state(b, &dev);
    let first = m.forward(x.clone().narrow(1, 0, 10), Some(&mut st));
    let rest = m.forward(x.clone().narrow(1, 10, l - 10), Some(&mut st));
    assert_close(
        "continued scan",
        &values(Tensor::cat(vec![first, rest], 1)),
        &recurrent,
        1e-4,
    );
}

/// The delta rule's chunked (UT-transform) form against its recurrent form, with and
/// without the gate, from a non-zero initial state, over several chunk sizes.
#[test]
fn delta_rule_chunked_and_recurrent_forms_agree() {
    use burn::tensor::activation::{log_sigmoid, sigmoid};
    use burn::tensor::Distribution;
    use ember_models::hybrid::delta_rule::{chunked, recurrent, DeltaInputs};
    let dev = device();
    let (b, h, l, dk, dv) = (2, 3, 37, 8, 6);
    let normal =
        |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let unit = |m: Tensor<4>| {
        let n = m.clone().square().sum_dim(3).add_scalar(1e-6).sqrt();
        m / n
    };
    let q = unit(normal([b, h, l, dk]));
    let k = unit(normal([b, h, l, dk]));
    let v = normal([b, h, l, dv]);
    let beta = sigmoid(normal([b, h, l, 1]).reshape([b, h, l]));
    let g = log_sigmoid(normal([b, h, l, 1]).reshape([b, h, l]).add_scalar(2.0));
    let s0 = normal([b, h, dk, dv]).mul_scalar(0.3);
    for gated in [false, true] {
        let inputs = || DeltaInputs {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            beta: beta.clone(),
            g: gated.then(|| g.clone()),
        };
        let mut s_rec = s0.clone();
        let want = values(recurrent(inputs(), &mut s_rec));
        let want_state = values(s_rec);
        for chunk in [1, 4, 8, 16, 64] {
            let mut s = s0.clone();
            let got = values(chunked(inputs(), chunk, &mut s, None));
            let what = format!("gated {gated}, chunk {chunk}");
            assert_close(&what, &got, &want, 1e-4);
            assert_close(&format!("{what} state"), &values(s), &want_state, 1e-4);
        }
    }
}
