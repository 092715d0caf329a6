//! Incremental decoding with a key/value cache (CPU backend): the next token's logits after one more token, in
//! O(t·C) attention work per token instead of a full forward over the whole context (O(t²·C)), for sampling.
//!
//! Per block, for the new token's row `x` at position `p`: `h = ln1(x)`, `[q | k | v] = h·W_qkvᵀ + b`, `k` and
//! `v` appended to the layer's cache; per head `s_j = q·k_j/√hs` for `j ≤ p`, `a = softmax(s)`,
//! `y = Σ_j a_j·v_j`; `x += y·W_projᵀ + b`; `x += fcproj(gelu(fc(ln2(x))))`; finally `lnf` and the tied LM head.
//! The row-wise parts call the same ops as the full forward ([`crate::ops`]); only attention is specific to one
//! query row. Logits match the full forward's last row to float rounding (tested).

use crate::backend::Cpu;
use crate::error::{Gpt2Error, Result};
use crate::model::Gpt2;
use crate::ops::{gelu, layernorm, linear};

/// Keys and values of the positions fed so far, per layer (`[len, C]` each, row-major).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (a new context).
    pub fn clear(&mut self) {
        self.keys.iter_mut().for_each(Vec::clear);
        self.values.iter_mut().for_each(Vec::clear);
        self.len = 0;
    }
}

impl Gpt2<Cpu> {
    /// An empty cache for this model.
    pub fn new_kv_cache(&self) -> KvCache {
        let l = self.config().n_layer;
        KvCache {
            keys: vec![Vec::new(); l],
            values: vec![Vec::new(); l],
            len: 0,
        }
    }

    /// Feeds `token` at position `cache.len()` and returns the logits of the next token (`V` values).
    ///
    /// # Errors
    /// A token outside the vocabulary, or a context longer than the model's maximum sequence length.
    pub fn decode_step(&self, cache: &mut KvCache, token: u32) -> Result<Vec<f32>> {
        let cfg = *self.config();
        let (c, nh, v) = (cfg.n_embd, cfg.n_head, cfg.vocab_size);
        let pos = cache.len;
        if token as usize >= v {
            return Err(Gpt2Error::TokenOutOfRange {
                pos,
                token,
                vocab: v,
            });
        }
        if pos >= cfg.max_seq_len || cache.keys.len() != cfg.n_layer {
            return Err(Gpt2Error::InvalidConfig(format!(
                "decode: position {pos} needs a context of at most {} positions and a cache of this model",
                cfg.max_seq_len
            )));
        }
        let w = self.params().weights();
        let (t, p) = (token as usize, pos);
        let mut x: Vec<f32> = (0..c)
            .map(|i| w.wte[t * c + i] + w.wpe[p * c + i])
            .collect();
        let (mut h, mut qkv, mut y) = (vec![0.0; c], vec![0.0; 3 * c], vec![0.0; c]);
        let (mut proj, mut fc, mut fc_gelu) = (vec![0.0; c], vec![0.0; 4 * c], vec![0.0; 4 * c]);
        for (l, lw) in w.layers.iter().enumerate() {
            layernorm::forward(&mut h, None, None, &x, lw.ln1w, lw.ln1b, 1, c);
            linear::forward(&mut qkv, &h, lw.qkvw, Some(lw.qkvb), 1, c, 3 * c);
            cache.keys[l].extend_from_slice(&qkv[c..2 * c]);
            cache.values[l].extend_from_slice(&qkv[2 * c..]);
            attend(&qkv[..c], &cache.keys[l], &cache.values[l], nh, &mut y);
            linear::forward(&mut proj, &y, lw.attprojw, Some(lw.attprojb), 1, c, c);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
            layernorm::forward(&mut h, None, None, &x, lw.ln2w, lw.ln2b, 1, c);
            linear::forward(&mut fc, &h, lw.fcw, Some(lw.fcb), 1, c, 4 * c);
            gelu::forward(&mut fc_gelu, &fc);
            linear::forward(
                &mut proj,
                &fc_gelu,
                lw.fcprojw,
                Some(lw.fcprojb),
                1,
                4 * c,
                c,
            );
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        cache.len += 1;
        layernorm::forward(&mut h, None, None, &x, w.lnfw, w.lnfb, 1, c);
        let mut logits = vec![0.0; cfg.padded_vocab_size];
        linear::lm_head_forward(&mut logits, &h, w.wte, 1, c, v, cfg.padded_vocab_size);
        logits.truncate(v);
        Ok(logits)
    }
}

/// One query row `q [C]` against the cached `keys`, `values` (`[t, C]`), `nh` heads: `y [C]`.
fn attend(q: &[f32], keys: &[f32], values: &[f32], nh: usize, y: &mut [f32]) {
    let c = q.len();
    let hs = c / nh;
    let t = keys.len() / c;
    let scale = 1.0 / (hs as f32).sqrt();
    let mut s = vec![0.0f32; t];
    for head in 0..nh {
        let o = head * hs;
        let qh = &q[o..o + hs];
        for (j, sj) in s.iter_mut().enumerate() {
            let kj = &keys[j * c + o..j * c + o + hs];
            *sj = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
        }
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0.0f32;
        s.iter_mut().for_each(|sj| {
            *sj = (*sj - m).exp();
            z += *sj;
        });
        let yh = &mut y[o..o + hs];
        yh.iter_mut().for_each(|v| *v = 0.0);
        for (j, &a) in s.iter().enumerate() {
            let vj = &values[j * c + o..j * c + o + hs];
            yh.iter_mut()
                .zip(vj)
                .for_each(|(yv, &vv)| *yv += a / z * vv);
        }
    }
}
