//! The generation engine against transformers' greedy `generate`, plus sampling behaviour.

use ember_models::decode_graph::{generate_graph, GraphDecode};
use ember_models::generate::{generate, FinishReason, GenerateOptions, Hooks, Sampling, Sequence};
use ember_models::qwen3::Qwen3;

use crate::common::*;

fn opts(max_new: usize, model: &Qwen3, sampling: Sampling) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: vec![max_new],
        eos_ids: model.config.eos_ids(),
        pad_id: 0,
        sampling,
    }
}

fn greedy(model: &Qwen3, prompts: &[Vec<u32>], max_new: usize) -> Vec<Sequence> {
    generate(
        model,
        prompts,
        &opts(max_new, model, Sampling::default()),
        &mut Hooks::default(),
    )
    .unwrap()
}

#[test]
fn greedy_batch_matches_transformers_generate() {
    for name in ["qwen3", "qwen3_tied"] {
        let model = Qwen3::from_pretrained(&fixture_dir(name), &device()).unwrap();
        let (prompts, expected, max_new) = fixture_generate(name);
        let out = greedy(&model, &prompts, max_new);
        for (r, seq) in out.iter().enumerate() {
            assert_eq!(
                seq.tokens, expected[r],
                "{name} row {r}: ours vs transformers greedy"
            );
            assert!(seq.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite()));
        }
        // The same prompts one at a time (no padding) give the same tokens.
        for (r, p) in prompts.iter().enumerate() {
            let one = generate(
                &model,
                std::slice::from_ref(p),
                &opts(max_new, &model, Sampling::default()),
                &mut Hooks::default(),
            )
            .unwrap();
            assert_eq!(one[0].tokens, expected[r], "{name} row {r} alone");
        }
    }
}

#[test]
fn per_row_budgets_eos_and_stop_hooks() {
    let model = Qwen3::from_pretrained(&fixture_dir("qwen3"), &device()).unwrap();
    let (prompts, expected, _) = fixture_generate("qwen3");
    let mut o = opts(0, &model, Sampling::default());
    o.max_new_tokens = vec![3, 7];
    let out = generate(&model, &prompts, &o, &mut Hooks::default()).unwrap();
    assert_eq!(out[0].tokens, expected[0][..3]);
    assert_eq!(out[0].finish, FinishReason::Length);
    assert_eq!(out[1].tokens, expected[1][..7]);

    // Treat row 0's second greedy token as EOS: it must stop right there.
    let mut o = opts(10, &model, Sampling::default());
    o.eos_ids = vec![expected[0][1]];
    let out = generate(&model, &prompts[..1], &o, &mut Hooks::default()).unwrap();
    assert_eq!(out[0].tokens, expected[0][..2]);
    assert_eq!(out[0].finish, FinishReason::Eos);

    // A stop hook ends a row; streaming sees every token exactly once.
    let mut streamed = vec![vec![]; 2];
    let mut on_token = |r: usize, t: u32| streamed[r].push(t);
    let mut stop = |r: usize, toks: &[u32]| r == 1 && toks.len() == 4;
    let out = generate(
        &model,
        &prompts,
        &opts(6, &model, Sampling::default()),
        &mut Hooks {
            on_token: Some(&mut on_token),
            stop: Some(&mut stop),
        },
    )
    .unwrap();
    assert_eq!(out[1].finish, FinishReason::Stop);
    assert_eq!(out[1].tokens.len(), 4);
    assert_eq!(streamed[0], out[0].tokens);
    assert_eq!(streamed[1], out[1].tokens);
}

#[test]
fn sampling_is_seeded_and_respects_top_k() {
    let model = Qwen3::from_pretrained(&fixture_dir("qwen3"), &device()).unwrap();
    let (prompts, _, _) = fixture_generate("qwen3");
    let run = |s: Sampling| {
        generate(&model, &prompts, &opts(8, &model, s), &mut Hooks::default()).unwrap()
    };
    for (k, p) in [(0, 1.0), (5, 1.0), (0, 0.9), (20, 0.8)] {
        let s = |seed| Sampling {
            temperature: 1.3,
            top_k: k,
            top_p: p,
            seed,
        };
        let a = run(s(1));
        let b = run(s(1));
        let c = run(s(2));
        for r in 0..2 {
            assert_eq!(
                a[r].tokens, b[r].tokens,
                "k={k} p={p}: same seed, different tokens"
            );
            assert_eq!(a[r].logprobs, b[r].logprobs);
        }
        assert!(
            a.iter().zip(&c).any(|(x, y)| x.tokens != y.tokens),
            "k={k} p={p}: seeds 1 and 2 agree"
        );
    }
    // top_k = 1 is greedy, whatever the temperature.
    let greedy = run(Sampling::default());
    let k1 = run(Sampling {
        temperature: 2.0,
        top_k: 1,
        top_p: 1.0,
        seed: 5,
    });
    for r in 0..2 {
        assert_eq!(greedy[r].tokens, k1[r].tokens);
    }
}

