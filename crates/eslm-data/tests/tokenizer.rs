//! GPT-2 tokenizer against known values (needs `../shared/data/gpt2`; skips with a message when missing).

use std::path::PathBuf;

use eslm_data::prepare::split_for_encoding;
use eslm_data::{DataError, Tokenizer};

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

fn both() -> Option<Vec<Tokenizer>> {
    let dir = shared("gpt2")?;
    Some(vec![
        Tokenizer::from_path(dir.join("tokenizer.json")).unwrap(),
        Tokenizer::from_vocab_merges(dir.join("vocab.json"), dir.join("merges.txt")).unwrap(),
        Tokenizer::from_path(dir.join("vocab.json")).unwrap(),
    ])
}

#[test]
fn hello_world_and_eot() {
    let Some(toks) = both() else { return };
    for tok in toks {
        assert_eq!(
            tok.encode("Hello world").unwrap(),
            vec![15496, 995],
            "{tok:?}"
        );
        assert_eq!(tok.decode(&[15496, 995]).unwrap(), "Hello world");
        assert_eq!(tok.eot_id(), Some(50256));
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.encode("a<|endoftext|>b").unwrap(), vec![64, 50256, 65]);
    }
}

#[test]
fn tinyshakespeare_token_count_and_round_trip() {
    let (Some(toks), Some(path)) = (both(), shared("corpus/tinyshakespeare.txt")) else {
        return;
    };
    let text = std::fs::read_to_string(path).unwrap();
    let mut reference = None;
    for tok in toks {
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 338_025, "{tok:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Encoding in safe pieces gives the same ids as encoding the whole text.
        let pieces = split_for_encoding(&text, 20_000);
        assert!(pieces.len() > 40, "{} pieces", pieces.len());
        assert_eq!(pieces.concat(), text);
        let chunked: Vec<u32> = pieces.iter().flat_map(|p| tok.encode(p).unwrap()).collect();
        assert_eq!(chunked, ids);
        match &reference {
            None => reference = Some(ids),
            Some(r) => assert_eq!(&ids, r, "tokenizer.json and vocab+merges disagree"),
        }
    }
}

#[test]
fn missing_files_are_tokenizer_errors() {
    let err = Tokenizer::from_path("/nonexistent/tokenizer.json").unwrap_err();
    assert!(matches!(err, DataError::Tokenizer(_)));
    assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
    let err = Tokenizer::from_vocab_merges("/nonexistent/vocab.json", "/nonexistent/merges.txt")
        .unwrap_err();
    assert!(matches!(err, DataError::Tokenizer(_)));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{ not json").unwrap();
    assert!(matches!(
        Tokenizer::from_path(&bad),
        Err(DataError::Tokenizer(_))
    ));
}
