//! A bf16 copy of the model's parameters for bf16 products (llm.c's "bf16 weights for compute";
//! `kernels/convert.cu`; CPU counterpart: none, the CPU multiplies f32). Without it, every product converts its f32
//! weight operand; with it, the whole parameter buffer is converted once after each write into it (an AdamW step,
//! an upload, a gather across ranks), and products read their weight's bf16 copy at the same offset.
//!
//! Staleness is impossible by construction: every backend op that writes device memory through a view of the
//! registered buffer ([`Cuda::touched`]: upload, fill, AdamW, collectives) marks the copy stale, and a stale copy
//! is refreshed (on the stream, before the product that reads it) at its next use.

use super::*;

/// The registered parameter buffer and its bf16 copy.
#[derive(Debug)]
pub(super) struct Shadow {
    /// Device address of the f32 parameters.
    base: u64,
    /// Their length in floats.
    len: usize,
    /// The bf16 copy, allocated at first use.
    copy: Option<CudaSlice<u16>>,
}

impl Shadow {
    pub(super) fn new(base: u64, len: usize) -> Self {
        Self {
            base,
            len,
            copy: None,
        }
    }
}

/// Element offset of `[ptr, ptr + 4·extent)` inside the f32 buffer `[base, base + 4·len)`, if it lies there.
pub(super) fn offset_in(base: u64, len: usize, ptr: u64, extent: usize) -> Option<usize> {
    let off = ptr.checked_sub(base)?;
    let end = off.checked_add(4 * extent as u64)?;
    (off % 4 == 0 && end <= 4 * len as u64).then_some((off / 4) as usize)
}

/// Whether the byte ranges `[a, a + a_bytes)` and `[b, b + b_bytes)` share a byte.
pub(super) fn overlaps(a: u64, a_bytes: u64, b: u64, b_bytes: u64) -> bool {
    a < b.saturating_add(b_bytes) && b < a.saturating_add(a_bytes)
}

impl Cuda {
    /// Marks the bf16 copy of the parameters stale when `[ptr, ptr + len)` elements of `dtype` overlap them.
    pub(super) fn touched(&self, ptr: u64, len: usize, dtype: Dtype) {
        let shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shadow.as_ref() {
            if overlaps(ptr, (len * dtype.size()) as u64, s.base, 4 * s.len as u64) {
                self.shadow_stale
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The bf16 copy of the f32 operand `[ptr, ptr + extent)` when it lies in the registered parameters and the
    /// products are bf16 (refreshing the copy first if it is stale); `None` otherwise, or when the copy cannot be
    /// made (the caller converts the operand itself).
    pub(super) fn shadow_of(&self, ptr: u64, extent: usize) -> Option<u64> {
        if self.precision != MatmulPrecision::Bf16 {
            return None;
        }
        let mut shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
        let s = shadow.as_mut()?;
        let off = offset_in(s.base, s.len, ptr, extent)?;
        if s.copy.is_none() {
            s.copy = self.stream().alloc_zeros::<u16>(alloc_len(s.len)).ok();
            self.shadow_stale
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let copy = raw_ptr(s.copy.as_ref()?);
        if self
            .shadow_stale
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            let (src, len64) = (s.base, s.len as u64);
            // SAFETY: matches f32_to_bf16 (convert.cu): the copy holds `len` u16, the registered buffer `len`
            // floats; queued on the stream before the product that reads the copy.
            let queued = unsafe {
                launch!(
                    self,
                    f32_to_bf16,
                    cfg(grid(s.len, ESLM_EW_THREADS), ESLM_EW_THREADS),
                    &copy,
                    &src,
                    &len64
                )
            };
            if !queued {
                self.shadow_stale
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
        }
        Some(copy + 2 * off as u64)
    }

    /// An f32 operand of a bf16 product as bf16: the parameters' bf16 copy when it lies there, else converted into
    /// `slot` over its extent.
    pub(super) fn bf16_operand(
        &self,
        slot: &mut Grow<u16>,
        ptr: u64,
        extent: usize,
    ) -> Option<u64> {
        self.shadow_of(ptr, extent)
            .or_else(|| self.to_bf16(slot, ptr, extent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_inside_the_parameters_map_to_the_same_offset() {
        let base = 0x7000_0000u64;
        assert_eq!(offset_in(base, 100, base, 100), Some(0));
        assert_eq!(offset_in(base, 100, base + 40, 90), Some(10));
        assert_eq!(
            offset_in(base, 100, base + 40, 91),
            None,
            "runs past the end"
        );
        assert_eq!(offset_in(base, 100, base - 4, 1), None, "starts before");
        assert_eq!(offset_in(base, 100, base + 2, 1), None, "not on a float");
        assert_eq!(
            offset_in(base, 100, base + 400, 0),
            Some(100),
            "empty at the end"
        );
    }

    #[test]
    fn a_write_marks_the_copy_stale_only_where_it_overlaps() {
        let (base, bytes) = (4096u64, 400u64);
        assert!(overlaps(base, 4, base, bytes), "first float");
        assert!(overlaps(base + 396, 4, base, bytes), "last float");
        assert!(overlaps(base - 8, 16, base, bytes), "straddles the start");
        assert!(overlaps(0, u64::MAX, base, bytes), "covers it");
        assert!(!overlaps(base + 400, 4, base, bytes), "just after");
        assert!(!overlaps(base - 4, 4, base, bytes), "just before");
        assert!(!overlaps(base, 0, base, bytes), "empty write");
    }
}
