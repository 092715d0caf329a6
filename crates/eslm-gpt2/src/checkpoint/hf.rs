//! HuggingFace `GPT2LMHeadModel` checkpoints: safetensors with HF names and layouts, plus `config.json`.
//!
//! Name and layout mapping (per layer `i`; HF's `Conv1D` stores its weight `[in, out]` and computes
//! `y = x·W + b`, we store `[out, in]` and compute `y = x·Wᵀ + b`, so every block matrix is transposed):
//!
//! | HF name (`transformer.` prefix optional) | HF shape | ours |
//! |---|---|---|
//! | `wte.weight` | `[V, C]` | `wte[0..V]` (rows `V..Vp` are zero) |
//! | `wpe.weight` | `[maxT, C]` | `wpe` |
//! | `h.i.ln_1.weight` / `.bias` | `[C]` | `ln1w[i]` / `ln1b[i]` |
//! | `h.i.attn.c_attn.weight` | `[C, 3C]` | `qkvw[i]ᵀ` |
//! | `h.i.attn.c_attn.bias` | `[3C]` | `qkvb[i]` |
//! | `h.i.attn.c_proj.weight` / `.bias` | `[C, C]` / `[C]` | `attprojw[i]ᵀ` / `attprojb[i]` |
//! | `h.i.ln_2.weight` / `.bias` | `[C]` | `ln2w[i]` / `ln2b[i]` |
//! | `h.i.mlp.c_fc.weight` / `.bias` | `[C, 4C]` / `[4C]` | `fcw[i]ᵀ` / `fcb[i]` |
//! | `h.i.mlp.c_proj.weight` / `.bias` | `[4C, C]` / `[C]` | `fcprojw[i]ᵀ` / `fcprojb[i]` |
//! | `ln_f.weight` / `.bias` | `[C]` | `lnfw` / `lnfb` |
//! | `lm_head.weight` (optional) | `[V, C]` | must equal `wte[0..V]` (tied) |
//!
//! The causal-mask buffers of old HF files (`h.i.attn.bias`, `h.i.attn.masked_bias`) are ignored. Writing omits
//! `lm_head.weight`, as `save_pretrained` does for tied models. Loading accepts f32, bf16 and f16 tensors (converted
//! to f32). The number of heads is not visible in the weights: it comes from `config.json` (or the caller).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorInfo, View};
use serde_json::Value;

use super::{io_err, transpose, CheckpointError, Result};
use crate::config::{pad_vocab, GptConfig};
use crate::params::{layer_mut, ParamKind, ParamSet};

/// File name of the weights inside a checkpoint directory (what `save_pretrained` writes).
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the HF config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// Vocabulary padding multiple used when a config does not carry a padded size (50257 → 50304).
pub const DEFAULT_VOCAB_PAD: usize = 128;
/// Extra `config.json` key recording our padded vocabulary (transformers ignores it).
pub const PADDED_VOCAB_KEY: &str = "eslm_padded_vocab_size";
/// The layer-norm epsilon the engine uses (HF's GPT-2 default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// Where one HF tensor lives in our layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    kind: ParamKind,
    /// Layer index for per-layer tensors.
    layer: usize,
}

/// What an HF tensor name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Param(Slot),
    LmHead,
    /// A non-parameter buffer of old HF files (causal mask), ignored.
    Buffer,
    Unknown,
}

