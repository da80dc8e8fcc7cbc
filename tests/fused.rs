//! Fused kernels against the unfused paths they replace: the same values and the same
//! gradients, on flex here and on each GPU backend in `backends.rs`.

use burn::tensor::{DType, Device, Distribution, Int, Tensor, TensorData};
use ember_models::layers::linear::{linear, linear_fused, Linear, FUSE_MIN_ROWS};
use ember_models::layers::rms_norm::RmsNorm;
use ember_train::objectives::linear_ce::{chunk_rows, linear_cross_entropy, linear_logprobs};
use ember_train::objectives::lm::{cross_entropy, token_logprobs};
use ember_train::trainer::NextTokenModel;

use crate::common::*;
use crate::train::{tiny_model, tokens};

/// Loss and gradients (hidden, head) of the chunked fused loss and of the full-logits
/// loss, for the same leaves; `dtype` is the compute dtype the hidden states are cast to.
fn both_losses(
    dev: &Device,
    dtype: DType,
    weighted: bool,
    chunk: usize,
) -> [(f64, Vec<f64>, Vec<f64>); 2] {
    let (n, d, v) = (37, 16, 50);
    let normal = Distribution::Normal(0.0, 1.0);
    let hidden0 = Tensor::<2>::random([n, d], normal, dev);
    let head0 = Tensor::<2>::random([v, d], normal, dev) * 0.5;
    let targets: Vec<i32> = (0..n).map(|i| ((i * 7 + 3) % v) as i32).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), dev);
    // Every third token weightless, the others 0.5 or 2: the mean must skip and weigh them.
    let w: Vec<f32> = (0..n).map(|i| [0.0, 0.5, 2.0][i % 3]).collect::<Vec<_>>();
    let weights = weighted.then(|| Tensor::<1>::from_data(TensorData::new(w, [n]), dev));
    let run = |fused: bool| {
        let hidden = hidden0.clone().require_grad();
        let head = head0.clone().require_grad();
        let h = hidden.clone().cast(dtype);
        let loss = if fused {
            linear_cross_entropy(h, head.clone(), targets.clone(), weights.clone(), chunk)
        } else {
            let logits = linear(h.reshape([1, n, d]), head.clone(), None);
            cross_entropy(
                logits,
                targets.clone().reshape([1, n]),
                weights.clone().map(|w| w.reshape([1, n])),
            )
        };
        let g = loss.clone().backward();
        let grad = |t: &Tensor<2>| values(t.grad(&g).unwrap().cast(DType::F32));
        (values(loss)[0], grad(&hidden), grad(&head))
    };
    [run(true), run(false)]
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    max_abs_diff(a, b) / scale
}

/// Each named part of `ours` within `tol` of `reference`, relative to the reference's largest
/// magnitude.
fn assert_parts_close(
    what: &str,
    names: &[&str],
    ours: &[Vec<f64>],
    reference: &[Vec<f64>],
    tol: f64,
) {
    for (part, (a, r)) in names.iter().zip(ours.iter().zip(reference)) {
        let e = rel_diff(a, r);
        assert!(e <= tol, "{what}: {part} differs by {e:.2e}");
    }
}

/// The fused loss's value and both gradients against the full-logits loss on `dev`.
pub(crate) fn check_linear_cross_entropy(dev: &Device, dtype: DType, tol: f64) {
    for weighted in [false, true] {
        // One row per chunk, chunks that do not divide the tokens, one chunk, a chunk larger
        // than the input.
        for chunk in [1, 5, 37, 100] {
            let [(lf, hf, wf), (lu, hu, wu)] = both_losses(dev, dtype, weighted, chunk);
            let what = format!("{dtype:?} weighted={weighted} chunk={chunk}");
            assert!(
                (lf - lu).abs() <= tol * lu.abs(),
                "{what}: loss {lf} vs {lu}"
            );
            assert_parts_close(&what, &["d hidden", "d head"], &[hf, wf], &[hu, wu], tol);
        }
    }
}

