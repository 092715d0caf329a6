//! HF safetensors checkpoints: exact save → load round trips, the HF layout on disk (names, `[in, out]` Conv1D
//! weights, unpadded `wte`, no `lm_head.weight`), the accepted variants (no `transformer.` prefix, mask buffers,
//! tied `lm_head.weight`, bf16/f16), and a typed error — never a panic — for every kind of bad input.

use std::collections::HashMap;
use std::path::PathBuf;

use eslm_gpt2::checkpoint::{hf, CheckpointError};
use eslm_gpt2::{GptConfig, ParamKind, ParamSet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn golden_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gpt2-tiny")
}

/// Random parameters (padded `wte` rows zero, as the engine keeps them).
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

fn odd_config() -> GptConfig {
    GptConfig::new(3, 3, 24, 50, 7).expect("config")
}

/// An owned copy of a safetensors file's tensors: name → (dtype, shape, bytes).
type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(bytes: &[u8]) -> Tensors {
    let st = SafeTensors::deserialize(bytes).expect("parse");
    st.tensors()
        .into_iter()
        .map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_tensors(t: &Tensors) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = t
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize(views, &None).expect("serialize")
}

fn golden_bytes() -> Vec<u8> {
    std::fs::read(golden_model_dir().join(hf::MODEL_FILE)).expect("golden model")
}

fn golden_config() -> GptConfig {
    let text = std::fs::read_to_string(golden_model_dir().join(hf::CONFIG_FILE)).expect("config");
    hf::config_from_json(&text).expect("golden config")
}

fn f32_bytes_to_vec(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn save_pretrained_load_pretrained_round_trip_is_exact() {
    for (cfg, seed) in [(GptConfig::tiny(), 1), (odd_config(), 2)] {
        let params = random_params(&cfg, seed);
        let dir = tempfile::tempdir().expect("tempdir");
        hf::save_pretrained(&params, dir.path()).expect("save");
        let back = hf::load_pretrained(dir.path()).expect("load");
        assert_eq!(back.config(), &cfg);
        assert_eq!(back.as_slice(), params.as_slice());
    }
}

#[test]
fn bytes_round_trip_and_infer_config() {
    let cfg = odd_config();
    let params = random_params(&cfg, 3);
    let bytes = hf::to_safetensors_bytes(&params).expect("serialize");
    let inferred = hf::infer_config(&bytes, cfg.n_head, 128).expect("infer");
    assert_eq!(inferred, cfg);
    let back = hf::params_from_safetensors(&bytes, &cfg, None).expect("load");
    assert_eq!(back.as_slice(), params.as_slice());
}

#[test]
fn written_file_uses_hf_names_shapes_and_layout() {
    let cfg = golden_config();
    let params = hf::load_pretrained(&golden_model_dir()).expect("golden");
    let ours = read_tensors(&hf::to_safetensors_bytes(&params).expect("serialize"));
    let theirs = read_tensors(&golden_bytes());
    // Same names (transformers omits the tied lm_head.weight too), shapes and bytes as transformers wrote.
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (name, (dtype, shape, data)) in &theirs {
        let (d2, s2, b2) = &ours[name];
        assert_eq!((dtype, shape), (d2, s2), "{name}");
        assert_eq!(data, b2, "{name} bytes differ");
    }
    // The Conv1D convention explicitly: HF c_attn.weight[i, o] (x·W) == our qkvw[o, i] (x·Wᵀ), layer 1.
    let c = cfg.n_embd;
    let hf_w = f32_bytes_to_vec(&theirs["transformer.h.1.attn.c_attn.weight"].2);
    let qkvw = params.get(ParamKind::QkvW);
    let layer1 = &qkvw[3 * c * c..6 * c * c];
    for (i, o) in [(0, 0), (1, 0), (0, 1), (c - 1, 3 * c - 1), (5, 70)] {
        assert_eq!(hf_w[i * 3 * c + o], layer1[o * c + i], "({i}, {o})");
    }
    // wte is stored unpadded; our padded rows are zero.
    assert_eq!(theirs["transformer.wte.weight"].1, vec![cfg.vocab_size, c]);
    assert!(params.get(ParamKind::Wte)[cfg.vocab_size * c..]
        .iter()
        .all(|&x| x == 0.0));
}

#[test]
fn accepts_unprefixed_names_buffers_and_tied_lm_head() {
    let cfg = golden_config();
    let reference = hf::params_from_safetensors(&golden_bytes(), &cfg, None).expect("golden");
    let mut t: Tensors = read_tensors(&golden_bytes())
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("transformer.").unwrap_or(&k).to_string(), v))
        .collect();
    let wte = t["wte.weight"].clone();
    t.insert("lm_head.weight".into(), wte);
    t.insert(
        "h.0.attn.bias".into(),
        (Dtype::F32, vec![1, 1, 2, 2], vec![0u8; 16]),
    );
    t.insert(
        "h.1.attn.masked_bias".into(),
        (Dtype::F32, vec![], vec![0u8; 4]),
    );
    let back = hf::params_from_safetensors(&write_tensors(&t), &cfg, None).expect("load variant");
    assert_eq!(back.as_slice(), reference.as_slice());
}

