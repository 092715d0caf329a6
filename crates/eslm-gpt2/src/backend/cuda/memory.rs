//! Device memory of the CUDA backend: owned buffers of f32 or bf16 elements ([`Dtype`]), the views the `Backend`
//! trait hands around (pointer + length in elements + type, so sub-ranges and disjoint mutable splits are plain
//! arithmetic), integer index buffers, grow-only scratch, and borrowed views for the eslm-kernels launchers.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use eslm_kernels::cuda::{alloc_len, cudarc};
use eslm_kernels::KernelError;

use crate::error::Gpt2Error;

/// Element type of a device buffer: f32, or bf16 (the activations of a backend with bf16 storage,
/// [`super::Cuda::set_activation_dtype`]). The `Backend` trait's values are f32 either way: bf16 elements widen
/// exactly on the way to the host and round to nearest even on the way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// 4-byte IEEE float.
    #[default]
    F32,
    /// 2-byte bfloat16 (8-bit mantissa, f32's range).
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// An owned buffer in device memory (`len` elements of `dtype`). A failed allocation leaves no memory (`slice`
/// `None`, pointer 0); the failure is recorded by the backend and any op given a view of it records a shape error.
#[derive(Debug)]
pub struct CudaBuf {
    pub(super) slice: Option<CudaSlice<u8>>,
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) dtype: Dtype,
}

impl Clone for CudaBuf {
    /// A device-to-device copy on the buffer's stream; on failure the copy holds no memory (see [`CudaBuf`]).
    fn clone(&self) -> Self {
        let slice = self.slice.as_ref().and_then(|s| s.try_clone().ok());
        let ptr = slice.as_ref().map_or(0, raw_ptr);
        Self {
            slice,
            ptr,
            len: self.len,
            dtype: self.dtype,
        }
    }
}

impl CudaBuf {
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

/// A read-only range of a [`CudaBuf`]: device pointer, length in elements and their type (pointer 0: no memory,
/// or a range outside its buffer).
#[derive(Debug, Clone, Copy)]
pub struct DevView<'a> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) dtype: Dtype,
    pub(super) _buf: PhantomData<&'a [f32]>,
}

/// A mutable range of a [`CudaBuf`] (see [`DevView`]).
#[derive(Debug)]
pub struct DevViewMut<'a> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) dtype: Dtype,
    pub(super) _buf: PhantomData<&'a mut [f32]>,
}

impl DevView<'_> {
    /// Length in elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl DevViewMut<'_> {
    /// Length in elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Integers on the device (token ids, targets) with their host copy.
#[derive(Debug)]
pub struct DeviceInts<T: DeviceRepr> {
    pub(super) dev: Option<CudaSlice<T>>,
    pub(super) capacity: usize,
    pub(super) host: Vec<T>,
}

impl<T: DeviceRepr + Clone> Clone for DeviceInts<T> {
    fn clone(&self) -> Self {
        Self {
            dev: self.dev.as_ref().and_then(|s| s.try_clone().ok()),
            capacity: self.capacity,
            host: self.host.clone(),
        }
    }
}

impl<T: DeviceRepr> DeviceInts<T> {
    /// Number of values held.
    pub fn len(&self) -> usize {
        self.host.len()
    }
    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    /// The host copy.
    pub fn host(&self) -> &[T] {
        &self.host
    }
    pub(super) fn ptr(&self) -> u64 {
        self.dev.as_ref().map_or(0, raw_ptr)
    }
}

/// The device pointer of a slice (event tracking is off on the backend's context, so this records nothing).
pub(super) fn raw_ptr<T>(s: &CudaSlice<T>) -> u64 {
    let (ptr, _sync) = s.device_ptr(s.stream());
    ptr
}

/// `(ptr, len)` of `range` within a view of `len` elements of `dtype` at `ptr`; pointer 0 when the range is
/// outside.
pub(super) fn sub(ptr: u64, len: usize, range: Range<usize>, dtype: Dtype) -> (u64, usize) {
    let n = range.end.saturating_sub(range.start);
    if ptr == 0 || range.start > range.end || range.end > len {
        return (0, n);
    }
    (ptr + (dtype.size() * range.start) as u64, n)
}

/// The device address `elems` elements of `dtype` after `ptr`.
pub(super) fn at(ptr: u64, elems: usize, dtype: Dtype) -> u64 {
    ptr + (elems * dtype.size()) as u64
}

/// A device buffer that grows on demand (scratch).
#[derive(Debug)]
pub(super) struct Grow<T: DeviceRepr> {
    pub(super) slice: Option<CudaSlice<T>>,
}

impl<T: DeviceRepr + ValidAsZeroBits> Grow<T> {
    pub(super) fn new() -> Self {
        Self { slice: None }
    }
    /// At least `len` elements; `None` if the allocation failed.
    pub(super) fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        len: usize,
    ) -> std::result::Result<&mut CudaSlice<T>, Gpt2Error> {
        if self.slice.as_ref().is_none_or(|s| s.len() < len) {
            self.slice = None;
            let s = stream
                .alloc_zeros::<T>(alloc_len(len))
                .map_err(KernelError::from)?;
            self.slice = Some(s);
        }
        self.slice
            .as_mut()
            .ok_or_else(|| Gpt2Error::Kernel(KernelError::Cuda("scratch allocation".into())))
    }
}

/// A `CudaSlice` over memory the backend does not own (a view of a [`CudaBuf`]), for the eslm-kernels launchers
/// that take cudarc views; forgotten (never freed) on drop.
pub(super) struct Borrowed<T>(pub(super) std::mem::ManuallyDrop<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` must point to at least `len` live elements of `T` for the lifetime of the value, on `stream`'s
    /// context.
    pub(super) unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        // SAFETY: as the caller promises; event tracking is off on this context, so nothing else is created.
        Self(std::mem::ManuallyDrop::new(unsafe {
            stream.upgrade_device_ptr(ptr, len)
        }))
    }
}

impl<T> std::ops::Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.0
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `leak` hands the pointer back without freeing it (its owner frees it).
        let slice = unsafe { std::mem::ManuallyDrop::take(&mut self.0) };
        let _ = slice.leak();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_outside_a_view_have_no_memory() {
        let f = Dtype::F32;
        assert_eq!(sub(4096, 10, 2..5, f), (4096 + 8, 3));
        assert_eq!(sub(4096, 10, 0..10, f), (4096, 10));
        assert_eq!(sub(4096, 10, 5..11, f), (0, 6));
        assert_eq!(sub(0, 10, 0..3, f), (0, 3));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..2;
        assert_eq!(sub(4096, 10, reversed, f), (0, 0));
    }

    #[test]
    fn bf16_ranges_step_two_bytes() {
        assert_eq!(sub(4096, 10, 2..5, Dtype::Bf16), (4096 + 4, 3));
        assert_eq!(sub(4096, 10, 5..11, Dtype::Bf16), (0, 6));
        assert_eq!(at(4096, 3, Dtype::Bf16), 4102);
        assert_eq!(at(4096, 3, Dtype::F32), 4108);
    }
}