/// Fused log-probs and entropies, and the gradients of a PPO-like ratio loss through them,
/// against [`token_logprobs`] of the full logits on `dev`.
pub(crate) fn check_linear_logprobs(dev: &Device, dtype: DType, tol: f64) {
    let (n, d, v): (usize, usize, usize) = (37, 16, 50);
    let normal = Distribution::Normal(0.0, 1.0);
    let hidden0 = Tensor::<2>::random([n, d], normal, dev);
    let head0 = Tensor::<2>::random([v, d], normal, dev) * 0.5;
    let targets: Vec<i32> = (0..n).map(|i| ((i * 11 + 5) % v) as i32).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), dev);
    let adv = Tensor::<1>::random([n], normal, dev);
    for temperature in [1.0, 0.7] {
        for chunk in [1, 5, 37, 100] {
            let run = |fused: bool| {
                let hidden = hidden0.clone().require_grad();
                let head = head0.clone().require_grad();
                let h = hidden.clone().cast(dtype);
                let (logp, entropy) = if fused {
                    linear_logprobs(h, head.clone(), targets.clone(), temperature, chunk)
                } else {
                    let logits = linear(h.reshape([1, n, d]), head.clone(), None);
                    let (lp, e) =
                        token_logprobs(logits, targets.clone().reshape([1, n]), temperature);
                    (lp.reshape([n]), e.reshape([n]))
                };
                // A ratio against the detached log-probs, as the clipped surrogate has.
                let ratio = (logp.clone() - logp.clone().detach() + 0.1).exp();
                let g = (ratio * adv.clone()).sum().backward();
                let grad = |t: &Tensor<2>| values(t.grad(&g).unwrap().cast(DType::F32));
                [values(logp), values(entropy), grad(&hidden), grad(&head)]
            };
            let (ours, reference) = (run(true), run(false));
            let what = format!("{dtype:?} T={temperature} chunk={chunk}");
            let names = ["logp", "entropy", "d hidden", "d head"];
            assert_parts_close(&what, &names, &ours, &reference, tol);
        }
    }
}

/// Several projections of one input as one GEMM (`linear_fused`) against each run alone:
/// the outputs and the gradients of the input, the weights and a bias.
pub(crate) fn check_linear_fused(dev: &Device, dtype: DType, tol: f64) {
    let (b, s, d) = (2, FUSE_MIN_ROWS / 2 + 22, 16);
    let normal = Distribution::Normal(0.0, 1.0);
    let x0 = Tensor::<3>::random([b, s, d], normal, dev);
    let layer = |out: usize, bias: bool| Linear {
        weight: burn::module::Param::from_tensor(Tensor::random([out, d], normal, dev)),
        bias: bias.then(|| burn::module::Param::from_tensor(Tensor::random([out], normal, dev))),
    };
    // q, k and v shaped: a wide one, then two narrow ones, one with a bias.
    let layers = [layer(24, false), layer(8, true), layer(8, false)];
    let probes: Vec<Tensor<3>> = [24, 8, 8]
        .iter()
        .map(|&o| Tensor::random([b, s, o], normal, dev))
        .collect();
    let run = |fused: bool| {
        let x = x0.clone().require_grad();
        let xc = x.clone().cast(dtype);
        let ys = if fused {
            linear_fused(xc, &layers.each_ref())
        } else {
            layers.iter().map(|l| l.forward(xc.clone())).collect()
        };
        let loss = ys
            .iter()
            .zip(&probes)
            .map(|(y, p)| (y.clone().cast(DType::F32) * p.clone()).sum())
            .reduce(|a, b| a + b)
            .unwrap();
        let g = loss.backward();
        let grad = |t: Tensor<2>| values(t.grad(&g).unwrap().cast(DType::F32));
        let mut parts: Vec<Vec<f64>> = ys.into_iter().map(|y| values(y.cast(DType::F32))).collect();
        parts.push(values(x.grad(&g).unwrap().cast(DType::F32)));
        parts.extend(layers.iter().map(|l| grad(l.weight.val())));
        let bias = layers[1].bias.as_ref().unwrap().val();
        parts.push(values(bias.grad(&g).unwrap().cast(DType::F32)));
        parts
    };
    let (ours, reference) = (run(true), run(false));
    let names = ["q", "k", "v", "d x", "d wq", "d wk", "d wv", "d bk"];
    assert_parts_close(&format!("{dtype:?}"), &names, &ours, &reference, tol);
}

#[test]
fn fused_projections_match_separate_ones() {
    let dev = device().autodiff();
    check_linear_fused(&dev, DType::F32, 1e-5);
    check_linear_fused(&dev, DType::BF16, 2e-2);
}

