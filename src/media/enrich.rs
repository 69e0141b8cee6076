//! Media: the I/O stage between the decision and the publish. Every track of a
//! record is checked against its real file — probed by range reads, or, when
//! archiving, streamed into the bucket and probed on the way — and the record
//! is updated with what was found.

use std::collections::HashMap;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use futures_util::StreamExt;

use crate::decision::normalize::Normalized;
use crate::decision::reason::Rejection;
use crate::decision::record::{Archive, Probe, Record, Track, Warning};
use crate::decision::warning::WarningCode;
use crate::media::archive::budget::PartBudget;
use crate::media::archive::{ArchiveSettings, Archiver, transfer};
use crate::media::fetch::{Download, FetchError, FetchSettings, Fetcher};
use crate::media::s3_error::S3Error;
use crate::telemetry::metrics::{Metrics, Stage};

/// Where each app's lessons are archived: the default destination and one
/// per app with a table of its own, every one drawing its part buffers from
/// the worker's one memory budget.
struct Destinations {
    default: Option<Archiver>,
    apps: HashMap<i64, Option<Archiver>>,
}

impl Destinations {
    /// Build each destination and check them all side by side (start-up
    /// waits for the slowest store, not for the sum). The default one stops
    /// the worker when unusable (as it always has); an app's only warns:
    /// that app's lessons are parked with the store's reason while every
    /// other app is served.
    async fn new(settings: &MediaSettings, metrics: &Metrics) -> Result<Destinations, S3Error> {
        let app_settings = settings.apps.iter().filter_map(|(_, a)| a.as_ref());
        let Some(first) = settings.archive.iter().chain(app_settings).next() else {
            return Ok(Destinations {
                default: None,
                apps: HashMap::new(),
            });
        };
        // The transfer settings are the worker's: the same in every destination.
        let budget = PartBudget::new(first.part_size, first.memory_bytes, Some(metrics.clone()));
        let build = async |archive: &ArchiveSettings, app: Option<i64>| {
            Archiver::for_app(archive, metrics.clone(), budget.clone(), app).await
        };
        let default = match &settings.archive {
            Some(archive) => Some(build(archive, None).await),
            None => None,
        };
        let mut apps = HashMap::new();
        for (app, archive) in &settings.apps {
            let archiver = match archive {
                Some(archive) => Some(build(archive, Some(*app)).await),
                None => None,
            };
            apps.insert(*app, archiver);
        }
        let app_checks = apps.iter().filter_map(|(app, archiver)| {
            let archiver = archiver.as_ref()?;
            Some(async move { (*app, archiver, archiver.check().await) })
        });
        let default_check = async {
            match &default {
                Some(archiver) => archiver.check().await,
                None => Ok(()),
            }
        };
        let (default_checked, apps_checked) =
            tokio::join!(default_check, futures_util::future::join_all(app_checks));
        for (app, archiver, checked) in apps_checked {
            match checked {
                Ok(()) => info!(
                    sdkappid = app,
                    bucket = archiver.bucket(),
                    "app archives to S3"
                ),
                Err(e) => error!(sdkappid = app, bucket = archiver.bucket(), error = %e,
                    "the app's bucket is not usable: its lessons are parked until it is (docs/operations.md)"),
            }
        }
        default_checked?;
        if let Some(archiver) = &default {
            info!(bucket = archiver.bucket(), "archiving to S3");
        }
        Ok(Destinations { default, apps })
    }

