//! zstd frames for stored values that are rewritten on every flush: the embedded store's
//! profiles and outbox batches, and MongoDB's packed profile bookkeeping. Each caller keeps its
//! own format byte in front; this module only compresses and bounds what a read may allocate.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io;

/// Fast compression: the point is fewer bytes per flush, not the smallest value.
const LEVEL: i32 = 1;

/// The most a frame may claim to hold: far above any profile or outbox entry, so a damaged
/// frame cannot make a read allocate without bound.
pub(crate) const MAX_BYTES: usize = 64 << 20;

/// The most an outbox entry may hold. One Bronze row carries a whole request body as JSON text,
/// and an import chunk may be 64 MiB (`server.max_import_body_bytes`) before escaping: at
/// [`MAX_BYTES`] such an entry was written but never readable, and the relay stopped at it.
pub(crate) const MAX_OUTBOX_BYTES: usize = 1 << 30;

thread_local! {
    /// One compression context per thread (in practice the store's writer), reused for every value.
    static PACKER: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    /// One decompression context per reading thread, reused for every value.
    static UNPACKER: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// First byte of packed JSON: a zstd frame holding the JSON follows. JSON stored before values
/// were packed is plain, and its first byte is `{`.
pub(crate) const PACKED_JSON: u8 = 1;

/// JSON as [`unpack_json`] reads it back: redb's profiles and outbox, MongoDB's outbox rows.
pub(crate) fn pack_json(json: &[u8]) -> io::Result<Vec<u8>> {
    compress(PACKED_JSON, json)
}

/// The JSON in what [`pack_json`] wrote, decompressing at most `limit` bytes, or plain JSON as
/// it is; the error completes "the stored value ...".
pub(crate) fn unpack_json(bytes: &[u8], limit: usize) -> Result<Cow<'_, [u8]>, String> {
    match bytes.split_first() {
        Some((&PACKED_JSON, frame)) => {
            decompress_within(frame, limit).map(Cow::Owned).map_err(|why| format!("does not decompress: {why}"))
        }
        Some((b'{', _)) => Ok(Cow::Borrowed(bytes)),
        Some((format, _)) => Err(format!("is in an unknown format ({format}); written by a newer Cohort?")),
        None => Err("is empty".into()),
    }
}

/// `format`, then `raw` as one zstd frame that records its size.
pub(crate) fn compress(format: u8, raw: &[u8]) -> io::Result<Vec<u8>> {
    PACKER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let packer = match slot.as_mut() {
            Some(p) => p,
            None => slot.insert(zstd::bulk::Compressor::new(LEVEL)?),
        };
        let frame = packer.compress(raw)?;
        let mut out = Vec::with_capacity(frame.len() + 1);
        out.push(format);
        out.extend_from_slice(&frame);
        Ok(out)
    })
}

/// What a frame written by [`compress`] (without its format byte) holds; the error says why
/// it is unreadable.
pub(crate) fn decompress(frame: &[u8]) -> Result<Vec<u8>, String> {
    decompress_within(frame, MAX_BYTES)
}

/// [`decompress`] for values that may legitimately be larger than [`MAX_BYTES`], up to `limit`.
fn decompress_within(frame: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size <= limit as u64 => {}
        Ok(Some(size)) => return Err(format!("it claims {size} bytes")),
        Ok(None) => return Err("its size is not recorded".into()),
        Err(_) => return Err("it is not a zstd frame".into()),
    }
    UNPACKER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let unpacker = match slot.as_mut() {
            Some(u) => u,
            None => slot.insert(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?),
        };
        unpacker.decompress(frame, limit).map_err(|e| e.to_string())
    })
}
