//! Qwen3 against transformers' own outputs (tests/fixtures/gen_qwen3.py): logits, every
//! hidden state, a left-padded batch, and cached decoding, for a tied and an untied model.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use ember_models::qwen3::{ForwardOptions, Qwen3};

use crate::common::*;

const TOL: f64 = 1e-4;

fn check_forward(name: &str) {
    let dev = device();
    let fx = load_fixtures(name);
    let model = Qwen3::from_pretrained(&fixture_dir(name), &dev).unwrap();
    let ids = fx["input_ids"].ids(&dev);
    let [b, s] = ids.dims();
    let pos = Tensor::<1, Int>::arange(0..s as i64, &dev)
        .reshape([1, s])
        .expand([b, s]);
    let opts = ForwardOptions {
        hidden_states: true,
        last_only: false,
    };
    let out = model.forward_with(ids, pos, None, None, opts);
    assert_eq!(out.hidden_states.len(), model.config.num_hidden_layers + 1);
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        assert_close(
            &format!("{name} hidden_states.{i}"),
            &values(h),
            &fx[&format!("hidden_states.{i}")].values,
            TOL,
        );
    }
    assert_close(
        &format!("{name} logits"),
        &values(out.logits),
        &fx["logits"].values,
        TOL,
    );
}

fn check_padded(name: &str) {
    let dev = device();
    let fx = load_fixtures(name);
    let model = Qwen3::from_pretrained(&fixture_dir(name), &dev).unwrap();
    let mask = &fx["padded.attention_mask"];
    let (b, s) = (mask.shape[0], mask.shape[1]);
    let mut pos = vec![];
    let mut pad = vec![];
    for row in mask.values.chunks(s) {
        let mut seen = 0i64;
        for &m in row {
            pad.push(m == 0.0);
            pos.push((seen - 1 + m as i64).max(0));
            seen += m as i64;
        }
    }
    let pos = Tensor::<2, Int>::from_data(TensorData::new(pos, [b, s]), &dev);
    let pad = Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, s]), &dev);
    let logits = model
        .forward_with(
            fx["padded.input_ids"].ids(&dev),
            pos,
            Some(pad),
            None,
            ForwardOptions::default(),
        )
        .logits;
    let v = fx["padded.logits"].shape[2];
    let ours = values(logits);
    let reference = &fx["padded.logits"].values;
    // Only real tokens have defined outputs; pad rows attend to nothing.
    let keep: Vec<usize> = (0..b * s).filter(|&i| mask.values[i] == 1.0).collect();
    let pick = |x: &[f64]| {
        keep.iter()
            .flat_map(|&i| x[i * v..(i + 1) * v].to_vec())
            .collect::<Vec<_>>()
    };
    assert_close(
        &format!("{name} padded logits"),
        &pick(&ours),
        &pick(reference),
        TOL,
    );
}

fn check_cached_decode(name: &str) {
    let dev = device();
    let fx = load_fixtures(name);
    let model = Qwen3::from_pretrained(&fixture_dir(name), &dev).unwrap();
    let ids = fx["input_ids"].ids(&dev);
    let [b, s] = ids.dims();
    let steps = fx["decode.tokens"].shape[1];
    let v = model.config.vocab_size;
    let mut cache = model.new_cache(b, s + steps, &dev);
    let pos = Tensor::<1, Int>::arange(0..s as i64, &dev)
        .reshape([1, s])
        .expand([b, s]);
    let opts = ForwardOptions {
        hidden_states: false,
        last_only: true,
    };
    let prefill = model
        .forward_with(ids.clone(), pos, None, Some(&mut cache), opts)
        .logits;
    assert_close(
        &format!("{name} prefill"),
        &values(prefill),
        &fx["decode.prefill_logits"].values,
        TOL,
    );

    let toks = fx["decode.tokens"].rows();
    let mut stepped = vec![0.0; b * steps * v];
    for t in 0..steps {
        let col: Vec<i64> = toks.iter().map(|r| r[t] as i64).collect();
        let step_ids = Tensor::<2, Int>::from_data(TensorData::new(col, [b, 1]), &dev);
        let p = Tensor::<2, Int>::from_data(TensorData::new(vec![(s + t) as i64; b], [b, 1]), &dev);
        let l = values(
            model
                .forward_with(step_ids, p, None, Some(&mut cache), opts)
                .logits,
        );
        for r in 0..b {
            stepped[(r * steps + t) * v..(r * steps + t + 1) * v]
                .copy_from_slice(&l[r * v..(r + 1) * v]);
        }
    }
    assert_close(
        &format!("{name} cached steps vs transformers"),
        &stepped,
        &fx["decode.step_logits"].values,
        TOL,
    );

    // Cached decoding must equal recomputing the whole sequence.
    let full_ids: Vec<i64> = fx["input_ids"]
        .rows()
        .iter()
        .zip(&toks)
        .flat_map(|(a, t)| a.iter().chain(t).map(|&x| x as i64).collect::<Vec<_>>())
        .collect();
    let full = values(model.forward(Tensor::from_data(
        TensorData::new(full_ids, [b, s + steps]),
        &dev,
    )));
    assert_close(
        &format!("{name} full recompute vs transformers"),
        &full,
        &fx["decode.full_logits"].values,
        TOL,
    );
    // Step t fed position s+t, so it must equal the recompute's output there.
    let recomputed_steps: Vec<f64> = (0..b)
        .flat_map(|r| full[(r * (s + steps) + s) * v..(r * (s + steps) + s + steps) * v].to_vec())
        .collect();
    assert_close(
        &format!("{name} cached vs recomputed"),
        &stepped,
        &recomputed_steps,
        1e-5,
    );
}

#[test]
fn untied_forward_matches_transformers() {
    check_forward("qwen3");
}

#[test]
fn tied_forward_matches_transformers() {
    check_forward("qwen3_tied");
}

#[test]
fn left_padded_batch_matches_transformers() {
    check_padded("qwen3");
    check_padded("qwen3_tied");
}

#[test]
fn cached_decoding_matches_transformers_and_recompute() {
    check_cached_decode("qwen3");
    check_cached_decode("qwen3_tied");
}

/// The mixed-precision path (bf16 parameters and activations, f32 norm statistics) that
/// CUDA runs, checked on the CPU: bf16 keeps 8 bits of mantissa, so the bound is looser.
#[test]
fn bf16_inference_stays_close_to_transformers_f32() {
    let dev = device();
    for name in ["qwen3", "qwen3_tied"] {
        let fx = load_fixtures(name);
        let model = Qwen3::from_pretrained(&fixture_dir(name), &dev)
            .unwrap()
            .into_inference_dtype(burn::tensor::DType::BF16);
        let logits = model.forward(fx["input_ids"].ids(&dev));
        assert_eq!(logits.dtype(), burn::tensor::DType::BF16);
        let ours = values(logits.cast(burn::tensor::DType::F32));
        let d = max_abs_diff(&ours, &fx["logits"].values);
        eprintln!("{name} bf16 max abs diff {d:.3e}");
        assert!(d < 2e-2, "{name}: bf16 logits differ by {d:.3e}");
        assert!(
            d > 1e-5,
            "{name}: bf16 run looks like f32 (diff {d:.1e}); is the cast applied?"
        );
    }
}