fn parse_name(name: &str) -> Name {
    if name == "lm_head.weight" {
        return Name::LmHead;
    }
    let n = name.strip_prefix("transformer.").unwrap_or(name);
    let global = |kind| Name::Param(Slot { kind, layer: 0 });
    match n {
        "wte.weight" => return global(ParamKind::Wte),
        "wpe.weight" => return global(ParamKind::Wpe),
        "ln_f.weight" => return global(ParamKind::LnfW),
        "ln_f.bias" => return global(ParamKind::LnfB),
        _ => {}
    }
    let Some(rest) = n.strip_prefix("h.") else {
        return Name::Unknown;
    };
    let Some((idx, field)) = rest.split_once('.') else {
        return Name::Unknown;
    };
    let Ok(layer) = idx.parse::<usize>() else {
        return Name::Unknown;
    };
    if layer.to_string() != idx {
        return Name::Unknown; // "01", "+1": not a name HF writes
    }
    let kind = match field {
        "ln_1.weight" => ParamKind::Ln1W,
        "ln_1.bias" => ParamKind::Ln1B,
        "attn.c_attn.weight" => ParamKind::QkvW,
        "attn.c_attn.bias" => ParamKind::QkvB,
        "attn.c_proj.weight" => ParamKind::AttProjW,
        "attn.c_proj.bias" => ParamKind::AttProjB,
        "ln_2.weight" => ParamKind::Ln2W,
        "ln_2.bias" => ParamKind::Ln2B,
        "mlp.c_fc.weight" => ParamKind::FcW,
        "mlp.c_fc.bias" => ParamKind::FcB,
        "mlp.c_proj.weight" => ParamKind::FcProjW,
        "mlp.c_proj.bias" => ParamKind::FcProjB,
        "attn.bias" | "attn.masked_bias" => return Name::Buffer,
        _ => return Name::Unknown,
    };
    Name::Param(Slot { kind, layer })
}

/// The HF name (with the `transformer.` prefix) of tensor `kind`, layer `layer` (ignored for global tensors).
pub fn hf_name(kind: ParamKind, layer: usize) -> String {
    let field = match kind {
        ParamKind::Wte => return "transformer.wte.weight".into(),
        ParamKind::Wpe => return "transformer.wpe.weight".into(),
        ParamKind::LnfW => return "transformer.ln_f.weight".into(),
        ParamKind::LnfB => return "transformer.ln_f.bias".into(),
        ParamKind::Ln1W => "ln_1.weight",
        ParamKind::Ln1B => "ln_1.bias",
        ParamKind::QkvW => "attn.c_attn.weight",
        ParamKind::QkvB => "attn.c_attn.bias",
        ParamKind::AttProjW => "attn.c_proj.weight",
        ParamKind::AttProjB => "attn.c_proj.bias",
        ParamKind::Ln2W => "ln_2.weight",
        ParamKind::Ln2B => "ln_2.bias",
        ParamKind::FcW => "mlp.c_fc.weight",
        ParamKind::FcB => "mlp.c_fc.bias",
        ParamKind::FcProjW => "mlp.c_proj.weight",
        ParamKind::FcProjB => "mlp.c_proj.bias",
    };
    format!("transformer.h.{layer}.{field}")
}

/// The HF shape of (one layer of) tensor `kind`; `wte` has the unpadded `V` rows.
pub fn hf_shape(kind: ParamKind, cfg: &GptConfig) -> Vec<usize> {
    let c = cfg.n_embd;
    match kind {
        ParamKind::Wte => vec![cfg.vocab_size, c],
        ParamKind::Wpe => vec![cfg.max_seq_len, c],
        ParamKind::QkvW => vec![c, 3 * c],
        ParamKind::QkvB => vec![3 * c],
        ParamKind::AttProjW => vec![c, c],
        ParamKind::FcW => vec![c, 4 * c],
        ParamKind::FcB => vec![4 * c],
        ParamKind::FcProjW => vec![4 * c, c],
        ParamKind::Ln1W
        | ParamKind::Ln1B
        | ParamKind::AttProjB
        | ParamKind::Ln2W
        | ParamKind::Ln2B
        | ParamKind::FcProjB
        | ParamKind::LnfW
        | ParamKind::LnfB => vec![c],
    }
}

/// Whether the HF tensor is the transpose of ours (the `Conv1D` weights).
fn is_transposed(kind: ParamKind) -> bool {
    matches!(
        kind,
        ParamKind::QkvW | ParamKind::AttProjW | ParamKind::FcW | ParamKind::FcProjW
    )
}

/// Every HF tensor of a model with config `cfg`, in storage order: `(name, kind, layer)`.
fn all_slots(cfg: &GptConfig) -> Vec<(String, Slot)> {
    let mut out = Vec::new();
    for kind in ParamKind::ALL {
        let layers = if kind.per_layer() { cfg.n_layer } else { 1 };
        for layer in 0..layers {
            out.push((hf_name(kind, layer), Slot { kind, layer }));
        }
    }
    out
}

