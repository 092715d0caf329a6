//! The loss head on the device: eslm-kernels' token statistics and sparse cross-entropy launchers on this
//! backend's stream, the distillation gradient (`kernels/kd.cu`; CPU counterpart `eslm_kernels::kd`), the
//! importance weights of kept rows (`kernels/scale.cu`).
//!
//! What travels: the statistics are read back once per forward (the host copy the trainer sees). A selection
//! over the model's own loss or entropy ranks the device statistics (`kernels/select.cu`) and reads back the kept
//! list; the sparse CE and KD then read `lse`, the kept list and its count from the device, and the sparse CE's
//! mean loss comes from the host copy of the per-row losses (no read-back). Only host-made scores (random keys, a
//! reference model's excess loss) and host-made selections (every valid row, a global threshold) are uploaded.

use super::*;
use cudarc::driver::DevicePtr;
use eslm_kernels::cuda::DeviceElem;

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
    (cuda.stats_fresh, cuda.sel_fresh) = (false, false);
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
    let tgt = tgt.slice(0..rows);
    let (kernels, z_used) = (&cuda.kernels, (z.ptr, used));
    // SAFETY: z is a live range of `used` ≥ z-extent elements of its type on this context (checked above).
    unsafe {
        with_elem!(
            z.dtype,
            queue_stats(kernels, &stream, z_used, rows, dims, &tgt, stats)
        )
    }?;
    stats.check_status(&cuda.kernels)?;
    stats.to_host(&cuda.kernels, out)?;
    cuda.stats_loss.clone_from(&out.loss);
    cuda.stats_fresh = true;
    Ok(())
}

/// Queues eslm-kernels' token statistics of `rows` rows of logits of element type `T` (`z`: pointer and the
/// elements the rows span).
///
/// # Safety
/// `z` must be a live range of that many elements of `T` on the stream's context.
unsafe fn queue_stats<T: DeviceElem>(
    kernels: &CudaKernels,
    stream: &Arc<CudaStream>,
    (ptr, used): (u64, usize),
    rows: usize,
    dims: HeadDims,
    targets: &cudarc::driver::CudaView<'_, i32>,
    out: &mut DeviceTokenStats,
) -> Result<()> {
    // SAFETY: as the caller promises; the borrow ends with this call.
    let borrowed = unsafe { Borrowed::<T>::new(stream, ptr, used) };
    let view = DeviceLogits::new(borrowed.slice(0..used), rows, dims.v, dims.vp)?;
    kernels.token_stats(&view, targets, DEFAULT_IGNORE_INDEX, out)?;
    Ok(())
}

/// The device statistics of the last `token_stats` call when they cover `rows` rows.
fn fresh_stats(cuda: &Cuda, rows: usize) -> Option<&DeviceTokenStats> {
    let stats = cuda.stats.as_ref().filter(|s| s.rows() == rows);
    stats.filter(|_| cuda.stats_fresh)
}

/// The device selection of the last `select` call over `rows` rows when the loss head says its kept list is that
/// selection's host copy (`own`; the host copy was read back from it, so the two agree).
fn fresh_selection(cuda: &Cuda, rows: usize, own: bool) -> Option<&DeviceSelection> {
    let sel = cuda.sel.as_ref().filter(|s| s.rows() == rows);
    sel.filter(|_| own && cuda.sel_fresh && fresh_stats(cuda, rows).is_some())
}

