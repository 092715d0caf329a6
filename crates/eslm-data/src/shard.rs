//! Token shards in llm.c's binary format, read through a memory map without copying and written atomically.
//!
//! Layout (all little-endian): a header of 256 `i32` (1024 bytes) followed by the tokens.
//! `header[0]` = magic, `header[1]` = version, `header[2]` = token count `n`, the rest zero.
//! - u16 tokens (GPT-2, vocabularies up to 65,536): magic 20240520, version 1, file size = 1024 + 2·n.
//! - u32 tokens (larger vocabularies):              magic 20240801, version 7, file size = 1024 + 4·n.
//!
//! Reading validates magic, version and size before any token is touched, so a foreign, empty or truncated file
//! is a [`DataError::BadShard`] naming the file, never a panic. Writing goes to a temporary name in the same
//! directory, is flushed and fsynced, then renamed: an interrupted run never leaves a half-written shard under
//! the final name.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{DataError, Result};

#[cfg(target_endian = "big")]
compile_error!("eslm-data reads little-endian shards through zero-copy casts and supports little-endian hosts only");

/// Number of `i32` in a shard header.
pub const HEADER_INTS: usize = 256;
/// Size of a shard header in bytes (256 × 4).
pub const HEADER_BYTES: usize = HEADER_INTS * 4;
/// Magic number of u16 shards (llm.c, GPT-2).
pub const MAGIC_U16: i32 = 20240520;
/// Version of u16 shards.
pub const VERSION_U16: i32 = 1;
/// Magic number of u32 shards (llm.c, Llama 3).
pub const MAGIC_U32: i32 = 20240801;
/// Version of u32 shards.
pub const VERSION_U32: i32 = 7;

/// Width of one stored token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TokenWidth {
    /// 2 bytes per token; ids < 65,536.
    U16,
    /// 4 bytes per token.
    U32,
}

impl TokenWidth {
    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// The narrowest width that holds every id of a vocabulary of `vocab_size` tokens.
    pub fn for_vocab(vocab_size: u64) -> TokenWidth {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    /// The header's (magic, version) for this width.
    pub fn magic_version(self) -> (i32, i32) {
        match self {
            TokenWidth::U16 => (MAGIC_U16, VERSION_U16),
            TokenWidth::U32 => (MAGIC_U32, VERSION_U32),
        }
    }

    /// Largest id this width can store.
    pub fn max_token(self) -> u32 {
        match self {
            TokenWidth::U16 => u16::MAX as u32,
            TokenWidth::U32 => u32::MAX,
        }
    }
}

/// The parsed header of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    /// Width of the stored tokens (from the magic number).
    pub width: TokenWidth,
    /// Number of tokens the header announces.
    pub num_tokens: u64,
}

impl ShardHeader {
    /// The file size in bytes a shard with this header must have.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.num_tokens * self.width.bytes() as u64
    }

    /// Serialises the header to its 1024 bytes. Fails if the count exceeds `i32::MAX` (the format's limit).
    pub fn to_bytes(&self) -> std::result::Result<[u8; HEADER_BYTES], HeaderError> {
        let count = i32::try_from(self.num_tokens)
            .map_err(|_| HeaderError::CountTooLarge(self.num_tokens))?;
        let (magic, version) = self.width.magic_version();
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&magic.to_le_bytes());
        out[4..8].copy_from_slice(&version.to_le_bytes());
        out[8..12].copy_from_slice(&count.to_le_bytes());
        Ok(out)
    }
}

/// What is wrong with a header (without the file name; [`ShardReader::open`] adds it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 1024 bytes.
    #[error("file is {0} bytes, shorter than the 1024-byte header")]
    TooShort(usize),
    /// The magic number is neither 20240520 nor 20240801.
    #[error("wrong magic {0} (expected {MAGIC_U16} for u16 tokens or {MAGIC_U32} for u32 tokens)")]
    WrongMagic(i32),
    /// The version does not match the magic.
    #[error("magic {magic} expects version {expected}, found version {found}")]
    WrongVersion {
        /// The magic number found.
        magic: i32,
        /// The version that magic requires.
        expected: i32,
        /// The version found.
        found: i32,
    },
    /// The token count is negative.
    #[error("negative token count {0}")]
    NegativeCount(i32),
    /// The token count does not fit the format's `i32` (writing only).
    #[error("token count {0} exceeds the format's limit of 2^31 - 1 tokens per shard")]
    CountTooLarge(u64),
}

