//! `prepare`: token totals, document separators, train/val split, bad inputs, gzip and JSONL, atomic output,
//! and the binary on tinyshakespeare (needs `../shared/data`; skips with a message when missing).

use std::io::Write;
use std::path::{Path, PathBuf};

use eslm_data::prepare::{prepare, PrepareConfig};
use eslm_data::{DataError, ShardReader, Tokenizer};

fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} not found (shared test data missing)", p.display());
        None
    }
}

fn tokenizer() -> Option<Tokenizer> {
    Some(Tokenizer::from_path(shared("gpt2/tokenizer.json")?).unwrap())
}

fn read_all(paths: &[PathBuf]) -> Vec<u32> {
    paths
        .iter()
        .flat_map(|p| ShardReader::open(p).unwrap().tokens().to_vec_u32())
        .collect()
}

fn cfg(inputs: &[&Path], out: &Path) -> PrepareConfig {
    PrepareConfig::new(inputs.iter().map(|p| p.to_path_buf()).collect(), out)
}

#[test]
fn documents_are_joined_by_single_eots() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    std::fs::write(
        &a,
        "Hello world<|endoftext|>Second doc.<|endoftext|><|endoftext|>Third",
    )
    .unwrap();
    let b = dir.path().join("b.txt");
    std::fs::write(&b, "Fourth<|endoftext|>").unwrap();
    let out = dir.path().join("out");
    let s = prepare(&cfg(&[&a, &b], &out), &tok).unwrap();
    let expect = tok
        .encode("Hello world<|endoftext|>Second doc.<|endoftext|>Third<|endoftext|>Fourth")
        .unwrap();
    assert_eq!(read_all(&s.train_shards), expect);
    assert_eq!(s.train_documents, 4);
    assert_eq!(s.empty_documents, 2);
    assert_eq!(s.train_tokens as usize, expect.len());
    assert!(s.val_shards.is_empty());
}

#[test]
fn shards_split_at_the_requested_size_and_val_split_is_by_document() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..40)
        .map(|i| format!("Document number {i} says hello {i} times."))
        .collect();
    let input = dir.path().join("docs.txt");
    std::fs::write(&input, docs.join("<|endoftext|>")).unwrap();
    let run = |out: &str, seed: u64| {
        let c = PrepareConfig {
            val_fraction: 0.1,
            shard_tokens: 50,
            seed,
            ..cfg(&[&input], &dir.path().join(out))
        };
        prepare(&c, &tok).unwrap()
    };
    let s = run("o1", 7);
    assert_eq!((s.train_documents, s.val_documents), (36, 4));
    for p in &s.train_shards[..s.train_shards.len() - 1] {
        assert_eq!(ShardReader::open(p).unwrap().len(), 50);
    }
    let train = read_all(&s.train_shards);
    let val = read_all(&s.val_shards);
    assert_eq!(train.len() as u64, s.train_tokens);
    let decode_docs = |ids: &[u32]| -> Vec<String> {
        ids.split(|&t| t == 50256)
            .map(|d| tok.decode(d).unwrap())
            .collect()
    };
    let (tr, va) = (decode_docs(&train), decode_docs(&val));
    assert_eq!((tr.len(), va.len()), (36, 4));
    let mut all: Vec<String> = tr.iter().chain(&va).cloned().collect();
    all.sort();
    let mut want = docs.clone();
    want.sort();
    assert_eq!(all, want, "every document lands in exactly one split");
    // Deterministic in the seed.
    let again = run("o2", 7);
    assert_eq!(read_all(&again.val_shards), val);
    let other = run("o3", 8);
    assert_ne!(read_all(&other.val_shards), val);
}

#[test]
fn gzip_jsonl_and_folders() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(inputs.join("sub")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"Zipped text").unwrap();
    std::fs::write(inputs.join("a.txt.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        inputs.join("sub/b.jsonl"),
        "{\"text\": \"First record\"}\nnot json\n{\"other\": 1}\n\n{\"text\": \"Second record\"}\n",
    )
    .unwrap();
    std::fs::write(inputs.join(".hidden.txt"), "ignored").unwrap();
    let s = prepare(&cfg(&[&inputs], &dir.path().join("out")), &tok).unwrap();
    let expect = tok
        .encode("Zipped text<|endoftext|>First record<|endoftext|>Second record")
        .unwrap();
    assert_eq!(read_all(&s.train_shards), expect);
    assert_eq!(s.files_read, 2);
    assert_eq!(s.skipped.len(), 2, "{:?}", s.skipped);
    assert!(s
        .skipped
        .iter()
        .any(|x| x.path.ends_with("b.jsonl:2") && x.reason.contains("bad JSON")));
    assert!(s
        .skipped
        .iter()
        .any(|x| x.path.ends_with("b.jsonl:3") && x.reason.contains("\"text\"")));
}

