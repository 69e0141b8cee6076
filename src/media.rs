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
use crate::record::{Archive, Probe, Record, Track, Warning};
use futures_util::StreamExt;

/// Tracks of one recording probed at once.
const PARALLEL_PROBES: usize = 4;

/// What checking one track against its file found.
#[derive(Debug, Default)]
struct Checked {
    archive: Option<Archive>,
    probe: Option<Result<Probe, String>>,
    warning: Option<Warning>,
}

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
            self.fetcher.check_url(&track.source_url).map_err(|e| {
                Rejection::new(e.reason(), format!("track {}: {e}", track.track_id))
            })?;
        }
        if self.archiver.is_none() && !self.probe {
            return Ok(());
        }
        // Probes of one recording's tracks run side by side; archives one at a
        // time, so that memory stays at about one upload part per message.
        let tracks = normalized.record.tracks.clone();
        let checked: Vec<Result<Checked, FetchError>> = match &self.archiver {
            Some(archiver) => {
                let mut out = Vec::with_capacity(tracks.len());
                for track in &tracks {
                    let stage = self.metrics.stage_timer("archive");
                    out.push(
                        self.archive_track(archiver, &normalized.record, track)
                            .await,
                    );
                    stage.observe_duration();
                }
                out
            }
            None => {
                let stage = self.metrics.stage_timer("probe");
                let probes: Vec<_> = tracks.iter().map(|t| self.probe_track(t)).collect();
                let out = futures_util::stream::iter(probes)
                    .buffered(PARALLEL_PROBES)
                    .collect()
                    .await;
                stage.observe_duration();
                out
            }
        };
        for (index, (track, result)) in tracks.iter().zip(checked).enumerate() {
            let checked = result.map_err(|e| {
                Rejection::new(e.reason(), format!("track {}: {e}", track.track_id))
            })?;
            normalized.record.tracks[index].archive = checked.archive;
            normalized.record.warnings.extend(checked.warning);
            match checked.probe {
                Some(Ok(probe)) => normalized.apply_probe(index, probe),
                Some(Err(why)) => normalized.record.warnings.push(Warning::new(
                    "probe_failed",
                    format!("track {}: not probed: {why}", track.track_id),
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
    async fn probe_track(&self, track: &Track) -> Result<Checked, FetchError> {
        if !self.probe {
            return Ok(Checked::default());
        }
        let probe_once = || self.fetcher.probe_by_ranges(&track.source_url);
        let read = probe_once
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(FetchError::is_transient)
            .notify(|e, wait| warn!(track = %track.track_id, error = %e, ?wait, "probe failed, retrying"))
            .await?;
        info!(track = %track.track_id, bytes_read = read.bytes_read, requests = read.requests, "probed by range reads");
        let warning = match (read.total_size, track.size_bytes) {
            (Some(real), Some(declared)) if i64::try_from(real).ok() != Some(declared) => {
                Some(Warning::new(
                    "size_mismatch",
                    format!(
                        "track {}: the file has {real} bytes, video_size declares {declared}",
                        track.track_id
                    ),
                ))
            }
            _ => None,
        };
        Ok(Checked {
            archive: None,
            probe: Some(read.probe),
            warning,
        })
    }

    /// Archive one track (or find it archived already), with retries.
    async fn archive_track(
        &self,
        archiver: &Archiver,
        record: &Record,
        track: &Track,
    ) -> Result<Checked, FetchError> {
        let key = archiver.track_key(record, track);
        let sink_error = |e: ArchiveError| FetchError::Sink(e.0);
        if let Some((archive, probe)) = archiver
            .existing(&key, track.size_bytes)
            .await
            .map_err(sink_error)?
        {
            info!(track = %track.track_id, %key, "already archived: upload skipped");
            self.metrics.uploads_skipped.inc();
            let mut checked = match probe {
                Some(p) => Checked {
                    probe: Some(Ok(p)),
                    ..Checked::default()
                },
                None => self.probe_track(track).await?,
            };
            checked.archive = Some(archive);
            return Ok(checked);
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
        Ok(Checked {
            archive: Some(archive),
            probe: Some(download.probe),
            warning: None,
        })
    }
}
