//! Finite-difference gradient checks in f64 for every op (random small, ragged shapes), each for the dense row set
//! and a random row subset (the loss then only reads those rows, so the subset backward must be exact).

mod common;
use common::*;
use eslm_gpt2::ops::attention::{self, AttnDims};
use eslm_gpt2::ops::matmul::{matmul, Mat};
use eslm_gpt2::ops::{encoder, gather, gelu, layernorm, linear, residual, RowSet};
use rand::seq::index::sample;
use rand::Rng;

const H: f64 = 1e-6;

/// Central differences of `f` at `x` compared with `grad` (relative to the largest gradient).
fn fd_check(what: &str, x: &[f64], grad: &[f64], f: impl Fn(&[f64]) -> f64) {
    let scale = grad.iter().fold(1e-8f64, |m, &g| m.max(g.abs()));
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + H;
        let fp = f(&xp);
        xp[i] = x[i] - H;
        let fm = f(&xp);
        xp[i] = x[i];
        let fd = (fp - fm) / (2.0 * H);
        let err = (fd - grad[i]).abs() / scale;
        assert!(
            err < 1e-6,
            "{what}[{i}]: analytic {} vs fd {fd} (rel {err:e})",
            grad[i]
        );
    }
}

fn random_rows(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<RowSet> {
    let k = rng.gen_range(1..=n);
    let mut r: Vec<u32> = sample(rng, n, k).into_iter().map(|x| x as u32).collect();
    r.sort_unstable();
    vec![
        RowSet::All,
        RowSet::Rows(r),
        RowSet::Rows(vec![(n - 1) as u32]),
    ]
}

/// `Σ_{rows} wout ⊙ y` for a dense `y [n, width]`.
fn masked_dot(y: &[f64], wout: &[f64], rows: &RowSet, n: usize, width: usize) -> f64 {
    let mut s = 0.0;
    for i in 0..n {
        let on = match rows {
            RowSet::All => true,
            RowSet::Rows(r) => r.contains(&(i as u32)),
        };
        if on {
            s += (0..width)
                .map(|j| y[i * width + j] * wout[i * width + j])
                .sum::<f64>();
        }
    }
    s
}

fn compact(g: &[f64], rows: &RowSet, width: usize) -> Vec<f64> {
    let mut scratch = vec![0.0; g.len()];
    gather(g, width, rows, &mut scratch).to_vec()
}

fn expand(c: &[f64], rows: &RowSet, n: usize, width: usize) -> Vec<f64> {
    let mut d = vec![0.0; n * width];
    eslm_gpt2::ops::scatter_add(&mut d, width, rows, c);
    d
}

#[test]
fn matmul_matches_naive_with_strides() {
    let mut r = rng(10);
    for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (70, 65, 80)] {
        let a = rand_vec(&mut r, m * k, 1.0);
        let b = rand_vec(&mut r, n * k, 1.0); // used as bᵀ: element (kk, j) = b[j*k + kk]
        let mut dst = rand_vec(&mut r, m * (n + 2), 1.0);
        let orig = dst.clone();
        matmul(
            m,
            n,
            k,
            &mut dst,
            n + 2,
            true,
            Mat::rows(&a, k),
            Mat::transposed(&b, k),
        );
        for i in 0..m {
            for j in 0..n {
                let want = orig[i * (n + 2) + j]
                    + (0..k).map(|kk| a[i * k + kk] * b[j * k + kk]).sum::<f64>();
                assert!((dst[i * (n + 2) + j] - want).abs() < 1e-10);
            }
            assert_eq!(dst[i * (n + 2) + n], orig[i * (n + 2) + n]);
        }
    }
}

#[test]
fn linear_gradcheck() {
    let mut r = rng(11);
    let (n, di, dout) = (5, 7, 3);
    let x = rand_vec(&mut r, n * di, 1.0);
    let w = rand_vec(&mut r, dout * di, 1.0);
    let b = rand_vec(&mut r, dout, 1.0);
    let wout = rand_vec(&mut r, n * dout, 1.0);
    for rows in random_rows(&mut r, n) {
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; n * dout];
            linear::forward(&mut y, x, w, Some(b), n, di, dout);
            masked_dot(&y, &wout, &rows, n, dout)
        };
        let dy = compact(&wout, &rows, dout);
        let k = rows.count(n);
        let (mut dx, mut dw, mut db) = (vec![0.0; k * di], vec![0.0; dout * di], vec![0.0; dout]);
        let mut scratch = vec![0.0; n * di];
        linear::backward(
            Some(&mut dx),
            &mut dw,
            Some(&mut db),
            &dy,
            dout,
            &x,
            &w,
            &rows,
            n,
            di,
            dout,
            &mut scratch,
        );
        fd_check("linear dx", &x, &expand(&dx, &rows, n, di), |v| {
            loss(v, &w, &b)
        });
        fd_check("linear dw", &w, &dw, |v| loss(&x, v, &b));
        fd_check("linear db", &b, &db, |v| loss(&x, &w, v));
    }
}

