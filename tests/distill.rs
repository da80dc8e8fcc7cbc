//! OPD's losses and RLP's reward, advantage and EMA against hand-computed numbers; then both
//! stages as a user runs them: OPD pulls a student towards a teacher (every loss kind, the
//! bridge, extrapolation, exact resume, one-line errors) and RLP trains thoughts with its
//! EMA baseline saved in every checkpoint so that resume is exact.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Tensor, TensorData};
use ember_models::qwen3::Qwen3;
use ember_train::objectives::distill::{divergence, extrapolated, sampled_advantage, Divergence};
use ember_train::objectives::rlp::{ema_update, information_gain, rlp_advantages};

use crate::cli::{assert_one_line_error, stderr};
use crate::common::*;
use crate::rl::mean_of;
use crate::stages::records;
use crate::train::{losses, recipe, tiny_model, train};

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

/// Log-probs `[1, rows, vocab]` of the given distributions.
fn log_probs(rows: &[&[f32]], dev: &burn::tensor::Device) -> Tensor<3> {
    let v = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().map(|p| p.ln())).collect();
    Tensor::from_data(TensorData::new(flat, [1, rows.len(), v]), dev)
}

#[test]
fn distillation_losses_match_hand_computation() {
    let dev = device();
    // Student S = (0.5, 0.5), teacher T = (0.8, 0.2), at two positions (the second with the
    // roles of the two tokens swapped, which must give the same numbers).
    let s = log_probs(&[&[0.5, 0.5], &[0.5, 0.5]], &dev);
    let t = log_probs(&[&[0.8, 0.2], &[0.2, 0.8]], &dev);
    let d = |kind| values(divergence(s.clone(), t.clone(), kind));
    // KL(T‖S) = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5); KL(S‖T) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2).
    let (fwd, rev) = (0.192744757, 0.223143551);
    close(&d(Divergence::Forward), &[fwd, fwd], 1e-6);
    close(&d(Divergence::Reverse), &[rev, rev], 1e-6);
    // M = (0.65, 0.35): 0.5·KL(T‖M) + 0.5·KL(S‖M); at β = 0.25, M = (0.575, 0.425).
    close(&d(Divergence::Jsd(0.5)), &[0.050671837, 0.050671837], 1e-6);
    close(&d(Divergence::Jsd(0.25)), &[0.036893617, 0.036893617], 1e-6);
    // The endpoints are the two KLs, and they are the limits of JSD_β/β and JSD_β/(1−β).
    close(&d(Divergence::Jsd(0.0)), &[fwd, fwd], 1e-6);
    close(&d(Divergence::Jsd(1.0)), &[rev, rev], 1e-6);
    let eps = 1e-3;
    let near0 = d(Divergence::Jsd(eps))[0] / eps;
    let near1 = d(Divergence::Jsd(1.0 - eps))[0] / eps;
    assert!((near0 - fwd).abs() < 2e-3, "JSD_β/β → {near0}, want {fwd}");
    assert!(
        (near1 - rev).abs() < 2e-3,
        "JSD_β/(1−β) → {near1}, want {rev}"
    );

    // Extrapolation: λ = 1 is the teacher; λ = 2 over a uniform reference is T²/ΣT².
    let r = log_probs(&[&[0.5, 0.5], &[0.5, 0.5]], &dev);
    let same = values(extrapolated(t.clone(), r.clone(), 1.0).exp());
    close(&same, &[0.8, 0.2, 0.2, 0.8], 1e-6);
    let two = values(extrapolated(t.clone(), r, 2.0).exp());
    close(&two, &[0.941176, 0.058824, 0.058824, 0.941176], 1e-5);

    // The sampled loss's advantage: log π_T − log π_S, and with λ = 2 and π_ref = 0.4,
    // 2(ln 0.8 − ln 0.4) − (ln 0.5 − ln 0.4).
    let row = |v: f32| Tensor::<2>::from_data(TensorData::new(vec![v.ln()], [1, 1]), &dev);
    let a1 = values(sampled_advantage(row(0.5), row(0.8), None, 1.0));
    close(&a1, &[0.470003629], 1e-6);
    let a2 = values(sampled_advantage(row(0.5), row(0.8), Some(row(0.4)), 2.0));
    close(&a2, &[1.163150810], 1e-6);
}

