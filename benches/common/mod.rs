//! Helpers shared by the train-step benchmarks (`benches/train_step.rs`, `benches/train_step_cuda.rs`), included
//! with `#[path = "common/mod.rs"] mod common;`.

/// The `--name value` pairs of the command line whose name is in `known`, in order; every other argument
/// (`--bench` and cargo's harness flags) is skipped.
pub fn flags(known: &[&str]) -> Vec<(String, String)> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        if known.contains(&argv[i].as_str()) {
            out.push((
                argv[i].clone(),
                argv.get(i + 1).cloned().unwrap_or_default(),
            ));
            i += 2;
        } else {
            i += 1;
        }
    }
    out
}

/// `value` parsed as a number for `flag`, or an error naming both.
pub fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: bad value `{value}`"))
}

/// The median of `v` (the mean of the middle two for an even count; NaN for none).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}
