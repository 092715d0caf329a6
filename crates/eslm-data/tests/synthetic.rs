//! Synthetic corpus: exact kind proportions, determinism, the generative rules hold token by token, the
//! written shards and kinds files match the in-memory corpus, and batch targets are labelled correctly.

use eslm_data::loader::{DataLoader, LoaderConfig};
use eslm_data::synthetic::{
    read_kinds, write_synthetic_corpus, KindTable, Language, Rule, Slot, SyntheticConfig,
    SyntheticCorpus, TokenKind,
};
use eslm_data::{DataError, ShardReader};

fn small() -> SyntheticConfig {
    SyntheticConfig {
        train_documents: 200,
        val_documents: 20,
        shard_tokens: 10_000,
        ..Default::default()
    }
}

fn count(kinds: &[TokenKind]) -> [usize; 3] {
    let mut c = [0; 3];
    for &k in kinds {
        c[k as usize] += 1;
    }
    c
}

#[test]
fn proportions_are_exact_and_close_to_the_requested_fractions() {
    for (t, l, n) in [
        (0.40, 0.35, 0.25),
        (0.6, 0.2, 0.2),
        (0.3, 0.3, 0.4),
        (1.0, 0.0, 0.0),
    ] {
        let cfg = SyntheticConfig {
            template_fraction: t,
            learnable_fraction: l,
            noise_fraction: n,
            ..small()
        };
        let corpus = SyntheticCorpus::generate(&cfg).unwrap();
        let d = cfg.document_len();
        let per_doc = cfg.kind_counts_per_document();
        let c = count(&corpus.train_kinds);
        for k in 0..3 {
            assert_eq!(c[k], per_doc[k] * cfg.train_documents);
        }
        // Learnable and noise are rounded (error <= 1/2 slot); template takes the rest (error <= 1 slot).
        for (k, f) in [t, l, n].into_iter().enumerate() {
            let slack = if k == 0 { 1.0 } else { 0.5 };
            assert!(
                (per_doc[k] as f64 / d as f64 - f).abs() <= slack / d as f64 + 1e-12,
                "{per_doc:?} vs {f}"
            );
        }
    }
}

#[test]
fn generation_is_deterministic_and_seeded() {
    let a = SyntheticCorpus::generate(&small()).unwrap();
    let b = SyntheticCorpus::generate(&small()).unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(a.val, b.val);
    assert_eq!(a.train_kinds, b.train_kinds);
    let c = SyntheticCorpus::generate(&SyntheticConfig {
        seed: 99,
        ..small()
    })
    .unwrap();
    assert_ne!(a.train, c.train);
    assert_ne!(
        a.train[..a.language.slots.len()],
        a.val[..a.language.slots.len()],
        "train and val streams differ"
    );
}

#[test]
fn tokens_follow_the_rules() {
    let cfg = small();
    let corpus = SyntheticCorpus::generate(&cfg).unwrap();
    let lang = &corpus.language;
    let d = cfg.document_len();
    let v = cfg.noise_vocab;
    let mut noise_hist = vec![0usize; v as usize];
    for doc in corpus.train.chunks(d) {
        assert_eq!(doc.len(), d);
        assert_eq!(doc[d - 1], cfg.vocab_size - 1, "documents end with EOT");
        let value = |i: usize| doc[i] - lang.noise_base;
        for (i, slot) in lang.slots.iter().enumerate() {
            let tok = doc[i];
            assert!(tok < cfg.vocab_size);
            match *slot {
                Slot::Template(id) => assert_eq!(tok, id),
                Slot::Noise => {
                    assert!((lang.noise_base..lang.noise_base + v).contains(&tok));
                    noise_hist[value(i) as usize] += 1;
                }
                Slot::Learnable(rule) => {
                    let expect = match rule {
                        Rule::Copy { src } => value(src),
                        Rule::Lookup { src } => lang.permutation[value(src) as usize],
                        Rule::Add { a, b } => (value(a) + value(b)) % v,
                    };
                    let (src_max, srcs) = match rule {
                        Rule::Copy { src } | Rule::Lookup { src } => (src, vec![src]),
                        Rule::Add { a, b } => (a.max(b), vec![a, b]),
                    };
                    assert!(src_max < i, "a rule reads a later slot");
                    assert!(srcs.iter().all(|&s| lang.slots[s] == Slot::Noise));
                    assert_eq!(tok, lang.learnable_base + expect);
                }
            }
        }
    }
    // Noise is roughly uniform: every value appears, none more than 3x its expectation.
    let total: usize = noise_hist.iter().sum();
    let mean = total as f64 / v as f64;
    assert!(
        noise_hist.iter().all(|&c| c > 0 && (c as f64) < 3.0 * mean),
        "{noise_hist:?}"
    );
    // Template ids, learnable ids and noise ids are disjoint ranges; sentence starts are templates.
    for k in 0..cfg.num_templates {
        assert!(matches!(
            lang.slots[k * cfg.sentence_len],
            Slot::Template(_)
        ));
    }
    let max_template = lang.slots.iter().filter_map(|s| match s {
        Slot::Template(id) if *id != lang.eot => Some(*id),
        _ => None,
    });
    assert!(max_template.max().unwrap() < lang.learnable_base);
    assert_eq!(lang.noise_base, lang.learnable_base + v);
}

#[test]
fn every_rule_kind_occurs_in_the_default_language() {
    let lang = Language::new(&SyntheticConfig::default()).unwrap();
    let rules: Vec<Rule> = lang
        .slots
        .iter()
        .filter_map(|s| {
            if let Slot::Learnable(r) = s {
                Some(*r)
            } else {
                None
            }
        })
        .collect();
    assert!(rules.iter().any(|r| matches!(r, Rule::Copy { .. })));
    assert!(rules.iter().any(|r| matches!(r, Rule::Lookup { .. })));
    assert!(rules.iter().any(|r| matches!(r, Rule::Add { .. })));
}