#[test]
fn routing_marks_the_spans_between_markers() {
    use ember_train::opd::spans;
    assert_eq!(
        spans(&[1, 7, 2, 8, 3, 7, 4], &[7], &[8]),
        [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    );
    assert_eq!(
        spans(&[7, 7, 1, 8, 8, 2, 8, 8], &[7, 7], &[8, 8]),
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(spans(&[1, 2, 3], &[7], &[8]), [0.0, 0.0, 0.0]);
}

#[test]
fn reverse_kl_gradient_matches_the_formula() {
    // d KL(S‖T)/dz_i = S_i (log S_i − log T_i − KL) for student logits z.
    let dev = device().autodiff();
    let z =
        Tensor::<3>::from_data(TensorData::new(vec![0.3f32, 0.3], [1, 1, 2]), &dev).require_grad();
    let t = log_probs(&[&[0.8, 0.2]], &dev);
    let loss = divergence(log_softmax(z.clone(), 2), t, Divergence::Reverse).sum();
    let g = z
        .grad(&loss.backward())
        .expect("the logits have a gradient");
    close(&values(g), &[-0.346573590, 0.346573590], 1e-6);
}

#[test]
fn rlp_reward_and_advantage_on_fixed_logits() {
    let dev = device();
    // Next-token logits over 3 tokens after a thought (2, 0, 0) and without one (0, 0, 0);
    // the next token is token 0.
    let logits = Tensor::<2>::from_data(
        TensorData::new(vec![2.0f32, 0.0, 0.0, 0.0, 0.0, 0.0], [2, 3]),
        &dev,
    );
    let lp = values(log_softmax(logits, 1));
    // 2 − ln(e² + 2) and −ln 3.
    close(&[lp[0], lp[3]], &[-0.239544766, -1.098612289], 1e-6);
    let gain = information_gain(&[lp[0], lp[3]], lp[3]);
    close(&gain, &[0.859067522, 0.0], 1e-6);
    // G = 4: A_i = 4/3 (r_i − mean r).
    let r = [gain[0], 0.0, -0.5, 0.2];
    close(
        &rlp_advantages(&r),
        &[0.959067522, -0.186355841, -0.853022507, 0.080310826],
        1e-6,
    );
    close(&rlp_advantages(&[0.7]), &[0.0], 0.0);
}

#[test]
fn ema_update_blends_every_parameter() {
    let phi: Qwen3 = tiny_model(1).valid();
    let theta = tiny_model(2);
    let before = (
        values(phi.embed_tokens.val()),
        values(phi.norm.weight.val()),
        values(theta.embed_tokens.val()),
        values(theta.norm.weight.val()),
    );
    let ema = ema_update(phi, &theta, 0.9);
    let want = |a: &[f64], b: &[f64]| -> Vec<f64> {
        a.iter().zip(b).map(|(p, t)| 0.9 * p + 0.1 * t).collect()
    };
    close(
        &values(ema.embed_tokens.val()),
        &want(&before.0, &before.2),
        1e-6,
    );
    close(
        &values(ema.norm.weight.val()),
        &want(&before.1, &before.3),
        1e-6,
    );
    // Every layer moved too (the last one's MLP, say).
    let last = ema.layers.len() - 1;
    let (e, t) = (
        values(ema.layers[last].mlp.down_proj.weight.val()),
        values(theta.layers[last].mlp.down_proj.weight.val()),
    );
    assert!(max_abs_diff(&e, &t) > 0.0);
}

// ---- The opd and rlp stages, run as a user runs them ----

/// A tiny pretrained teacher (the TINY recipe's 8 steps), shared by the OPD tests.
fn teacher(tag: &str) -> PathBuf {
    let (p, run) = recipe(tag, "");
    let o = train(&p, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    run
}

/// A smaller student than TINY's model, distilled from `teacher` on level-1 prompts.
fn opd_recipe(name: &str, teacher: &Path, train_sec: &str, distill: &str) -> (PathBuf, PathBuf) {
    let model = "arch = \"qwen3\"\nvocab_size = 259\nhidden_size = 16\nintermediate_size = 32\n\
         num_hidden_layers = 1\nnum_attention_heads = 2\nnum_key_value_heads = 1\nhead_dim = 8\n\
         max_position_embeddings = 128\ntie_word_embeddings = true";
    opd_recipe_for(model, name, teacher, train_sec, distill)
}

/// [`opd_recipe`] with the student's `[model]` body `model` (none when empty).
fn opd_recipe_for(
    model: &str,
    name: &str,
    teacher: &Path,
    train_sec: &str,
    distill: &str,
) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    // No `[model]` body: the student is the checkpoint `train.init_from` names.
    let model = match model {
        "" => String::new(),
        m => format!("[model]\n{m}\n\n"),
    };
    let text = format!(
        "kind = \"opd\"\n[run]\nname = \"student\"\nseed = 5\nout_dir = \"{}\"\n\n\
         {model}\
         [data]\nseq_len = 64\n[data.generated]\ntask = \"arithmetic\"\ncount = 40\nlevels = [1]\n\n\
         [train]\n{train_sec}\n\n[distill]\nteacher = \"{}\"\nmax_new_tokens = 8\n{distill}\n",
        dir.join("runs").display(),
        teacher.display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    (path, dir.join("runs/student"))
}

/// Over 16 steps of `loss = "reverse_kl"`: every step's loss is the full-vocabulary reverse
/// KL it logs, and the KL of the last 4 steps is below 0.8× that of the first 4.
fn assert_reverse_kl_falls(recs: &[serde_json::Value]) {
    for r in recs {
        let (kl, loss) = (r["kl"].as_f64().unwrap(), r["loss"].as_f64().unwrap());
        assert!((kl - loss).abs() < 1e-4 * kl.max(1.0), "{r}");
    }
    let (first, last) = (mean_of(&recs[..4], "kl"), mean_of(&recs[12..], "kl"));
    assert!(
        last < 0.8 * first,
        "KL to the teacher did not fall: {first:.3} -> {last:.3}"
    );
}

/// Trains the OPD recipe `p` (16 steps of `loss = "reverse_kl"`) and checks that the KL falls
/// ([`assert_reverse_kl_falls`]); returns the stage's stderr and records.
fn distil_sixteen_steps(p: &Path, run: &Path) -> (String, Vec<serde_json::Value>) {
    let o = train(p, &[], &[]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    let recs = records(run);
    assert_eq!(recs.len(), 16);
    assert_reverse_kl_falls(&recs);
    (e, recs)
}

#[test]
fn opd_pulls_the_student_towards_the_teacher_with_every_loss() {
    let teacher = teacher("opd-teacher");
    let (p, run) = opd_recipe(
        "opd-learns",
        &teacher,
        "steps = 16\nbatch_size = 4\nlr = 1e-2\nschedule = \"constant\"\nlog_every = 1\nsave_every = 0",
        "loss = \"reverse_kl\"",
    );
    let (e, recs) = distil_sixteen_steps(&p, &run);
    assert!(e.contains("40 prompts, teacher"), "{e}");
    for r in &recs {
        for key in [
            "kl",
            "logprob_gap",
            "completions/mean_length",
            "rollout_tokens_per_s",
            "time/rollout_s",
            "time/train_s",
            "loss",
        ] {
            assert!(r[key].is_number(), "{key} missing from {r}");
        }
        assert_eq!(r["bridge"], 0);
    }
    assert!(run.join("model.safetensors").is_file());

    // The other losses, the bridge and extrapolation past the teacher run and log.
    for (tag, distill) in [
        ("fwd", "loss = \"forward_kl\""),
        ("jsd", "loss = \"jsd\"\njsd_beta = 0.3"),
        (
            "sampled",
            "loss = \"reverse_kl_sampled\"\nlambda = 1.5\nbridge_steps = 1\nsamples_per_prompt = 2",
        ),

        // Routing: distil from each "=" to the end of its line, GRPO on the rest.
        (
            "routed",
            "loss = \"reverse_kl\"\nsamples_per_prompt = 2\nroute_open = \"=\"\nroute_close = \"\\n\"",
        ),
    ] {
        let (p, run) = opd_recipe(
            &format!("opd-{tag}"),
            &teacher,
            "steps = 2\nbatch_size = 2\nlr = 1e-3\nlog_every = 1",
            distill,
        );
        let o = train(&p, &[], &[]);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        let recs = records(&run);
        for r in &recs {
            assert!(r["loss"].as_f64().unwrap().is_finite(), "{tag}: {r}");
            assert!(r["kl"].as_f64().unwrap() >= 0.0, "{tag}: {r}");
        }
        if tag == "routed" {
            for r in &recs {
                let f = r["route/distilled_fraction"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&f), "{r}");
            }
        }
        if tag == "sampled" {
            assert_eq!(recs[0]["bridge"], 1);
            assert_eq!(recs[1]["bridge"], 0);
            assert!(recs[1]["clip_ratio"].is_number());
        }
    }
}

#[test]
fn opd_resumes_exactly() {
    let teacher = teacher("opd-resume-teacher");
    let train_sec =
        "steps = 5\nbatch_size = 2\ngrad_accum = 2\nlr = 5e-3\nlog_every = 1\nsave_every = 2";
    let distill = "loss = \"reverse_kl_sampled\"\nsamples_per_prompt = 2\ntemperature = 1.2\nbridge_steps = 1";
    let (full, full_run) = opd_recipe("opd-full", &teacher, train_sec, distill);
    let o = train(&full, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (cut, cut_run) = opd_recipe("opd-cut", &teacher, train_sec, distill);
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:3")]);
    assert!(!o.status.success(), "the fault did not fire");
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&cut_run), losses(&full_run));
}

/// Nemotron-Flash's recipe: a transformer teacher distilled into a hybrid student (DeltaNet,
/// Mamba2 and attention layers, meta tokens, weight normalisation).
#[test]
fn opd_distils_a_qwen3_teacher_into_a_hybrid_student() {
    let teacher = teacher("opd-hybrid-teacher");
    let hybrid = "arch = \"nemotron_flash\"\nvocab_size = 259\nhidden_size = 32\n\
         intermediate_size = 64\npattern = \"D F M2 F A F\"\nnum_attention_heads = 4\n\
         num_key_value_heads = 2\nhead_dim = 8\nmamba_num_heads = 4\nmamba_head_dim = 16\n\
         ssm_state_size = 8\nmamba_chunk_size = 8\nlinear_num_heads = 2\n\
         linear_key_head_dim = 16\nlinear_value_head_dim = 16\nlinear_chunk_size = 8\n\
         num_memory_tokens = 2\nweight_normalization = true";
    let (p, run) = opd_recipe_for(
        hybrid,
        "opd-hybrid",
        &teacher,
        "steps = 16\nbatch_size = 4\nlr = 1e-2\nweight_decay = 0.0\nschedule = \"constant\"\n\
         log_every = 1\nsave_every = 0",
        "loss = \"reverse_kl\"",
    );
    distil_sixteen_steps(&p, &run);
    let student =
        ember_models::hybrid::stack::HybridLM::from_pretrained(&run, &crate::common::device())
            .unwrap();
    assert_eq!(student.config.memory_tokens, 2);
}

/// A hybrid teacher (DeltaNet, Mamba2 and attention layers, 4 meta tokens, weight
/// normalisation) for a student of either family. Distilled into itself, its scores of the
/// student's samples equal the student's own, so the first step's KL is zero; a Qwen3
/// student moves towards it.
#[test]
fn opd_takes_a_hybrid_teacher_for_a_student_of_either_family() {
    let (p, teacher) = crate::hybrid::flash_recipe("opd-hybrid-as-teacher", |s| {
        s.replace("steps = 30", "steps = 8")
    });
    let o = train(&p, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // On the student's samples, and (the bridge) on the teacher's own.
    for (tag, distill) in [
        ("self", "loss = \"reverse_kl\"\nsamples_per_prompt = 2"),
        ("self-bridge", "bridge_steps = 1\nsamples_per_prompt = 2"),
    ] {
        let (p, run) = opd_recipe_for(
            "",
            &format!("opd-hybrid-{tag}"),
            &teacher,
            &format!(
                "init_from = \"{}\"\nsteps = 1\nbatch_size = 4\nlr = 1e-3\nweight_decay = 0.0\n\
                 log_every = 1\nsave_every = 0",
                teacher.display()
            ),
            distill,
        );
        let o = train(&p, &[], &[]);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        let r = &records(&run)[0];
        let (kl, gap) = (
            r["kl"].as_f64().unwrap(),
            r["logprob_gap"].as_f64().unwrap(),
        );
        assert_eq!(r["bridge"], (tag == "self-bridge") as u8, "{r}");
        assert!(r["completions/mean_length"].as_f64().unwrap() >= 1.0, "{r}");
        assert!(kl.abs() < 1e-6 && gap.abs() < 1e-5, "{tag}: {r}");
    }

    let (p, run) = opd_recipe(
        "opd-hybrid-teacher-qwen3-student",
        &teacher,
        "steps = 16\nbatch_size = 4\nlr = 1e-2\nschedule = \"constant\"\nlog_every = 1\nsave_every = 0",
        "loss = \"reverse_kl\"",
    );
    distil_sixteen_steps(&p, &run);
    Qwen3::from_pretrained(&run, &device()).unwrap();
}

#[test]
fn opd_recipe_mistakes_are_one_line_errors() {
    let teacher = teacher("opd-bad-teacher");
    let ok_train = "steps = 2\nbatch_size = 2\nlr = 1e-3";
    let (p, _) = opd_recipe(
        "opd-bad",
        &teacher,
        ok_train,
        "loss = \"jsd\"\njsd_beta = 1.5",
    );
    assert_one_line_error(&train(&p, &[], &[]), &["[distill]", "`jsd_beta`"]);
    let (p, _) = opd_recipe("opd-bad", &teacher, ok_train, "lambda = -1.0");
    assert_one_line_error(&train(&p, &[], &[]), &["[distill]", "`lambda`"]);
    let (p, _) = opd_recipe("opd-bad", &teacher, ok_train, "route_open = \"<think>\"");
    assert_one_line_error(&train(&p, &[], &[]), &["[distill]", "`route_close`"]);
    let routed = "route_open = \"<think>\"\nroute_close = \"</think>\"";
    let (p, _) = opd_recipe("opd-bad", &teacher, ok_train, routed);
    assert_one_line_error(&train(&p, &[], &[]), &["[distill]", "`samples_per_prompt`"]);
    let (p, _) = opd_recipe("opd-bad", &teacher, ok_train, "loss = \"kl\"");
    assert_one_line_error(&train(&p, &[], &[]), &["recipe.toml:", "kl"]);
    let missing = teacher.with_file_name("nowhere");
    let (p, _) = opd_recipe("opd-bad", &missing, ok_train, "");
    assert_one_line_error(&train(&p, &[], &[]), &["teacher", "nowhere"]);
    // A teacher with another vocabulary cannot score the student's tokens.
    let (p, _) = opd_recipe("opd-bad-vocab", &teacher, ok_train, "");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("vocab_size = 259", "vocab_size = 300")).unwrap();
    assert_one_line_error(
        &train(&p, &[], &[]),
        &["teacher", "vocab_size 259 differs from the student's 300"],
    );
    // No [distill], and a [distill] on another kind.
    let (p, _) = opd_recipe("opd-bad-kind", &teacher, ok_train, "");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.split("[distill]").next().unwrap()).unwrap();
    assert_one_line_error(&train(&p, &[], &[]), &["needs a [distill] section"]);
    std::fs::write(&p, text.replace("kind = \"opd\"", "kind = \"rlvr\"")).unwrap();
    assert_one_line_error(
        &train(&p, &[], &[]),
        &["[distill] section belongs to kind = \"opd\""],
    );
}

/// With `doc_masks`, RLP's no-thought baseline reads each document of a packed row alone (as
/// next-token training does) and a thought's context starts at its document, so both scorers
/// see the same prefix. Checked on a Qwen3 and on a hybrid with meta tokens.
#[test]
fn rlp_reads_each_document_of_a_packed_row_alone() {
    use burn::tensor::Int;
    use ember_data::loader::Batch;
    use ember_train::rlp::{baseline, context_start, Baseline};
    use ember_train::trainer::NextTokenModel;

    // Two rows, each documents ending in EOS (id 0) and packed the way the loader packs them:
    // positions restart and the segment grows after each EOS.
    let eos = 0u32;
    let docs: [&[usize]; 2] = [&[5, 8], &[3, 6, 4]];
    let seq = 12;
    let (mut stream, mut inputs, mut targets) = (vec![], vec![], vec![]);
    let (mut positions, mut segments, mut starts) = (vec![], vec![], vec![]);
    for (r, lens) in docs.iter().enumerate() {
        let mut row = vec![];
        let mut at = vec![];
        for (d, &n) in lens.iter().enumerate() {
            at.push(row.len());
            row.extend((0..n - 1).map(|j| 1 + ((5 * j + 11 * d + 3 * r) % 60) as u32));
            row.push(eos);
        }
        assert_eq!(row.len(), seq + 1);
        let (mut pos, mut seg) = (0, 0);
        for &t in &row[..seq] {
            positions.push(pos);
            segments.push(seg);
            (pos, seg) = if t == eos {
                (0, seg + 1)
            } else {
                (pos + 1, seg)
            };
        }
        inputs.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
        stream.push(row);
        starts.push(at);
    }
    let packed = Batch {
        batch: 2,
        seq_len: seq,
        inputs,
        targets,
        positions: positions.clone(),
        segments: Some(segments),
        weights: None,
    };
    let whole = Batch {
        positions: (0..2).flat_map(|_| 0..seq as u32).collect(),
        segments: None,
        ..packed.clone()
    };

    fn check<M: NextTokenModel>(
        what: &str,
        model: &M,
        b: &Batch,
        whole: &Batch,
        rows: &[Vec<u32>],
        starts: &[Vec<usize>],
    ) {
        let dev = device();
        let got = baseline(model, b, &dev);
        let read_whole = baseline(model, whole, &dev);
        for (r, row) in rows.iter().enumerate() {
            for (d, &start) in starts[r].iter().enumerate() {
                let end = starts[r].get(d + 1).copied().unwrap_or(row.len());
                let doc: Vec<i32> = row[start..end].iter().map(|&x| x as i32).collect();
                let n = doc.len();
                let ids = Tensor::<2, Int>::from_data(TensorData::new(doc.clone(), [1, n]), &dev);
                let lp = log_softmax(model.logits(ids), 2);
                // Each target of the document given its prefix alone (the row's last token
                // has no target inside the batch).
                let alone: Vec<f64> = (0..n - 1)
                    .map(|j| {
                        let v = doc[j + 1] as usize;
                        values(lp.clone().slice([0..1, j..j + 1, v..v + 1]))[0]
                    })
                    .collect();
                let of = |b: &Baseline| -> Vec<f64> {
                    b.logp[r][start..start + n - 1]
                        .iter()
                        .map(|&x| x as f64)
                        .collect()
                };
                let what = format!("{what}, row {r}, document {d}");
                assert_close(&what, &of(&got), &alone, 1e-5);
                if d > 0 {
                    let gap = max_abs_diff(&of(&read_whole), &alone);
                    assert!(
                        gap > 1e-3,
                        "{what}: the whole row reads it as alone too ({gap})"
                    );
                }
                // Thoughts before any token of the document (after its first) see only it.
                for t in start + 1..end {
                    assert_eq!(context_start(b, r, t), start, "{what}, t = {t}");
                    assert_eq!(context_start(whole, r, t), 0, "{what}, t = {t}");
                }
            }
        }
    }
    let qwen3 = crate::train::tiny_model(4).valid();
    check("qwen3", &qwen3, &packed, &whole, &stream, &starts);
    let hybrid = ember_models::hybrid::stack::HybridLM::random(
        crate::hybrid::flash_config(3, false),
        9,
        &device(),
    )
    .unwrap();
    check(
        "hybrid with 3 meta tokens",
        &hybrid,
        &packed,
        &whole,
        &stream,
        &starts,
    );
}

fn rlp_recipe(name: &str, rlp: &str) -> (PathBuf, PathBuf) {
    recipe(name, &format!("\n[rlp]\n{rlp}\n"))
}

#[test]
fn rlp_trains_thoughts_and_resumes_exactly_with_its_ema() {
    check_rlp_trains_and_resumes("rlp", None);
}

/// RLP on a hybrid (DeltaNet, Mamba2 and attention layers, meta tokens) over packed
/// documents (`doc_masks`): its thoughts are sampled through the recurrent decode and scored
/// by the chunked forward, and its EMA baseline is a hybrid saved in every checkpoint.
#[test]
fn rlp_trains_a_hybrid_and_resumes_exactly_with_its_ema() {
    let hybrid = "arch = \"nemotron_flash\"\nvocab_size = 259\nhidden_size = 32\n\
         intermediate_size = 64\npattern = \"D F M2 F A F\"\nnum_attention_heads = 4\n\
         num_key_value_heads = 2\nhead_dim = 8\nmamba_num_heads = 4\nmamba_head_dim = 16\n\
         ssm_state_size = 8\nmamba_chunk_size = 8\nlinear_num_heads = 2\n\
         linear_key_head_dim = 16\nlinear_value_head_dim = 16\nlinear_chunk_size = 8\n\
         num_memory_tokens = 2\n";
    check_rlp_trains_and_resumes("rlp-hybrid", Some(hybrid));
}

/// RLP on TINY's recipe, with its `[model]` body replaced by `model` (and `doc_masks = true`)
/// when given: every metric is logged, each checkpoint holds the EMA, and a kill and
/// `--resume` reproduce the uninterrupted run.
fn check_rlp_trains_and_resumes(tag: &str, model: Option<&str>) {
    let rlp = "group_size = 3\npositions_per_row = 2\nthought_tokens = 4\nnext_tokens = 2\n\
               positions = \"entropy\"\nntp_weight = 0.5\nema_decay = 0.9";
    let with_objective = |name: &str| {
        let (p, run) = rlp_recipe(name, rlp);
        let mut text = std::fs::read_to_string(&p).unwrap();
        if let Some(m) = model {
            let start = text.find("[model]\n").unwrap() + "[model]\n".len();
            let end = text.find("\n[data]").unwrap();
            text.replace_range(start..end, m);
            text = text.replace("[data]\n", "[data]\ndoc_masks = true\n");
        }
        std::fs::write(&p, format!("objective = \"rlp\"\n{text}")).unwrap();
        (p, run)
    };
    let (full, full_run) = with_objective(&format!("{tag}-full"));
    let o = train(&full, &[], &[]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("2 positions × 3 thoughts of up to 4 tokens"),
        "{e}"
    );
    let recs = records(&full_run);
    assert_eq!(recs.len(), 8);
    for r in &recs {
        for key in [
            "info_gain",
            "info_gain_std",
            "thought/mean_length",
            "ema_ce",
            "clip_ratio",
            "entropy",
            "loss",
        ] {
            assert!(
                r[key].as_f64().is_some_and(f64::is_finite),
                "{key} missing from {r}"
            );
        }
        let len = r["thought/mean_length"].as_f64().unwrap();
        assert!(len > 0.0 && len <= 4.0, "{r}");
    }
    for ckpt in std::fs::read_dir(full_run.join("checkpoints")).unwrap() {
        let ema = ckpt
            .unwrap()
            .path()
            .join("train_state/ema/model.safetensors");
        assert!(ema.is_file(), "{} missing", ema.display());
    }
    // A kill after step 4 and --resume reproduce every later loss: the EMA and the data
    // position come back from the checkpoint of step 3.
    let (cut, cut_run) = with_objective(&format!("{tag}-cut"));
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:4")]);
    assert!(!o.status.success(), "the fault did not fire");
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&cut_run), losses(&full_run));
    let ema_ce = |run: &Path| -> Vec<f64> {
        records(run)
            .iter()
            .filter_map(|r| r["ema_ce"].as_f64())
            .collect()
    };
    assert_eq!(ema_ce(&cut_run), ema_ce(&full_run));
}

#[test]
fn rlp_recipe_mistakes_are_one_line_errors() {
    let (p, _) = rlp_recipe("rlp-bad", "group_size = 1");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("objective = \"rlp\"\n{text}")).unwrap();
    assert_one_line_error(&train(&p, &[], &[]), &["[rlp]", "`group_size`"]);
    let (p, _) = recipe("rlp-no-section", "");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("objective = \"rlp\"\n{text}")).unwrap();
    assert_one_line_error(&train(&p, &[], &[]), &["needs an [rlp] section"]);
    std::fs::write(&p, format!("kind = \"sft\"\nobjective = \"rlp\"\n{text}")).unwrap();
    assert_one_line_error(
        &train(&p, &[], &[]),
        &["`objective` belongs to kind = \"pretrain\""],
    );
}
