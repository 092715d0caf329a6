//! Helper for `scripts/check_hf_roundtrip.py` (checks that checkpoints move both ways between eslm and
//! HuggingFace transformers).
//!
//! - `hf_roundtrip export DIR`: builds a small GPT-2-initialised model (L=3, H=4, C=64, V=300, maxT=32, seed 7),
//!   writes it with `checkpoint::hf::save_pretrained(DIR)` and writes our logits for fixed inputs to
//!   `DIR/eslm_logits.safetensors` (`inputs` I32 [B, T], `logits` F32 [B, T, V]).
//! - `hf_roundtrip import DIR`: loads an HF checkpoint directory written by transformers
//!   (`checkpoint::hf::load_pretrained`), runs our forward on `DIR/inputs.safetensors` (`inputs` I32 [B, T]) and
//!   writes `DIR/eslm_logits.safetensors`.

use std::collections::HashMap;
use std::error::Error;
use std::path::Path;

use eslm_gpt2::checkpoint::hf;
use eslm_gpt2::{Gpt2, GptConfig};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

type Res<T> = Result<T, Box<dyn Error>>;

fn write_logits(model: &mut Gpt2, inputs: &[u32], b: usize, t: usize, dir: &Path) -> Res<()> {
    let view = model.forward(inputs, b, t)?;
    let v = view.vocab();
    let logits: Vec<u8> = (0..view.rows())
        .flat_map(|i| view.row(i)[..v].to_vec())
        .flat_map(f32::to_le_bytes)
        .collect();
    let ids: Vec<u8> = inputs
        .iter()
        .flat_map(|&x| (x as i32).to_le_bytes())
        .collect();
    let tensors = HashMap::from([
        (
            "inputs".to_string(),
            TensorView::new(Dtype::I32, vec![b, t], &ids)?,
        ),
        (
            "logits".to_string(),
            TensorView::new(Dtype::F32, vec![b, t, v], &logits)?,
        ),
    ]);
    safetensors::serialize_to_file(tensors, &None, &dir.join("eslm_logits.safetensors"))?;
    Ok(())
}

fn export(dir: &Path) -> Res<()> {
    let cfg = GptConfig::new(3, 4, 64, 300, 32)?;
    let (b, t) = (2, 16);
    let mut model = Gpt2::new(cfg, b, t, 7)?;
    hf::save_pretrained(model.params(), dir)?;
    let inputs: Vec<u32> = (0..b * t)
        .map(|i| ((i * 37 + 11) % cfg.vocab_size) as u32)
        .collect();
    write_logits(&mut model, &inputs, b, t, dir)
}

fn import(dir: &Path) -> Res<()> {
    let params = hf::load_pretrained(dir)?;
    let bytes = std::fs::read(dir.join("inputs.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let view = st.tensor("inputs")?;
    let (b, t) = match view.shape() {
        &[b, t] => (b, t),
        s => return Err(format!("inputs must be [B, T], got {s:?}").into()),
    };
    let inputs: Vec<u32> = view
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
        .collect();
    let mut model = Gpt2::from_params(params, b, t)?;
    write_logits(&mut model, &inputs, b, t, dir)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("export"), Some(dir)) => export(Path::new(dir)),
        (Some("import"), Some(dir)) => import(Path::new(dir)),
        _ => Err("usage: hf_roundtrip (export|import) DIR".into()),
    }
}