/// RMSNorm's own backward against autodiff through the same formula, at ranks 3 and 4 (the
/// hidden states and QK-norm's heads), for the output and both gradients.
pub(crate) fn check_rms_norm(dev: &Device, dtype: DType, tol: f64) {
    fn case<const D: usize>(dev: &Device, dtype: DType, tol: f64, shape: [usize; D]) {
        let normal = Distribution::Normal(0.0, 1.0);
        let d = shape[D - 1];
        let x0 = Tensor::<D>::random(shape, normal, dev) * 3.0;
        let w0 = Tensor::<1>::random([d], normal, dev) + 1.0;
        let probe = Tensor::<D>::random(shape, normal, dev);
        let run = |own: bool| {
            let x = x0.clone().require_grad();
            let norm = RmsNorm {
                weight: burn::module::Param::from_tensor(w0.clone()),
                eps: 1e-6,
            };
            let xc = x.clone().cast(dtype);
            let y = if own {
                norm.forward(xc)
            } else {
                // The formula as autodiff records it, op by op.
                let x32 = xc.cast(DType::F32);
                let inv = (x32.clone().square().mean_dim(D - 1) + 1e-6).sqrt().recip();
                (x32 * inv).cast(dtype) * norm.weight.val().cast(dtype).unsqueeze::<D>()
            };
            let g = (y.clone().cast(DType::F32) * probe.clone())
                .sum()
                .backward();
            let dw = norm.weight.val().grad(&g).unwrap();
            [
                values(y.cast(DType::F32)),
                values(x.grad(&g).unwrap().cast(DType::F32)),
                values(dw.cast(DType::F32)),
            ]
        };
        let (ours, reference) = (run(true), run(false));
        let what = format!("{dtype:?} {shape:?}");
        assert_parts_close(&what, &["y", "d x", "d weight"], &ours, &reference, tol);
        assert!(reference[1].iter().any(|g| g.abs() > 1e-3));
    }
    case(dev, dtype, tol, [2, 5, 16]);
    case(dev, dtype, tol, [2, 3, 4, 8]);
}

#[test]
fn rms_norm_backward_matches_autodiff() {
    let dev = device().autodiff();
    check_rms_norm(&dev, DType::F32, 1e-5);
    check_rms_norm(&dev, DType::BF16, 2e-2);
}

#[test]
fn fused_linear_logprobs_match_the_full_logits_and_their_gradients() {
    let dev = device().autodiff();
    check_linear_logprobs(&dev, DType::F32, 1e-5);
    check_linear_logprobs(&dev, DType::BF16, 2e-2);
}

#[test]
fn fused_linear_cross_entropy_matches_the_full_logits_loss_and_gradients() {
    let dev = device().autodiff();
    check_linear_cross_entropy(&dev, DType::F32, 1e-5);
    check_linear_cross_entropy(&dev, DType::BF16, 2e-2);
}

#[test]
fn fused_loss_trains_qwen3_exactly_as_the_full_logits_loss() {
    for tied in [false, true] {
        qwen3_gradients_match(tied);
    }
}

/// Tied, the head is the embedding, so its gradient sums the surrogate's and the lookup's.
fn qwen3_gradients_match(tied: bool) {
    let mut model = tiny_model(4);
    if tied {
        model.lm_head = None;
        model.config.tie_word_embeddings = true;
    }
    let dev = device().autodiff();
    let x = tokens(&[vec![1, 5, 9, 2, 7, 3], vec![8, 8, 1, 0, 4, 6]], &dev);
    let y = tokens(&[vec![5, 9, 2, 7, 3, 4], vec![8, 1, 0, 4, 6, 2]], &dev);
    let pos = Tensor::<1, Int>::arange(0..6, &dev)
        .reshape([1, 6])
        .expand([2, 6]);
    let grads = |fused: bool| {
        let loss = if fused {
            let h = model.packed_hidden(x.clone(), pos.clone(), None);
            let head = model.head_weight();
            let rows = chunk_rows(head.dims()[0], &head.device()).min(5);
            linear_cross_entropy(
                h.reshape([12, 64]),
                head,
                y.clone().reshape([12]),
                None,
                rows,
            )
        } else {
            cross_entropy(
                model.packed_logits(x.clone(), pos.clone(), None),
                y.clone(),
                None,
            )
        };
        let g = loss.clone().backward();
        let emb = values(model.embed_tokens.val().grad(&g).unwrap());
        let q = values(
            model.layers[0]
                .self_attn
                .q_proj
                .weight
                .val()
                .grad(&g)
                .unwrap(),
        );
        (values(loss)[0], emb, q)
    };
    let (lf, ef, qf) = grads(true);
    let (lu, eu, qu) = grads(false);
    assert!((lf - lu).abs() < 1e-5, "tied={tied}: loss {lf} vs {lu}");
    assert!(rel_diff(&ef, &eu) < 1e-5, "tied={tied}: embedding gradient");
    assert!(rel_diff(&qf, &qu) < 1e-5, "tied={tied}: q_proj gradient");
    assert!(eu.iter().any(|g| g.abs() > 0.0) && qu.iter().any(|g| g.abs() > 0.0));

    // Without a graph (evaluation) the fused loss is just the loss.
    let valid = burn::module::Module::valid(&model);
    let h = valid.packed_hidden(x.inner(), pos.inner(), None);
    let plain = linear_cross_entropy(
        h.reshape([12, 64]),
        valid.head_weight(),
        y.inner().reshape([12]),
        None,
        5,
    );
    assert!((values(plain)[0] - lu).abs() < 1e-5);
}

