//! Media: the I/O stage between the decision and the publish. Every track of a
//! record is checked against its real file — probed by range reads, or, when
//! archiving, streamed into the bucket and probed on the way — and the record
//! is updated with what was found.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tracing::{info, warn};

use crate::archive::{ArchiveError, Archiver};
use crate::config::Config;
use crate::fetch::{Download, FetchError, Fetcher};
use crate::metrics::Metrics;
use crate::normalize::Normalized;
use crate::reason::{ReasonCode, Rejection};
use crate::record::{Archive, Probe, Warning};

pub struct Media {
    fetcher: Fetcher,
    archiver: Option<Archiver>,
    probe: bool,
    attempts: usize,
    /// Longest total backoff of one stage's in-process retries.
    budget: Duration,
    metrics: Metrics,
}

impl Media {
    /// Build from the settings and check the bucket once: a wrong bucket or
    /// wrong credentials stop the worker at start-up with a clear message.
    pub async fn from_config(config: &Config, metrics: Metrics) -> Result<Media, String> {
        let fetcher =
            Fetcher::new(config.fetch_settings(), metrics.clone()).map_err(|e| e.to_string())?;
        let archiver = Archiver::from_config(config, metrics.clone())
            .await
            .map_err(|e| e.to_string())?;
        if let Some(archiver) = &archiver {
            archiver.check().await.map_err(|e| e.to_string())?;
            info!(bucket = archiver.bucket(), "archiving to S3");
        }
        Ok(Media {
            fetcher,
            archiver,
            probe: config.probe,
            attempts: config.fetch_attempts,
            budget: Duration::from_secs(config.stage_budget_secs),
            metrics,
        })
    }

    /// Quick attempts with exponential backoff and jitter, within one delivery.
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.attempts.saturating_sub(1))
            .with_total_delay(Some(self.budget))
            .with_jitter()
    }

    /// Wait (at most `limit`) for uploads cut short to be aborted.
    pub async fn wait_for_cleanup(&self, limit: Duration) {
        if let Some(archiver) = &self.archiver {
            archiver.wait_for_cleanup(limit).await;
        }
    }

    /// Probe and (when on) archive every track, then write the manifest.
    pub async fn enrich(&self, normalized: &mut Normalized) -> Result<(), Rejection> {
        // Records only ever point at allowed hosts, fetched or not.
        for track in &normalized.record.tracks {
            self.fetcher
                .check_url_syntax(&track.source_url)
                .map_err(|e| {
                    Rejection::new(e.reason(), format!("track {}: {e}", track.track_id))
                })?;
        }
        if self.archiver.is_none() && !self.probe {
            return Ok(());
        }
        for index in 0..normalized.record.tracks.len() {
            let track_id = normalized.record.tracks[index].track_id.clone();
            let failed =
                |e: FetchError| Rejection::new(e.reason(), format!("track {track_id}: {e}"));
            let stage = self.metrics.stage_timer(if self.archiver.is_some() {
                "archive"
            } else {
                "probe"
            });
            let probe = match &self.archiver {
                Some(archiver) => {
                    let (archive, probe) = self
                        .archive_track(archiver, normalized, index)
                        .await
                        .map_err(failed)?;
                    normalized.record.tracks[index].archive = Some(archive);
                    probe
                }
                None => self.probe_track(normalized, index).await.map_err(failed)?,
            };
            stage.observe_duration();
            match probe {
                Some(Ok(probe)) => normalized.apply_probe(index, probe),
                Some(Err(why)) => normalized.record.warnings.push(Warning::new(
                    "probe_failed",
                    format!("track {track_id}: not probed: {why}"),
                )),
                None => {}
            }
        }
        normalized.relayout();
        if let Some(archiver) = &self.archiver {
            let put = || archiver.put_manifest(&normalized.record);
            let key = put
                .retry(self.backoff())
                .sleep(tokio::time::sleep)
                .await
                .map_err(|e: ArchiveError| {
                    Rejection::new(ReasonCode::ArchiveFailed, format!("manifest: {e}"))
                })?;
            info!(%key, "manifest written");
        }
        Ok(())
    }

    /// Probe one track by range reads, with retries.
    async fn probe_track(
        &self,
        normalized: &mut Normalized,
        index: usize,
    ) -> Result<Option<Result<Probe, String>>, FetchError> {
        if !self.probe {
            return Ok(None);
        }
        let track = &normalized.record.tracks[index];
        let probe_once = || self.fetcher.probe_by_ranges(&track.source_url);
        let read = probe_once
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(FetchError::is_transient)
            .notify(|e, wait| warn!(track = %track.track_id, error = %e, ?wait, "probe failed, retrying"))
            .await?;
        info!(track = %track.track_id, bytes_read = read.bytes_read, requests = read.requests, "probed by range reads");
        if let (Some(real), Some(declared)) = (read.total_size, track.size_bytes)
            && i64::try_from(real).ok() != Some(declared)
        {
            let message = format!(
                "track {}: the file has {real} bytes, video_size declares {declared}",
                track.track_id
            );
            normalized
                .record
                .warnings
                .push(Warning::new("size_mismatch", message));
        }
        Ok(Some(read.probe))
    }

    /// Archive one track (or find it archived already), with retries.
    async fn archive_track(
        &self,
        archiver: &Archiver,
        normalized: &Normalized,
        index: usize,
    ) -> Result<(Archive, Option<Result<Probe, String>>), FetchError> {
        let record = &normalized.record;
        let track = &record.tracks[index];
        let key = archiver.track_key(record, track);
        let sink_error = |e: ArchiveError| FetchError::Sink(e.0);
        if let Some((archive, probe)) = archiver
            .existing(&key, track.size_bytes)
            .await
            .map_err(sink_error)?
        {
            info!(track = %track.track_id, %key, "already archived: upload skipped");
            self.metrics.uploads_skipped.inc();
            let probe = match probe {
                Some(p) => Some(Ok(p)),
                None => self.probe_track(&mut normalized.clone(), index).await?,
            };
            return Ok((archive, probe));
        }
        let archive_once = || async {
            let mut upload = archiver.upload(key.clone());
            match self
                .fetcher
                .download(&track.source_url, track.size_bytes, &mut upload)
                .await
            {
                Ok(download) => {
                    let probe = download.probe.as_ref().ok();
                    let archive = upload
                        .finish(&download.md5, probe)
                        .await
                        .map_err(sink_error)?;
                    Ok((archive, download))
                }
                Err(e) => {
                    upload.abort().await;
                    Err(e)
                }
            }
        };
        let (archive, download): (Archive, Download) = archive_once
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(FetchError::is_transient)
            .notify(|e, wait| warn!(track = %track.track_id, error = %e, ?wait, "archive failed, retrying"))
            .await?;
        info!(
            track = %track.track_id, %key, bytes = download.size, transferred = download.transferred,
            resumes = download.resumes, "archived"
        );
        Ok((archive, Some(download.probe)))
    }
}
