//! llm.c checkpoints: exact round trips (file and stream), the on-disk header and size, bf16 (version 5) import,
//! llm.c ↔ HF conversion, and typed errors for bad magic, versions, headers, truncation and trailing data.

use eslm_gpt2::checkpoint::{hf, llmc, CheckpointError};
use eslm_gpt2::{GptConfig, ParamKind, ParamSet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_params(cfg: &GptConfig, seed: u64) -> ParamSet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = ParamSet::zeros(cfg);
    for x in p.as_mut_slice() {
        *x = rng.gen_range(-1.0f32..1.0);
    }
    let v = cfg.vocab_size * cfg.n_embd;
    p.get_mut(ParamKind::Wte)[v..]
        .iter_mut()
        .for_each(|x| *x = 0.0);
    p
}

fn to_bytes(p: &ParamSet) -> Vec<u8> {
    let mut out = Vec::new();
    llmc::write(p, &mut out).expect("write");
    out
}

fn header_words(bytes: &[u8]) -> Vec<i32> {
    bytes[..llmc::HEADER_BYTES]
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn set_word(bytes: &mut [u8], i: usize, v: i32) {
    bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn file_round_trip_is_exact_with_llmc_header() {
    let cfg = GptConfig::new(3, 3, 24, 50, 7).expect("config");
    let params = random_params(&cfg, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.bin");
    llmc::save(&params, &path).expect("save");
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(bytes.len(), llmc::HEADER_BYTES + 4 * cfg.num_params());
    let h = header_words(&bytes);
    assert_eq!(&h[..8], &[20240326, 3, 7, 50, 3, 3, 24, 128]);
    assert!(h[8..].iter().all(|&x| x == 0));
    // Parameters follow in our storage order, f32 little-endian.
    let first = f32::from_le_bytes([bytes[1024], bytes[1025], bytes[1026], bytes[1027]]);
    assert_eq!(first, params.get(ParamKind::Wte)[0]);
    let back = llmc::load(&path).expect("load");
    assert_eq!(back.config(), &cfg);
    assert_eq!(back.as_slice(), params.as_slice());
}

#[test]
fn stream_round_trip_with_and_without_length() {
    let cfg = GptConfig::tiny();
    let params = random_params(&cfg, 2);
    let bytes = to_bytes(&params);
    for len in [Some(bytes.len() as u64), None] {
        let back = llmc::read(bytes.as_slice(), len).expect("read");
        assert_eq!(back.as_slice(), params.as_slice());
    }
}

#[test]
fn reads_bf16_version_5() {
    let cfg = GptConfig::tiny();
    let params = random_params(&cfg, 3);
    let mut bytes = to_bytes(&params)[..llmc::HEADER_BYTES].to_vec();
    set_word(&mut bytes, 1, llmc::VERSION_BF16);
    for &x in params.as_slice() {
        bytes.extend(half::bf16::from_f32(x).to_bits().to_le_bytes());
    }
    let back = llmc::read(bytes.as_slice(), Some(bytes.len() as u64)).expect("bf16");
    for (a, b) in back.as_slice().iter().zip(params.as_slice()) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
}

#[test]
fn llmc_to_hf_and_back() {
    let cfg = GptConfig::new(2, 4, 32, 200, 16).expect("config");
    let params = random_params(&cfg, 4);
    let dir = tempfile::tempdir().expect("tempdir");
    llmc::save(&params, &dir.path().join("m.bin")).expect("save llmc");
    let loaded = llmc::load(&dir.path().join("m.bin")).expect("load llmc");
    hf::save_pretrained(&loaded, &dir.path().join("hf")).expect("save hf");
    let via_hf = hf::load_pretrained(&dir.path().join("hf")).expect("load hf");
    assert_eq!(via_hf.config(), &cfg);
    assert_eq!(via_hf.as_slice(), params.as_slice());
}

fn read_err(bytes: &[u8], len: Option<u64>) -> CheckpointError {
    match llmc::read(bytes, len) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn bad_headers_and_sizes_give_typed_errors() {
    let cfg = GptConfig::tiny();
    let good = to_bytes(&random_params(&cfg, 5));
    let n = good.len() as u64;

    let mut b = good.clone();
    set_word(&mut b, 0, 12345);
    assert!(matches!(
        read_err(&b, Some(n)),
        CheckpointError::BadMagic { got: 12345, .. }
    ));

    let mut b = good.clone();
    set_word(&mut b, 1, 4);
    assert!(matches!(
        read_err(&b, Some(n)),
        CheckpointError::UnsupportedVersion(4)
    ));

    for (word, value) in [(2, 0), (3, -1), (4, 0), (5, 0), (6, -5), (7, 0)] {
        let mut b = good.clone();
        set_word(&mut b, word, value);
        assert!(
            matches!(read_err(&b, Some(n)), CheckpointError::Config(_)),
            "word {word} = {value}"
        );
    }
    // C not divisible by H; Vp < V.
    let mut b = good.clone();
    set_word(&mut b, 5, 3);
    assert!(matches!(read_err(&b, Some(n)), CheckpointError::Model(_)));
    let mut b = good.clone();
    set_word(&mut b, 7, 10);
    assert!(matches!(read_err(&b, Some(n)), CheckpointError::Model(_)));

    // A header claiming an enormous model: an error, not an allocation, with or without the length.
    let mut b = good.clone();
    for (w, v) in [
        (2, i32::MAX),
        (3, i32::MAX - 1),
        (6, i32::MAX - 1),
        (5, 1),
        (7, i32::MAX),
    ] {
        set_word(&mut b, w, v);
    }
    assert!(matches!(read_err(&b, Some(n)), CheckpointError::Config(_)));
    assert!(llmc::read(b.as_slice(), None).is_err());
    let mut b = good.clone();
    set_word(&mut b, 3, 1 << 30);
    set_word(&mut b, 7, 1 << 30);
    assert!(matches!(
        read_err(&b, Some(n)),
        CheckpointError::Truncated { .. }
    ));
    assert!(matches!(
        read_err(&b, None),
        CheckpointError::Truncated { .. }
    ));

    // Truncation anywhere, and trailing bytes.
    for cut in [0, 3, 1023, 1024, 1025, good.len() / 2, good.len() - 1] {
        let e = read_err(&good[..cut], Some(cut as u64));
        assert!(
            matches!(e, CheckpointError::Truncated { .. }),
            "cut {cut}: {e}"
        );
        let e = read_err(&good[..cut], None);
        assert!(
            matches!(e, CheckpointError::Truncated { .. }),
            "stream cut {cut}: {e}"
        );
    }
    // A stream shorter than the length the caller claims.
    let e = read_err(&good[..good.len() - 8], Some(n));
    assert!(matches!(e, CheckpointError::Truncated { .. }), "{e}");
    let mut longer = good.clone();
    longer.extend([0u8; 4]);
    assert!(matches!(
        read_err(&longer, Some(n + 4)),
        CheckpointError::TrailingData { .. }
    ));
    assert!(matches!(
        read_err(&longer, None),
        CheckpointError::TrailingData { .. }
    ));
    assert!(matches!(
        read_err(&longer, Some(n)),
        CheckpointError::TrailingData { .. }
    ));
}

#[test]
fn load_reports_io_errors_with_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.bin");
    match llmc::load(&missing) {
        Err(CheckpointError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Io error, got {other:?}"),
    }
}
