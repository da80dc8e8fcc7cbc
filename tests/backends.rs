//! Parity on the GPU backends compiled into this build (`--features wgpu|vulkan|cuda`), for
//! each one present: f32 logits within 1e-4 of transformers, bf16 (where the device has it)
//! within 2e-2, and greedy generation equal to transformers', eager and through a captured
//! decode graph. Built without a GPU feature, this module is not compiled.
//! `EMBER_REQUIRE_BACKENDS=wgpu` (as CI sets) turns a missing device from a skip into a
//! failure.

use burn::tensor::DType;
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling};
use ember_models::qwen3::Qwen3;

use crate::common::*;

#[test]
fn gpu_backends_match_transformers() {
    let mut ran = 0;
    for name in ember_models::device::compiled_backends()
        .into_iter()
        .filter(|b| *b != "cpu")
    {
        let required = std::env::var("EMBER_REQUIRE_BACKENDS").unwrap_or_default();
        let dev = match ember_models::device::select(name) {
            Ok(dev) => dev,
            Err(e) if required.split(',').any(|r| r == name) => {
                panic!("{name} is required here: {e:#}")
            }
            Err(_) => {
                eprintln!("{name}: compiled in but no device present; skipped");
                continue;
            }
        };
        ran += 1;
        crate::fused::check_linear_cross_entropy(&dev.clone().autodiff(), DType::F32, 1e-4);
        crate::fused::check_linear_logprobs(&dev.clone().autodiff(), DType::F32, 1e-4);
        crate::fused::check_rms_norm(&dev.clone().autodiff(), DType::F32, 1e-4);
        crate::fused::check_linear_fused(&dev.clone().autodiff(), DType::F32, 1e-4);
        eprintln!("{name}: fused linear cross-entropy, log-probs, RMSNorm backward and stacked projections match the unfused ones");
        crate::fused::check_blocked_attention(&dev.clone().autodiff(), DType::F32, 1e-4);
        eprintln!("{name}: blocked attention matches dense attention");
        let fx = load_fixtures("qwen3");
        let model = Qwen3::from_pretrained(&fixture_dir("qwen3"), &dev).unwrap();
        let ours = values(model.forward(fx["input_ids"].ids(&dev)));
        let d = max_abs_diff(&ours, &fx["logits"].values);
        eprintln!("{name} f32: max |ours - transformers| = {d:.3e}");
        assert!(d <= 1e-4, "{name} f32 logits differ by {d:.3e}");

        let (prompts, expected, max_new) = fixture_generate("qwen3");
        let opts = GenerateOptions {
            max_new_tokens: vec![max_new],
            eos_ids: model.config.eos_ids(),
            pad_id: 0,
            sampling: Sampling::default(),
        };
        let out = generate(&model, &prompts, &opts, &mut Hooks::default()).unwrap();
        for (r, want) in expected.iter().enumerate() {
            assert_eq!(&out[r].tokens, want, "{name} greedy row {r}");
        }
        // The decode step captured once and replayed against the buffers it was recorded
        // with: only right if the step's state really is updated in place.
        let replayed = crate::qwen3_generate::check_graph_decode(&model);
        eprintln!("{name}: graph decoding matches (replayed as a graph: {replayed})");
        // The captured training step writes parameters, moments, the step counter and the
        // batch in place; only a real replay tests that.
        let trained = crate::train::check_captured_training(&dev);
        eprintln!("{name}: a captured training step trains as the eager one (replayed as a graph: {trained})");
        let hybrid = crate::hybrid::check_captured_hybrid(&dev);
        eprintln!("{name}: and a hybrid's (replayed as a graph: {hybrid})");
        let hybrid_decode = crate::hybrid::check_hybrid_graph_decode(&dev);
        eprintln!(
            "{name}: a hybrid's graph decoding matches (replayed as a graph: {hybrid_decode})"
        );
        assert!(
            replayed && hybrid_decode,
            "{name}: a decode step did not replay as a graph"
        );
        assert!(
            trained && hybrid,
            "{name}: a training step did not replay as a graph"
        );

        if dev.supports_dtype(DType::BF16) {
            let m16 = model.into_inference_dtype(DType::BF16);
            let ours = values(m16.forward(fx["input_ids"].ids(&dev)).cast(DType::F32));
            let d = max_abs_diff(&ours, &fx["logits"].values);
            eprintln!("{name} bf16: max |ours - transformers f32| = {d:.3e}");
            assert!(d <= 2e-2, "{name} bf16 logits differ by {d:.3e}");
        } else {
            eprintln!("{name}: no bf16 on this device; bf16 check skipped");
        }
    }
    eprintln!("{ran} GPU backend(s) checked");
}
