//! Probe: what an MP4 file itself says about its length and picture size.
//!
//! Finding the `moov` box is ours: [`parse_box_header`] reads top-level box
//! headers, and [`MoovScanner`] captures `ftyp` and `moov` from bytes streaming
//! past while skipping `mdat` by its size. [`parse_moov`] reads the few boxes
//! of the `moov` a probe needs. All of it is pure: the range reads live in
//! [`crate::media::fetch`].

use crate::decision::record::Probe;

/// The largest `moov` we keep in memory (a multi-hour lesson needs a few MB).
pub const MAX_MOOV_BYTES: u64 = 64 * 1024 * 1024;

/// A top-level ISO-BMFF box header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoxHeader {
    pub kind: [u8; 4],
    /// Header length: 8, or 16 with a 64-bit size.
    pub header_len: u64,
    /// Whole box length including the header; `None` when it runs to the end of the file.
    pub size: Option<u64>,
}

impl BoxHeader {
    pub fn is(&self, kind: &[u8; 4]) -> bool {
        &self.kind == kind
    }
}

/// Parse a box header from the start of `bytes`. `Ok(None)`: need more bytes.
/// At the top level a type that is not printable means the bytes are no MP4
/// file (an HTML error page, say).
pub fn parse_box_header(bytes: &[u8]) -> Result<Option<BoxHeader>, String> {
    if let Some(kind) = bytes.get(4..8)
        && !kind.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
    {
        return Err(format!("not an MP4 box header (type bytes {kind:02x?})"));
    }
    any_box_header(bytes)
}

/// A box header whatever its type bytes (inside `moov`, `©nam` and the like
/// are legal).
fn any_box_header(bytes: &[u8]) -> Result<Option<BoxHeader>, String> {
    if bytes.len() < 8 {
        return Ok(None);
    }
    let size32 = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let kind: [u8; 4] = bytes[4..8].try_into().expect("4 bytes");
    let (header_len, size) = match size32 {
        0 => (8, None),
        1 => {
            if bytes.len() < 16 {
                return Ok(None);
            }
            (
                16,
                Some(u64::from_be_bytes(
                    bytes[8..16].try_into().expect("8 bytes"),
                )),
            )
        }
        n => (8, Some(u64::from(n))),
    };
    if size.is_some_and(|s| s < header_len) {
        return Err(format!(
            "box {} declares an impossible size",
            String::from_utf8_lossy(&kind)
        ));
    }
    Ok(Some(BoxHeader {
        kind,
        header_len,
        size,
    }))
}

/// Parse `ftyp` + `moov` (whole boxes, headers included) into a [`Probe`].
///
/// Only the boxes a probe needs are read — `mvhd`, and in each `trak` its
/// `tkhd` and its `mdia`'s `mdhd` and `hdlr` — never the sample tables, which
/// in a long lesson's `moov` are hundreds of KB. Every read is bounds-checked;
/// the nesting is fixed (no recursion). The first of each box counts; a
/// duration of all ones is "unknown" (a track's `tkhd` duration is used
/// instead of its `mdhd`'s). It does not judge the rest of the `moov`: a
/// broken sample table does not stop a probe. The tests check it against
/// Mozilla's `mp4parse` on real, mutated and hand-built files.
pub fn parse_moov(ftyp: &[u8], moov: &[u8]) -> Result<Probe, String> {
    let (kind, brands) = only_box(ftyp)?;
    if &kind != b"ftyp" || brands.len() < 8 {
        return Err("not an MP4 file: no valid ftyp box".into());
    }
    let (kind, moov) = only_box(moov)?;
    if &kind != b"moov" {
        return Err("no moov box".into());
    }
    // The first of each box counts; `mvhd` may come after the tracks.
    let mut movie_scale = None;
    let mut tracks = Vec::new();
    for child in boxes(moov) {
        let (kind, body) = child?;
        match &kind {
            b"mvhd" if movie_scale.is_none() => movie_scale = Some(movie_header(body)?.0),
            b"trak" => tracks.push(track(body)?),
            _ => {}
        }
    }
    let movie_scale = movie_scale.filter(|t| *t > 0);
    let mut duration_ms: Option<u64> = None;
    for track in &tracks {
        let from_media = match track.media {
            Some((scale, Some(d))) if scale > 0 => Some(d.saturating_mul(1000) / scale),
            _ => None,
        };
        let from_header = match (track.duration, movie_scale) {
            (Some(d), Some(scale)) => Some(d.saturating_mul(1000) / scale),
            _ => None,
        };
        if let Some(ms) = from_media.or(from_header) {
            duration_ms = Some(duration_ms.map_or(ms, |d| d.max(ms)));
        }
    }
    let (width, height) = tracks
        .iter()
        .find(|t| t.video)
        .and_then(|t| t.picture)
        .unzip();
    let duration_ms = duration_ms.ok_or("the moov box declares no track duration")?;
    Ok(Probe {
        duration_ms: i64::try_from(duration_ms).map_err(|_| "duration out of range")?,
        width,
        height,
    })
}

