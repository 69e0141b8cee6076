//! The replay page: one self-contained HTML file (CSS and script inline, no
//! network but the videos) that plays a record with its layout.
//! [`page::render`] builds it; `lesson-replay preview` and the archiver
//! (`index.html` beside `manifest.json`) write it.

pub mod page;