/// The slice of `params` that holds `slot` (one layer for per-layer tensors; the first `V` rows of `wte`).
fn slot_mut(params: &mut ParamSet, slot: Slot) -> &mut [f32] {
    let cfg = *params.config();
    let t = params.get_mut(slot.kind);
    if slot.kind == ParamKind::Wte {
        &mut t[..cfg.vocab_size * cfg.n_embd]
    } else if slot.kind.per_layer() {
        layer_mut(t, cfg.n_layer, slot.layer)
    } else {
        t
    }
}

/// Decodes a little-endian f32/bf16/f16 tensor into f32.
fn decode(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    match dtype {
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Dtype::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect()),
        Dtype::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect()),
        other => Err(CheckpointError::UnsupportedDtype {
            name: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// A parsed safetensors header over its byte buffer.
struct Parsed<'a> {
    data: &'a [u8],
    tensors: Vec<(String, TensorInfo)>,
}

fn parse_safetensors(bytes: &[u8]) -> Result<Parsed<'_>> {
    let (n, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| CheckpointError::SafeTensors(e.to_string()))?;
    let mut tensors: Vec<(String, TensorInfo)> = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // read_metadata checked that the offsets tile the data exactly and that the file length matches.
    Ok(Parsed {
        data: &bytes[8 + n..],
        tensors,
    })
}

impl Parsed<'_> {
    fn bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let (s, e) = info.data_offsets;
        self.data.get(s..e).ok_or_else(|| {
            CheckpointError::SafeTensors(format!("data offsets {s}..{e} out of range"))
        })
    }
}

/// Strips `prefix` (when given) and returns the names to consider, with their infos.
fn select<'p>(parsed: &'p Parsed<'_>, prefix: Option<&str>) -> Vec<(&'p str, &'p TensorInfo)> {
    parsed
        .tensors
        .iter()
        .filter_map(|(name, info)| match prefix {
            None => Some((name.as_str(), info)),
            Some(p) => name.strip_prefix(p).map(|n| (n, info)),
        })
        .collect()
}

/// Reads HF-named GPT-2 tensors from safetensors `bytes` into a new [`ParamSet`] for `cfg`.
///
/// With `prefix = None` every tensor in the file must be a GPT-2 parameter (or an ignored mask buffer, or a tied
/// `lm_head.weight`); with `Some(p)` only the tensors whose names start with `p` are read (with `p` stripped) and
/// the others are ignored, which lets one file hold several parameter-shaped sets (e.g. weights and gradients).
/// All names, shapes and dtypes are validated before anything is allocated.
pub fn params_from_safetensors(
    bytes: &[u8],
    cfg: &GptConfig,
    prefix: Option<&str>,
) -> Result<ParamSet> {
    cfg.validate()?;
    let parsed = parse_safetensors(bytes)?;
    let mut found: HashMap<(usize, usize), (&str, &TensorInfo)> = HashMap::new();
    let mut lm_head: Option<(&str, &TensorInfo)> = None;
    for (name, info) in select(&parsed, prefix) {
        let check = |expected: Vec<usize>| -> Result<()> {
            if info.shape != expected {
                return Err(CheckpointError::ShapeMismatch {
                    name: name.to_string(),
                    expected,
                    got: info.shape.clone(),
                });
            }
            if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(CheckpointError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{:?}", info.dtype),
                });
            }
            Ok(())
        };
        match parse_name(name) {
            Name::Buffer => {}
            Name::Unknown => {
                return Err(CheckpointError::UnexpectedTensor {
                    name: name.to_string(),
                })
            }
            Name::LmHead => {
                check(hf_shape(ParamKind::Wte, cfg))?;
                lm_head = Some((name, info));
            }
            Name::Param(slot) => {
                if slot.kind.per_layer() && slot.layer >= cfg.n_layer {
                    return Err(CheckpointError::Config(format!(
                        "tensor `{name}` names layer {} but the config has {} layers",
                        slot.layer, cfg.n_layer
                    )));
                }
                check(hf_shape(slot.kind, cfg))?;
                if found
                    .insert((slot.kind.index(), slot.layer), (name, info))
                    .is_some()
                {
                    return Err(CheckpointError::Config(format!(
                        "tensor `{name}` appears twice (with and without the `transformer.` prefix)"
                    )));
                }
            }
        }
    }
    let slots = all_slots(cfg);
    for (hf, slot) in &slots {
        if !found.contains_key(&(slot.kind.index(), slot.layer)) {
            let name = match prefix {
                Some(p) => format!("{p}{hf}"),
                None => hf.clone(),
            };
            return Err(CheckpointError::MissingTensor { name });
        }
    }

    let mut params = ParamSet::zeros(cfg);
    for (_, slot) in &slots {
        let Some(&(name, info)) = found.get(&(slot.kind.index(), slot.layer)) else {
            continue; // checked above
        };
        let values = decode(name, info.dtype, parsed.bytes(info)?)?;
        let shape = hf_shape(slot.kind, cfg);
        let dst = slot_mut(&mut params, *slot);
        if is_transposed(slot.kind) {
            transpose(&values, shape[0], shape[1], dst);
        } else {
            dst.copy_from_slice(&values);
        }
    }
    if let Some((name, info)) = lm_head {
        let values = decode(name, info.dtype, parsed.bytes(info)?)?;
        let wte = &params.get(ParamKind::Wte)[..cfg.vocab_size * cfg.n_embd];
        if values
            .iter()
            .zip(wte)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(CheckpointError::UntiedLmHead);
        }
    }
    Ok(params)
}

