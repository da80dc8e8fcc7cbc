//! ModernBERT against transformers' `ModernBertForMaskedLM` (eager attention) on the fixture
//! of `tests/fixtures/gen_modernbert.py`: a local window small enough to matter, a padded
//! row, noised 1-D weights. Logits and every hidden state, padded positions included.

use ember_models::modernbert::ModernBert;

use crate::common::*;

#[test]
fn modernbert_matches_transformers_padded_rows_included() {
    let fx = load_fixtures("modernbert");
    let dev = device();
    let model = ModernBert::from_pretrained(&fixture_dir("modernbert"), &dev).unwrap();
    let ids = fx["input_ids"].ids(&dev);
    let mask = fx["attention_mask"].ids(&dev);
    let hidden = model.hidden_states(ids.clone(), mask.clone());
    assert_eq!(hidden.len(), 5);
    for (i, h) in hidden.into_iter().enumerate() {
        let name = format!("hidden_states.{i}");
        assert_close(&name, &values(h), &fx[&name].values, 1e-4);
    }
    let logits = values(model.forward(ids, mask));
    assert!(logits.iter().all(|x| x.is_finite()));
    assert_close("logits", &logits, &fx["logits"].values, 1e-4);
}

/// Rows of different lengths (left-aligned, zero-padded) with their mask.
fn ragged(lengths: &[usize], width: usize, vocab: i64) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let mut seed = 7i64;
    lengths
        .iter()
        .map(|&n| {
            let ids = (0..width)
                .map(|j| {
                    seed = (seed * 1103515245 + 12345) % 2147483648;
                    if j < n {
                        1 + seed % (vocab - 1)
                    } else {
                        0
                    }
                })
                .collect();
            let mask = (0..width).map(|j| (j < n) as i64).collect();
            (ids, mask)
        })
        .unzip()
}

#[test]
fn unpadded_path_equals_the_padded_one() {
    let dev = device();
    let model = ModernBert::from_pretrained(&fixture_dir("modernbert"), &dev).unwrap();
    // Width 20 and a window of 8: first fit packs 7 + 12 into one row and 5 + 3 into
    // another, so documents share rows and attention must stay inside each one.
    let lengths = [20, 7, 12, 5, 3];
    let (ids, mask) = ragged(&lengths, 20, 96);
    let int = |v: &[Vec<i64>]| {
        burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(v.concat(), [v.len(), 20]),
            &dev,
        )
    };
    let padded = values(model.forward(int(&ids), int(&mask)));
    let vocab = 96;
    let valid: Vec<f64> = mask
        .concat()
        .iter()
        .enumerate()
        .filter(|(_, &m)| m == 1)
        .flat_map(|(i, _)| padded[i * vocab..(i + 1) * vocab].to_vec())
        .collect();
    let unpadded = model.forward_unpadded(&ids, &mask);
    assert_eq!(unpadded.dims(), [lengths.iter().sum::<usize>(), vocab]);
    assert_close("unpadded logits", &values(unpadded), &valid, 1e-5);
}

#[test]
fn modernbert_saves_what_it_loads() {
    let dev = device();
    let model = ModernBert::from_pretrained(&fixture_dir("modernbert"), &dev).unwrap();
    let dir = temp_dir("modernbert-save");
    model
        .save_pretrained(&dir, &ember_models::hf::SaveOptions::default())
        .unwrap();
    let again = ModernBert::from_pretrained(&dir, &dev).unwrap();
    assert_eq!(again.config.global_layers, model.config.global_layers);
    assert_eq!(again.config.local_attention, 8);
    let stored: usize = model.weights().iter().map(|(_, d)| d.num_elements()).sum();
    assert_eq!(model.config.num_params(), stored);
    let (ids, mask) = ragged(&[24, 15], 24, 96);
    let int = |v: &[Vec<i64>]| {
        burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(v.concat(), [2, 24]),
            &dev,
        )
    };
    let a = values(model.forward(int(&ids), int(&mask)));
    let b = values(again.forward(int(&ids), int(&mask)));
    assert_eq!(a, b);
}