#[test]
fn bayes_losses() {
    let cfg = SyntheticConfig::default();
    assert_eq!(cfg.bayes_loss(TokenKind::Template), 0.0);
    assert_eq!(cfg.bayes_loss(TokenKind::Learnable), 0.0);
    assert!((cfg.bayes_loss(TokenKind::Noise) - 64f64.ln()).abs() < 1e-12);
    let noise = cfg.kind_counts_per_document()[2] as f64 / cfg.document_len() as f64;
    assert!((cfg.optimal_mean_loss() - noise * 64f64.ln()).abs() < 1e-12);
}

#[test]
fn invalid_configs_are_errors() {
    let bad = [
        SyntheticConfig {
            noise_fraction: 0.5,
            ..small()
        },
        SyntheticConfig {
            template_fraction: 0.01,
            learnable_fraction: 0.5,
            noise_fraction: 0.49,
            ..small()
        },
        SyntheticConfig {
            template_fraction: 0.5,
            learnable_fraction: 0.5,
            noise_fraction: 0.0,
            ..small()
        },
        SyntheticConfig {
            vocab_size: 100,
            ..small()
        },
        SyntheticConfig {
            noise_vocab: 1,
            ..small()
        },
        SyntheticConfig {
            learnable_fraction: f64::NAN,
            ..small()
        },
    ];
    for cfg in bad {
        assert!(
            matches!(SyntheticCorpus::generate(&cfg), Err(DataError::Config(_))),
            "{cfg:?}"
        );
    }
}

#[test]
fn written_corpus_matches_memory_and_labels_batches() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small();
    let summary = write_synthetic_corpus(dir.path(), &cfg).unwrap();
    let corpus = SyntheticCorpus::generate(&cfg).unwrap();
    assert_eq!(summary.train_tokens as usize, corpus.train.len());
    assert_eq!(
        summary.train_shards.len(),
        corpus.train.len().div_ceil(cfg.shard_tokens)
    );
    assert_eq!(summary.val_shards.len(), 1);
    let mut tokens = Vec::new();
    let mut kinds = Vec::new();
    for p in &summary.train_shards {
        tokens.extend(ShardReader::open(p).unwrap().tokens().to_vec_u32());
        kinds.extend(read_kinds(p.with_extension("kinds")).unwrap());
    }
    assert_eq!(tokens, corpus.train);
    assert_eq!(kinds, corpus.train_kinds);
    let c = count(&corpus.train_kinds);
    assert_eq!(
        summary.train_kind_counts,
        [c[0] as u64, c[1] as u64, c[2] as u64]
    );
    assert!(dir.path().join("synthetic.json").is_file());

    // Batch targets labelled from the side files equal the labels from memory.
    let mut loader = DataLoader::open(
        dir.path().join("train_*.bin"),
        LoaderConfig::new(4, 32).with_seed(2),
    )
    .unwrap();
    let table = KindTable::for_shards(loader.shards()).unwrap();
    for _ in 0..10 {
        let batch = loader.next_batch().unwrap();
        let labels = table.targets_of(&batch).unwrap();
        assert_eq!(labels.len(), 4 * 32);
        for (r, w) in batch.rows.iter().enumerate() {
            let global = w.shard * cfg.shard_tokens + w.start as usize + 1;
            assert_eq!(
                &labels[r * 32..(r + 1) * 32],
                &corpus.train_kinds[global..global + 32]
            );
        }
    }
}

#[test]
fn in_memory_loader_with_kind_table() {
    let corpus = SyntheticCorpus::generate(&small()).unwrap();
    let mut loader = DataLoader::new(vec![corpus.train_shard()], LoaderConfig::new(2, 64)).unwrap();
    let table = corpus.train_kind_table();
    let batch = loader.next_batch().unwrap();
    let labels = table.targets_of(&batch).unwrap();
    let start = batch.rows[0].start as usize + 1;
    assert_eq!(&labels[..64], &corpus.train_kinds[start..start + 64]);
}

fn eslm_data(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_eslm-data"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// Issue 12: `eslm-data synthetic --out DIR` must not mix its shards into a prepared dataset (the same
/// `--overwrite` rule as `prepare`), and `info` on a directory names it.
#[test]
fn synthetic_refuses_a_used_out_without_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("prepare.json"), "{}").unwrap();
    let small = |extra: &[&str]| {
        let mut a: Vec<std::ffi::OsString> =
            vec!["synthetic".into(), "--out".into(), out.clone().into()];
        a.extend(["--train-documents", "8", "--val-documents", "2"].map(Into::into));
        a.extend(extra.iter().map(Into::into));
        let refs: Vec<&std::ffi::OsStr> = a.iter().map(|s| s.as_os_str()).collect();
        eslm_data(&refs)
    };
    let o = small(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--overwrite") && err.contains("prepare.json"),
        "{err}"
    );
    assert!(!err.contains("stack backtrace"), "{err}");
    assert_eq!(err.matches("--overwrite").count(), 1, "printed once: {err}");
    let o = small(&["--overwrite"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !out.join("prepare.json").exists(),
        "the stale prepare.json is gone"
    );
    assert!(!small(&[]).status.success(), "its own shards count too");

    let o = eslm_data(&["info".as_ref(), out.as_os_str()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("is a directory") && err.contains(&*out.to_string_lossy()),
        "{err}"
    );
}
