//! Layout: where each track sits on screen over the lesson timeline, from the
//! TIC mix rules (contract §4).
//!
//! The canvas is split into a large `main` picture on the left (screen share,
//! else whiteboard) and camera tiles stacked from the top at the right edge.
//! Tile size depends on how many cameras are active at that moment:
//!
//! | cameras | tile w × h  | columns |
//! |---------|-------------|---------|
//! | 1–4     | 1/5 × 1/4   | 1       |
//! | 5–6     | 1/7 × 1/6   | 1       |
//! | 7–8     | 1/9 × 1/8   | 1       |
//! | 9–16    | 1/10 × 1/8  | 2       |
//!
//! With two columns the first eight cameras fill the column at the right edge,
//! the next eight the column left of it. A mixed video is `main` over the whole
//! canvas, with no tiles. Coordinates are fractions of the canvas.

use crate::decision::record::{Kind, Placement, Segment, Track, Warning};
use crate::decision::warning::WarningCode;

/// The most cameras the TIC rules can place.
pub const MAX_TILES: usize = 16;

/// Tile width, tile height and number of columns for `cameras` active cameras.
fn tile_grid(cameras: usize) -> (f64, f64, usize) {
    match cameras {
        0..=4 => (1.0 / 5.0, 1.0 / 4.0, 1),
        5..=6 => (1.0 / 7.0, 1.0 / 6.0, 1),
        7..=8 => (1.0 / 9.0, 1.0 / 8.0, 1),
        _ => (1.0 / 10.0, 1.0 / 8.0, 2),
    }
}

/// Place the main track and the camera tiles for one set of active tracks.
/// `cameras` must be in join order; at most [`MAX_TILES`] are placed.
pub fn arrange(main: Option<&Track>, cameras: &[&Track]) -> (Option<Placement>, Vec<Placement>) {
    let place = |t: &Track, x: f64, y: f64, w: f64, h: f64| Placement {
        track_id: t.track_id.clone(),
        x,
        y,
        w,
        h,
    };
    if let Some(mixed) = main.filter(|t| t.kind == Kind::Mixed) {
        return (Some(place(mixed, 0.0, 0.0, 1.0, 1.0)), Vec::new());
    }
    let cameras = &cameras[..cameras.len().min(MAX_TILES)];
    if cameras.is_empty() {
        return (main.map(|t| place(t, 0.0, 0.0, 1.0, 1.0)), Vec::new());
    }
    let (w, h, columns) = tile_grid(cameras.len());
    let per_column = (1.0 / h).round() as usize;
    let tiles = cameras
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let column = (i / per_column) as f64;
            let row = (i % per_column) as f64;
            place(t, 1.0 - w * (column + 1.0), row * h, w, h)
        })
        .collect();
    let main_w = 1.0 - w * columns as f64;
    (main.map(|t| place(t, 0.0, 0.0, main_w, 1.0)), tiles)
}