#[test]
fn converts_bf16_and_f16() {
    let cfg = golden_config();
    let reference = hf::params_from_safetensors(&golden_bytes(), &cfg, None).expect("golden");
    for dtype in [Dtype::BF16, Dtype::F16] {
        let t: Tensors = read_tensors(&golden_bytes())
            .into_iter()
            .map(|(k, (_, s, b))| {
                let halves: Vec<u8> = f32_bytes_to_vec(&b)
                    .into_iter()
                    .flat_map(|x| match dtype {
                        Dtype::BF16 => half::bf16::from_f32(x).to_bits().to_le_bytes(),
                        _ => half::f16::from_f32(x).to_bits().to_le_bytes(),
                    })
                    .collect();
                (k, (dtype, s, halves))
            })
            .collect();
        let back = hf::params_from_safetensors(&write_tensors(&t), &cfg, None).expect("load half");
        for (a, b) in back.as_slice().iter().zip(reference.as_slice()) {
            let rounded = match dtype {
                Dtype::BF16 => half::bf16::from_f32(*b).to_f32(),
                _ => half::f16::from_f32(*b).to_f32(),
            };
            assert_eq!(*a, rounded);
        }
    }
}

fn load_err(t: &Tensors, cfg: &GptConfig) -> CheckpointError {
    match hf::params_from_safetensors(&write_tensors(t), cfg, None) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn bad_files_give_typed_errors() {
    let cfg = golden_config();
    let good = read_tensors(&golden_bytes());

    let mut t = good.clone();
    t.remove("transformer.ln_f.bias");
    assert!(
        matches!(load_err(&t, &cfg), CheckpointError::MissingTensor { name } if name == "transformer.ln_f.bias")
    );

    let mut t = good.clone();
    t.insert(
        "transformer.h.0.attn.q_proj.weight".into(),
        (Dtype::F32, vec![1], vec![0u8; 4]),
    );
    assert!(matches!(
        load_err(&t, &cfg),
        CheckpointError::UnexpectedTensor { .. }
    ));

    let mut t = good.clone();
    t.insert(
        "transformer.h.7.ln_1.weight".into(),
        (Dtype::F32, vec![32], vec![0u8; 128]),
    );
    assert!(matches!(load_err(&t, &cfg), CheckpointError::Config(_)));

    let mut t = good.clone();
    t.insert(
        "transformer.h.1.ln_2.bias".into(),
        (Dtype::F32, vec![31], vec![0u8; 124]),
    );
    assert!(matches!(
        load_err(&t, &cfg),
        CheckpointError::ShapeMismatch { .. }
    ));

    let mut t = good.clone();
    t.insert(
        "transformer.h.1.ln_2.bias".into(),
        (Dtype::I32, vec![32], vec![0u8; 128]),
    );
    assert!(matches!(
        load_err(&t, &cfg),
        CheckpointError::UnsupportedDtype { .. }
    ));

    let mut t = good.clone();
    t.insert(
        "transformer.h.1.ln_2.bias".into(),
        (Dtype::F64, vec![32], vec![0u8; 256]),
    );
    assert!(matches!(
        load_err(&t, &cfg),
        CheckpointError::UnsupportedDtype { .. }
    ));

    let mut t = good.clone();
    let (d, s, mut b) = t["transformer.wte.weight"].clone();
    b[0] ^= 0x40;
    t.insert("lm_head.weight".into(), (d, s, b));
    assert!(matches!(load_err(&t, &cfg), CheckpointError::UntiedLmHead));

    let mut t = good.clone();
    let ln = t["transformer.ln_f.bias"].clone();
    t.insert("ln_f.bias".into(), ln);
    assert!(matches!(load_err(&t, &cfg), CheckpointError::Config(_)));

    // Config mismatches: the file's shapes against another config.
    let wide = GptConfig { n_embd: 64, ..cfg };
    assert!(matches!(
        load_err(&good, &wide),
        CheckpointError::ShapeMismatch { .. }
    ));
    let deeper = GptConfig { n_layer: 3, ..cfg };
    assert!(matches!(
        load_err(&good, &deeper),
        CheckpointError::MissingTensor { .. }
    ));
    let shallower = GptConfig { n_layer: 1, ..cfg };
    assert!(matches!(
        load_err(&good, &shallower),
        CheckpointError::Config(_)
    ));
    let invalid = GptConfig { n_head: 5, ..cfg };
    assert!(matches!(
        load_err(&good, &invalid),
        CheckpointError::Model(_)
    ));
}

#[test]
fn truncated_or_corrupt_bytes_give_errors() {
    let cfg = golden_config();
    let bytes = golden_bytes();
    for cut in [0, 1, 7, 8, 9, 100, bytes.len() / 2, bytes.len() - 1] {
        let r = hf::params_from_safetensors(&bytes[..cut], &cfg, None);
        assert!(
            matches!(r, Err(CheckpointError::SafeTensors(_))),
            "cut at {cut}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(hf::params_from_safetensors(&longer, &cfg, None).is_err());
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for _ in 0..200 {
        // Corrupt the header: any outcome but a panic is fine; most must be errors.
        let mut b = bytes.clone();
        let i = rng.gen_range(0..200.min(b.len()));
        b[i] = rng.gen();
        let _ = hf::params_from_safetensors(&b, &cfg, None);
        let _ = hf::infer_config(&b, 2, 128);
    }
    let garbage: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
    assert!(hf::params_from_safetensors(&garbage, &cfg, None).is_err());
}

#[test]
fn load_pretrained_reports_missing_and_bad_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        hf::load_pretrained(dir.path()),
        Err(CheckpointError::Io { .. })
    ));
    std::fs::write(dir.path().join(hf::CONFIG_FILE), "{ not json").expect("write");
    assert!(matches!(
        hf::load_pretrained(dir.path()),
        Err(CheckpointError::Config(_))
    ));
    std::fs::copy(
        golden_model_dir().join(hf::CONFIG_FILE),
        dir.path().join(hf::CONFIG_FILE),
    )
    .expect("copy");
    assert!(matches!(
        hf::load_pretrained(dir.path()),
        Err(CheckpointError::Io { .. })
    ));
    let bytes = golden_bytes();
    std::fs::write(dir.path().join(hf::MODEL_FILE), &bytes[..bytes.len() - 3]).expect("write");
    assert!(matches!(
        hf::load_pretrained(dir.path()),
        Err(CheckpointError::SafeTensors(_))
    ));
    std::fs::write(dir.path().join(hf::MODEL_FILE), &bytes).expect("write");
    assert!(hf::load_pretrained(dir.path()).is_ok());
}
