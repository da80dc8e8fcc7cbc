//! HF `tokenizer.json` tokenizers (any BPE: Qwen3's, GPT-2's, our own), through the
//! `tokenizers` crate.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Map, Value};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages.
    pub origin: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            anyhow::bail!("{}: tokenizer file not found", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json ({e})", path.display()))?;
        Ok(Self {
            inner,
            origin: path.to_path_buf(),
        })
    }

    fn from_json(v: &Value, origin: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = v
            .to_string()
            .parse()
            .map_err(|e| anyhow!("{origin}: invalid tokenizer ({e})"))?;
        Ok(Self {
            inner,
            origin: PathBuf::from(origin),
        })
    }

    /// A byte-level BPE with the 256 byte tokens and no merges, plus `specials` after them.
    /// It needs no training data and no download, and encodes any text losslessly, so it
    /// is what a model built from a bare recipe uses until a trained tokenizer is given.
    pub fn byte_level(specials: &[&str]) -> Result<Self> {
        let mut vocab = Map::new();
        for (b, ch) in byte_to_unicode().iter().enumerate() {
            vocab.insert(ch.to_string(), json!(b));
        }
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                vocab.insert(s.to_string(), json!(256 + i));
                json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let v = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        Self::from_json(&v, "<byte-level tokenizer>")
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        self.inner
            .save(&tmp, false)
            .map_err(|e| anyhow!("{}: cannot write tokenizer ({e})", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot move into place", path.display()))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("{}: cannot encode text ({e})", self.origin.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts in parallel (without special tokens).
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encs = self
            .inner
            .encode_batch(inputs, false)
            .map_err(|e| anyhow!("{}: cannot encode text ({e})", self.origin.display()))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub(crate) fn from_inner(inner: tokenizers::Tokenizer, origin: &str) -> Self {
        Self {
            inner,
            origin: PathBuf::from(origin),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("{}: cannot decode ids ({e})", self.origin.display()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The ids of the added tokens marked special (document separators, chat markers, a
    /// mask token), sorted.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        v.sort_unstable();
        v
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// GPT-2's reversible map from bytes to printable characters, which byte-level BPE
/// vocabularies are written in.
fn byte_to_unicode() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// Turns a growing list of ids into text pieces as soon as they form whole characters
/// (a byte-level token can end in the middle of a UTF-8 sequence).
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
    skip_special: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> Self {
        Self {
            tok,
            ids: vec![],
            emitted: 0,
            skip_special,
        }
    }

    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_any_text_and_streams_whole_chars() {
        let t = Tokenizer::byte_level(&["<|endoftext|>"]).unwrap();
        assert_eq!(t.vocab_size(), 257);
        let text = "Hello, wörld — 你好 🙂\n\ttabs";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        assert_eq!(t.encode("<|endoftext|>").unwrap(), vec![256]);

        let mut s = StreamDecoder::new(&t, false);
        let mut out = String::new();
        for &id in &ids {
            if let Some(p) = s.push(id).unwrap() {
                assert!(!p.contains('\u{FFFD}'), "streamed a partial character");
                out.push_str(&p);
            }
        }
        assert_eq!(out, text);
    }

    #[test]
    fn missing_or_corrupt_file_names_the_file() {
        let e = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
        let p = std::env::temp_dir().join(format!("ember-bad-tok-{}.json", std::process::id()));
        std::fs::write(&p, "{\"model\": 3}").unwrap();
        let e = Tokenizer::from_file(&p).err().unwrap().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("not a valid tokenizer.json"),
            "{e}"
        );
        std::fs::remove_file(p).unwrap();
    }
}
