//! The loss head on the device: eslm-kernels' token statistics and sparse cross-entropy launchers on this
//! backend's stream, the distillation gradient (`kernels/kd.cu`; CPU counterpart `eslm_kernels::kd`), the
//! importance weights of kept rows (`kernels/scale.cu`). Selection runs on the host copy of the per-row scores.

use super::*;

/// The CPU's check of a loss gradient's kept rows (each needs a target in `[0, V)`), on the targets' host copy:
/// the same typed error before anything is launched.
pub(super) fn check_kept_targets(kept: &[u32], targets: &[i32], vocab: usize) -> Result<()> {
    match kept
        .iter()
        .find(|&&r| !(0..vocab as i64).contains(&(targets[r as usize] as i64)))
    {
        Some(&r) => Err(KernelError::KeptTargetOutOfRange {
            row: r as usize,
            target: targets[r as usize] as i64,
            vocab,
        }
        .into()),
        None => Ok(()),
    }
}

pub(super) fn token_stats(
    cuda: &mut Cuda,
    logits: Logits<DevView<'_>>,
    targets: &DeviceInts<i32>,
    out: &mut TokenStats,
) -> Result<()> {
    cuda.recorded()?;
    let Logits { z, rows, dims } = logits;
    crate::error::check_len("targets", targets.len(), rows)?;
    let vocab = dims.v;
    for (row, &target) in targets.host.iter().enumerate() {
        if target != DEFAULT_IGNORE_INDEX && (target < 0 || target as usize >= vocab) {
            return Err(KernelError::TargetOutOfRange {
                row,
                target: target as i64,
                vocab,
            }
            .into());
        }
    }
    if rows == 0 {
        *out = TokenStats::default();
        return Ok(());
    }
    let used = logits_extent(rows, dims)?;
    if !cuda.ready(&[("logits", z.len, used, z.ptr)]) {
        return cuda.recorded();
    }
    let stream = cuda.stream().clone();
    if cuda.stats.as_ref().is_none_or(|s| s.capacity() < rows) {
        cuda.stats = Some(DeviceTokenStats::new(&cuda.kernels, rows)?);
    }
    let Some(stats) = cuda.stats.as_mut() else {
        return cuda.recorded();
    };
    let Some(tgt) = targets.dev.as_ref() else {
        return Err(KernelError::Cuda("targets have no device memory".into()).into());
    };
    // SAFETY: z is a live range of `used` ≥ z-extent floats of this context (checked above).
    let borrowed = unsafe { Borrowed::<f32>::new(&stream, z.ptr, used) };
    let view = DeviceLogits::new(borrowed.slice(0..used), rows, vocab, dims.vp)?;
    cuda.kernels
        .token_stats(&view, &tgt.slice(0..rows), DEFAULT_IGNORE_INDEX, stats)?;
    stats.check_status(&cuda.kernels)?;
    stats.to_host(&cuda.kernels, out)?;
    Ok(())
}

pub(super) fn select(
    cuda: &mut Cuda,
    scores: &[f32],
    valid: &[bool],
    rule: SelectRule,
    out: &mut Selection,
) -> Result<()> {
    cuda.recorded()?;
    cuda.kernels.select_host(scores, Some(valid), rule, out)?;
    Ok(())
}

pub(super) fn sparse_ce(
    cuda: &mut Cuda,
    logits: Logits<DevView<'_>>,
    rows: KeptTargets<'_, DeviceInts<i32>>,
    lse: &[f32],
    scale: f32,
    dlogits: DevViewMut<'_>,
) -> Result<f32> {
    cuda.recorded()?;
    let Logits { z, rows: n, dims } = logits;
    let kept = rows.kept;
    let k = kept.len();
    crate::error::check_len("targets", rows.targets.len(), n)?;
    crate::error::check_len("lse", lse.len(), n)?;
    if k == 0 {
        return Ok(0.0);
    }
    crate::model::validate_kept(kept, n)?;
    check_kept_targets(kept, &rows.targets.host, dims.v)?;
    let used = logits_extent(n, dims)?;
    if !cuda.ready(&[
        ("logits", z.len, used, z.ptr),
        ("dlogits", dlogits.len, k * dims.vp, dlogits.ptr),
    ]) {
        return cuda.recorded().map(|_| f32::NAN);
    }
    let stream = cuda.stream().clone();
    // Kept rows then the count, in the index scratch; lse in its own.
    let mut idx: Vec<u32> = kept.to_vec();
    idx.push(k as u32);
    let idx_ptr = cuda.upload_idx(&idx);
    let lse_ptr = cuda.scratch(3, n);
    let (Some(idx_ptr), Some(lse_ptr)) = (idx_ptr, lse_ptr) else {
        return cuda.recorded().map(|_| f32::NAN);
    };
    // SAFETY: lse scratch holds ≥ n floats; staged before return.
    let r = unsafe { drv::memcpy_htod_async(lse_ptr, lse, stream.cu_stream()) };
    r.map_err(KernelError::from)?;
    if cuda.ce.as_ref().is_none_or(|w| w.capacity() < k) {
        cuda.ce = Some(DeviceSparseCe::new(&cuda.kernels, k)?);
    }
    let Some(work) = cuda.ce.as_mut() else {
        return cuda.recorded().map(|_| f32::NAN);
    };
    let Some(tgt) = rows.targets.dev.as_ref() else {
        return Err(KernelError::Cuda("targets have no device memory".into()).into());
    };
    // SAFETY: each borrowed range is live device memory of this context of the stated length (checked above
    // or just uploaded), used only during this call.
    let (logits_b, lse_b, idx_b, mut dz_b) = unsafe {
        (
            Borrowed::<f32>::new(&stream, z.ptr, used),
            Borrowed::<f32>::new(&stream, lse_ptr, n),
            Borrowed::<u32>::new(&stream, idx_ptr, k + 1),
            Borrowed::<f32>::new(&stream, dlogits.ptr, k * dims.vp),
        )
    };
    let view = DeviceLogits::new(logits_b.slice(0..used), n, dims.v, dims.vp)?;
    let mut dz = dz_b.slice_mut(0..k * dims.vp);
    cuda.kernels.sparse_ce(
        SparseCeArgs {
            logits: &view,
            targets: &tgt.slice(0..n),
            lse: &lse_b.slice(0..n),
            kept: &idx_b.slice(0..k),
            count: &idx_b.slice(k..k + 1),
            dlogits: &mut dz,
            out_stride: dims.vp,
            scale: GradScale::Constant(scale),
        },
        work,
    )?;
    Ok(work.read_loss(&cuda.kernels)?)
}

