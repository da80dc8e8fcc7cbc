//! Data pipeline: sources, token cache, packed loader, BPE training.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, LargeStringArray, RecordBatch, StringArray};
use ember_data::{
    build_or_reuse, train_bpe, CacheSpec, Cursor, PackedLoader, Source, TextSplit, Tokenizer,
};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use crate::common::temp_dir;

fn docs(s: &Source) -> Vec<String> {
    s.documents()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn err_of<E: std::fmt::Display>(r: Result<Vec<String>, E>) -> String {
    let e = match r {
        Ok(d) => panic!("expected an error, got {d:?}"),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains('\n'), "error spans several lines: {e}");
    e
}

fn all_docs(s: &Source) -> Result<Vec<String>, String> {
    s.documents()
        .and_then(|d| d.collect())
        .map_err(|e| e.to_string())
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>, row_group: usize) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group))
        .build();
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn write_tokens(path: &Path, tokens: &[u32]) {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_tokens(path: &Path) -> Vec<u32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn text_sources_split_by_file_line_and_blank_line() {
    let d = temp_dir("data-text");
    std::fs::create_dir_all(d.join("corpus/sub")).unwrap();
    std::fs::write(d.join("corpus/b.txt"), "second file\n").unwrap();
    std::fs::write(d.join("corpus/a.txt"), "first file\r\nline two\n").unwrap();
    std::fs::write(d.join("corpus/sub/c.txt"), "nested").unwrap();
    std::fs::write(d.join("corpus/empty.txt"), "").unwrap();

    let dir = Source::Text {
        path: d.join("corpus"),
        split: TextSplit::File,
    };
    dir.check().unwrap();
    assert_eq!(
        docs(&dir),
        ["first file\r\nline two\n", "second file\n", "nested"],
        "files sorted by path, recursively, empty file skipped"
    );

    let para = d.join("para.txt");
    std::fs::write(&para, "p1 l1\np1 l2\n\n\n  \np2 l1\r\n\np3\n").unwrap();
    let lines = Source::Text {
        path: para.clone(),
        split: TextSplit::Line,
    };
    assert_eq!(docs(&lines), ["p1 l1", "p1 l2", "p2 l1", "p3"]);
    let paras = Source::Text {
        path: para,
        split: TextSplit::BlankLine,
    };
    assert_eq!(docs(&paras), ["p1 l1\np1 l2", "p2 l1", "p3"]);

    // The config shape: `split` defaults to file, names are snake_case.
    let s: Source = serde_json::from_str(r#"{"format":"text","path":"x"}"#).unwrap();
    assert_eq!(
        s,
        Source::Text {
            path: "x".into(),
            split: TextSplit::File
        }
    );
    let s: Source =
        serde_json::from_str(r#"{"format":"text","path":"x","split":"blank_line"}"#).unwrap();
    assert!(s.describe().contains("blank_line"), "{}", s.describe());
}

#[test]
fn jsonl_source_reads_the_named_field() {
    let d = temp_dir("data-jsonl");
    let p = d.join("x.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"hello\", \"body\": \"b1\"}\n\n{\"text\": \"wörld 🙂\\nnext\", \"body\": \"b2\"}\n",
    )
    .unwrap();
    let s = Source::Jsonl {
        path: p.clone(),
        field: "text".into(),
    };
    s.check().unwrap();
    assert_eq!(docs(&s), ["hello", "wörld 🙂\nnext"]);
    let s = Source::Jsonl {
        path: p.clone(),
        field: "body".into(),
    };
    assert_eq!(docs(&s), ["b1", "b2"]);
    assert_eq!(s.describe(), format!("jsonl {} field body", p.display()));
    let s: Source = serde_json::from_str(r#"{"format":"jsonl","path":"y"}"#).unwrap();
    assert_eq!(
        s,
        Source::Jsonl {
            path: "y".into(),
            field: "text".into()
        }
    );
}

#[test]
fn parquet_source_streams_string_columns_across_row_groups() {
    let d = temp_dir("data-parquet");
    std::fs::create_dir_all(d.join("ds/data")).unwrap();
    let texts: Vec<Option<String>> = (0..10)
        .map(|i| (i != 4).then(|| format!("doc {i} ✓")))
        .collect();
    write_parquet(
        &d.join("ds/data/train-00000-of-00002.parquet"),
        vec![
            (
                "id",
                Arc::new(Int64Array::from_iter_values(0..10)) as ArrayRef,
            ),
            ("text", Arc::new(StringArray::from(texts)) as ArrayRef),
        ],
        3,
    );
    write_parquet(
        &d.join("ds/data/train-00001-of-00002.parquet"),
        vec![(
            "text",
            Arc::new(LargeStringArray::from(vec!["large a", "large b"])) as ArrayRef,
        )],
        1,
    );
    std::fs::write(d.join("ds/README.md"), "not parquet").unwrap();

    let one = Source::Parquet {
        path: d.join("ds/data/train-00000-of-00002.parquet"),
        column: "text".into(),
    };
    one.check().unwrap();
    let want: Vec<String> = (0..10)
        .filter(|&i| i != 4)
        .map(|i| format!("doc {i} ✓"))
        .collect();
    assert_eq!(docs(&one), want, "null rows skipped, order kept");

    let dir = Source::Parquet {
        path: d.join("ds"),
        column: "text".into(),
    };
    dir.check().unwrap();
    let got = docs(&dir);
    assert_eq!(got.len(), 11);
    assert_eq!(&got[9..], ["large a", "large b"], "LargeUtf8 column read");
}

#[test]
fn source_errors_are_one_line_and_name_the_path() {
    let d = temp_dir("data-errors");

    // Missing file.
    let missing = d.join("nope.jsonl");
    let s = Source::Jsonl {
        path: missing.clone(),
        field: "text".into(),
    };
    let e = s.check().unwrap_err().to_string();
    assert!(
        e.contains(&missing.display().to_string()) && !e.contains('\n'),
        "{e}"
    );
    let e = err_of(all_docs(&s));
    assert!(e.contains(&missing.display().to_string()), "{e}");

    // Bad JSONL line, and a missing field.
    let p = d.join("bad.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": oops}\n",
    )
    .unwrap();
    let s = Source::Jsonl {
        path: p.clone(),
        field: "text".into(),
    };
    let e = err_of(all_docs(&s));
    assert!(
        e.starts_with(&format!("{}:3: invalid JSON", p.display())),
        "{e}"
    );
    let p2 = d.join("nofield.jsonl");
    std::fs::write(&p2, "{\"text\": \"ok\"}\n{\"content\": \"x\"}\n").unwrap();
    let s = Source::Jsonl {
        path: p2.clone(),
        field: "text".into(),
    };
    let e = err_of(all_docs(&s));
    assert!(
        e.starts_with(&format!(
            "{}:2: field `text` missing or not a string",
            p2.display()
        )),
        "{e}"
    );
    // The stream stops after its first error.
    let mut it = s.documents().unwrap();
    assert!(it.next().unwrap().is_ok());
    assert!(it.next().unwrap().is_err());
    assert!(it.next().is_none());

    // Truncated Parquet.
    let pq = d.join("t.parquet");
    let texts: Vec<String> = (0..200).map(|i| format!("document number {i}")).collect();
    write_parquet(
        &pq,
        vec![("text", Arc::new(StringArray::from(texts)) as ArrayRef)],
        50,
    );
    let len = std::fs::metadata(&pq).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&pq).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let s = Source::Parquet {
        path: pq.clone(),
        column: "text".into(),
    };
    let e = s.check().unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: not a readable Parquet file", pq.display()))
            && !e.contains('\n'),
        "{e}"
    );
    let e = err_of(all_docs(&s));
    assert!(e.contains("not a readable Parquet file"), "{e}");

    // Missing column: names it and lists the columns there are.
    let pq2 = d.join("cols.parquet");
    write_parquet(
        &pq2,
        vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "content",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
        ],
        10,
    );
    let s = Source::Parquet {
        path: pq2.clone(),
        column: "text".into(),
    };
    let e = s.check().unwrap_err().to_string();
    assert!(
        e.contains(&pq2.display().to_string())
            && e.contains("`text`")
            && e.contains("id, content")
            && !e.contains('\n'),
        "{e}"
    );
    // A non-string column.
    let s = Source::Parquet {
        path: pq2.clone(),
        column: "id".into(),
    };
    let e = s.check().unwrap_err().to_string();
    assert!(e.contains("`id`") && e.contains("not a string"), "{e}");
}