#[test]
fn lm_head_gradcheck_and_padding() {
    let mut r = rng(12);
    let (n, c, v, vp) = (4, 6, 9, 16);
    let h = rand_vec(&mut r, n * c, 1.0);
    let mut wte = rand_vec(&mut r, vp * c, 1.0);
    wte[v * c..].iter_mut().for_each(|x| *x = 0.0);
    let wout = rand_vec(&mut r, n * vp, 1.0);
    for rows in random_rows(&mut r, n) {
        let loss = |h: &[f64], wte: &[f64]| {
            let mut z = vec![0.0; n * vp];
            linear::lm_head_forward(&mut z, h, wte, n, c, v, vp);
            // Padded columns are never written.
            assert!((0..n).all(|i| z[i * vp + v..(i + 1) * vp].iter().all(|&x| x == 0.0)));
            let mut s = 0.0;
            for i in 0..n {
                if rows.is_all() || matches!(&rows, RowSet::Rows(rr) if rr.contains(&(i as u32))) {
                    s += (0..v)
                        .map(|j| z[i * vp + j] * wout[i * vp + j])
                        .sum::<f64>();
                }
            }
            s
        };
        // Compact dz with garbage in the padded columns: it must be ignored.
        let mut dz = compact(&wout, &rows, vp);
        for row in dz.chunks_mut(vp) {
            row[v..].iter_mut().for_each(|x| *x = 1e6);
        }
        let k = rows.count(n);
        let (mut dh, mut dwte) = (vec![0.0; k * c], vec![0.0; vp * c]);
        let mut scratch = vec![0.0; n * c];
        linear::lm_head_backward(
            &mut dh,
            &mut dwte,
            &dz,
            &h,
            &wte,
            &rows,
            n,
            c,
            v,
            vp,
            &mut scratch,
        );
        assert!(
            dwte[v * c..].iter().all(|&x| x == 0.0),
            "padded wte rows got gradient"
        );
        fd_check("lm_head dh", &h, &expand(&dh, &rows, n, c), |x| {
            loss(x, &wte)
        });
        fd_check("lm_head dwte", &wte[..v * c], &dwte[..v * c], |x| {
            let mut full = x.to_vec();
            full.extend_from_slice(&wte[v * c..]);
            loss(&h, &full)
        });
    }
}

#[test]
fn layernorm_gradcheck() {
    let mut r = rng(13);
    let (n, c) = (5, 11);
    let x = rand_vec(&mut r, n * c, 2.0);
    let w = rand_vec(&mut r, c, 1.0);
    let b = rand_vec(&mut r, c, 1.0);
    let wout = rand_vec(&mut r, n * c, 1.0);
    for rows in random_rows(&mut r, n) {
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; n * c];
            layernorm::forward(&mut y, None, None, x, w, b, n, c);
            masked_dot(&y, &wout, &rows, n, c)
        };
        let (mut y, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm::forward(&mut y, Some(&mut mean), Some(&mut rstd), &x, &w, &b, n, c);
        let dy = compact(&wout, &rows, c);
        let k = rows.count(n);
        let (mut dx, mut dw, mut db) = (vec![0.0; k * c], vec![0.0; c], vec![0.0; c]);
        layernorm::backward(
            &mut dx, &mut dw, &mut db, &dy, &x, &mean, &rstd, &w, &rows, n, c,
        );
        fd_check("layernorm dx", &x, &expand(&dx, &rows, n, c), |v| {
            loss(v, &w, &b)
        });
        fd_check("layernorm dw", &w, &dw, |v| loss(&x, v, &b));
        fd_check("layernorm db", &b, &db, |v| loss(&x, &w, v));
    }
}

#[test]
fn gelu_gradcheck() {
    let mut r = rng(14);
    let (n, width) = (4, 13);
    let x = rand_vec(&mut r, n * width, 3.0);
    let wout = rand_vec(&mut r, n * width, 1.0);
    for rows in random_rows(&mut r, n) {
        let loss = |x: &[f64]| {
            let mut y = vec![0.0; n * width];
            gelu::forward(&mut y, x);
            masked_dot(&y, &wout, &rows, n, width)
        };
        let dy = compact(&wout, &rows, width);
        let mut dx = vec![0.0; dy.len()];
        gelu::backward(&mut dx, &dy, &x, &rows, n, width);
        fd_check("gelu dx", &x, &expand(&dx, &rows, n, width), loss);
    }
}