/// What a `trak` says.
#[derive(Debug, Default)]
struct TrackFacts {
    /// `tkhd` duration, in the movie's timescale.
    duration: Option<u64>,
    /// `tkhd` width and height, whole pixels.
    picture: Option<(u32, u32)>,
    /// `mdhd` timescale and duration (in that timescale).
    media: Option<(u64, Option<u64>)>,
    /// `hdlr` says `vide`.
    video: bool,
}

fn track(trak: &[u8]) -> Result<TrackFacts, String> {
    let mut facts = TrackFacts::default();
    for child in boxes(trak) {
        let (kind, body) = child?;
        match &kind {
            // The first `tkhd` counts: it always sets the picture.
            b"tkhd" if facts.picture.is_none() => {
                let (duration, picture) = track_header(body)?;
                (facts.duration, facts.picture) = (duration, Some(picture));
            }
            b"mdia" => {
                for child in boxes(body) {
                    let (kind, body) = child?;
                    match &kind {
                        b"mdhd" if facts.media.is_none() => {
                            let (scale, duration) = movie_header(body)?;
                            facts.media = Some((scale, duration));
                        }
                        b"hdlr" => {
                            let handler = field(body, 8, 4, "hdlr")?;
                            facts.video = handler == b"vide";
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// `mvhd` and `mdhd` share their start: (timescale, duration). A duration of
/// all ones (in its version's width) means "unknown".
fn movie_header(body: &[u8]) -> Result<(u64, Option<u64>), String> {
    let (scale, duration) = match version(body)? {
        0 => (u32_at(body, 12)?, known_u32(u32_at(body, 16)?)),
        1 => (u32_at(body, 20)?, known_u64(u64_at(body, 24)?)),
        v => return Err(format!("unsupported header box version {v}")),
    };
    Ok((u64::from(scale), duration))
}

/// `tkhd`: (duration, (width, height)); the sizes are 16.16 fixed point.
fn track_header(body: &[u8]) -> Result<(Option<u64>, (u32, u32)), String> {
    let (duration, size_at) = match version(body)? {
        0 => (known_u32(u32_at(body, 20)?), 76),
        1 => (known_u64(u64_at(body, 28)?), 88),
        v => return Err(format!("unsupported tkhd version {v}")),
    };
    let width = u32_at(body, size_at)? >> 16;
    let height = u32_at(body, size_at + 4)? >> 16;
    Ok((duration, (width, height)))
}

/// A 32-bit duration, `None` when all ones ("unknown").
fn known_u32(duration: u32) -> Option<u64> {
    (duration != u32::MAX).then_some(u64::from(duration))
}

/// A 64-bit duration, `None` when all ones ("unknown").
fn known_u64(duration: u64) -> Option<u64> {
    (duration != u64::MAX).then_some(duration)
}

fn version(body: &[u8]) -> Result<u8, String> {
    body.first().copied().ok_or_else(|| "empty full box".into())
}

fn field<'a>(body: &'a [u8], at: usize, len: usize, what: &str) -> Result<&'a [u8], String> {
    body.get(at..at + len)
        .ok_or_else(|| format!("{what} box too short"))
}

fn u32_at(body: &[u8], at: usize) -> Result<u32, String> {
    let bytes = field(body, at, 4, "header")?;
    Ok(u32::from_be_bytes(bytes.try_into().expect("4 bytes")))
}

fn u64_at(body: &[u8], at: usize) -> Result<u64, String> {
    let bytes = field(body, at, 8, "header")?;
    Ok(u64::from_be_bytes(bytes.try_into().expect("8 bytes")))
}

/// A box's type and contents.
type Contents<'a> = ([u8; 4], &'a [u8]);

/// The first box of `bytes`, and what follows it.
fn next_box(bytes: &[u8]) -> Result<(Contents<'_>, &[u8]), String> {
    let header = any_box_header(bytes)?.ok_or("truncated box header")?;
    let size = header
        .size
        .map_or(Some(bytes.len()), |s| usize::try_from(s).ok())
        .filter(|s| *s <= bytes.len())
        .ok_or_else(|| {
            format!(
                "box {} runs past its parent",
                String::from_utf8_lossy(&header.kind)
            )
        })?;
    let (whole, rest) = bytes.split_at(size);
    Ok(((header.kind, &whole[header.header_len as usize..]), rest))
}

/// The one box `bytes` holds: its type and contents.
fn only_box(bytes: &[u8]) -> Result<Contents<'_>, String> {
    let mut all = boxes(bytes);
    let first = all.next().ok_or("empty box")??;
    match all.next() {
        None => Ok(first),
        Some(_) => Err("bytes after the box".into()),
    }
}

/// The boxes laid end to end in `bytes`: each one's type and contents.
fn boxes(mut bytes: &[u8]) -> impl Iterator<Item = Result<Contents<'_>, String>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let next = next_box(bytes);
        // After an error nothing more is read.
        bytes = next.as_ref().map_or(&[], |(_, rest)| rest);
        Some(next.map(|(contents, _)| contents))
    })
}