#[test]
fn bad_inputs_are_counted_or_fatal_when_strict() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "fine").unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let binary = dir.path().join("bad.txt");
    std::fs::write(&binary, [b'o', b'k', 0xff, 0xfe]).unwrap();
    let missing = dir.path().join("missing.txt");
    let inputs = [
        good.as_path(),
        empty.as_path(),
        binary.as_path(),
        missing.as_path(),
    ];
    let s = prepare(&cfg(&inputs, &dir.path().join("lenient")), &tok).unwrap();
    assert_eq!(s.files_read, 1);
    let reasons: Vec<&str> = s.skipped.iter().map(|x| x.reason.as_str()).collect();
    assert_eq!(s.skipped.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("empty file")));
    assert!(reasons
        .iter()
        .any(|r| r.contains("invalid UTF-8 at byte 2")));
    assert!(reasons.iter().any(|r| r.contains("does not exist")));
    for bad in [&empty, &binary, &missing] {
        let c = PrepareConfig {
            strict: true,
            ..cfg(&[&good, bad], &dir.path().join("strict"))
        };
        let err = prepare(&c, &tok).unwrap_err();
        assert!(
            matches!(&err, DataError::BadInput { path, .. } if path == bad),
            "{err}"
        );
    }
    // Nothing usable at all is an error.
    assert!(matches!(
        prepare(&cfg(&[&empty], &dir.path().join("none")), &tok),
        Err(DataError::NoInput(_))
    ));
}

#[test]
fn existing_shards_need_overwrite() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("a.txt");
    std::fs::write(&input, "one two three").unwrap();
    let out = dir.path().join("out");
    prepare(&cfg(&[&input], &out), &tok).unwrap();
    assert!(matches!(
        prepare(&cfg(&[&input], &out), &tok),
        Err(DataError::Config(_))
    ));
    let c = PrepareConfig {
        overwrite: true,
        ..cfg(&[&input], &out)
    };
    prepare(&c, &tok).unwrap();
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["train_000000.bin".to_string()],
        "no temporary files left"
    );
}

#[test]
fn bad_settings_are_config_errors() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (f, n) in [(1.0, 10), (-0.1, 10), (f64::NAN, 10), (0.1, 0)] {
        let c = PrepareConfig {
            val_fraction: f,
            shard_tokens: n,
            ..cfg(&[dir.path()], &dir.path().join("o"))
        };
        assert!(
            matches!(prepare(&c, &tok), Err(DataError::Config(_))),
            "{f} {n}"
        );
    }
}

#[test]
fn binary_prepares_tinyshakespeare_to_338025_tokens() {
    let (Some(text), Some(tok)) = (
        shared("corpus/tinyshakespeare.txt"),
        shared("gpt2/tokenizer.json"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_eslm-data"))
        .args(["prepare", "--input"])
        .arg(&text)
        .arg("--tokenizer")
        .arg(&tok)
        .arg("--out")
        .arg(&out)
        .args(["--val-fraction", "0", "--shard-tokens", "100000"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("338025 train"), "{stdout}");
    let paths = eslm_data::loader::expand_pattern(out.join("train_*.bin")).unwrap();
    assert_eq!(paths.len(), 4);
    let total: usize = paths
        .iter()
        .map(|p| ShardReader::open(p).unwrap().len())
        .sum();
    assert_eq!(total, 338_025);
    assert!(!out.join("val_000000.bin").exists());
}

/// Issue 12: a one-document input (no `<|endoftext|>`) with `--val-fraction` gets a validation split by size,
/// with a warning; an input that does not exist is named in the error.
#[test]
fn one_document_input_is_split_by_size_and_missing_inputs_are_named() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("book.txt");
    let body: String = (0..200).map(|i| format!("Line {i} of a book.\n")).collect();
    std::fs::write(&text, &body).unwrap();
    let c = PrepareConfig {
        val_fraction: 0.1,
        ..cfg(&[&text], &dir.path().join("out"))
    };
    let s = prepare(&c, &tok).unwrap();
    assert_eq!(s.val_shards.len(), 1, "{s}");
    assert!(s.val_tokens > 0 && s.train_tokens > 5 * s.val_tokens, "{s}");
    assert!(s.warnings.iter().any(|w| w.contains("one document")), "{s}");

    let missing = dir.path().join("no-such-file.txt");
    let err = prepare(&cfg(&[&missing], &dir.path().join("out2")), &tok)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-file.txt"), "{err}");
}
