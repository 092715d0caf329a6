//! Parsers of the evaluation formats on inline samples and (when present) on the shared files; completion
//! scoring on a bigram model whose answer is known.

use std::path::{Path, PathBuf};

use eslm_train::bigram::BigramModel;
use eslm_train::eval_tasks::{
    eval_choices, eval_lambada, parse_choice_jsonl, parse_hellaswag, parse_lambada,
    parse_winogrande, score_completion, ChoiceItem, LambadaItem,
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
        items[0].options[0].0,
        "Roof shingle removal: A man is sitting on a roof. he"
    );
    assert_eq!(items[0].gold, 3);
    assert_eq!(
        items[0].options[3].1,
        " starts pulling up roofing on a roof."
    );
    assert_eq!(items[1].options.len(), 4);
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
                continuation: " mat".into(),
                line: 1,
            },
            LambadaItem {
                context: "a".into(),
                continuation: " b".into(),
                line: 3,
            },
        ]
    );
    assert!(parse_lambada("{\"context\": 1}\n", Path::new("x")).is_err());
    let a = "{\"choices\": [\"red\", \"blue\"], \"query\": \"Question: sky?\", \"gold\": 1}\n";
    let items = parse_choice_jsonl(a, Path::new("inline")).unwrap();
    let completions: Vec<&str> = items[0].options.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(completions, vec![" red", " blue"]);
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
        ChoiceItem::shared_context("abc", &[" h".into(), " d".into(), " a".into()], 1, 1),
        ChoiceItem::shared_context("fg", &[" h".into(), " b".into()], 0, 2),
    ];
    let r = eval_choices(&mut m, &items, &encode, Path::new("inline")).unwrap();
    assert_eq!((r.items, r.acc, r.acc_norm), (2, 1.0, 1.0));
    let l = vec![LambadaItem {
        context: "abc".into(),
        continuation: " de".into(),
        line: 1,
    }];
    let r = eval_lambada(&mut m, &l, &encode, Path::new("inline")).unwrap();
    assert_eq!(r.acc, 1.0);
    assert!((r.ppl - (-lp).exp()).abs() < 1e-4);
}

fn letters(s: &str) -> Result<Vec<u32>> {
    Ok(s.trim()
        .chars()
        .map(|c| (c as u32 - 'a' as u32) % 10)
        .collect())
}

/// Issue 12: empty files are errors (not `acc 0.0` / `ppl 1.0`), an empty context names its file and line, ARC's
/// letter answers are accepted, and a non-letter string gold is named.
#[test]
fn empty_files_empty_contexts_and_letter_golds() {
    let p = Path::new("tasks/empty.jsonl");
    for (name, err) in [
        ("hellaswag", parse_hellaswag("", p).unwrap_err()),
        ("lambada", parse_lambada("\n", p).unwrap_err()),
        ("arc", parse_choice_jsonl("", p).unwrap_err()),
        ("winogrande", parse_winogrande("", p).unwrap_err()),
    ] {
        let text = err.to_string();
        assert!(
            text.contains("empty.jsonl") && text.contains("no items"),
            "{name}: {text}"
        );
    }
    let a = "{\"choices\": [\"red\", \"blue\", \"green\"], \"query\": \"Q\", \"gold\": \"C\"}\n";
    assert_eq!(parse_choice_jsonl(a, p).unwrap()[0].gold, 2);
    let bad = a.replace("\"C\"", "\"maybe\"");
    let text = parse_choice_jsonl(&bad, p).unwrap_err().to_string();
    assert!(text.contains("line 1") && text.contains("maybe"), "{text}");
    let out_of_range = a.replace("\"C\"", "\"D\"");
    assert!(parse_choice_jsonl(&out_of_range, p).is_err());

    let mut m = successor_model(10);
    let items = parse_choice_jsonl(
        "{\"choices\": [\"b\"], \"query\": \"a\", \"gold\": 0}\n{\"choices\": [\"b\"], \"query\": \"\", \"gold\": 0}\n",
        Path::new("arc_small.jsonl"),
    )
    .unwrap();
    let text = eval_choices(&mut m, &items, &letters, Path::new("arc_small.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("arc_small.jsonl")
            && text.contains("line 2")
            && text.contains("empty context"),
        "{text}"
    );
    let l = parse_lambada(
        "{\"context\": \"\", \"continuation\": \"b\"}\n",
        Path::new("lam.jsonl"),
    )
    .unwrap();
    let text = eval_lambada(&mut m, &l, &letters, Path::new("lam.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("lam.jsonl") && text.contains("line 1"),
        "{text}"
    );
}

/// Winogrande-style partial scoring: one context per option, the shared continuation is scored; ties go to the
/// first option (documented).
#[test]
fn winogrande_partial_scoring_and_the_tie_rule() {
    let w = "{\"context_options\": [\"ab\", \"ac\"], \"continuation\": \"d\", \"gold\": 1}\n\
             {\"context_options\": [\"ac\", \"ab\"], \"continuation\": \"d\", \"gold\": 0}\n";
    let p = Path::new("wino.jsonl");
    let items = parse_winogrande(w, p).unwrap();
    assert_eq!(items[0].options[1], ("ac".to_string(), " d".to_string()));
    let mut m = successor_model(10);
    let r = eval_choices(&mut m, &items, &letters, p).unwrap();
    assert_eq!((r.items, r.acc), (2, 1.0));
    assert_eq!(r.per_item[0].pred, 1);
    assert_eq!(r.per_item[0].tokens, vec![1, 1]);
    // Only the continuation is scored: the context's own likelihood does not count.
    let lp = 5.0 - (5f64.exp() + 9.0).ln();
    assert!((r.per_item[0].logprobs[1] - lp).abs() < 1e-5);
    // Identical options tie exactly and the first wins.
    let tie = vec![ChoiceItem::shared_context(
        "ab",
        &[" e".into(), " e".into()],
        1,
        7,
    )];
    let r = eval_choices(&mut m, &tie, &letters, p).unwrap();
    assert_eq!((r.per_item[0].pred, r.acc), (0, 0.0));
    assert!(parse_winogrande(
        "{\"context_options\": [\"a\"], \"continuation\": \"b\", \"gold\": 0}\n",
        p
    )
    .is_err());
}