fn read_i32(bytes: &[u8], index: usize) -> i32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[index * 4..index * 4 + 4]);
    i32::from_le_bytes(word)
}

/// Parses the first 1024 bytes of `bytes` as a shard header. Never panics, whatever the input.
///
/// ```
/// use eslm_data::shard::{parse_header, ShardHeader, TokenWidth};
/// let header = ShardHeader { width: TokenWidth::U16, num_tokens: 3 };
/// let bytes = header.to_bytes().unwrap();
/// assert_eq!(parse_header(&bytes), Ok(header));
/// assert!(parse_header(&bytes[..100]).is_err());
/// ```
pub fn parse_header(bytes: &[u8]) -> std::result::Result<ShardHeader, HeaderError> {
    if bytes.len() < HEADER_BYTES {
        return Err(HeaderError::TooShort(bytes.len()));
    }
    let magic = read_i32(bytes, 0);
    let version = read_i32(bytes, 1);
    let count = read_i32(bytes, 2);
    let width = match magic {
        MAGIC_U16 => TokenWidth::U16,
        MAGIC_U32 => TokenWidth::U32,
        other => return Err(HeaderError::WrongMagic(other)),
    };
    let (_, expected) = width.magic_version();
    if version != expected {
        return Err(HeaderError::WrongVersion {
            magic,
            expected,
            found: version,
        });
    }
    if count < 0 {
        return Err(HeaderError::NegativeCount(count));
    }
    Ok(ShardHeader {
        width,
        num_tokens: count as u64,
    })
}

/// Checks a parsed header against the actual file size.
pub fn check_size(header: &ShardHeader, file_bytes: u64) -> std::result::Result<(), String> {
    let expected = header.file_bytes();
    if file_bytes < expected {
        Err(format!(
            "truncated: header announces {} tokens ({} bytes in all) but the file has {} bytes",
            header.num_tokens, expected, file_bytes
        ))
    } else if file_bytes > expected {
        Err(format!(
            "size does not match the token count: header announces {} tokens ({} bytes in all) but the file has {} bytes",
            header.num_tokens, expected, file_bytes
        ))
    } else {
        Ok(())
    }
}

