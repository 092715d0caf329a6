//! CUDA backend (feature `cuda`): the three kernel families on the GPU, mirroring the CPU API.
//!
//! The kernels are `kernels/*.cu`, compiled by `build.rs` into fatbins (SASS for sm_80 and sm_90, PTX for newer
//! GPUs) and embedded in the library; [`CudaKernels`] loads them into a CUDA context through cudarc's dynamic
//! loading of the driver, so the crate builds and links on machines without CUDA. On such machines every entry
//! point returns [`KernelError::NoCudaDriver`] (never a panic): call [`cuda_probe`] or [`cuda_available`] first.
//!
//! Two layers:
//! - **device API** ([`CudaKernels::token_stats`], [`CudaKernels::select`], [`CudaKernels::sparse_ce`]): inputs and
//!   outputs stay in device memory, every call is asynchronous on one stream, and the selection's threshold and
//!   kept count stay on the GPU (the sparse cross-entropy reads the count there). Results and device-side errors
//!   (NaN scores, no valid rows, k > M) are read back only when asked ([`DeviceSelection::summary`],
//!   [`DeviceTokenStats::check_status`]), e.g. for logging.
//! - **host wrappers** ([`CudaKernels::token_stats_host`], [`CudaKernels::select_host`],
//!   [`CudaKernels::sparse_ce_host`]): the CPU functions' exact signatures and error checks over host slices
//!   (upload, run, download); used by the parity tests and handy for one-off calls.

mod params;
pub mod select;
pub mod sparse_ce;
pub mod token_stats;

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DeviceRepr,
    DriverError, ValidAsZeroBits,
};

use crate::error::{KernelError, Result};

/// The cudarc version this backend is built on, re-exported so callers name the same device types.
pub use cudarc;

pub use select::{DeviceSelection, SelectionSummary};
pub use sparse_ce::{DeviceSparseCe, GradScale, SparseCeArgs};
pub use token_stats::DeviceTokenStats;

// The shapes the kernels assume of the header's block sizes (the .cu files static_assert the same).
const _: () = assert!(params::ESLM_SELECT_BINS == 2 * params::ESLM_SEL_PICK_THREADS);
const _: () = assert!(params::ESLM_TS_THREADS % 32 == 0 && params::ESLM_TS_THREADS / 32 <= 32);
const _: () = assert!(params::ESLM_CE_REDUCE_THREADS.is_power_of_two());

/// What [`DeviceSelection::indices`] holds past the kept count (`ESLM_NO_ROW`: never a row index).
pub const NO_ROW: u32 = params::ESLM_NO_ROW;

impl From<DriverError> for KernelError {
    fn from(e: DriverError) -> Self {
        KernelError::Cuda(e.to_string())
    }
}

/// The fatbins built by `build.rs` from `kernels/<name>.cu`.
const FATBIN_TOKEN_STATS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/token_stats.fatbin"));
const FATBIN_SELECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/select.fatbin"));
const FATBIN_SPARSE_CE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sparse_ce.fatbin"));

/// The engine's kernel families (`kernels/<name>.cu`, one fatbin each), launched by the CUDA backend of eslm-gpt2
/// (`eslm_gpt2::backend::cuda`): `(family, fatbin)`. Load one with
/// `ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))`.
pub const ENGINE_FATBINS: [(&str, &[u8]); 12] = [
    (
        "encoder",
        include_bytes!(concat!(env!("OUT_DIR"), "/encoder.fatbin")),
    ),
    (
        "layernorm",
        include_bytes!(concat!(env!("OUT_DIR"), "/layernorm.fatbin")),
    ),
    (
        "gelu",
        include_bytes!(concat!(env!("OUT_DIR"), "/gelu.fatbin")),
    ),
    (
        "residual",
        include_bytes!(concat!(env!("OUT_DIR"), "/residual.fatbin")),
    ),
    (
        "rows",
        include_bytes!(concat!(env!("OUT_DIR"), "/rows.fatbin")),
    ),
    (
        "attention",
        include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
    ),
    (
        "adamw",
        include_bytes!(concat!(env!("OUT_DIR"), "/adamw.fatbin")),
    ),
    (
        "global_norm",
        include_bytes!(concat!(env!("OUT_DIR"), "/global_norm.fatbin")),
    ),
    (
        "scale",
        include_bytes!(concat!(env!("OUT_DIR"), "/scale.fatbin")),
    ),
    (
        "linear",
        include_bytes!(concat!(env!("OUT_DIR"), "/linear.fatbin")),
    ),
    ("kd", include_bytes!(concat!(env!("OUT_DIR"), "/kd.fatbin"))),
    (
        "convert",
        include_bytes!(concat!(env!("OUT_DIR"), "/convert.fatbin")),
    ),
];