/// The layout timeline over `[0, duration_ms)`: one segment per stretch in
/// which the picture is constant, adjacent equal stretches merged.
pub fn compute_layout(tracks: &[Track], duration_ms: i64) -> (Vec<Segment>, Vec<Warning>) {
    let mut cuts: Vec<i64> = vec![0, duration_ms.max(0)];
    for t in tracks {
        cuts.push(t.offset_ms.clamp(0, duration_ms));
        cuts.push(t.end_ms().clamp(0, duration_ms));
    }
    cuts.sort_unstable();
    cuts.dedup();

    // Cameras join in order of offset, then user id (tracks are given sorted
    // by offset, kind, user id, so a stable filter keeps that order).
    let mut segments: Vec<Segment> = Vec::new();
    let mut most_cameras = 0;
    for pair in cuts.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let active: Vec<&Track> = tracks
            .iter()
            .filter(|t| t.duration_ms > 0 && t.offset_ms <= from && from < t.end_ms())
            .collect();
        let latest = |kind: Kind| active.iter().rev().find(|t| t.kind == kind).copied();
        let main = latest(Kind::Mixed)
            .or_else(|| latest(Kind::ScreenShare))
            .or_else(|| latest(Kind::Whiteboard));
        let cameras: Vec<&Track> = active
            .iter()
            .copied()
            .filter(|t| t.kind == Kind::Camera)
            .collect();
        if main.is_none_or(|m| m.kind != Kind::Mixed) {
            most_cameras = most_cameras.max(cameras.len());
        }
        let (main, tiles) = arrange(main, &cameras);
        match segments.last_mut() {
            Some(last) if last.main == main && last.tiles == tiles => last.to_ms = to,
            _ => segments.push(Segment {
                from_ms: from,
                to_ms: to,
                main,
                tiles,
            }),
        }
    }
    let mut warnings = Vec::new();
    if most_cameras > MAX_TILES {
        warnings.push(Warning::new(
            WarningCode::TooManyCameras,
            format!(
                "{most_cameras} cameras active at once; the layout tiles the first {MAX_TILES} only"
            ),
        ));
    }
    (segments, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(id: &str, kind: Kind, offset_ms: i64, duration_ms: i64) -> Track {
        Track {
            track_id: id.into(),
            kind,
            user_id: (kind == Kind::Camera).then(|| id.to_string()),
            offset_ms,
            duration_ms,
            size_bytes: None,
            format: "mp4".into(),
            source_url: format!("http://1.vod2.myqcloud.com/{id}.mp4"),
            vod_file_id: None,
            archive: None,
            probe: None,
        }
    }

    fn cameras(n: usize) -> Vec<Track> {
        (0..n)
            .map(|i| track(&format!("c{i:02}"), Kind::Camera, 0, 1000))
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Layout of a whiteboard plus `n` cameras, all active for the whole lesson.
    fn board_with(n: usize) -> (Segment, Vec<Warning>) {
        let mut tracks = vec![track("board", Kind::Whiteboard, 0, 1000)];
        tracks.extend(cameras(n));
        let (segments, warnings) = compute_layout(&tracks, 1000);
        assert_eq!(segments.len(), 1);
        (segments.into_iter().next().unwrap(), warnings)
    }

    #[test]
    fn no_camera_gives_main_the_whole_canvas() {
        let (seg, warnings) = board_with(0);
        let main = seg.main.unwrap();
        assert!(close(main.w, 1.0) && close(main.h, 1.0));
        assert!(seg.tiles.is_empty() && warnings.is_empty());
    }

    #[test]
    fn tile_sizes_follow_the_camera_count() {
        // (cameras, tile w, tile h, main width)
        let table = [
            (1, 1.0 / 5.0, 1.0 / 4.0, 0.8),
            (4, 1.0 / 5.0, 1.0 / 4.0, 0.8),
            (5, 1.0 / 7.0, 1.0 / 6.0, 6.0 / 7.0),
            (8, 1.0 / 9.0, 1.0 / 8.0, 8.0 / 9.0),
            (9, 1.0 / 10.0, 1.0 / 8.0, 0.8),
            (16, 1.0 / 10.0, 1.0 / 8.0, 0.8),
        ];
        for (n, w, h, main_w) in table {
            let (seg, warnings) = board_with(n);
            assert!(warnings.is_empty(), "{n}");
            assert_eq!(seg.tiles.len(), n);
            assert!(close(seg.main.as_ref().unwrap().w, main_w), "{n}: main");
            for tile in &seg.tiles {
                assert!(close(tile.w, w) && close(tile.h, h), "{n}: {tile:?}");
                // Never covers the main picture, never leaves the canvas.
                assert!(
                    tile.x >= main_w - 1e-9 && tile.x + tile.w <= 1.0 + 1e-9,
                    "{n}: {tile:?}"
                );
                assert!(
                    tile.y >= 0.0 && tile.y + tile.h <= 1.0 + 1e-9,
                    "{n}: {tile:?}"
                );
            }
        }
    }

    #[test]
    fn one_column_stacks_from_the_top_at_the_right_edge() {
        let (seg, _) = board_with(4);
        for (i, tile) in seg.tiles.iter().enumerate() {
            assert_eq!(tile.track_id, format!("c{i:02}"));
            assert!(
                close(tile.x, 0.8) && close(tile.y, i as f64 * 0.25),
                "{tile:?}"
            );
        }
    }

    #[test]
    fn nine_cameras_fill_two_columns_right_column_first() {
        let (seg, _) = board_with(9);
        assert!(seg.tiles[..8].iter().all(|t| close(t.x, 0.9)));
        assert!(close(seg.tiles[7].y, 7.0 / 8.0));
        assert!(close(seg.tiles[8].x, 0.8) && close(seg.tiles[8].y, 0.0));
        let (seg, _) = board_with(16);
        assert!(close(seg.tiles[15].x, 0.8) && close(seg.tiles[15].y, 7.0 / 8.0));
    }

    #[test]
    fn seventeen_cameras_tile_sixteen_and_warn() {
        let (seg, warnings) = board_with(17);
        assert_eq!(seg.tiles.len(), 16);
        assert!(seg.tiles.iter().all(|t| t.track_id != "c16"));
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].code, WarningCode::TooManyCameras);
    }

    #[test]
    fn screen_share_takes_main_over_whiteboard_while_active() {
        let tracks = vec![
            track("board", Kind::Whiteboard, 0, 3000),
            track("share", Kind::ScreenShare, 1000, 1000),
        ];
        let (segments, _) = compute_layout(&tracks, 3000);
        let mains: Vec<(i64, i64, &str)> = segments
            .iter()
            .map(|s| {
                (
                    s.from_ms,
                    s.to_ms,
                    s.main.as_ref().unwrap().track_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            mains,
            [
                (0, 1000, "board"),
                (1000, 2000, "share"),
                (2000, 3000, "board")
            ]
        );
    }

    #[test]
    fn segments_cover_the_timeline_and_merge_equal_neighbours() {
        // Contract example: cameras at 0 (1200 s) and 300 s (810 s), board at 120 s (1320 s).
        let tracks = vec![
            track("ios", Kind::Camera, 0, 1_200_000),
            track("board", Kind::Whiteboard, 120_000, 1_320_000),
            track("pc", Kind::Camera, 300_000, 810_000),
        ];
        let (segments, _) = compute_layout(&tracks, 1_440_000);
        let bounds: Vec<(i64, i64)> = segments.iter().map(|s| (s.from_ms, s.to_ms)).collect();
        assert_eq!(
            bounds,
            [
                (0, 120_000),
                (120_000, 300_000),
                (300_000, 1_110_000),
                (1_110_000, 1_200_000),
                (1_200_000, 1_440_000)
            ]
        );
        assert!(segments[0].main.is_none());
        assert!(close(segments[0].tiles[0].x, 0.8));
        assert_eq!(segments[2].tiles.len(), 2);
        assert!(segments[4].tiles.is_empty());
        assert!(close(segments[4].main.as_ref().unwrap().w, 1.0));
    }

    #[test]
    fn mixed_video_is_full_canvas_without_tiles() {
        let tracks = vec![
            track("mix", Kind::Mixed, 0, 1000),
            track("c", Kind::Camera, 0, 1000),
        ];
        let (segments, _) = compute_layout(&tracks, 1000);
        assert_eq!(segments.len(), 1);
        let main = segments[0].main.as_ref().unwrap();
        assert_eq!((main.track_id.as_str(), main.w, main.h), ("mix", 1.0, 1.0));
        assert!(segments[0].tiles.is_empty());
    }

    #[test]
    fn empty_timeline_has_no_segments() {
        assert!(compute_layout(&[], 0).0.is_empty());
        let (segments, _) = compute_layout(&[], 500);
        assert_eq!(segments.len(), 1);
        assert!(segments[0].main.is_none() && segments[0].tiles.is_empty());
    }
}