/// A borrowed view of a shard's tokens at their stored width.
#[derive(Debug, Clone, Copy)]
pub enum Tokens<'a> {
    /// u16 tokens.
    U16(&'a [u16]),
    /// u32 tokens.
    U32(&'a [u32]),
}

impl Tokens<'_> {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        match self {
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i` widened to u32, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u32> {
        match self {
            Tokens::U16(t) => t.get(i).map(|&x| x as u32),
            Tokens::U32(t) => t.get(i).copied(),
        }
    }

    /// Copies `out.len()` tokens starting at `start` into `out`, widening to u32.
    /// Returns `false` (and leaves `out` untouched) if the range runs past the end.
    pub fn copy_to_u32(&self, start: usize, out: &mut [u32]) -> bool {
        let Some(end) = start.checked_add(out.len()) else {
            return false;
        };
        match self {
            Tokens::U16(t) => match t.get(start..end) {
                Some(src) => {
                    for (o, &s) in out.iter_mut().zip(src) {
                        *o = s as u32;
                    }
                    true
                }
                None => false,
            },
            Tokens::U32(t) => match t.get(start..end) {
                Some(src) => {
                    out.copy_from_slice(src);
                    true
                }
                None => false,
            },
        }
    }

    /// All tokens widened into a new `Vec<u32>`.
    pub fn to_vec_u32(&self) -> Vec<u32> {
        match self {
            Tokens::U16(t) => t.iter().map(|&x| x as u32).collect(),
            Tokens::U32(t) => t.to_vec(),
        }
    }
}

#[derive(Debug)]
enum Backing {
    Mapped(Mmap),
    Memory(Vec<u32>),
}

/// A shard opened for reading: a memory map of a shard file (zero copy), or tokens held in memory
/// (see [`ShardReader::from_tokens`], used for generated data).
///
/// ```no_run
/// use eslm_data::shard::ShardReader;
/// let shard = ShardReader::open("data/train_000000.bin")?;
/// println!("{} tokens, first {:?}", shard.len(), shard.get(0));
/// # Ok::<(), eslm_data::DataError>(())
/// ```
#[derive(Debug)]
pub struct ShardReader {
    path: PathBuf,
    header: ShardHeader,
    backing: Backing,
}

impl ShardReader {
    /// Opens and validates a shard file (magic, version, size = header + count × width) and maps it.
    ///
    /// The file must not be modified while the reader is alive (the map would change under it).
    pub fn open(path: impl AsRef<Path>) -> Result<ShardReader> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let file_bytes = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        if file_bytes < HEADER_BYTES as u64 {
            return Err(DataError::bad_shard(
                &path,
                HeaderError::TooShort(file_bytes as usize).to_string(),
            ));
        }
        // SAFETY: the map is read-only; callers are told not to modify shard files while they are read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(&path, e))?;
        let header = parse_header(&map).map_err(|e| DataError::bad_shard(&path, e.to_string()))?;
        check_size(&header, map.len() as u64).map_err(|e| DataError::bad_shard(&path, e))?;
        let body = &map[HEADER_BYTES..];
        let aligned = match header.width {
            TokenWidth::U16 => bytemuck::try_cast_slice::<u8, u16>(body).is_ok(),
            TokenWidth::U32 => bytemuck::try_cast_slice::<u8, u32>(body).is_ok(),
        };
        if !aligned {
            return Err(DataError::bad_shard(
                &path,
                "memory map is not aligned for the token width",
            ));
        }
        Ok(ShardReader {
            path,
            header,
            backing: Backing::Mapped(map),
        })
    }

    /// Wraps tokens held in memory as a shard (u32 width); `name` is used in error messages.
    pub fn from_tokens(name: impl Into<PathBuf>, tokens: Vec<u32>) -> ShardReader {
        ShardReader {
            path: name.into(),
            header: ShardHeader {
                width: TokenWidth::U32,
                num_tokens: tokens.len() as u64,
            },
            backing: Backing::Memory(tokens),
        }
    }

    /// The file this shard was read from (or the name given to [`ShardReader::from_tokens`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> ShardHeader {
        self.header
    }

    /// Stored token width.
    pub fn width(&self) -> TokenWidth {
        self.header.width
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.header.num_tokens as usize
    }

    /// True when the shard holds no token.
    pub fn is_empty(&self) -> bool {
        self.header.num_tokens == 0
    }

    /// The tokens at their stored width, borrowed from the map.
    pub fn tokens(&self) -> Tokens<'_> {
        match &self.backing {
            Backing::Memory(v) => Tokens::U32(v),
            Backing::Mapped(map) => {
                let body = &map[HEADER_BYTES..];
                // Alignment and length were checked in `open`; the fallbacks are unreachable.
                match self.header.width {
                    TokenWidth::U16 => Tokens::U16(bytemuck::try_cast_slice(body).unwrap_or(&[])),
                    TokenWidth::U32 => Tokens::U32(bytemuck::try_cast_slice(body).unwrap_or(&[])),
                }
            }
        }
    }

    /// The tokens as `&[u16]` if the shard stores u16.
    pub fn tokens_u16(&self) -> Option<&[u16]> {
        match self.tokens() {
            Tokens::U16(t) => Some(t),
            Tokens::U32(_) => None,
        }
    }

    /// The tokens as `&[u32]` if the shard stores u32.
    pub fn tokens_u32(&self) -> Option<&[u32]> {
        match self.tokens() {
            Tokens::U32(t) => Some(t),
            Tokens::U16(_) => None,
        }
    }

    /// Token `i` widened to u32, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u32> {
        self.tokens().get(i)
    }

    /// Checks that every token id is `< vocab_size`; reports the first one that is not.
    pub fn check_vocab(&self, vocab_size: u64) -> Result<()> {
        let bad = match self.tokens() {
            Tokens::U16(t) => t.iter().position(|&x| x as u64 >= vocab_size),
            Tokens::U32(t) => t.iter().position(|&x| x as u64 >= vocab_size),
        };
        match bad {
            None => Ok(()),
            Some(position) => Err(DataError::TokenOutOfRange {
                path: self.path.clone(),
                position: position as u64,
                token: self.get(position).unwrap_or(0),
                vocab: vocab_size,
            }),
        }
    }
}

