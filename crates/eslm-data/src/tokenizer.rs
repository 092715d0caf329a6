//! The GPT-2 byte-level BPE tokenizer, through the `tokenizers` crate (pinned 0.23.2, pure Rust).
//!
//! Loads a Hugging Face `tokenizer.json`, or OpenAI's pair `vocab.json` (= `encoder.json`) + `merges.txt`
//! (= `vocab.bpe`), from which it builds the same pipeline: byte-level pre-tokenization with GPT-2's regex and
//! no prefix space, BPE over the byte alphabet, byte-level decoding. `<|endoftext|>` is a special token in both
//! cases: written literally in the text it becomes the EOT id (50256 for GPT-2).

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::{DataError, Result};

/// The end-of-text marker that separates documents.
pub const EOT_TEXT: &str = "<|endoftext|>";

/// A byte-level BPE tokenizer (GPT-2 by default).
///
/// ```no_run
/// use eslm_data::Tokenizer;
/// let tok = Tokenizer::from_path("../shared/data/gpt2/tokenizer.json")?;
/// assert_eq!(tok.encode("Hello world")?, vec![15496, 995]);
/// assert_eq!(tok.decode(&[15496, 995])?, "Hello world");
/// assert_eq!(tok.eot_id(), Some(50256));
/// # Ok::<(), eslm_data::DataError>(())
/// ```
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    eot: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("eot", &self.eot)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!(
        "{}: {e}. HINT: pass a GPT-2 tokenizer.json, or vocab.json with merges.txt next to it (see docs/data.md)",
        path.display()
    ))
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(tok_err(path, "file not found"));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        Ok(Tokenizer::wrap(inner, path.to_path_buf()))
    }

    /// Builds GPT-2's byte-level BPE from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
    ) -> Result<Tokenizer> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        for p in [vocab, merges] {
            if !p.is_file() {
                return Err(tok_err(p, "file not found"));
            }
        }
        let (vocab_s, merges_s) = (vocab.to_string_lossy(), merges.to_string_lossy());
        let bpe = BPE::from_file(&vocab_s, &merges_s)
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner
            .add_special_tokens([AddedToken::from(EOT_TEXT, true)])
            .map_err(|e| tok_err(vocab, e))?;
        Ok(Tokenizer::wrap(inner, vocab.to_path_buf()))
    }

    /// Loads from a path: a `tokenizer.json`; a `vocab.json` with `merges.txt` in the same directory; or a
    /// directory holding either.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            if json.is_file() {
                return Tokenizer::from_tokenizer_json(json);
            }
            return Tokenizer::from_vocab_merges(path.join("vocab.json"), path.join("merges.txt"));
        }
        if path
            .file_name()
            .is_some_and(|n| n == "vocab.json" || n == "encoder.json")
        {
            let dir = path.parent().unwrap_or(Path::new("."));
            let merges = [dir.join("merges.txt"), dir.join("vocab.bpe")]
                .into_iter()
                .find(|p| p.is_file())
                .unwrap_or_else(|| dir.join("merges.txt"));
            return Tokenizer::from_vocab_merges(path, merges);
        }
        Tokenizer::from_tokenizer_json(path)
    }

    fn wrap(inner: tokenizers::Tokenizer, source: PathBuf) -> Tokenizer {
        let eot = inner.token_to_id(EOT_TEXT);
        Tokenizer { inner, source, eot }
    }

    /// Encodes text to ids (no special tokens added; a literal `<|endoftext|>` becomes the EOT id).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The id of `<|endoftext|>`, if the vocabulary has it.
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }

    /// Vocabulary size, added tokens included (50257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The file it was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}