/// Block sizes of the engine's kernel families (`kernels/eslm_kernels.h`, the one definition; each kernel traps on
/// a launch with another block size), for the launchers in eslm-gpt2.
pub mod engine_block_sizes {
    pub use super::params::{
        ESLM_ADAMW_THREADS, ESLM_ATT_THREADS, ESLM_COLSUM_ROWS, ESLM_ENC_THREADS, ESLM_EW_THREADS,
        ESLM_KD_THREADS, ESLM_LN_THREADS, ESLM_NORM_BLOCKS, ESLM_NORM_THREADS,
    };
}

/// The `nvcc -Xptxas -v` report (registers, shared memory, spills per kernel, for sm_80 and sm_90) of the build.
pub const PTXAS_REPORT: [(&str, &str); 15] = [
    (
        "token_stats.cu",
        include_str!(concat!(env!("OUT_DIR"), "/token_stats.ptxas.txt")),
    ),
    (
        "select.cu",
        include_str!(concat!(env!("OUT_DIR"), "/select.ptxas.txt")),
    ),
    (
        "sparse_ce.cu",
        include_str!(concat!(env!("OUT_DIR"), "/sparse_ce.ptxas.txt")),
    ),
    (
        "encoder.cu",
        include_str!(concat!(env!("OUT_DIR"), "/encoder.ptxas.txt")),
    ),
    (
        "layernorm.cu",
        include_str!(concat!(env!("OUT_DIR"), "/layernorm.ptxas.txt")),
    ),
    (
        "gelu.cu",
        include_str!(concat!(env!("OUT_DIR"), "/gelu.ptxas.txt")),
    ),
    (
        "residual.cu",
        include_str!(concat!(env!("OUT_DIR"), "/residual.ptxas.txt")),
    ),
    (
        "rows.cu",
        include_str!(concat!(env!("OUT_DIR"), "/rows.ptxas.txt")),
    ),
    (
        "attention.cu",
        include_str!(concat!(env!("OUT_DIR"), "/attention.ptxas.txt")),
    ),
    (
        "adamw.cu",
        include_str!(concat!(env!("OUT_DIR"), "/adamw.ptxas.txt")),
    ),
    (
        "global_norm.cu",
        include_str!(concat!(env!("OUT_DIR"), "/global_norm.ptxas.txt")),
    ),
    (
        "scale.cu",
        include_str!(concat!(env!("OUT_DIR"), "/scale.ptxas.txt")),
    ),
    (
        "linear.cu",
        include_str!(concat!(env!("OUT_DIR"), "/linear.ptxas.txt")),
    ),
    (
        "kd.cu",
        include_str!(concat!(env!("OUT_DIR"), "/kd.ptxas.txt")),
    ),
    (
        "convert.cu",
        include_str!(concat!(env!("OUT_DIR"), "/convert.ptxas.txt")),
    ),
];

/// Checks that a CUDA driver can be loaded and sees at least one GPU; returns the number of GPUs.
///
/// # Errors
/// [`KernelError::NoCudaDriver`] if `libcuda` cannot be loaded (checked before any cudarc call, which would
/// panic); [`KernelError::Cuda`] if the driver fails to initialise or reports no GPU.
pub fn cuda_probe() -> Result<usize> {
    // SAFETY: only tries to dlopen the driver library under its usual names; nothing is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::NoCudaDriver);
    }
    let count = CudaContext::device_count().map_err(|e| {
        KernelError::Cuda(format!(
            "the CUDA driver failed to initialise ({e}); use --device cpu"
        ))
    })?;
    if count <= 0 {
        return Err(KernelError::Cuda(
            "the CUDA driver reports no GPU; use --device cpu".into(),
        ));
    }
    Ok(count as usize)
}

/// Whether [`cuda_probe`] succeeds (a driver and at least one GPU).
pub fn cuda_available() -> bool {
    cuda_probe().is_ok()
}