/// Writes a shard incrementally: tokens are appended in chunks, [`ShardWriter::finish`] patches the header,
/// fsyncs and renames the temporary file to its final name. Dropping an unfinished writer deletes the
/// temporary file, so nothing under the final name ever looks valid unless it is complete.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    file: Option<BufWriter<File>>,
    width: TokenWidth,
    count: u64,
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

impl ShardWriter {
    /// Starts a shard that will be renamed to `path` on [`ShardWriter::finish`].
    pub fn create(path: impl AsRef<Path>, width: TokenWidth) -> Result<ShardWriter> {
        let path = path.as_ref().to_path_buf();
        let tmp_path = tmp_name(&path);
        let file = File::create(&tmp_path).map_err(|e| DataError::io(&tmp_path, e))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&[0u8; HEADER_BYTES])
            .map_err(|e| DataError::io(&tmp_path, e))?;
        Ok(ShardWriter {
            path,
            tmp_path,
            file: Some(file),
            width,
            count: 0,
        })
    }

    /// Number of tokens written so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when no token has been written yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends tokens. Fails on an id that does not fit the width or when the shard would exceed 2^31 − 1 tokens.
    pub fn write(&mut self, tokens: &[u32]) -> Result<()> {
        let max = self.width.max_token();
        if let Some(position) = tokens.iter().position(|&t| t > max) {
            return Err(DataError::TokenOutOfRange {
                path: self.path.clone(),
                position: self.count + position as u64,
                token: tokens[position],
                vocab: max as u64 + 1,
            });
        }
        if self.count + tokens.len() as u64 > i32::MAX as u64 {
            return Err(DataError::bad_shard(
                &self.path,
                HeaderError::CountTooLarge(self.count + tokens.len() as u64).to_string(),
            ));
        }
        let Some(file) = self.file.as_mut() else {
            return Err(DataError::bad_shard(&self.path, "writer already finished"));
        };
        let result = match self.width {
            TokenWidth::U16 => {
                let narrow: Vec<u16> = tokens.iter().map(|&t| t as u16).collect();
                file.write_all(bytemuck::cast_slice(&narrow))
            }
            TokenWidth::U32 => file.write_all(bytemuck::cast_slice(tokens)),
        };
        result.map_err(|e| DataError::io(&self.tmp_path, e))?;
        self.count += tokens.len() as u64;
        Ok(())
    }

    /// Writes the header, flushes, fsyncs and renames the file to its final name; returns the header.
    pub fn finish(mut self) -> Result<ShardHeader> {
        let header = ShardHeader {
            width: self.width,
            num_tokens: self.count,
        };
        let bytes = header
            .to_bytes()
            .map_err(|e| DataError::bad_shard(&self.path, e.to_string()))?;
        let Some(buffered) = self.file.take() else {
            return Err(DataError::bad_shard(&self.path, "writer already finished"));
        };
        let tmp = self.tmp_path.clone();
        let mut file = buffered
            .into_inner()
            .map_err(|e| DataError::io(&tmp, e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| DataError::io(&tmp, e))?;
        file.write_all(&bytes).map_err(|e| DataError::io(&tmp, e))?;
        file.sync_all().map_err(|e| DataError::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        // Best effort: persist the rename itself.
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(header)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Writes `tokens` as one shard at `path` (atomically: temporary file, fsync, rename).
///
/// ```
/// use eslm_data::shard::{write_shard, ShardReader, TokenWidth};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("train_000000.bin");
/// write_shard(&path, &[1, 2, 50256], TokenWidth::U16)?;
/// let shard = ShardReader::open(&path)?;
/// assert_eq!(shard.tokens_u16(), Some(&[1u16, 2, 50256][..]));
/// # Ok::<(), eslm_data::DataError>(())
/// ```
pub fn write_shard(
    path: impl AsRef<Path>,
    tokens: &[u32],
    width: TokenWidth,
) -> Result<ShardHeader> {
    let mut writer = ShardWriter::create(path, width)?;
    writer.write(tokens)?;
    writer.finish()
}