/// Infers a config from the tensor shapes of an HF GPT-2 safetensors file (L, C, V, maxT); the number of heads
/// is not stored in the weights and must be given. `Vp` is `V` rounded up to `vocab_pad_multiple`.
pub fn infer_config(bytes: &[u8], n_head: usize, vocab_pad_multiple: usize) -> Result<GptConfig> {
    let parsed = parse_safetensors(bytes)?;
    let mut wte = None;
    let mut wpe = None;
    let mut n_layer = 0;
    for (name, info) in &parsed.tensors {
        if let Name::Param(slot) = parse_name(name) {
            match slot.kind {
                ParamKind::Wte => wte = Some(info.shape.clone()),
                ParamKind::Wpe => wpe = Some(info.shape.clone()),
                k if k.per_layer() => n_layer = n_layer.max(slot.layer + 1),
                _ => {}
            }
        }
    }
    let wte = wte.ok_or_else(|| CheckpointError::MissingTensor {
        name: "transformer.wte.weight".into(),
    })?;
    let wpe = wpe.ok_or_else(|| CheckpointError::MissingTensor {
        name: "transformer.wpe.weight".into(),
    })?;
    let (&[v, c], &[t, c2]) = (wte.as_slice(), wpe.as_slice()) else {
        return Err(CheckpointError::Config(format!(
            "wte {wte:?} and wpe {wpe:?} must be 2-D"
        )));
    };
    if c != c2 {
        return Err(CheckpointError::Config(format!(
            "wte width {c} differs from wpe width {c2}"
        )));
    }
    let cfg = GptConfig {
        n_layer,
        n_head,
        n_embd: c,
        vocab_size: v,
        padded_vocab_size: pad_vocab(v, vocab_pad_multiple),
        max_seq_len: t,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Little-endian f32 tensor bytes for the safetensors writer: borrowed from the parameters where their layout is
/// HF's (little-endian machines), owned where it is transposed.
struct F32Tensor<'a> {
    shape: Vec<usize>,
    bytes: std::borrow::Cow<'a, [u8]>,
}

impl View for F32Tensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes.as_ref())
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn hf_tensors(params: &ParamSet) -> Vec<(String, F32Tensor<'_>)> {
    use std::borrow::Cow;
    let cfg = *params.config();
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    let owned =
        |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|x| x.to_le_bytes()).collect() };
    for (name, slot) in all_slots(&cfg) {
        let shape = hf_shape(slot.kind, &cfg);
        let n: usize = shape.iter().product();
        let t = params.get(slot.kind);
        let src = if slot.kind.per_layer() {
            &t[slot.layer * n..(slot.layer + 1) * n]
        } else {
            &t[..n]
        };
        let bytes = if is_transposed(slot.kind) {
            scratch.resize(n, 0.0);
            // ours is [out, in] = [shape[1], shape[0]]
            transpose(src, shape[1], shape[0], &mut scratch);
            Cow::Owned(if cfg!(target_endian = "little") {
                bytemuck::cast_slice(&scratch).to_vec()
            } else {
                owned(&scratch)
            })
        } else if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(src))
        } else {
            Cow::Owned(owned(src))
        };
        out.push((name, F32Tensor { shape, bytes }));
    }
    out
}

