//! Shard format: write → read round trips (u16 and u32, proptest), and every header corruption is a typed
//! error naming the file, never a panic.

use std::path::Path;

use eslm_data::shard::{
    parse_header, write_shard, HeaderError, ShardHeader, ShardReader, ShardWriter, TokenWidth,
    HEADER_BYTES, MAGIC_U16, MAGIC_U32,
};
use eslm_data::DataError;
use proptest::prelude::*;

fn header_bytes(magic: i32, version: i32, count: i32) -> Vec<u8> {
    let mut v = vec![0u8; HEADER_BYTES];
    v[0..4].copy_from_slice(&magic.to_le_bytes());
    v[4..8].copy_from_slice(&version.to_le_bytes());
    v[8..12].copy_from_slice(&count.to_le_bytes());
    v
}

fn open_err(path: &Path) -> String {
    match ShardReader::open(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e @ DataError::BadShard { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "error does not name the file: {msg}"
            );
            msg
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn round_trip_u16(tokens in proptest::collection::vec(0u32..=65535, 0..3000)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        let header = write_shard(&path, &tokens, TokenWidth::U16).unwrap();
        prop_assert_eq!(header.num_tokens, tokens.len() as u64);
        let shard = ShardReader::open(&path).unwrap();
        prop_assert_eq!(shard.width(), TokenWidth::U16);
        prop_assert_eq!(shard.len(), tokens.len());
        prop_assert_eq!(shard.tokens().to_vec_u32(), tokens.clone());
        let bytes = std::fs::metadata(&path).unwrap().len();
        prop_assert_eq!(bytes, (HEADER_BYTES + 2 * tokens.len()) as u64);
        for (i, &t) in tokens.iter().enumerate().step_by(97) {
            prop_assert_eq!(shard.get(i), Some(t));
        }
        prop_assert_eq!(shard.get(tokens.len()), None);
    }

    #[test]
    fn round_trip_u32(tokens in proptest::collection::vec(any::<u32>(), 0..3000)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_shard(&path, &tokens, TokenWidth::U32).unwrap();
        let shard = ShardReader::open(&path).unwrap();
        prop_assert_eq!(shard.width(), TokenWidth::U32);
        prop_assert_eq!(shard.tokens_u32().unwrap(), &tokens[..]);
        prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), (HEADER_BYTES + 4 * tokens.len()) as u64);
    }

    #[test]
    fn parse_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
        let _ = parse_header(&bytes);
    }

    #[test]
    fn header_round_trip(count in 0u64..(i32::MAX as u64), wide in any::<bool>()) {
        let width = if wide { TokenWidth::U32 } else { TokenWidth::U16 };
        let h = ShardHeader { width, num_tokens: count };
        prop_assert_eq!(parse_header(&h.to_bytes().unwrap()), Ok(h));
    }
}

#[test]
fn header_matches_llm_c_layout() {
    let h = ShardHeader {
        width: TokenWidth::U16,
        num_tokens: 7,
    };
    assert_eq!(h.to_bytes().unwrap().to_vec(), header_bytes(20240520, 1, 7));
    let h = ShardHeader {
        width: TokenWidth::U32,
        num_tokens: 9,
    };
    assert_eq!(h.to_bytes().unwrap().to_vec(), header_bytes(20240801, 7, 9));
}

#[test]
fn streaming_writer_matches_one_shot() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..10_000).map(|i| (i * 7919) % 50257).collect();
    let mut w = ShardWriter::create(dir.path().join("s.bin"), TokenWidth::U16).unwrap();
    for chunk in tokens.chunks(333) {
        w.write(chunk).unwrap();
    }
    assert_eq!(w.len(), tokens.len() as u64);
    w.finish().unwrap();
    write_shard(dir.path().join("o.bin"), &tokens, TokenWidth::U16).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("s.bin")).unwrap(),
        std::fs::read(dir.path().join("o.bin")).unwrap()
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn unfinished_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut w = ShardWriter::create(dir.path().join("x.bin"), TokenWidth::U16).unwrap();
        w.write(&[1, 2, 3]).unwrap();
        // Dropped without finish (an interrupted run).
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn writer_rejects_ids_too_wide_for_u16() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.bin");
    let err = write_shard(&path, &[1, 65536, 3], TokenWidth::U16).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TokenOutOfRange {
                position: 1,
                token: 65536,
                ..
            }
        ),
        "{err}"
    );
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn corrupt_headers_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let body = |n: usize, w: usize| vec![0u8; n * w];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.bin", vec![], "shorter than the 1024-byte header"),
        ("short.bin", vec![0u8; 1023], "1023 bytes, shorter"),
        (
            "magic.bin",
            [header_bytes(12345, 1, 0), body(0, 2)].concat(),
            "wrong magic 12345",
        ),
        (
            "version16.bin",
            [header_bytes(MAGIC_U16, 2, 3), body(3, 2)].concat(),
            "expects version 1, found version 2",
        ),
        (
            "version32.bin",
            [header_bytes(MAGIC_U32, 1, 3), body(3, 4)].concat(),
            "expects version 7, found version 1",
        ),
        (
            "negative.bin",
            header_bytes(MAGIC_U16, 1, -5),
            "negative token count -5",
        ),
        (
            "truncated.bin",
            [header_bytes(MAGIC_U16, 1, 10), body(9, 2)].concat(),
            "truncated",
        ),
        (
            "odd.bin",
            [header_bytes(MAGIC_U16, 1, 10), body(10, 2), vec![0]].concat(),
            "does not match the token count",
        ),
        (
            "longer.bin",
            [header_bytes(MAGIC_U32, 7, 2), body(3, 4)].concat(),
            "does not match the token count",
        ),
        (
            "u32asu16.bin",
            [header_bytes(MAGIC_U32, 7, 10), body(10, 2)].concat(),
            "truncated",
        ),
    ];
    for (name, bytes, needle) in cases {
        let path = d.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let msg = open_err(&path);
        assert!(msg.contains(needle), "{name}: {msg}");
    }
}

#[test]
fn missing_file_is_io_error_naming_it() {
    let err = ShardReader::open("/nonexistent/dir/shard.bin").unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/dir/shard.bin"));
}

#[test]
fn parse_header_errors() {
    assert_eq!(parse_header(&[]), Err(HeaderError::TooShort(0)));
    assert_eq!(
        parse_header(&header_bytes(7, 1, 0)),
        Err(HeaderError::WrongMagic(7))
    );
    assert_eq!(
        parse_header(&header_bytes(MAGIC_U16, 7, 0)),
        Err(HeaderError::WrongVersion {
            magic: MAGIC_U16,
            expected: 1,
            found: 7
        })
    );
    assert_eq!(
        ShardHeader {
            width: TokenWidth::U16,
            num_tokens: 1 << 31
        }
        .to_bytes(),
        Err(HeaderError::CountTooLarge(1 << 31))
    );
}

#[test]
fn check_vocab_reports_first_bad_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bin");
    write_shard(&path, &[5, 50256, 50257, 60000], TokenWidth::U16).unwrap();
    let shard = ShardReader::open(&path).unwrap();
    shard.check_vocab(60001).unwrap();
    let err = shard.check_vocab(50257).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TokenOutOfRange {
                position: 2,
                token: 50257,
                ..
            }
        ),
        "{err}"
    );
}