/// A logits element the CUDA kernels accept: `f32` or `half::bf16` (stored as raw bits on the device).
pub trait DeviceElem:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
    /// The kernel name suffix (`"f32"` or `"bf16"`).
    const NAME: &'static str;
    /// Size of one element in bytes.
    const BYTES: usize = std::mem::size_of::<Self>();
}

impl DeviceElem for f32 {
    const NAME: &'static str = "f32";
}

impl DeviceElem for half::bf16 {
    const NAME: &'static str = "bf16";
}

/// A checked `[rows, vocab]` logits matrix in device memory with row stride `stride ≥ vocab` (elements).
#[derive(Debug)]
pub struct DeviceLogits<'a, T> {
    data: CudaView<'a, T>,
    rows: usize,
    vocab: usize,
    stride: usize,
}

impl<'a, T> DeviceLogits<'a, T> {
    /// Wraps `data` as `rows` rows of `vocab` logits spaced `stride` apart. Same rules as
    /// [`LogitsView::new`](crate::LogitsView::new): `1 ≤ vocab ≤ stride`, `data.len() ≥ (rows − 1)·stride + vocab`.
    ///
    /// # Errors
    /// [`KernelError::Shape`] if the rules above are broken.
    pub fn new(data: CudaView<'a, T>, rows: usize, vocab: usize, stride: usize) -> Result<Self> {
        crate::layout::check_logits_shape(data.len(), rows, vocab, stride)?;
        Ok(Self {
            data,
            rows,
            vocab,
            stride,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of real columns.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Distance in elements between row starts.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The underlying device memory.
    pub fn data(&self) -> &CudaView<'a, T> {
        &self.data
    }
}

pub(crate) use crate::layout::logits_len;

/// The loaded kernels.
#[derive(Debug)]
struct Functions {
    token_stats_f32: CudaFunction,
    token_stats_bf16: CudaFunction,
    select_init: CudaFunction,
    select_histogram: CudaFunction,
    select_pick: CudaFunction,
    select_tile_counts: CudaFunction,
    select_tile_scan: CudaFunction,
    select_write: CudaFunction,
    sparse_ce: [[CudaFunction; 2]; 2], // [input f32, bf16][output f32, bf16]
    sparse_ce_loss: CudaFunction,
}

/// The CUDA backend: a context, the stream every call is queued on, and the loaded kernel modules.
///
/// ```no_run
/// use eslm_kernels::cuda::CudaKernels;
/// use eslm_kernels::{SelectRule, Selection};
/// let gpu = CudaKernels::new(0)?; // KernelError::NoCudaDriver on a machine without CUDA
/// let mut sel = Selection::new();
/// gpu.select_host(&[0.5, 3.0, 1.0, 3.0, 2.0], None, SelectRule::Var { alpha: 0.6 }, &mut sel)?;
/// assert_eq!(sel.indices, vec![1, 3]);
/// # Ok::<(), eslm_kernels::KernelError>(())
/// ```
#[derive(Debug)]
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    functions: Functions,
    _modules: [Arc<CudaModule>; 3],
}

impl CudaKernels {
    /// Opens GPU `ordinal` (its primary context), creates a stream and loads the kernels.
    ///
    /// # Errors
    /// [`KernelError::NoCudaDriver`] without a driver; [`KernelError::Cuda`] if there is no such GPU or loading
    /// fails (e.g. a GPU older than sm_80 with a driver too old for the embedded PTX).
    ///
    /// Everything runs on that one stream, so cudarc's multi-stream event tracking (a read and a write event recorded
    /// per buffer per launch, tens of extra driver calls) is turned off on the context before the stream is created
    /// (see [`CudaContext::disable_event_tracking`]); buffers allocated in this context afterwards are not tracked.
    /// A caller that shares the context with other streams should use [`CudaKernels::with_stream`] instead and
    /// manage the event tracking itself.
    pub fn new(ordinal: usize) -> Result<Self> {
        cuda_probe()?;
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: from here on every buffer of this backend is allocated, used and freed on the one stream created
        // below, so no cross-stream synchronisation is needed (the conditions cudarc lists are met trivially).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Self::with_stream(stream)
    }