pub(super) fn select(
    cuda: &mut Cuda,
    scores: RowScores<'_>,
    valid: &[bool],
    rule: SelectRule,
    out: &mut Selection,
) -> Result<()> {
    cuda.recorded()?;
    cuda.sel_fresh = false;
    let n = scores.host.len();
    let own = scores.own.filter(|_| fresh_stats(cuda, n).is_some());
    let Some(stat) = own else {
        // Scores made on the host: uploaded, ranked on the device, read back.
        cuda.kernels
            .select_host(scores.host, Some(valid), rule, out)?;
        return Ok(());
    };
    crate::error::check_len("valid", valid.len(), n)?;
    if cuda.sel.as_ref().is_none_or(|s| s.capacity() < n) {
        cuda.sel = Some(DeviceSelection::new(&cuda.kernels, n)?);
    }
    let (Some(stats), Some(sel)) = (cuda.stats.as_ref(), cuda.sel.as_mut()) else {
        return cuda.recorded();
    };
    let src = match stat {
        OwnStat::Loss => &stats.loss,
        OwnStat::Entropy => &stats.entropy,
    };
    let valid_dev = stats.valid.slice(0..n);
    cuda.kernels
        .select(&src.slice(0..n), Some(&valid_dev), rule, sel)?;
    sel.to_host(&cuda.kernels, out)?;
    cuda.sel_fresh = true;
    Ok(())
}

/// Device pointers of a loss gradient's kept list `[K]`, its count (one u32) and, when `lse_rows > 0`, the
/// `lse [lse_rows]` of the logits: the loss head's own device copies where they are this forward's, else
/// uploaded from the host. `None` after recording a failure.
fn kept_on_device(
    cuda: &mut Cuda,
    n: usize,
    kept: &[u32],
    own_selection: bool,
    lse: &[f32],
) -> Option<(u64, u64, Option<u64>)> {
    let k = kept.len();
    let own_lse = fresh_stats(cuda, n).map(|s| raw_ptr(&s.lse));
    let own_kept = fresh_selection(cuda, n, own_selection).map(|s| {
        let count_view = s.count();
        let (count, _sync) = count_view.device_ptr(cuda.stream());
        (raw_ptr(&s.indices), count)
    });
    let (idx, count) = match own_kept {
        Some(p) => p,
        None => {
            // Kept rows then the count, in the index scratch.
            let mut idx: Vec<u32> = kept.to_vec();
            idx.push(k as u32);
            let p = cuda.upload_idx(&idx)?;
            (p, p + 4 * k as u64)
        }
    };
    let lse_ptr = match (lse.is_empty(), own_lse) {
        (true, _) => None,
        (false, Some(p)) => Some(p),
        (false, None) => {
            let p = cuda.scratch(3, lse.len())?;
            // SAFETY: the lse scratch holds ≥ lse.len() floats; staged before return (pageable host memory).
            let r = unsafe { drv::memcpy_htod_async(p, lse, cuda.stream().cu_stream()) };
            if !cuda.check(r) {
                return None;
            }
            Some(p)
        }
    };
    Some((idx, count, lse_ptr))
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
    let Some(dt) = cuda.op_dtype(&[("logits", z.dtype), ("dlogits", dlogits.dtype)], &[]) else {
        return cuda.recorded().map(|_| f32::NAN);
    };
    let stream = cuda.stream().clone();
    let Some((idx_ptr, count_ptr, Some(lse_ptr))) =
        kept_on_device(cuda, n, kept, rows.own_selection, lse)
    else {
        return cuda.recorded().map(|_| f32::NAN);
    };
    let host_mean = fresh_stats(cuda, n).map(|_| {
        let sum: f64 = kept
            .iter()
            .map(|&r| cuda.stats_loss[r as usize] as f64)
            .sum();
        (sum / k as f64) as f32
    });
    if cuda.ce.as_ref().is_none_or(|w| w.capacity() < k) {
        cuda.ce = Some(DeviceSparseCe::new(&cuda.kernels, k)?);
    }
    let Some(work) = cuda.ce.as_mut() else {
        return cuda.recorded().map(|_| f32::NAN);
    };
    let Some(tgt) = rows.targets.dev.as_ref() else {
        return Err(KernelError::Cuda("targets have no device memory".into()).into());
    };
    let ptrs = CePtrs {
        z: (z.ptr, used),
        lse: lse_ptr,
        idx: idx_ptr,
        count: count_ptr,
        dz: dlogits.ptr,
    };
    let tgt = tgt.slice(0..n);
    let kernels = &cuda.kernels;
    let (rows_k, scale) = ((n, k), GradScale::Constant(scale));
    // SAFETY: each pointer is live device memory of this context of the stated length and of the logits' type
    // (checked above, or the loss head's own buffers, or just uploaded).
    unsafe {
        with_elem!(
            dt,
            queue_sparse_ce(kernels, &stream, ptrs, rows_k, dims, &tgt, scale, work)
        )
    }?;
    // The mean loss of the kept rows, in f64 in kept order like the kernel's: from the host copy of this forward's
    // per-row losses (the same `lse − z_y`) when there is one, so nothing is read back here; the status word is
    // then read by the next `Backend::status` (once per optimizer step; with several micro-batches per step only
    // the last one's word survives, and the host has already checked what it reports: the kept targets, and K
    // against the workspace it sized). Else read back.
    match host_mean {
        Some(mean) => {
            cuda.ce_unchecked
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(mean)
        }
        None => Ok(work.read_loss(&cuda.kernels)?),
    }
}

