//! What the bucket says about a lesson: its `manifest.json` and `index.html`,
//! and for each archived object a small record of what was uploaded.
//!
//! A multipart upload learns its MD5 only at the end, when the object's
//! metadata can no longer be set without copying the whole object onto
//! itself (a full server-side copy on S3: minutes for a multi-GB recording,
//! and impossible above 5 GiB). Instead the object's record — size, ETag,
//! MD5, probe — is written beside it as a small JSON object after the upload
//! completes. [`Archiver::existing`] reads it with the object's HEAD, side by
//! side: a redelivery finds any archived object, whatever its size, in one
//! round trip. An object whose ETag or size differs from its record (written
//! over by something else) is not trusted and is uploaded again. A small
//! file's single PUT carries the same facts as metadata, which an object
//! archived by an earlier version also has.

use std::collections::HashMap;

use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use serde::{Deserialize, Serialize};

use crate::decision::record::{Archive, Probe, Record};
use crate::media::archive::{Archiver, Observed, Timed};
use crate::media::s3_error::S3Error;
use crate::preview::page;
use crate::telemetry::metrics::S3Op;

/// Object metadata written with a single PUT.
const META_MD5: &str = "md5";
const META_DURATION: &str = "probe-duration-ms";
const META_WIDTH: &str = "probe-width";
const META_HEIGHT: &str = "probe-height";

/// What was uploaded to a key, as its object record holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub key: String,
    pub size_bytes: i64,
    pub etag: Option<String>,
    pub md5: String,
    pub probe: Option<Probe>,
}

impl Archiver {
    /// Write the lesson's replay page as `index.html`, then the record as
    /// its `manifest.json` (last: a manifest means the lesson is complete).
    /// The page plays the tracks by their keys relative to the folder, so
    /// the folder plays itself wherever the bucket is served over HTTP.
    pub async fn put_manifest(&self, record: &Record) -> Result<String, S3Error> {
        let folder = format!("{}/", self.lesson_folder(record));
        let relative = |key: &str| key.strip_prefix(&folder).map(str::to_owned);
        let page = page::render(record, &page::archive_sources(record, relative));
        self.put_small(
            &format!("{folder}index.html"),
            "text/html; charset=utf-8",
            page.into_bytes(),
        )
        .await?;
        let key = self.manifest_key(record);
        let body = serde_json::to_vec_pretty(record).expect("a record always serializes");
        self.put_small(&key, "application/json", body).await?;
        Ok(key)
    }

    /// Write `archive`'s object record (after its upload completed).
    pub(crate) async fn put_object_record(
        &self,
        archive: &Archive,
        probe: Option<&Probe>,
    ) -> Result<(), S3Error> {
        let record = ObjectRecord {
            key: archive.key.clone(),
            size_bytes: archive.size_bytes,
            etag: archive.etag.clone(),
            md5: archive.md5.clone(),
            probe: probe.cloned(),
        };
        let body = serde_json::to_vec(&record).expect("an object record always serializes");
        let key = self.object_record_key(&archive.key);
        self.put_small(&key, "application/json", body).await
    }

    /// Delete an archived object and its record (written by an attempt whose
    /// lesson then failed for good: nothing would ever name them).
    pub async fn delete_archived(&self, key: &str) -> Result<(), S3Error> {
        self.delete(&self.object_record_key(key)).await?;
        self.delete(key).await
    }

    /// The copy already in the bucket, when it has the expected size and its
    /// MD5 is known (its object record, or the metadata of a single PUT): a
    /// redelivery costs one round trip (a HEAD and a GET side by side), not
    /// an upload.
    pub async fn existing(
        &self,
        key: &str,
        expected_size: Option<i64>,
    ) -> Result<Option<(Archive, Option<Probe>)>, S3Error> {
        let (head, record) = tokio::try_join!(self.head(key), self.object_record(key))?;
        let Some(head) = head else {
            return Ok(None);
        };
        let size = head.content_length().unwrap_or(-1);
        if expected_size.is_some_and(|e| e != size) {
            return Ok(None);
        }
        let etag = head.e_tag().map(str::to_owned);
        let (md5, probe) = match (from_metadata(&head), record) {
            (Some(found), _) => found,
            // The record must describe this very object.
            (None, Some(r)) if r.size_bytes == size && r.etag == etag && r.md5.len() == 32 => {
                (r.md5, r.probe)
            }
            _ => return Ok(None),
        };
        let archive = self.archive(key, size as u64, &md5, etag.as_deref());
        Ok(Some((archive, probe)))
    }

    /// `key`'s object record; `None` when there is none (or it is unreadable:
    /// the object is then uploaded again).
    async fn object_record(&self, key: &str) -> Result<Option<ObjectRecord>, S3Error> {
        let record_key = self.object_record_key(key);
        let read = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&record_key)
            .send()
            .timed(self.metrics.s3_timer(S3Op::Get))
            .await;
        let object = match read {
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 404) =>
            {
                return Ok(None);
            }
            other => other.observed(&self.metrics, || format!("GET {record_key}"))?,
        };
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| S3Error::protocol(format!("GET {record_key}"), e.to_string()))?
            .into_bytes();
        match serde_json::from_slice::<ObjectRecord>(&body) {
            Ok(record) if record.key == key => Ok(Some(record)),
            _ => {
                tracing::warn!(%record_key, "unreadable object record: the object is uploaded again");
                Ok(None)
            }
        }
    }
}

/// The metadata a single PUT writes (or an earlier version's copy did).
pub(crate) fn metadata(md5: &str, probe: Option<&Probe>) -> HashMap<String, String> {
    let mut meta = HashMap::from([(META_MD5.to_owned(), md5.to_owned())]);
    if let Some(p) = probe {
        meta.insert(META_DURATION.to_owned(), p.duration_ms.to_string());
        if let Some(w) = p.width {
            meta.insert(META_WIDTH.to_owned(), w.to_string());
        }
        if let Some(h) = p.height {
            meta.insert(META_HEIGHT.to_owned(), h.to_string());
        }
    }
    meta
}

/// The MD5 (and probe) in an object's metadata, when it has them.
fn from_metadata(head: &HeadObjectOutput) -> Option<(String, Option<Probe>)> {
    let metadata = head.metadata()?;
    let md5 = metadata.get(META_MD5).filter(|m| m.len() == 32)?;
    let number = |name: &str| metadata.get(name).and_then(|v| v.parse::<i64>().ok());
    let probe = number(META_DURATION).map(|duration_ms| Probe {
        duration_ms,
        width: number(META_WIDTH).and_then(|v| u32::try_from(v).ok()),
        height: number(META_HEIGHT).and_then(|v| u32::try_from(v).ok()),
    });
    Some((md5.clone(), probe))
}