/// Captures `ftyp` and `moov` from a file streaming past, chunk by chunk,
/// skipping every other box by its size. Memory: the two boxes only.
#[derive(Debug, Default)]
pub struct MoovScanner {
    /// Bytes of the current box header seen so far.
    header: Vec<u8>,
    /// Remaining bytes of the current box to skip or capture.
    remaining: u64,
    /// The box being captured, if any.
    capture: Option<([u8; 4], Vec<u8>)>,
    ftyp: Option<Vec<u8>>,
    moov: Option<Vec<u8>>,
    failed: Option<String>,
    /// The current box runs to the end of the file.
    to_end: bool,
}

impl MoovScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// `moov` has been captured: the rest of the file is not needed for the probe.
    pub fn done(&self) -> bool {
        self.moov.is_some() || self.failed.is_some()
    }

    /// Feed the next bytes of the file.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && !self.done() {
            if self.to_end {
                return;
            }
            if self.remaining == 0 {
                let take = chunk.len().min(16 - self.header.len());
                self.header.extend_from_slice(&chunk[..take]);
                match parse_box_header(&self.header) {
                    Ok(None) => {
                        chunk = &chunk[take..];
                        continue;
                    }
                    Err(e) => {
                        self.failed = Some(e);
                        return;
                    }
                    Ok(Some(header)) => {
                        // Give back what was read past the header.
                        let extra = self.header.len() - header.header_len as usize;
                        chunk = &chunk[take - extra..];
                        self.start_box(header);
                        continue;
                    }
                }
            }
            let take = chunk
                .len()
                .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            if let Some((_, buf)) = &mut self.capture {
                buf.extend_from_slice(&chunk[..take]);
            }
            self.remaining -= take as u64;
            chunk = &chunk[take..];
            if self.remaining == 0 {
                self.end_box();
            }
        }
    }

    fn start_box(&mut self, header: BoxHeader) {
        let header_bytes = self.header[..header.header_len as usize].to_vec();
        self.header.clear();
        let Some(size) = header.size else {
            if header.is(b"moov") {
                self.failed = Some("a moov box without a size is not supported".into());
            }
            self.to_end = true;
            return;
        };
        self.remaining = size - header.header_len;
        if header.is(b"moov") || header.is(b"ftyp") {
            if size > MAX_MOOV_BYTES {
                self.failed = Some(format!(
                    "{} box of {size} bytes is too large",
                    String::from_utf8_lossy(&header.kind)
                ));
                return;
            }
            self.capture = Some((header.kind, header_bytes));
        }
        if self.remaining == 0 {
            self.end_box();
        }
    }

    fn end_box(&mut self) {
        match self.capture.take() {
            Some((kind, bytes)) if &kind == b"moov" => self.moov = Some(bytes),
            Some((_, bytes)) => self.ftyp = Some(bytes),
            None => {}
        }
    }

    /// The probe, once the file (or enough of it) went past.
    pub fn finish(&self) -> Result<Probe, String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match (&self.ftyp, &self.moov) {
            (Some(ftyp), Some(moov)) => parse_moov(ftyp, moov),
            (None, _) => Err("no ftyp box: not an MP4 file".into()),
            (_, None) => Err("no moov box found".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FASTSTART: &[u8] = include_bytes!("../../tests/fixtures/faststart-2s-320x240.mp4");
    const MOOV_AT_END: &[u8] = include_bytes!("../../tests/fixtures/moov-at-end-5s-160x120.mp4");

    fn scan_in_chunks(file: &[u8], chunk: usize) -> MoovScanner {
        let mut scanner = MoovScanner::new();
        for piece in file.chunks(chunk) {
            scanner.feed(piece);
        }
        scanner
    }

    #[test]
    fn faststart_file_is_probed_from_any_chunking() {
        for chunk in [1, 7, 4096, FASTSTART.len()] {
            let probe = scan_in_chunks(FASTSTART, chunk).finish().unwrap();
            assert!(
                (1950..=2100).contains(&probe.duration_ms),
                "{chunk}: {probe:?}"
            );
            assert_eq!((probe.width, probe.height), (Some(320), Some(240)));
        }
    }

    #[test]
    fn moov_at_end_file_is_probed_after_skipping_mdat() {
        let probe = scan_in_chunks(MOOV_AT_END, 1000).finish().unwrap();
        assert!((4950..=5100).contains(&probe.duration_ms), "{probe:?}");
        assert_eq!((probe.width, probe.height), (Some(160), Some(120)));
    }

    #[test]
    fn faststart_scanner_is_done_before_the_media_data() {
        let mut scanner = MoovScanner::new();
        let mut fed = 0;
        for piece in FASTSTART.chunks(256) {
            if scanner.done() {
                break;
            }
            scanner.feed(piece);
            fed += piece.len();
        }
        assert!(scanner.done());
        assert!(
            fed < FASTSTART.len() / 2,
            "read {fed} of {}",
            FASTSTART.len()
        );
    }

    /// The `mp4parse` reading the product used before: the oracle.
    fn mp4parse_probe(ftyp: &[u8], moov: &[u8]) -> Result<Probe, String> {
        let file = [ftyp, moov].concat();
        let context =
            mp4parse::read_mp4(&mut std::io::Cursor::new(file)).map_err(|e| format!("{e:?}"))?;
        let movie_scale = context.timescale.map(|t| t.0).filter(|t| *t > 0);
        let mut duration_ms: Option<u64> = None;
        let mut picture = None;
        for track in &context.tracks {
            let from_media = match (track.duration, track.timescale) {
                (Some(d), Some(scale)) if scale.0 > 0 => Some(d.0.saturating_mul(1000) / scale.0),
                _ => None,
            };
            let from_header = match (&track.tkhd, movie_scale) {
                (Some(tkhd), Some(scale)) => Some(tkhd.duration.saturating_mul(1000) / scale),
                _ => None,
            };
            if let Some(ms) = from_media.or(from_header) {
                duration_ms = Some(duration_ms.map_or(ms, |d| d.max(ms)));
            }
            if picture.is_none()
                && track.track_type == mp4parse::TrackType::Video
                && let Some(tkhd) = &track.tkhd
            {
                picture = Some((tkhd.width >> 16, tkhd.height >> 16));
            }
        }
        let duration_ms = duration_ms.ok_or("no duration")?;
        Ok(Probe {
            duration_ms: i64::try_from(duration_ms).map_err(|_| "out of range")?,
            width: picture.map(|p| p.0),
            height: picture.map(|p| p.1),
        })
    }

    fn ftyp_and_moov(file: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let scanner = scan_in_chunks(file, file.len());
        (scanner.ftyp.unwrap(), scanner.moov.unwrap())
    }

    #[test]
    fn the_moov_reader_agrees_with_mp4parse_on_real_and_mutated_files() {
        let mut compared = 0;
        for file in [FASTSTART, MOOV_AT_END] {
            let (ftyp, moov) = ftyp_and_moov(file);
            assert_eq!(parse_moov(&ftyp, &moov), mp4parse_probe(&ftyp, &moov));
            // Every byte of the moov changed a few ways: the reader never
            // panics, and where mp4parse reads a probe, it reads the same.
            for at in 0..moov.len() {
                for value in [0x00, 0xff, moov[at] ^ 0x01, moov[at] ^ 0x80] {
                    let mut mutated = moov.clone();
                    mutated[at] = value;
                    let ours = parse_moov(&ftyp, &mutated);
                    if let Ok(expected) = mp4parse_probe(&ftyp, &mutated) {
                        assert_eq!(ours, Ok(expected), "byte {at} set to {value:#04x}");
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 1000, "only {compared} mutated files compared");
    }

    fn mp4_box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out
    }

    /// A full box's contents: version, flags, then `fields`.
    fn full(version: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![version, 0, 0, 0];
        for f in fields {
            out.extend_from_slice(f);
        }
        out
    }

    /// `mvhd` (as `mvhd`) or `mdhd` (as `mdhd`), version 1: 64-bit times.
    fn header_v1(kind: &[u8; 4], scale: u32, duration: u64) -> Vec<u8> {
        let tail: &[u8] = if kind == b"mvhd" { &[0; 80] } else { &[0; 4] };
        let fields = [
            &[0; 16][..],
            &scale.to_be_bytes(),
            &duration.to_be_bytes(),
            tail,
        ];
        mp4_box(kind, &full(1, &fields))
    }

    fn mdhd_v0(scale: u32, duration: u32) -> Vec<u8> {
        let fields = [
            &[0; 8][..],
            &scale.to_be_bytes(),
            &duration.to_be_bytes(),
            &[0; 4],
        ];
        mp4_box(b"mdhd", &full(0, &fields))
    }

    /// `tkhd` of `version` with `duration` and a picture of `size` pixels.
    fn tkhd(version: u8, duration: u64, size: (u32, u32)) -> Vec<u8> {
        let (w, h) = ((size.0 << 16).to_be_bytes(), (size.1 << 16).to_be_bytes());
        let (times, id, reserved) = (
            vec![0u8; if version == 1 { 16 } else { 8 }],
            1u32.to_be_bytes(),
            [0u8; 4],
        );
        let duration = if version == 1 {
            duration.to_be_bytes().to_vec()
        } else {
            (duration as u32).to_be_bytes().to_vec()
        };
        let fields = [
            &times[..],
            &id,
            &reserved,
            &duration,
            &[0; 16],
            &[0; 36],
            &w,
            &h,
        ];
        mp4_box(b"tkhd", &full(version, &fields))
    }

    fn trak(tkhd: Vec<u8>, mdhd: Vec<u8>, handler: &[u8; 4]) -> Vec<u8> {
        let hdlr = mp4_box(b"hdlr", &full(0, &[&[0; 4], handler, &[0; 12], b"\0"]));
        let mdia = mp4_box(b"mdia", &[mdhd, hdlr].concat());
        mp4_box(b"trak", &[tkhd, mdia].concat())
    }

    fn ftyp() -> Vec<u8> {
        mp4_box(b"ftyp", b"isom\0\0\x02\0isomiso2mp41")
    }

    #[test]
    fn version_1_boxes_several_tracks_and_box_order_are_read() {
        // Audio first (no picture), mvhd last, everything version 1 but
        // the video's tkhd: 8 s of audio, 10 s of 640x360 video.
        let audio = trak(
            tkhd(1, 9000, (0, 0)),
            header_v1(b"mdhd", 48_000, 48_000 * 8),
            b"soun",
        );
        let video = trak(
            tkhd(0, 9000, (640, 360)),
            header_v1(b"mdhd", 90_000, 90_000 * 10),
            b"vide",
        );
        let moov = mp4_box(
            b"moov",
            &[audio, video, header_v1(b"mvhd", 1000, 9000)].concat(),
        );
        let expected = Probe {
            duration_ms: 10_000,
            width: Some(640),
            height: Some(360),
        };
        assert_eq!(parse_moov(&ftyp(), &moov), Ok(expected.clone()));
        assert_eq!(mp4parse_probe(&ftyp(), &moov), Ok(expected));
    }

    #[test]
    fn unknown_durations_fall_back_to_the_track_header_in_either_version() {
        // The video's media duration is unknown (all ones, 32-bit): its tkhd
        // says 12 s in the movie's timescale, which mvhd gives after it.
        let video = trak(
            tkhd(1, 12_000, (320, 240)),
            mdhd_v0(90_000, u32::MAX),
            b"vide",
        );
        let moov = mp4_box(b"moov", &[video, header_v1(b"mvhd", 1000, 12_000)].concat());
        let probe = parse_moov(&ftyp(), &moov).unwrap();
        assert_eq!((probe.duration_ms, probe.width), (12_000, Some(320)));
        // The same with a 64-bit unknown media duration.
        let video = trak(
            tkhd(1, 12_000, (320, 240)),
            header_v1(b"mdhd", 90_000, u64::MAX),
            b"vide",
        );
        let moov = mp4_box(b"moov", &[header_v1(b"mvhd", 1000, 0), video].concat());
        assert_eq!(parse_moov(&ftyp(), &moov).unwrap().duration_ms, 12_000);
        // Nothing known at all: an error, not a made-up duration.
        let video = trak(
            tkhd(0, u64::from(u32::MAX), (320, 240)),
            mdhd_v0(90_000, u32::MAX),
            b"vide",
        );
        let moov = mp4_box(b"moov", &[header_v1(b"mvhd", 1000, 0), video].concat());
        assert!(parse_moov(&ftyp(), &moov).is_err());
    }

    #[test]
    fn an_unknown_media_duration_falls_back_to_the_track_header() {
        let (ftyp, mut moov) = ftyp_and_moov(FASTSTART);
        let known = parse_moov(&ftyp, &moov).unwrap();
        // Every mdhd (version 0) says "unknown": duration at 16 past its type.
        let mut at = 0;
        while let Some(found) = moov[at..].windows(4).position(|w| w == b"mdhd") {
            let body = at + found + 4;
            assert_eq!(moov[body], 0, "version 0");
            moov[body + 16..body + 20].copy_from_slice(&[0xff; 4]);
            at = body;
        }
        assert!(at > 0, "the fixture has an mdhd");
        let probe = parse_moov(&ftyp, &moov).unwrap();
        // The tkhd duration is in the movie's timescale, rounded differently.
        assert!(
            (probe.duration_ms - known.duration_ms).abs() <= 50,
            "{probe:?} vs {known:?}"
        );
        assert_eq!((probe.width, probe.height), (known.width, known.height));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(
            scan_in_chunks(b"<html>not a video</html>", 5)
                .finish()
                .is_err()
        );
        assert!(scan_in_chunks(&[0u8; 3], 1).finish().is_err());
        let mut truncated = FASTSTART[..FASTSTART.len() / 3].to_vec();
        truncated[40] ^= 0xff;
        let _ = scan_in_chunks(&truncated, 100).finish();
        let mut moov_only = MOOV_AT_END.to_vec();
        moov_only.truncate(moov_only.len() - 10);
        assert!(scan_in_chunks(&moov_only, 100).finish().is_err());
    }

    #[test]
    fn box_headers_handle_64_bit_and_to_end_sizes() {
        let mut large = vec![0, 0, 0, 1];
        large.extend_from_slice(b"mdat");
        large.extend_from_slice(&(5u64 << 32).to_be_bytes());
        let h = parse_box_header(&large).unwrap().unwrap();
        assert_eq!((h.header_len, h.size), (16, Some(5u64 << 32)));
        assert_eq!(parse_box_header(&large[..12]).unwrap(), None);
        let to_end = parse_box_header(b"\0\0\0\0mdat").unwrap().unwrap();
        assert_eq!(to_end.size, None);
        assert!(
            parse_box_header(b"\0\0\0\x04moov").is_err(),
            "size below header length"
        );
    }
}