fn corpus(d: &Path, n: usize) -> PathBuf {
    let p = d.join("corpus.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({ "text": format!("doc {i}: {}", "ab ".repeat(i % 7)) }).to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

#[test]
fn cache_counts_add_up_reuses_and_fingerprints() {
    let d = temp_dir("data-cache");
    let n = 300;
    let path = corpus(&d, n);
    let sources = vec![Source::Jsonl {
        path: path.clone(),
        field: "text".into(),
    }];
    let all = docs(&sources[0]);
    let tok = Tokenizer::byte_level(&["<|endoftext|>"]).unwrap();
    let eos = 256;
    let spec = CacheSpec {
        sources: &sources,
        tokenizer: &tok,
        eos_id: eos,
        val_fraction: 0.1,
        seed: 7,
    };
    let cdir = d.join("cache");
    let c = build_or_reuse(&spec, &cdir, false).unwrap();
    let text_tokens: u64 = all.iter().map(|s| s.len() as u64).sum(); // one token per byte
    assert_eq!(c.docs, n as u64);
    assert_eq!(c.train_tokens + c.val_tokens, text_tokens + n as u64);
    assert!(c.val_tokens > 0 && c.train_tokens > c.val_tokens, "{c:?}");
    let train = read_tokens(&cdir.join("train.bin"));
    let val = read_tokens(&cdir.join("val.bin"));
    assert_eq!(train.len() as u64, c.train_tokens);
    assert_eq!(val.len() as u64, c.val_tokens);
    assert_eq!(*train.last().unwrap(), eos);
    // Every document lands whole in one split, in order.
    let decode = |t: &[u32]| -> Vec<String> {
        t.split(|&x| x == eos)
            .filter(|d| !d.is_empty())
            .map(|d| tok.decode(d, false).unwrap())
            .collect()
    };
    let (mut tr, mut va) = (decode(&train), decode(&val));
    assert_eq!(tr.len() + va.len(), n);
    tr.append(&mut va);
    tr.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(tr, want);

    // Reuse: nothing rewritten.
    let meta1 = std::fs::read_to_string(cdir.join("meta.json")).unwrap();
    let mtime = std::fs::metadata(cdir.join("train.bin"))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let c2 = build_or_reuse(&spec, &cdir, false).unwrap();
    assert_eq!(
        (c2.train_tokens, c2.val_tokens, c2.docs),
        (c.train_tokens, c.val_tokens, c.docs)
    );
    assert_eq!(
        std::fs::metadata(cdir.join("train.bin"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime,
        "reuse rewrote train.bin"
    );
    assert_eq!(
        std::fs::read_to_string(cdir.join("meta.json")).unwrap(),
        meta1
    );

    // Same split for the same seed; another val_fraction is another fingerprint and split.
    let fp = |s: &str| -> String {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let spec3 = CacheSpec {
        val_fraction: 0.3,
        ..spec
    };
    let c3 = build_or_reuse(&spec3, &cdir, false).unwrap();
    let meta3 = std::fs::read_to_string(cdir.join("meta.json")).unwrap();
    assert_ne!(fp(&meta1), fp(&meta3));
    assert!(c3.val_tokens > c.val_tokens, "{c3:?} vs {c:?}");
    assert_eq!(c3.train_tokens + c3.val_tokens, text_tokens + n as u64);

    // A tiny corpus still gets a non-empty validation split when one is asked for.
    let tiny = d.join("tiny.txt");
    std::fs::write(&tiny, "only one document").unwrap();
    let ts = vec![Source::Text {
        path: tiny,
        split: TextSplit::File,
    }];
    let ct = build_or_reuse(
        &CacheSpec {
            sources: &ts,
            tokenizer: &tok,
            eos_id: eos,
            val_fraction: 0.01,
            seed: 1,
        },
        &d.join("tiny-cache"),
        false,
    )
    .unwrap();
    assert_eq!((ct.docs, ct.train_tokens, ct.val_tokens), (1, 0, 18));
}

#[test]
fn loader_targets_shift_and_seed_determines_order() {
    let d = temp_dir("data-loader");
    let f = d.join("train.bin");
    let toks: Vec<u32> = (1000..1000 + 8 * 16 + 5).collect();
    write_tokens(&f, &toks);
    let mut l = PackedLoader::open(&f, 8, 4, 3, true, false, 0).unwrap();
    assert_eq!(l.windows(), 16);
    assert_eq!(l.batches_per_epoch(), 4);
    let mut seen = vec![];
    for _ in 0..4 {
        let b = l.next_batch().unwrap();
        assert_eq!((b.batch, b.seq_len), (4, 8));
        assert!(b.segments.is_none());
        for r in 0..4 {
            let row = &b.inputs[r * 8..r * 8 + 8];
            let tgt = &b.targets[r * 8..r * 8 + 8];
            assert_eq!(&row[1..], &tgt[..7], "targets are inputs shifted");
            assert_eq!(tgt[7], row[7] + 1);
            assert_eq!((row[0] - 1000) % 8, 0, "windows are aligned");
            assert_eq!(&b.positions[r * 8..r * 8 + 8], &[0, 1, 2, 3, 4, 5, 6, 7]);
            seen.push((row[0] - 1000) / 8);
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..16).collect::<Vec<_>>(),
        "an epoch is a permutation"
    );
    assert_ne!(seen, sorted, "shuffled");
    assert_eq!(
        l.cursor(),
        Cursor {
            epoch: 0,
            index: 16
        }
    );

    let run = |seed: u64| -> Vec<Vec<u32>> {
        let mut l = PackedLoader::open(&f, 8, 4, seed, true, false, 0).unwrap();
        (0..4).map(|_| l.next_batch().unwrap().inputs).collect()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));

    // Unshuffled: file order; eval batches are file order and leave the cursor alone.
    let mut u = PackedLoader::open(&f, 8, 4, 3, false, false, 0).unwrap();
    let b = u.next_batch().unwrap();
    assert_eq!(b.inputs[..8], toks[..8]);
    assert_eq!(b.inputs[8..16], toks[8..16]);
    let ev = l.eval_batches(10).unwrap();
    assert_eq!(ev.len(), 4);
    assert_eq!(ev[0].inputs, b.inputs);
    assert_eq!(
        l.cursor(),
        Cursor {
            epoch: 0,
            index: 16
        }
    );
}

#[test]
fn loader_resumes_exactly_across_epochs() {
    let d = temp_dir("data-resume");
    let f = d.join("train.bin");
    let toks: Vec<u32> = (0..6 * 25 + 1).map(|i| (i * 7919 % 1000) as u32).collect();
    write_tokens(&f, &toks);
    // 25 windows, batch 4 ⇒ 6 batches an epoch (one window dropped).
    let open = || PackedLoader::open(&f, 6, 4, 11, true, false, 9999).unwrap();
    let mut full = open();
    assert_eq!(full.batches_per_epoch(), 6);
    let straight: Vec<_> = (0..15).map(|_| full.next_batch().unwrap()).collect();

    let k = 5;
    let mut first = open();
    for _ in 0..k {
        first.next_batch().unwrap();
    }
    let saved = serde_json::to_string(&first.cursor()).unwrap();
    let mut resumed = open();
    resumed
        .set_cursor(serde_json::from_str(&saved).unwrap())
        .unwrap();
    for (i, want) in straight.iter().enumerate().skip(k) {
        assert_eq!(
            &resumed.next_batch().unwrap(),
            want,
            "batch {i} after resume"
        );
    }
    assert_eq!(resumed.cursor().epoch, 2, "crossed two epoch boundaries");

    // Each epoch has its own order.
    let order = |e: usize| -> Vec<u32> {
        straight[e * 6..e * 6 + 6]
            .iter()
            .flat_map(|b| b.inputs.clone())
            .collect()
    };
    assert_ne!(order(0), order(1));
    assert!(resumed
        .set_cursor(Cursor {
            epoch: 0,
            index: 26
        })
        .is_err());
}

#[test]
fn loader_doc_masks_restart_positions_after_eos() {
    let d = temp_dir("data-masks");
    let f = d.join("train.bin");
    let eos = 0;
    // One window of 8: [5 6 EOS 7 EOS 8 9 10] then target 11.
    write_tokens(&f, &[5, 6, eos, 7, eos, 8, 9, 10, 11]);
    let l = PackedLoader::open(&f, 8, 1, 0, false, true, eos).unwrap();
    let b = &l.eval_batches(1).unwrap()[0];
    assert_eq!(b.positions, [0, 1, 2, 0, 1, 0, 1, 2]);
    assert_eq!(b.segments.as_deref(), Some(&[0, 0, 0, 1, 1, 2, 2, 2][..]));
    assert_eq!(b.targets, [6, eos, 7, eos, 8, 9, 10, 11]);
    let l = PackedLoader::open(&f, 8, 1, 0, false, false, eos).unwrap();
    let b = &l.eval_batches(1).unwrap()[0];
    assert_eq!(b.positions, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert!(b.segments.is_none());
}

#[test]
fn loader_rejects_files_too_small() {
    let d = temp_dir("data-small");
    let f = d.join("val.bin");
    write_tokens(&f, &[1, 2, 3, 4]);
    let e = PackedLoader::open(&f, 4, 1, 0, false, false, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&f.display().to_string()) && e.contains("only 4 tokens") && e.contains("= 5"),
        "{e}"
    );
    write_tokens(&f, &(0..9).collect::<Vec<_>>());
    let e = PackedLoader::open(&f, 4, 3, 0, false, false, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&f.display().to_string()) && e.contains("batch"),
        "{e}"
    );
    std::fs::write(&f, [0u8; 10]).unwrap();
    assert!(PackedLoader::open(&f, 1, 1, 0, false, false, 0).is_err());
}

#[test]
fn bpe_round_trips_unicode_and_puts_specials_first() {
    let d = temp_dir("data-bpe");
    let p = d.join("corpus.txt");
    let para =
        "The quick brown fox jumps over the lazy dog. Le renard brun saute. 狐狸跳过了懒狗。 \
                Ünïcödé ẞtraße — “quotes” 🙂🦀\n";
    std::fs::write(&p, para.repeat(50)).unwrap();
    let sources = vec![Source::Text {
        path: p,
        split: TextSplit::Line,
    }];
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let tok = train_bpe(&sources, 400, &specials, 2).unwrap();
    for (i, s) in specials.iter().enumerate() {
        assert_eq!(tok.token_id(s), Some(i as u32), "{s}");
    }
    assert!(tok.vocab_size() > 256 + specials.len() && tok.vocab_size() <= 400);
    let text = "The quick brown fox: 狐狸 🙂 ẞtraße\n\tnever seen: ʕ•ᴥ•ʔ ∮ Ω \u{0}<|im_end|>";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert!(ids.contains(&2), "the special token is encoded as one id");
    let trained = tok.encode(&para[..44]).unwrap();
    assert!(
        trained.len() < 44,
        "merges were learned: {} ids",
        trained.len()
    );

    let e = train_bpe(&sources, 258, &specials, 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("258") && e.contains("259"), "{e}");
    let missing = vec![Source::Text {
        path: d.join("missing.txt"),
        split: TextSplit::File,
    }];
    let e = train_bpe(&missing, 1000, &[], 2).err().unwrap().to_string();
    assert!(e.contains("missing.txt"), "{e}");
}
