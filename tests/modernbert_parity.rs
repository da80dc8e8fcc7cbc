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