#[test]
fn generation_on_an_autodiff_model_runs_on_a_plain_copy_and_agrees() {
    let dev = device().autodiff();
    let model = Qwen3::from_pretrained(&fixture_dir("qwen3"), &dev).unwrap();
    let (prompts, expected, max_new) = fixture_generate("qwen3");
    let out = greedy(&model, &prompts, max_new);
    for (r, seq) in out.iter().enumerate() {
        assert_eq!(seq.tokens, expected[r]);
    }
}

/// Decodes `prompts` through the captured step and eagerly, asserting the same tokens and
/// endings and log-probs within 1e-4 in every row; the graph's sequences, and whether its
/// step replayed as a graph.
pub(crate) fn graph_and_eager<M: GraphDecode>(
    model: &M,
    prompts: &[Vec<u32>],
    o: &GenerateOptions,
    what: &str,
) -> (Vec<Sequence>, bool) {
    let eager = generate(model, prompts, o, &mut Hooks::default()).unwrap();
    let (graph, stats) = generate_graph(model, prompts, o, &mut Hooks::default()).unwrap();
    for (r, (e, g)) in eager.iter().zip(&graph).enumerate() {
        assert_eq!(e.tokens, g.tokens, "{what}, row {r}: graph vs eager tokens");
        assert_eq!(e.finish, g.finish, "{what}, row {r}: graph vs eager ending");
        for (a, b) in e.logprobs.iter().zip(&g.logprobs) {
            assert!(
                (a - b).abs() < 1e-4,
                "{what}, row {r}: log-prob {b} vs eager {a}"
            );
        }
    }
    (graph, stats.replayed)
}

/// The captured decode step (`decode_graph`) against transformers' greedy tokens and the
/// eager engine: the same tokens, log-probs within 1e-4 (f32), and the same endings under
/// per-row budgets and an EOS, with the fixture's left-padded prompts; and the same seeded
/// samples with a temperature, top-k and top-p. Returns whether the step replayed as a graph
/// (flex has none and re-runs it; wgpu records one).
pub fn check_graph_decode(model: &Qwen3) -> bool {
    let (prompts, expected, max_new) = fixture_generate("qwen3");
    let mut hardware = true;
    let mut both = |o: &GenerateOptions| {
        let (graph, replayed) = graph_and_eager(model, &prompts, o, "qwen3");
        hardware &= replayed;
        graph
    };
    let out = both(&opts(max_new, model, Sampling::default()));
    for (r, want) in expected.iter().enumerate() {
        assert_eq!(
            &out[r].tokens, want,
            "row {r}: graph vs transformers greedy"
        );
    }
    let mut o = opts(0, model, Sampling::default());
    o.max_new_tokens = vec![3, 7];
    both(&o);
    let mut o = opts(max_new, model, Sampling::default());
    o.eos_ids = vec![expected[0][1]];
    assert_eq!(both(&o)[0].finish, FinishReason::Eos);
    // A stop hook (how RLP ends a thought) ends the row at the same token in both engines,
    // and streaming sees the same tokens.
    let o = opts(6, model, Sampling::default());
    let run = |graph: bool| {
        let mut streamed = vec![vec![]; prompts.len()];
        let mut on_token = |r: usize, t: u32| streamed[r].push(t);
        let mut stop = |r: usize, toks: &[u32]| r == 1 && toks.len() == 4;
        let mut hooks = Hooks {
            on_token: Some(&mut on_token),
            stop: Some(&mut stop),
        };
        let out = match graph {
            true => generate_graph(model, &prompts, &o, &mut hooks).unwrap().0,
            false => generate(model, &prompts, &o, &mut hooks).unwrap(),
        };
        (out, streamed)
    };
    let ((eager, eager_streamed), (graph, graph_streamed)) = (run(false), run(true));
    assert_eq!(graph[1].finish, FinishReason::Stop);
    assert_eq!(graph[1].tokens.len(), 4);
    for (r, (e, g)) in eager.iter().zip(&graph).enumerate() {
        assert_eq!(
            e.tokens, g.tokens,
            "row {r}: graph vs eager tokens under a stop hook"
        );
        assert_eq!(
            e.finish, g.finish,
            "row {r}: graph vs eager ending under a stop hook"
        );
    }
    assert_eq!(graph_streamed, eager_streamed);
    // Seeded sampling, with a temperature, top-k and top-p (alone and after top-k): the same
    // noise in the same order, so the same samples while every row runs (no EOS here).
    for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.8, 5, 1.0), (1.3, 0, 0.9), (1.3, 20, 0.8)]
    {
        let sampling = Sampling {
            temperature,
            top_k,
            top_p,
            seed: 11,
        };
        let mut o = opts(max_new, model, sampling);
        o.eos_ids.clear();
        let sampled = both(&o);
        assert_ne!(
            sampled[0].tokens, expected[0],
            "T={temperature} sampled greedily"
        );
    }
    hardware
}

#[test]
fn graph_decode_matches_eager_and_transformers() {
    let model = Qwen3::from_pretrained(&fixture_dir("qwen3"), &device()).unwrap();
    check_graph_decode(&model);
}