/// One attention configuration: causal or not, a window, documents, trailing key padding.
struct AttnCase {
    causal: bool,
    window: Option<usize>,
    segments: Option<Vec<i32>>,
    pad_tail: usize,
}

/// Output and q/k/v gradients of blocked attention and of Burn's attention with the
/// equivalent dense mask, for the same leaves and output weights.
fn attention_pair(dev: &Device, dtype: DType, case: &AttnCase, block: usize) -> [Vec<Vec<f64>>; 2] {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::Bool;
    use ember_models::layers::attention::repeat_kv;
    use ember_models::layers::flash::{self, MaskSpec};
    let (b, h, hkv, s, d) = (2, 4, 2, 13, 8);
    let normal = Distribution::Normal(0.0, 1.0);
    let leaves: Vec<Tensor<4>> = [h, hkv, hkv]
        .iter()
        .map(|&n| Tensor::<4>::random([b, n, s, d], normal, dev))
        .collect();
    let w_out = Tensor::<4>::random([b, h, s, d], normal, dev);
    let seg = case.segments.as_ref().map(|v| {
        let rows = [v.clone(), v.clone()].concat();
        Tensor::<2, Int>::from_data(TensorData::new(rows, [b, s]), dev)
    });
    let pad: Vec<bool> = (0..b * s).map(|i| i % s >= s - case.pad_tail).collect();
    let pad = (case.pad_tail > 0)
        .then(|| Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, s]), dev));
    let run = |blocked: bool| {
        let [q, k, v] = [0, 1, 2].map(|i| leaves[i].clone().require_grad());
        let (qc, kc, vc) = (
            q.clone().cast(dtype),
            k.clone().cast(dtype),
            v.clone().cast(dtype),
        );
        let out = if blocked {
            let spec = MaskSpec {
                causal: case.causal,
                window: case.window,
                segments: seg.clone(),
                key_pad: pad.clone(),
                ..Default::default()
            };
            flash::attention(qc, kc, vc, &spec, block)
        } else {
            // The same mask, dense: [b, 1, s, s], true = masked.
            let i = Tensor::<1, Int>::arange(0..s as i64, dev);
            let delta = i.clone().reshape([s, 1]).expand([s, s]) - i.reshape([1, s]).expand([s, s]);
            let mut m = delta
                .clone()
                .lower_elem(0)
                .bool_and(Tensor::<2, Bool>::full([s, s], case.causal, dev));
            if let Some(w) = case.window {
                m = m.bool_or(delta.abs().greater_elem(w as i64));
            }
            let mut m = m.reshape([1, 1, s, s]).expand([b, 1, s, s]);
            if let Some(g) = &seg {
                let q = g.clone().reshape([b, 1, s, 1]).expand([b, 1, s, s]);
                m = m.bool_or(q.not_equal(g.clone().reshape([b, 1, 1, s]).expand([b, 1, s, s])));
            }
            if let Some(p) = &pad {
                m = m.bool_or(p.clone().reshape([b, 1, 1, s]).expand([b, 1, s, s]));
            }
            let opts = AttentionModuleOptions::default();
            attention(
                qc,
                repeat_kv(kc, h / hkv),
                repeat_kv(vc, h / hkv),
                Some(m.expand([b, h, s, s])),
                None,
                opts,
            )
        };
        let out = out.cast(DType::F32);
        let g = (out.clone() * w_out.clone()).sum().backward();
        let grad = |t: &Tensor<4>| values(t.grad(&g).unwrap().cast(DType::F32));
        vec![values(out), grad(&q), grad(&k), grad(&v)]
    };
    [run(true), run(false)]
}

