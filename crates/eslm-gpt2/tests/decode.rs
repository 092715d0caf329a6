//! KV-cache decoding equals the full forward: after each token of a random sequence, `decode_step`'s logits
//! match the last row of `forward_inference` over the whole prefix (float rounding only), on a ragged config
//! (V = 67 in a padded stride, 3 heads); errors for tokens out of range and a context past the maximum.

use eslm_gpt2::{Gpt2, GptConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn decode_steps_match_the_full_forward_on_every_prefix() {
    let cfg = GptConfig::new(2, 3, 24, 67, 12).unwrap();
    let mut model = Gpt2::new(cfg, 1, 12, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let ids: Vec<u32> = (0..12).map(|_| rng.gen_range(0..67)).collect();
    let mut cache = model.new_kv_cache();
    for t in 1..=ids.len() {
        let step = model.decode_step(&mut cache, ids[t - 1]).unwrap();
        let full = model.forward_inference(&ids[..t], 1, t).unwrap();
        let last = full.row(t - 1);
        assert_eq!(step.len(), 67);
        for (j, (&a, &b)) in step.iter().zip(last).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 + 1e-4 * b.abs(),
                "prefix {t}, logit {j}: {a} vs {b}"
            );
        }
    }
    assert_eq!(cache.len(), 12);
    assert!(
        model.decode_step(&mut cache, 1).is_err(),
        "context past max_seq_len"
    );
    cache.clear();
    assert!(cache.is_empty());
    assert!(
        model.decode_step(&mut cache, 67).is_err(),
        "token out of range"
    );
    assert!(
        cache.is_empty(),
        "a refused token leaves the cache as it was"
    );
}
