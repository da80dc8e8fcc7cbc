//! Qwen3's real tokenizer.json against encodings made by HF `tokenizers` in Python.
//! The file is fetched by `data/fetch qwen3-tokenizer` (CI does this and sets
//! EMBER_REQUIRE_DATA=1, so the test cannot pass by skipping there).

use std::path::Path;

use ember_data::Tokenizer;

#[test]
fn qwen3_tokenizer_matches_hf_tokenizers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("data/downloads/qwen3/tokenizer.json");
    if !path.exists() {
        assert!(
            std::env::var("EMBER_REQUIRE_DATA").is_err(),
            "{} missing: run data/fetch qwen3-tokenizer",
            path.display()
        );
        eprintln!(
            "skipped: {} not fetched (data/fetch qwen3-tokenizer)",
            path.display()
        );
        return;
    }
    let tok = Tokenizer::from_file(&path).unwrap();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/qwen3_tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "encoding of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "decode round trip of {text:?}"
        );
    }
    for (t, id) in [
        ("<|endoftext|>", 151643),
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
    ] {
        assert_eq!(tok.token_id(t), Some(id));
    }
}