/// Device pointers of one sparse CE: the logits (pointer, elements spanned), `lse [N]`, the kept list `[K]`, its
/// count, the output `[K, Vp]`.
struct CePtrs {
    z: (u64, usize),
    lse: u64,
    idx: u64,
    count: u64,
    dz: u64,
}

/// Queues eslm-kernels' sparse CE of `(n, k)` rows with logits and their gradient of element type `T`.
///
/// # Safety
/// Every pointer of `p` must be live memory of this context: the logits `p.z.1` elements of `T`, lse `n` floats,
/// the kept list `k` u32, the count one u32, the output `k·Vp` elements of `T`.
#[allow(clippy::too_many_arguments)]
unsafe fn queue_sparse_ce<T: DeviceElem>(
    kernels: &CudaKernels,
    stream: &Arc<CudaStream>,
    p: CePtrs,
    (n, k): (usize, usize),
    dims: HeadDims,
    targets: &cudarc::driver::CudaView<'_, i32>,
    scale: GradScale,
    work: &mut DeviceSparseCe,
) -> Result<()> {
    // SAFETY: as the caller promises; the borrows end with this call.
    let (logits_b, lse_b, idx_b, count_b, mut dz_b) = unsafe {
        (
            Borrowed::<T>::new(stream, p.z.0, p.z.1),
            Borrowed::<f32>::new(stream, p.lse, n),
            Borrowed::<u32>::new(stream, p.idx, k),
            Borrowed::<u32>::new(stream, p.count, 1),
            Borrowed::<T>::new(stream, p.dz, k * dims.vp),
        )
    };
    let view = DeviceLogits::new(logits_b.slice(0..p.z.1), n, dims.v, dims.vp)?;
    let mut dz = dz_b.slice_mut(0..k * dims.vp);
    kernels.sparse_ce(
        SparseCeArgs {
            logits: &view,
            targets,
            lse: &lse_b.slice(0..n),
            kept: &idx_b.slice(0..k),
            count: &count_b.slice(0..1),
            dlogits: &mut dz,
            out_stride: dims.vp,
            scale,
        },
        work,
    )?;
    Ok(())
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
    if [z.dtype, teacher.z.dtype, dlogits.dtype].contains(&Dtype::Bf16) {
        return Err(Gpt2Error::Unsupported(
            "distillation (eslm-kd) on bf16 activations: kernels/kd.cu reads f32 logits; train with f32 storage"
                .into(),
        ));
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
    let idx_ptr = kept_on_device(cuda, n, kept, rows.own_selection, &[]).map(|(idx, _, _)| idx);
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
        dtype: Dtype::F32,
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
    let dt = x.dtype;
    // SAFETY: matches scale_rows (scale.cu; the twin of x's type); x holds K·width elements, w K floats.
    unsafe {
        launch!(
            cuda,
            scale_rows[dt],
            cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &x.ptr,
            &w,
            &k64,
            &w64
        )
    };
}
