//! The encoder family (`kernels/encoder.cu`; CPU counterpart `crate::ops::encoder`): token plus position
//! embeddings, and their backward as bucketed adds — rows grouped by token and by position on the host
//! ([`buckets`]), one block per destination row, rows added in ascending order (deterministic).

use super::*;

pub(super) fn forward(
    cuda: &mut Cuda,
    out: DevViewMut<'_>,
    tokens: &DeviceInts<u32>,
    emb: Embeddings<DevView<'_>>,
    n: usize,
    t: usize,
    c: usize,
) {
    let max_tok = tokens
        .host
        .iter()
        .take(n)
        .max()
        .map_or(0, |&x| x as usize + 1);
    let ok = n == 0
        || cuda.ready(&[
            ("encoder out", out.len, n * c, out.ptr),
            ("tokens", tokens.len(), n, tokens.ptr()),
            ("wte", emb.wte.len, max_tok * c, emb.wte.ptr),
            ("wpe", emb.wpe.len, t.min(n) * c, emb.wpe.ptr),
        ]);
    if n > 0 && t == 0 {
        cuda.fail(Gpt2Error::Shape {
            what: "encoder sequence length",
            expected: "T ≥ 1".into(),
            got: "T = 0".into(),
        });
    }
    if n == 0 || !ok || t == 0 || c == 0 {
        return;
    }
    let f32s = [("wte", emb.wte.dtype), ("wpe", emb.wpe.dtype)];
    let Some(dt) = cuda.op_dtype(&[("encoder out", out.dtype)], &f32s) else {
        return;
    };
    let (tok, n64, t64, c64) = (tokens.ptr(), n as u64, t as u64, c as u64);
    // SAFETY: matches encoder_forward (encoder.cu; the twin of `out`'s type); lengths checked above.
    unsafe {
        launch!(
            cuda,
            encoder_forward[dt],
            cfg(grid(n * c, ESLM_ENC_THREADS), ESLM_ENC_THREADS),
            &out.ptr,
            &tok,
            &emb.wte.ptr,
            &emb.wpe.ptr,
            &n64,
            &t64,
            &c64
        )
    };
}

pub(super) fn backward(
    cuda: &mut Cuda,
    demb: Embeddings<DevViewMut<'_>>,
    dout: RowGrad<'_, DevView<'_>>,
    tokens: &DeviceInts<u32>,
    t: usize,
    c: usize,
) {
    let RowGrad { g, rows, n } = dout;
    let k = rows.count(n);
    if k > 0 && t == 0 {
        cuda.fail(Gpt2Error::Shape {
            what: "encoder sequence length",
            expected: "T ≥ 1".into(),
            got: "T = 0".into(),
        });
    }
    if k == 0 || t == 0 || c == 0 {
        return;
    }
    let host = &tokens.host;
    let max_tok = host.iter().take(n).max().map_or(0, |&x| x as usize + 1);
    let max_row = match rows {
        RowSet::All => n,
        RowSet::Rows(r) => r.last().map_or(0, |&x| x as usize + 1),
    };
    if !cuda.ready(&[
        ("encoder dout", g.len, k * c, g.ptr),
        ("tokens", host.len(), max_row, tokens.ptr()),
        ("dwte", demb.wte.len, max_tok * c, demb.wte.ptr),
        ("dwpe", demb.wpe.len, t.min(n) * c, demb.wpe.ptr),
    ]) {
        return;
    }
    let f32s = [("dwte", demb.wte.dtype), ("dwpe", demb.wpe.dtype)];
    let Some(dt) = cuda.op_dtype(&[("encoder dout", g.dtype)], &f32s) else {
        return;
    };
    let by_token = buckets(rows, n, |i| host[i]);
    let by_pos = buckets(rows, n, |i| (i % t) as u32);
    bucket_add(cuda, demb.wte.ptr, (g.ptr, dt), c, by_token);
    bucket_add(cuda, demb.wpe.ptr, (g.ptr, dt), c, by_pos);
}

/// `dst[rows] += g` (the encoder backward's bucketed add) for one table; `g` a pointer and its element type.
pub(super) fn bucket_add(
    cuda: &mut Cuda,
    dw: u64,
    (g, dt): (u64, Dtype),
    c: usize,
    table: (Vec<u32>, Vec<u32>, Vec<u32>),
) {
    let (perm, keys, starts) = table;
    let nb = keys.len();
    if nb == 0 {
        return;
    }
    let mut all = perm;
    let (o_keys, o_starts) = (all.len(), all.len() + nb);
    all.extend_from_slice(&keys);
    all.extend_from_slice(&starts);
    let Some(base) = cuda.upload_idx(&all) else {
        return;
    };
    let (keys_p, starts_p) = (base + 4 * o_keys as u64, base + 4 * o_starts as u64);
    let (nb64, c64) = (nb as u64, c as u64);
    // SAFETY: matches encoder_backward_buckets (encoder.cu); every key is a row of dw (token < Vp or position
    // < T), every perm entry a row of g (checked by the caller's lengths).
    unsafe {
        launch!(
            cuda,
            encoder_backward_buckets[dt],
            cfg(nb.min(MAX_GRID) as u32, ESLM_ENC_THREADS),
            &dw,
            &g,
            &base,
            &keys_p,
            &starts_p,
            &nb64,
            &c64
        )
    };
}