    /// Uses an existing stream (and its context), e.g. the engine's, so kernels queue behind its work.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if a module fails to load.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let load = |image: &[u8]| -> Result<Arc<CudaModule>> {
            // A fatbin is accepted by cuModuleLoadData; cudarc names that input "Ptx" (binary image).
            Ok(ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))?)
        };
        let stats = load(FATBIN_TOKEN_STATS)?;
        let select = load(FATBIN_SELECT)?;
        let ce = load(FATBIN_SPARSE_CE)?;
        let f = |m: &Arc<CudaModule>, name: &str| -> Result<CudaFunction> {
            m.load_function(name)
                .map_err(|e| KernelError::Cuda(format!("loading kernel {name}: {e}")))
        };
        let functions = Functions {
            token_stats_f32: f(&stats, "token_stats_f32")?,
            token_stats_bf16: f(&stats, "token_stats_bf16")?,
            select_init: f(&select, "select_init")?,
            select_histogram: f(&select, "select_histogram")?,
            select_pick: f(&select, "select_pick")?,
            select_tile_counts: f(&select, "select_tile_counts")?,
            select_tile_scan: f(&select, "select_tile_scan")?,
            select_write: f(&select, "select_write")?,
            sparse_ce: [
                [f(&ce, "sparse_ce_f32_f32")?, f(&ce, "sparse_ce_f32_bf16")?],
                [
                    f(&ce, "sparse_ce_bf16_f32")?,
                    f(&ce, "sparse_ce_bf16_bf16")?,
                ],
            ],
            sparse_ce_loss: f(&ce, "sparse_ce_loss")?,
        };
        Ok(Self {
            stream,
            functions,
            _modules: [stats, select, ce],
        })
    }

    /// The stream every kernel is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    /// Waits until all queued work has finished.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if a queued kernel failed.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Copies a host slice into a new device buffer. An empty slice gives a zeroed one-element buffer (never a
    /// zero-byte allocation: see [`alloc_len`]); take `slice(0..0)` of it for an empty view.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on allocation or copy failure.
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(0);
        }
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copies `len` elements of a device buffer into a new host vector (synchronises the stream).
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on copy failure.
    pub fn download<T: DeviceRepr>(&self, device: &CudaView<'_, T>) -> Result<Vec<T>> {
        if device.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.stream.clone_dtoh(device)?)
    }

    /// A zeroed device buffer of [`alloc_len`]`(len)` elements (at least one, so views of it are never null).
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on allocation failure.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(alloc_len(len))?)
    }
}

/// Elements allocated for a buffer of `len`: at least one. `cuMemAllocAsync(…, 0)` is an error on some drivers
/// and a null pointer on others; a one-element buffer is always a valid kernel argument.
pub fn alloc_len(len: usize) -> usize {
    len.max(1)
}

/// Grid size for one-block-per-row kernels with a grid-stride loop.
pub(crate) fn grid_for(rows: usize) -> u32 {
    rows.clamp(1, i32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use params::*;

    #[test]
    fn empty_buffers_allocate_one_element() {
        assert_eq!(alloc_len(0), 1);
        assert_eq!(alloc_len(1), 1);
        assert_eq!(alloc_len(50257), 50257);
    }

    #[test]
    fn block_sizes_come_from_the_header() {
        // The values the kernels' shared arrays and CUB templates were written for; a change here must be a
        // deliberate change of the header (the kernels trap on a launch with any other block size).
        assert_eq!(token_stats::THREADS, ESLM_TS_THREADS);
        assert_eq!(sparse_ce::THREADS, ESLM_CE_THREADS);
        assert_eq!(select::THREADS, ESLM_SEL_THREADS);
        assert_eq!(NO_ROW, u32::MAX);
    }

    #[test]
    fn kernel_sources_use_only_the_header_block_sizes() {
        // No block size typed as a literal in a kernel: every `#define *_THREADS` in kernels/*.cu is an alias of an
        // ESLM_* constant from eslm_kernels.h.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels");
        for (name, _) in PTXAS_REPORT {
            let src = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
            for line in src.lines().filter(|l| l.starts_with("#define")) {
                let mut words = line.split_whitespace().skip(1);
                let (Some(macro_name), Some(value)) = (words.next(), words.next()) else {
                    continue;
                };
                if macro_name.ends_with("_THREADS") || macro_name.ends_with("_ITEMS") {
                    assert!(
                        value.starts_with("ESLM_") || value.starts_with('('),
                        "{name}: `{line}` types a block size; define it in eslm_kernels.h"
                    );
                }
            }
        }
    }
}
