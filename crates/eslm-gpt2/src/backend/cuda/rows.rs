//! Row movement (`kernels/rows.cu`; CPU counterparts `crate::ops::gather`, `crate::ops::scatter_add`): gathering
//! kept rows into compact buffers, scatter-adding compact gradients back, and compacting whole sequences in place
//! (hierarchical ESLM's reuse of the shallow pass).

use super::*;

pub(super) fn compact_blocks(cuda: &mut Cuda, x: DevViewMut<'_>, block: usize, seqs: &[usize]) {
    let end = seqs.last().map_or(0, |&s| (s + 1) * block);
    if block == 0 || !cuda.ready(&[("compacted buffer", x.len, end, x.ptr)]) {
        return;
    }
    let dt = x.dtype;
    for (i, &s) in seqs.iter().enumerate().filter(|(i, s)| *i != **s) {
        // SAFETY: both blocks lie inside the view (checked through the last block); `i < s` (the list is
        // strictly ascending), so the destination ends at or before the source begins; ordered on the stream
        // after the earlier copies, whose sources lie after this destination.
        let r = unsafe {
            drv::memcpy_dtod_async(
                at(x.ptr, i * block, dt),
                at(x.ptr, s * block, dt),
                block * dt.size(),
                cuda.stream().cu_stream(),
            )
        };
        if !cuda.check(r) {
            return;
        }
    }
}

pub(super) fn gather_rows(
    cuda: &mut Cuda,
    dst: DevViewMut<'_>,
    src: DevView<'_>,
    rows: &RowSet,
    width: usize,
) {
    match rows {
        RowSet::All => {
            let len = src.len;
            if len == 0
                || !cuda.ready(&[
                    ("gather dst", dst.len, len, dst.ptr),
                    ("gather src", len, len, src.ptr),
                ])
            {
                return;
            }
            if cuda
                .op_dtype(&[("gather dst", dst.dtype), ("gather src", src.dtype)], &[])
                .is_none()
            {
                return;
            }
            let bytes = len * src.dtype.size();
            // SAFETY: both ranges hold len elements of one type (checked) and are distinct buffers of the model.
            let r = unsafe {
                drv::memcpy_dtod_async(dst.ptr, src.ptr, bytes, cuda.stream().cu_stream())
            };
            cuda.check(r);
        }
        RowSet::Rows(r) => {
            let k = r.len();
            let max_row = r.last().map_or(0, |&x| x as usize + 1);
            if k == 0
                || !cuda.ready(&[
                    ("gather dst", dst.len, k * width, dst.ptr),
                    ("gather src", src.len, max_row * width, src.ptr),
                ])
            {
                return;
            }
            let acts = [("gather dst", dst.dtype), ("gather src", src.dtype)];
            if let Some(dt) = cuda.op_dtype(&acts, &[]) {
                gather_launch(cuda, dst.ptr, (src.ptr, dt), rows, width);
            }
        }
    }
}

pub(super) fn scatter_add_rows(
    cuda: &mut Cuda,
    dst: DevViewMut<'_>,
    g: RowGrad<'_, DevView<'_>>,
    width: usize,
) {
    let (rows, n) = (g.rows, g.n);
    let k = rows.count(n);
    let max_row = match rows {
        RowSet::All => n,
        RowSet::Rows(r) => r.last().map_or(0, |&x| x as usize + 1),
    };
    if k == 0
        || !cuda.ready(&[
            ("scatter dst", dst.len, max_row * width, dst.ptr),
            ("scatter g", g.g.len, k * width, g.g.ptr),
        ])
    {
        return;
    }
    let Some(dt) = cuda.op_dtype(&[("scatter dst", dst.dtype), ("scatter g", g.g.dtype)], &[])
    else {
        return;
    };
    let Some(rows_p) = cuda.upload_rows(rows) else {
        return;
    };
    let (k64, w64) = (k as u64, width as u64);
    // SAFETY: matches scatter_add_rows (rows.cu; the twin of the elements' type); distinct rows < max_row.
    unsafe {
        launch!(
            cuda,
            scatter_add_rows[dt],
            cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &dst.ptr,
            &g.g.ptr,
            &rows_p,
            &k64,
            &w64
        )
    };
}

/// The rows `rows` of the dense `[n, width]` matrix at `src` (elements of the given type): `src` itself for
/// `All`, else gathered into the gather scratch.
pub(super) fn rows_of(
    cuda: &mut Cuda,
    (src, dt): (u64, Dtype),
    rows: &RowSet,
    _n: usize,
    width: usize,
) -> Option<u64> {
    match rows {
        RowSet::All => Some(src),
        RowSet::Rows(r) => {
            let dst = cuda.scratch_of(0, r.len() * width, dt)?;
            gather_launch(cuda, dst, (src, dt), rows, width).then_some(dst)
        }
    }
}

/// Queues `gather_rows` of a `Rows` set into `dst` (elements of `src`'s type); whether it was queued.
pub(super) fn gather_launch(
    cuda: &mut Cuda,
    dst: u64,
    (src, dt): (u64, Dtype),
    rows: &RowSet,
    width: usize,
) -> bool {
    let RowSet::Rows(r) = rows else {
        return false;
    };
    let k = r.len();
    let Some(rows_p) = cuda.upload_rows(rows) else {
        return false;
    };
    let (k64, w64) = (k as u64, width as u64);
    // SAFETY: matches gather_rows (rows.cu; the twin of the elements' type); dst holds K·width elements, every row
    // < the rows of src.
    unsafe {
        launch!(
            cuda,
            gather_rows[dt],
            cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &dst,
            &src,
            &rows_p,
            &k64,
            &w64
        )
    }
}