/// Blocked attention's output and gradients against Burn's dense attention on `dev`.
pub(crate) fn check_blocked_attention(dev: &Device, dtype: DType, tol: f64) {
    let docs = vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2];
    let cases = [
        (
            "causal",
            AttnCase {
                causal: true,
                window: None,
                segments: None,
                pad_tail: 0,
            },
        ),
        (
            "causal+documents",
            AttnCase {
                causal: true,
                window: None,
                segments: Some(docs),
                pad_tail: 0,
            },
        ),
        (
            "causal+padding",
            AttnCase {
                causal: true,
                window: None,
                segments: None,
                pad_tail: 3,
            },
        ),
        (
            "bidirectional",
            AttnCase {
                causal: false,
                window: None,
                segments: None,
                pad_tail: 0,
            },
        ),
        (
            "window+padding",
            AttnCase {
                causal: false,
                window: Some(2),
                segments: None,
                pad_tail: 3,
            },
        ),
    ];
    for (name, case) in &cases {
        // Blocks that split the 13 positions unevenly, one block, and one-key blocks.
        for block in [4, 13, 1] {
            let [ours, reference] = attention_pair(dev, dtype, case, block);
            let what = format!("{dtype:?} {name} block {block}");
            assert_parts_close(&what, &["output", "dq", "dk", "dv"], &ours, &reference, tol);
        }
    }
}

#[test]
fn blocked_attention_matches_dense_attention_and_its_gradients() {
    let dev = device().autodiff();
    check_blocked_attention(&dev, DType::F32, 1e-5);
    check_blocked_attention(&dev, DType::BF16, 3e-2);
}

/// Packed ids, restarting positions and document ids `[2, 20]`: documents of 7, 13 and of
/// 20 tokens.
fn packed_rows(dev: &Device, vocab: i32) -> [Tensor<2, Int>; 4] {
    let ids: Vec<i32> = (0..41).map(|i| (i * 37 + 11) % vocab).collect();
    let seg: Vec<i32> = (0..20).map(|i| (i >= 7) as i32).chain([0; 20]).collect();
    let pos: Vec<i32> = (0..20)
        .map(|i| if i >= 7 { i - 7 } else { i })
        .chain(0..20)
        .collect();
    let t = |v: Vec<i32>| Tensor::<2, Int>::from_data(TensorData::new(v, [2, 20]), dev);
    let x = [&ids[..20], &ids[21..41]].concat();
    let y = [&ids[1..21], &ids[21..41]].concat();
    [t(x), t(y), t(pos), t(seg)]
}

#[test]
fn blocked_training_attention_trains_qwen3_and_modernbert_as_dense_attention() {
    use ember_models::modernbert::ModernBert;
    use ember_models::qwen3::Qwen3;
    let dev = device().autodiff();
    let mut qwen = Qwen3::from_pretrained(&fixture_dir("qwen3"), &dev).unwrap();
    let [x, y, pos, seg] = packed_rows(&dev, 90);
    let mut qwen_run = |dense: bool| {
        qwen.dense_attention = dense;
        let logits = qwen.forward_packed(x.clone(), pos.clone(), Some(seg.clone()));
        let g = cross_entropy(logits, y.clone(), None).backward();
        let l0 = &qwen.layers[0].self_attn;
        [
            l0.q_proj.weight.val(),
            l0.k_proj.weight.val(),
            l0.v_proj.weight.val(),
        ]
        .map(|w| values(w.grad(&g).unwrap()))
    };
    let (blocked, dense) = (qwen_run(false), qwen_run(true));
    for (name, (a, r)) in ["q", "k", "v"].iter().zip(blocked.iter().zip(&dense)) {
        let e = rel_diff(a, r);
        assert!(e < 1e-5, "qwen3 {name}_proj gradient differs by {e:.2e}");
    }

    // ModernBERT: bidirectional, its local layers windowed (±4 here), documents packed.
    let mut bert = ModernBert::from_pretrained(&fixture_dir("modernbert"), &dev).unwrap();
    let w = Tensor::<3>::random(
        [2, 20, bert.config.hidden_size],
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let mut bert_run = |dense: bool| {
        bert.dense_attention = dense;
        let h = bert.encode_packed(x.clone(), pos.clone(), Some(seg.clone()));
        let g = (h.clone() * w.clone()).sum().backward();
        // Layer 0 is global, layer 1 local.
        let grads = [0, 1].map(|i| values(bert.layers[i].wqkv.weight.val().grad(&g).unwrap()));
        (values(h), grads)
    };
    let ((hb, gb), (hd, gd)) = (bert_run(false), bert_run(true));
    assert!(rel_diff(&hb, &hd) < 1e-5, "modernbert hidden states differ");
    for (i, (a, r)) in gb.iter().zip(&gd).enumerate() {
        let e = rel_diff(a, r);
        assert!(
            e < 1e-5,
            "modernbert layer {i} wqkv gradient differs by {e:.2e}"
        );
    }
}