#[test]
fn attention_gradcheck() {
    let mut r = rng(15);
    // T = 70 spans three causal blocks of 32 query rows.
    for &(b, t, c, nh) in &[(2, 5, 6, 2), (1, 7, 4, 1), (3, 3, 6, 3), (1, 70, 4, 2)] {
        let n = b * t;
        let qkv = rand_vec(&mut r, n * 3 * c, 1.0);
        let wout = rand_vec(&mut r, n * c, 1.0);
        let d = AttnDims { b, t, c, nh };
        for rows in random_rows(&mut r, n) {
            let loss = |qkv: &[f64]| {
                let (mut y, mut att) = (vec![0.0; n * c], vec![0.0; b * nh * t * t]);
                attention::forward(&mut y, &mut att, qkv, d);
                masked_dot(&y, &wout, &rows, n, c)
            };
            let (mut y, mut att) = (vec![0.0; n * c], vec![0.0; b * nh * t * t]);
            let flops = attention::forward(&mut y, &mut att, &qkv, d);
            assert_eq!(flops, attention::forward_flops(d));
            // Causal: the probabilities above the diagonal are zero.
            for row in att.chunks(t).enumerate() {
                let i = row.0 % t;
                assert!(row.1[i + 1..].iter().all(|&p| p == 0.0));
            }
            let dy = compact(&wout, &rows, c);
            let mut dqkv = vec![f64::NAN; n * 3 * c]; // must be fully overwritten
            attention::backward(&mut dqkv, &dy, &qkv, &att, &rows, d);
            fd_check("attention dqkv", &qkv, &dqkv, loss);
        }
    }
}

#[test]
fn encoder_gradcheck() {
    let mut r = rng(16);
    let (b, t, c, v) = (2, 4, 5, 7);
    let n = b * t;
    let tokens = rand_tokens(&mut r, n, v);
    let wte = rand_vec(&mut r, v * c, 1.0);
    let wpe = rand_vec(&mut r, t * c, 1.0);
    let wout = rand_vec(&mut r, n * c, 1.0);
    for rows in random_rows(&mut r, n) {
        let loss = |wte: &[f64], wpe: &[f64]| {
            let mut y = vec![0.0; n * c];
            encoder::forward(&mut y, &tokens, wte, wpe, t, c);
            masked_dot(&y, &wout, &rows, n, c)
        };
        let dy = compact(&wout, &rows, c);
        let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
        encoder::backward(&mut dwte, &mut dwpe, &dy, &tokens, &rows, n, t, c);
        fd_check("encoder dwte", &wte, &dwte, |x| loss(x, &wpe));
        fd_check("encoder dwpe", &wpe, &dwpe, |x| loss(&wte, x));
    }
}

#[test]
fn residual_merge_is_the_dense_sum() {
    let mut r = rng(17);
    let (n, w) = (9, 3);
    for _ in 0..20 {
        let ra = random_rows(&mut r, n).swap_remove(r.gen_range(0..3));
        let rb = random_rows(&mut r, n).swap_remove(r.gen_range(0..3));
        let ga = rand_vec(&mut r, ra.count(n) * w, 1.0);
        let gb = rand_vec(&mut r, rb.count(n) * w, 1.0);
        let mut out = vec![0.0; n * w];
        let ru = residual::merge(&mut out, &ra, &ga, &rb, &gb, n, w);
        let got = expand(&out[..ru.count(n) * w], &ru, n, w);
        let mut want = expand(&ga, &ra, n, w);
        eslm_gpt2::ops::scatter_add(&mut want, w, &rb, &gb);
        assert_eq!(got, want);
        if let (RowSet::Rows(a), RowSet::Rows(b), RowSet::Rows(u)) = (&ra, &rb, &ru) {
            assert!(u.windows(2).all(|p| p[0] < p[1]));
            assert!(a.iter().chain(b).all(|x| u.contains(x)));
        }
    }
}

#[test]
fn fast_tanh_is_accurate() {
    let mut worst = 0.0f64;
    for i in -200_000..=200_000 {
        let x = i as f32 * 1e-4; // [-20, 20]
        let got = eslm_gpt2::ops::fast_tanh_f32(x) as f64;
        worst = worst.max((got - (x as f64).tanh()).abs());
    }
    assert!(worst < 5e-7, "max abs error {worst:e}");
    assert_eq!(eslm_gpt2::ops::fast_tanh_f32(1e-6), 1e-6);
}