fn st_metadata() -> Option<HashMap<String, String>> {
    Some(HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// Serializes `params` as an HF safetensors file in memory (f32, HF names, no `lm_head.weight`).
pub fn to_safetensors_bytes(params: &ParamSet) -> Result<Vec<u8>> {
    safetensors::serialize(hf_tensors(params), &st_metadata())
        .map_err(|e| CheckpointError::SafeTensors(e.to_string()))
}

/// Writes `params` as an HF safetensors file at `path` (f32, HF names, no `lm_head.weight`).
pub fn save_safetensors(params: &ParamSet, path: &Path) -> Result<()> {
    safetensors::serialize_to_file(hf_tensors(params), &st_metadata(), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => CheckpointError::SafeTensors(other.to_string()),
    })
}

/// Reads an HF safetensors file at `path` for the given config (see [`params_from_safetensors`]).
pub fn load_safetensors(path: &Path, cfg: &GptConfig) -> Result<ParamSet> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    params_from_safetensors(&bytes, cfg, None)
}

/// The HF `config.json` text for `cfg` (GPT2LMHeadModel, tanh GELU, no dropout, tied embeddings, f32), plus our
/// padded vocabulary under [`PADDED_VOCAB_KEY`].
pub fn config_to_json(cfg: &GptConfig) -> String {
    let v = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "tie_word_embeddings": true,
        "bos_token_id": cfg.vocab_size - 1,
        "eos_token_id": cfg.vocab_size - 1,
        "torch_dtype": "float32",
        PADDED_VOCAB_KEY: cfg.padded_vocab_size,
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Parses an HF GPT-2 `config.json`, rejecting settings the engine does not implement (another activation,
/// layer-norm epsilon, MLP width, attention scaling, cross-attention).
pub fn config_from_json(text: &str) -> Result<GptConfig> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| CheckpointError::Config(format!("config.json: {e}")))?;
    let bad = |m: String| CheckpointError::Config(m);
    let uint = |key: &str| -> Result<Option<usize>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|u| usize::try_from(u).ok())
                .filter(|&u| u > 0 && u <= 1 << 31)
                .map(Some)
                .ok_or_else(|| bad(format!("`{key}` must be a positive integer, got {x}"))),
        }
    };
    let need = |key: &str| uint(key)?.ok_or_else(|| bad(format!("config.json lacks `{key}`")));
    if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
        if mt != "gpt2" {
            return Err(bad(format!("model_type `{mt}` is not gpt2")));
        }
    }
    let n_layer = need("n_layer")?;
    let n_head = need("n_head")?;
    let n_embd = need("n_embd")?;
    let vocab_size = need("vocab_size")?;
    let max_seq_len = match uint("n_positions")? {
        Some(t) => t,
        None => need("n_ctx")?,
    };
    if let Some(act) = v.get("activation_function").and_then(Value::as_str) {
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(bad(format!(
                "activation `{act}` is not supported (the engine uses the tanh GELU, gelu_new)"
            )));
        }
    }
    if let Some(eps) = v.get("layer_norm_epsilon").and_then(Value::as_f64) {
        if (eps - LAYER_NORM_EPS).abs() > 1e-12 {
            return Err(bad(format!(
                "layer_norm_epsilon {eps} is not supported (the engine uses 1e-5)"
            )));
        }
    }
    if let Some(inner) = uint("n_inner")? {
        if inner != 4 * n_embd {
            return Err(bad(format!(
                "n_inner {inner} is not 4·n_embd = {}",
                4 * n_embd
            )));
        }
    }
    let flag = |key: &str| v.get(key).and_then(Value::as_bool);
    if flag("scale_attn_weights") == Some(false)
        || flag("scale_attn_by_inverse_layer_idx") == Some(true)
    {
        return Err(bad(
            "only the standard 1/√d attention scaling is supported".into()
        ));
    }
    if flag("add_cross_attention") == Some(true) {
        return Err(bad("cross-attention is not supported".into()));
    }
    if flag("tie_word_embeddings") == Some(false) {
        return Err(bad("untied word embeddings are not supported".into()));
    }
    let padded_vocab_size = match uint(PADDED_VOCAB_KEY)? {
        Some(p) if p >= vocab_size && p - vocab_size <= 1 << 16 => p,
        Some(p) => {
            return Err(bad(format!(
                "{PADDED_VOCAB_KEY} {p} is not in [{vocab_size}, {vocab_size} + 65536]"
            )))
        }
        None => pad_vocab(vocab_size, DEFAULT_VOCAB_PAD),
    };
    let cfg = GptConfig {
        n_layer,
        n_head,
        n_embd,
        vocab_size,
        padded_vocab_size,
        max_seq_len,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Writes `dir/config.json` and `dir/model.safetensors` (creating `dir`), loadable with
/// `transformers.GPT2LMHeadModel.from_pretrained(dir)`.
pub fn save_pretrained(params: &ParamSet, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cfg_path = dir.join(CONFIG_FILE);
    std::fs::write(&cfg_path, config_to_json(params.config())).map_err(io_err(&cfg_path))?;
    save_safetensors(params, &dir.join(MODEL_FILE))
}

/// Reads a checkpoint directory (`config.json` + `model.safetensors`), as written by [`save_pretrained`] or by
/// transformers' `save_pretrained(dir, safe_serialization=True)`.
pub fn load_pretrained(dir: &Path) -> Result<ParamSet> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let cfg = config_from_json(&text)?;
    load_safetensors(&dir.join(MODEL_FILE), &cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let cfg = GptConfig::tiny();
        for (name, slot) in all_slots(&cfg) {
            assert_eq!(parse_name(&name), Name::Param(slot), "{name}");
            let short = name.strip_prefix("transformer.").unwrap_or(&name);
            assert_eq!(parse_name(short), Name::Param(slot), "{short}");
        }
        assert_eq!(parse_name("transformer.h.0.attn.bias"), Name::Buffer);
        assert_eq!(parse_name("h.1.attn.masked_bias"), Name::Buffer);
        assert_eq!(parse_name("lm_head.weight"), Name::LmHead);
        assert_eq!(parse_name("transformer.h.01.ln_1.weight"), Name::Unknown);
        assert_eq!(parse_name("transformer.h.x.ln_1.weight"), Name::Unknown);
        assert_eq!(parse_name("transformer.h.0"), Name::Unknown);
        assert_eq!(parse_name("encoder.weight"), Name::Unknown);
    }

    #[test]
    fn config_json_round_trip() {
        for cfg in [
            GptConfig::tiny(),
            GptConfig::gpt2_124m(),
            GptConfig::config_t(),
        ] {
            assert_eq!(config_from_json(&config_to_json(&cfg)).ok(), Some(cfg));
        }
    }

    #[test]
    fn config_json_rejects_unsupported() {
        let base = config_to_json(&GptConfig::tiny());
        for (from, to) in [
            ("\"gelu_new\"", "\"relu\""),
            ("\"n_head\": 2", "\"n_head\": 3"),
            ("\"n_head\": 2", "\"n_head\": -2"),
            ("\"n_inner\": null", "\"n_inner\": 17"),
            (
                "\"layer_norm_epsilon\": 0.00001",
                "\"layer_norm_epsilon\": 1e-6",
            ),
            ("\"model_type\": \"gpt2\"", "\"model_type\": \"llama\""),
            (
                "\"eslm_padded_vocab_size\": 128",
                "\"eslm_padded_vocab_size\": 64",
            ),
        ] {
            assert!(base.contains(from), "{from} not in {base}");
            let text = base.replace(from, to);
            assert!(
                matches!(
                    config_from_json(&text),
                    Err(CheckpointError::Config(_) | CheckpointError::Model(_))
                ),
                "{to}"
            );
        }
        assert!(config_from_json("{").is_err());
        assert!(config_from_json("{}").is_err());
    }
}