pub(super) fn kd_grad(
    cuda: &mut Cuda,
    student: Logits<DevView<'_>>,
    teacher: Logits<DevView<'_>>,
    rows: KeptTargets<'_, DeviceInts<i32>>,
    kd: KdParams,
    scale: f32,
    dlogits: DevViewMut<'_>,
) -> Result<f32> {
    cuda.recorded()?;
    kd.validate()?;
    let Logits { z, rows: n, dims } = student;
    if teacher.rows != n || teacher.dims.v != dims.v || teacher.dims.vp != dims.vp {
        return Err(Gpt2Error::Shape {
            what: "teacher logits",
            expected: format!("[{n}, {}] in stride {} like the student's", dims.v, dims.vp),
            got: format!(
                "[{}, {}] in stride {}",
                teacher.rows, teacher.dims.v, teacher.dims.vp
            ),
        });
    }
    let kept = rows.kept;
    let k = kept.len();
    crate::error::check_len("targets", rows.targets.len(), n)?;
    if k == 0 {
        return Ok(0.0);
    }
    crate::model::validate_kept(kept, n)?;
    check_kept_targets(kept, &rows.targets.host, dims.v)?;
    let used = logits_extent(n, dims)?;
    if !cuda.ready(&[
        ("student logits", z.len, used, z.ptr),
        ("teacher logits", teacher.z.len, used, teacher.z.ptr),
        ("dlogits", dlogits.len, k * dims.vp, dlogits.ptr),
    ]) {
        return cuda.recorded().map(|_| f32::NAN);
    }
    let idx_ptr = cuda.upload_idx(kept);
    let loss_ptr = cuda.scratch(3, k);
    let (Some(idx_ptr), Some(loss_ptr)) = (idx_ptr, loss_ptr) else {
        return cuda.recorded().map(|_| f32::NAN);
    };
    let Some(tgt) = rows.targets.dev.as_ref() else {
        return Err(KernelError::Cuda("targets have no device memory".into()).into());
    };
    let tgt_ptr = raw_ptr(tgt);
    let (k64, v64, vp64) = (k as u64, dims.v as u64, dims.vp as u64);
    let (w, tau) = (kd.kd_weight, kd.temperature);
    // SAFETY: matches kd_grad_rows (kd.cu; W and τ as f64): both logits hold n rows of stride Vp, the kept
    // list k rows < n with valid targets (checked), dlogits k·Vp floats, the loss scratch k floats. The
    // teacher's logits were written on the teacher backend's own stream; its statistics were read back to the
    // host (a synchronisation) before the trainer asks for this gradient, so they are complete here.
    if !unsafe {
        launch!(
            cuda,
            kd_grad_rows,
            cfg(k.min(MAX_GRID) as u32, ESLM_KD_THREADS),
            &z.ptr,
            &teacher.z.ptr,
            &tgt_ptr,
            &idx_ptr,
            &k64,
            &v64,
            &vp64,
            &vp64,
            &w,
            &tau,
            &scale,
            &dlogits.ptr,
            &loss_ptr
        )
    } {
        return cuda.recorded().map(|_| f32::NAN);
    }
    // The kept rows' losses (a per-row vector, K floats): the mean over them in f64, as on the CPU.
    let mut losses = vec![0f32; k];
    let view = DevView {
        ptr: loss_ptr,
        len: k,
        _buf: PhantomData,
    };
    cuda.download(view, &mut losses);
    cuda.recorded()?;
    Ok((losses.iter().map(|&x| x as f64).sum::<f64>() / k as f64) as f32)
}

pub(super) fn scale_rows(cuda: &mut Cuda, x: DevViewMut<'_>, width: usize, weights: &[f32]) {
    let k = weights.len();
    if k == 0 || !cuda.ready(&[("scale_rows x", x.len, k * width, x.ptr)]) {
        return;
    }
    let Some(w) = cuda.scratch(1, k) else {
        return;
    };
    // SAFETY: the partial scratch holds ≥ k floats; ordered on the stream.
    let r = unsafe { drv::memcpy_htod_async(w, weights, cuda.stream().cu_stream()) };
    if !cuda.check(r) {
        return;
    }
    let (k64, w64) = (k as u64, width as u64);
    // SAFETY: matches scale_rows (scale.cu); x holds K·width floats.
    unsafe {
        launch!(
            cuda,
            scale_rows,
            cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &x.ptr,
            &w,
            &k64,
            &w64
        )
    };
}