    /// The destination of app `sdkappid`'s lessons (`None`: not archived).
    fn of(&self, sdkappid: Option<i64>) -> Option<&Archiver> {
        match sdkappid.and_then(|app| self.apps.get(&app)) {
            Some(own) => own.as_ref(),
            None => self.default.as_ref(),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Archiver> {
        self.default.iter().chain(self.apps.values().flatten())
    }
}

/// Tracks of one recording probed at once.
const PARALLEL_PROBES: usize = 4;

/// What checking one track against its file found.
#[derive(Debug, Default)]
struct Checked {
    archive: Option<Archive>,
    probe: Option<Result<Probe, String>>,
    warning: Option<Warning>,
    /// This attempt uploaded the copy (it was not in the bucket already).
    uploaded: bool,
}

/// What one attempt at archiving a track came to.
enum Copied {
    /// This attempt uploaded the copy.
    Uploaded(Archive, Download),
    /// The copy was already in place (another delivery finished it first).
    Found(Checked),
}

/// How tracks are checked: built from the settings by `config::parts`.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    pub fetch: FetchSettings,
    /// The default destination (apps without a table of their own, messages
    /// without an app); `None`: archiving is off for them.
    pub archive: Option<ArchiveSettings>,
    /// Each app with a table of its own, and its destination (`None`: that
    /// app does not archive).
    pub apps: Vec<(i64, Option<ArchiveSettings>)>,
    /// Probe every track's MP4 for its real duration and picture size.
    pub probe: bool,
    /// Tracks of one lesson archived side by side.
    pub parallel_tracks: usize,
    /// Attempts per file within one delivery.
    pub attempts: usize,
    /// Longest total backoff of one stage's in-process retries.
    pub budget: Duration,
}

/// Why the media edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("HTTP client: {0}")]
    Http(#[from] FetchError),
    #[error("archive: {0}")]
    Archive(#[from] S3Error),
}

pub struct Media {
    fetcher: Fetcher,
    destinations: Destinations,
    probe: bool,
    parallel_tracks: usize,
    attempts: usize,
    /// Longest total backoff of one stage's in-process retries.
    budget: Duration,
    metrics: Metrics,
}

impl Media {
    /// Build from the settings and check the bucket once: a wrong bucket or
    /// wrong credentials stop the worker at start-up with a clear message.
    pub async fn new(settings: MediaSettings, metrics: Metrics) -> Result<Media, MediaError> {
        let destinations = Destinations::new(&settings, &metrics).await?;
        let fetcher = Fetcher::new(settings.fetch, metrics.clone())?;
        Ok(Media {
            fetcher,
            destinations,
            probe: settings.probe,
            parallel_tracks: settings.parallel_tracks.max(1),
            attempts: settings.attempts,
            budget: settings.budget,
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
        let waits = self.destinations.all().map(|a| a.wait_for_cleanup(limit));
        futures_util::future::join_all(waits).await;
    }

    /// Every part deadline until `stop`, abort the uploads the journals of
    /// every destination hold whose owners are gone (killed workers, whose
    /// lessons may never come back). The first sweep comes one period after
    /// start-up: a lease a killed predecessor held runs that long anyway.
    pub async fn sweep_journals(&self, stop: CancellationToken) {
        let Some(every) = self.destinations.all().map(Archiver::sweep_every).min() else {
            return;
        };
        loop {
            // Workers started together drift apart: their sweeps seldom meet.
            let jitter = every.mul_f64(fastrand::f64() / 4.0);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every + jitter) => {}
            }
            let sweeps = self.destinations.all().map(Archiver::sweep_journal);
            tokio::select! {
                () = stop.cancelled() => return,
                _ = futures_util::future::join_all(sweeps) => {}
            }
        }
    }

    /// Whether the lesson of `record` already has its record, as far as this
    /// worker can know: its `manifest.json` is in the archive. `None` without
    /// archiving, or when the store cannot say.
    pub async fn recorded(&self, record: &Record) -> Option<bool> {
        let archiver = self.destinations.of(record.sdkappid)?;
        let key = archiver.manifest_key(record);
        match archiver.exists(&key).await {
            Ok(found) => Some(found),
            Err(e) => {
                warn!(%key, error = %e, "cannot tell whether the lesson has its record");
                None
            }
        }
    }

    /// Probe and (when on) archive every track, then write the manifest.
    pub async fn enrich(&self, normalized: &mut Normalized) -> Result<(), Rejection> {
        // The decision has refused URLs the policy forbids; the fetcher
        // checks each again before every request and redirect hop.
        let archiver = self.destinations.of(normalized.record.sdkappid);
        if archiver.is_none() && !self.probe {
            return Ok(());
        }
        // The tracks of one recording are checked side by side: probes, or
        // archives within the worker's memory budget of part buffers.
        let tracks = normalized.record.tracks.clone();
        let checked: Vec<Result<Checked, FetchError>> = match archiver {
            Some(archiver) => {
                let stage = self.metrics.stage_timer(Stage::Archive);
                let out = self
                    .archive_tracks(archiver, &normalized.record, &tracks)
                    .await;
                stage.observe_duration();
                out
            }
            None => {
                let stage = self.metrics.stage_timer(Stage::Probe);
                let probes: Vec<_> = tracks.iter().map(|t| self.probe_track(t)).collect();
                let out = futures_util::stream::iter(probes)
                    .buffered(PARALLEL_PROBES)
                    .collect()
                    .await;
                stage.observe_duration();
                out
            }
        };
        // A failure for good decides the lesson's reason before any other.
        let permanent = checked
            .iter()
            .position(|r| r.as_ref().is_err_and(|e| !e.is_transient()));
        if let Some(Err(e)) = permanent.map(|i| &checked[i]) {
            let track = &tracks[permanent.expect("found")].track_id;
            return Err(Rejection::new(e.reason(), format!("track {track}: {e}")));
        }
        for (index, (track, result)) in tracks.iter().zip(checked).enumerate() {
            let checked = result.map_err(|e| {
                Rejection::new(e.reason(), format!("track {}: {e}", track.track_id))
            })?;
            normalized.record.tracks[index].archive = checked.archive;
            normalized.record.warnings.extend(checked.warning);
            match checked.probe {
                Some(Ok(probe)) => normalized.apply_probe(index, probe),
                Some(Err(why)) => normalized.record.warnings.push(
                    Warning::new(
                        WarningCode::ProbeFailed,
                        format!("track {}: not probed: {why}", track.track_id),
                    )
                    .on_track(&track.track_id),
                ),
                None => {}
            }
        }
        normalized.relayout();
        if let Some(archiver) = archiver {
            let put = || archiver.put_manifest(&normalized.record);
            let key = put
                .retry(self.backoff())
                .sleep(tokio::time::sleep)
                .when(S3Error::is_transient)
                .await
                .map_err(|e| Rejection::new(e.reason(), format!("manifest: {e}")))?;
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
        // Per track, so at debug: the `published` line and the probe metrics
        // say the same per record at `info`.
        debug!(track = %track.track_id, bytes_read = read.bytes_read, requests = read.requests, "probed by range reads");
        let warning = match (read.total_size, track.size_bytes) {
            (Some(real), Some(declared)) if i64::try_from(real).ok() != Some(declared) => Some(
                Warning::new(
                    WarningCode::SizeMismatch,
                    format!(
                        "track {}: the file has {real} bytes, video_size declares {declared}",
                        track.track_id
                    ),
                )
                .on_track(&track.track_id),
            ),
            _ => None,
        };
        Ok(Checked {
            archive: None,
            probe: Some(read.probe),
            warning,
            uploaded: false,
        })
    }

    /// Archive the tracks side by side. The first that fails for good stops
    /// the others (their uploads aborted as they drop) and deletes what this
    /// attempt uploaded: the lesson is parked, and nothing would name those
    /// copies. A transient failure lets the others finish: the next attempt
    /// finds them archived.
    async fn archive_tracks(
        &self,
        archiver: &Archiver,
        record: &Record,
        tracks: &[Track],
    ) -> Vec<Result<Checked, FetchError>> {
        let each: Vec<_> = (0..tracks.len())
            .map(|index| self.archive_nth(archiver, record, tracks, index))
            .collect();
        let mut running = futures_util::stream::iter(each).buffer_unordered(self.parallel_tracks);
        let mut out: Vec<Option<Result<Checked, FetchError>>> =
            tracks.iter().map(|_| None).collect();
        let mut failed = None;
        while let Some((index, result)) = running.next().await {
            if let Err(e) = &result
                && !e.is_transient()
            {
                failed = Some(index);
                out[index] = Some(result);
                break;
            }
            out[index] = Some(result);
        }
        drop(running);
        if let Some(index) = failed {
            // What this attempt uploaded, and what the tracks stopped half-way
            // may have completed as they were dropped (a completion or a
            // single PUT already sent): not what an earlier attempt left.
            let failing = &tracks[index].track_id;
            for (track, result) in tracks.iter().zip(&out) {
                let found_before = matches!(result, Some(Ok(c)) if !c.uploaded);
                if found_before || track.track_id == *failing {
                    continue;
                }
                let key = archiver.track_key(record, track);
                match archiver.delete_archived(&key).await {
                    Ok(()) => info!(%key, track = %failing, "deleted: the lesson failed for good"),
                    Err(e) => warn!(%key, error = %e, "could not delete a copy of a failed lesson"),
                }
            }
        }
        out.into_iter()
            .zip(tracks)
            .map(|(result, track)| {
                result.unwrap_or_else(|| {
                    Err(FetchError::Cancelled(format!(
                        "track {}: stopped, another track failed",
                        track.track_id
                    )))
                })
            })
            .collect()
    }

    /// The store refused this attempt's upload: was it overtaken? No sweep
    /// aborts an upload under a live lease, but one whose renewals failed
    /// long enough may be aborted by another delivery that finished the key
    /// first; the next part or completion of this one is then refused —
    /// `NoSuchUpload` on S3 and MinIO, `403` on some stores, a connection
    /// cut mid-part on others. When the
    /// copy is in place, whole (its size and its MD5 known), the track is
    /// archived: the lesson goes on, with neither a parking nor a second
    /// upload. Otherwise the refusal stands (retried or parked by its kind).
    async fn overtaken(
        &self,
        archiver: &Archiver,
        key: &str,
        track: &Track,
        refused: S3Error,
    ) -> Result<Copied, FetchError> {
        match archiver.existing(key, track.size_bytes).await {
            Ok(Some((archive, probe))) => {
                info!(track = %track.track_id, %key, refused = %refused,
                    "the upload was refused, but the copy is in place (another delivery finished it first)");
                Ok(Copied::Found(self.in_place(track, archive, probe).await?))
            }
            _ => Err(FetchError::Sink(refused)),
        }
    }

    /// A track whose copy is in the bucket already: its probe from the
    /// copy's record, else probed by range reads.
    async fn in_place(
        &self,
        track: &Track,
        archive: Archive,
        probe: Option<Probe>,
    ) -> Result<Checked, FetchError> {
        let mut checked = match probe {
            Some(p) => Checked {
                probe: Some(Ok(p)),
                ..Checked::default()
            },
            None => self.probe_track(track).await?,
        };
        checked.archive = Some(archive);
        Ok(checked)
    }

    /// Track `index`, archived, with its index (they finish in any order).
    async fn archive_nth(
        &self,
        archiver: &Archiver,
        record: &Record,
        tracks: &[Track],
        index: usize,
    ) -> (usize, Result<Checked, FetchError>) {
        (
            index,
            self.archive_track(archiver, record, &tracks[index]).await,
        )
    }

    /// Archive one track (or find it archived already), with retries.
    async fn archive_track(
        &self,
        archiver: &Archiver,
        record: &Record,
        track: &Track,
    ) -> Result<Checked, FetchError> {
        let key = archiver.track_key(record, track);
        if let Some((archive, probe)) = archiver.existing(&key, track.size_bytes).await? {
            info!(track = %track.track_id, %key, "already archived: upload skipped");
            self.metrics.upload_skipped();
            archiver.abort_orphans(&key).await;
            return self.in_place(track, archive, probe).await;
        }
        let archive_once = || async {
            let mut upload = archiver.upload(key.clone());
            match transfer::copy(
                &self.fetcher,
                &track.source_url,
                track.size_bytes,
                &mut upload,
            )
            .await
            {
                Ok(download) => {
                    let probe = download.probe.as_ref().ok();
                    match upload.finish(&download.md5, probe).await {
                        Ok(archive) => Ok(Copied::Uploaded(archive, download)),
                        Err(refused) => self.overtaken(archiver, &key, track, refused).await,
                    }
                }
                Err(FetchError::Sink(refused)) => {
                    upload.abort().await;
                    self.overtaken(archiver, &key, track, refused).await
                }
                Err(e) => {
                    upload.abort().await;
                    Err(e)
                }
            }
        };
        let copied = archive_once
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(FetchError::is_transient)
            .notify(|e, wait| warn!(track = %track.track_id, error = %e, ?wait, "archive failed, retrying"))
            .await?;
        let (archive, download) = match copied {
            Copied::Uploaded(archive, download) => (archive, download),
            Copied::Found(checked) => return Ok(checked),
        };
        archiver.abort_orphans(&key).await;
        info!(
            track = %track.track_id, %key, bytes = download.size, transferred = download.transferred,
            resumes = download.resumes, "archived"
        );
        Ok(Checked {
            archive: Some(archive),
            probe: Some(download.probe),
            warning: None,
            uploaded: true,
        })
    }
}
