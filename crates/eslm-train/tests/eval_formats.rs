//! Parsers of the evaluation formats on inline samples and (when present) on the shared files; completion
//! scoring on a bigram model whose answer is known.

use std::path::{Path, PathBuf};

use eslm_train::bigram::BigramModel;
use eslm_train::eval_tasks::{
    eval_choices, eval_lambada, parse_choice_jsonl, parse_hellaswag, parse_lambada,
    score_completion, ChoiceItem, LambadaItem,
};
use eslm_train::Result;

fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel);
    if p.is_file() {
        Some(p)
    } else {
        println!("skipping: {} not found", p.display());
        None
    }
}

const HS: &str = "Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap to wrap a pair of skis.\nis ripping level tiles off.\nis holding a rubik's cube.\nstarts pulling up roofing on a roof.\nClean and jerk: A lady walks to a barbell. the lady\n0\nlifts it.\nsits.\nruns.\nsleeps.\n";

#[test]
fn hellaswag_six_line_format() {
    let items = parse_hellaswag(HS, Path::new("inline")).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[0].context,
        "Roof shingle removal: A man is sitting on a roof. he"
    );
    assert_eq!(items[0].gold, 3);
    assert_eq!(items[0].choices[3], " starts pulling up roofing on a roof.");
    assert_eq!(items[1].choices.len(), 4);
    // Truncated input and bad gold are errors with a line number.
    let cut: String = HS.lines().take(8).map(|l| format!("{l}\n")).collect();
    assert!(parse_hellaswag(&cut, Path::new("x")).is_err());
    let bad = HS.replacen("\n3\n", "\nx\n", 1);
    assert!(parse_hellaswag(&bad, Path::new("x"))
        .unwrap_err()
        .to_string()
        .contains("line 2"));
}

#[test]
fn lambada_and_arc_jsonl() {
    let l = "{\"context\": \"the cat sat on the\", \"continuation\": \"mat\"}\n\n{\"context\": \"a\", \"continuation\": \" b\"}\n";
    let items = parse_lambada(l, Path::new("inline")).unwrap();
    assert_eq!(
        items,
        vec![
            LambadaItem {
                context: "the cat sat on the".into(),
                continuation: " mat".into()
            },
            LambadaItem {
                context: "a".into(),
                continuation: " b".into()
            },
        ]
    );
    assert!(parse_lambada("{\"context\": 1}\n", Path::new("x")).is_err());
    let a = "{\"choices\": [\"red\", \"blue\"], \"query\": \"Question: sky?\", \"gold\": 1}\n";
    let items = parse_choice_jsonl(a, Path::new("inline")).unwrap();
    assert_eq!(items[0].choices, vec![" red", " blue"]);
    assert_eq!(items[0].gold, 1);
    assert!(parse_choice_jsonl(
        "{\"choices\": [\"a\"], \"query\": \"q\", \"gold\": 3}\n",
        Path::new("x")
    )
    .is_err());
}

#[test]
fn shared_eval_files_parse() {
    if let Some(p) = shared("eval/hellaswag_val_full.txt") {
        let items = parse_hellaswag(&std::fs::read_to_string(&p).unwrap(), &p).unwrap();
        assert_eq!(items.len(), 10_042);
    }
    if let Some(p) = shared("eval/lambada_openai.jsonl") {
        assert_eq!(
            parse_lambada(&std::fs::read_to_string(&p).unwrap(), &p)
                .unwrap()
                .len(),
            5_153
        );
    }
    if let Some(p) = shared("eval/arc_easy.jsonl") {
        assert_eq!(
            parse_choice_jsonl(&std::fs::read_to_string(&p).unwrap(), &p)
                .unwrap()
                .len(),
            2_376
        );
    }
}

/// A bigram model that strongly predicts `x + 1` after `x`.
fn successor_model(vocab: usize) -> BigramModel {
    let stride = vocab.div_ceil(8) * 8;
    let mut w = vec![0.0f32; vocab * stride];
    for x in 0..vocab {
        w[x * stride + (x + 1) % vocab] = 5.0;
    }
    BigramModel::from_weights(vocab, w).unwrap()
}

#[test]
fn completion_scoring_prefers_the_likely_continuation() {
    let mut m = successor_model(10);
    let mut stats = Default::default();
    let good = score_completion(&mut m, &[1, 2, 3], &[4, 5], &mut stats).unwrap();
    let bad = score_completion(&mut m, &[1, 2, 3], &[7, 5], &mut stats).unwrap();
    assert!(good.greedy && !bad.greedy);
    assert_eq!(good.tokens, 2);
    assert!(good.logprob > bad.logprob);
    // Exact value: each step has logit 5 on the successor and 0 elsewhere over 10 ids.
    let lp = 5.0 - (5f64.exp() + 9.0).ln();
    assert!((good.logprob - 2.0 * lp).abs() < 1e-5);
    // Characters map to digits: "a"→0 ... "j"→9.
    let encode = |s: &str| -> Result<Vec<u32>> {
        Ok(s.trim()
            .chars()
            .map(|c| (c as u32 - 'a' as u32) % 10)
            .collect())
    };
    let items = vec![
        ChoiceItem {
            context: "abc".into(),
            choices: vec![" h".into(), " d".into(), " a".into()],
            gold: 1,
        },
        ChoiceItem {
            context: "fg".into(),
            choices: vec![" h".into(), " b".into()],
            gold: 0,
        },
    ];
    let r = eval_choices(&mut m, &items, &encode).unwrap();
    assert_eq!((r.items, r.acc, r.acc_norm), (2, 1.0, 1.0));
    let l = vec![LambadaItem {
        context: "abc".into(),
        continuation: " de".into(),
    }];
    let r = eval_lambada(&mut m, &l, &encode).unwrap();
    assert_eq!(r.acc, 1.0);
    assert!((r.ppl - (-lp).exp()).abs() < 1e-4);
}
