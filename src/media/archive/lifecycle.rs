//! The bucket's lifecycle rules: the backstop for what no later attempt
//! cleans — uploads nobody finished (a lesson parked after its worker died)
//! and stale journal entries.

use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, ExpirationStatus,
    LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
};

use crate::media::archive::Archiver;
use crate::media::archive::keys::DEFAULT_PREFIX;
use crate::media::archive::orphans::JOURNAL;
use crate::media::s3_error::S3Error;

/// The lifecycle rule that aborts uploads nobody finished.
pub const LIFECYCLE_RULE: &str = "lesson-replay-abort-incomplete-uploads";
/// The lifecycle rule that expires stale journal entries.
pub const JOURNAL_RULE: &str = "lesson-replay-expire-upload-journal";
/// Journal entries older than this are stale (their uploads long aborted).
const JOURNAL_EXPIRY_DAYS: i32 = 7;

/// The ids of the two rules of `prefix`: the plain ids for the default
/// prefix, each with `:<prefix>` for any other, so that two apps sharing a
/// bucket under their own prefixes each keep their rules.
pub fn rule_ids(prefix: &str) -> (String, String) {
    if prefix == DEFAULT_PREFIX {
        (LIFECYCLE_RULE.to_owned(), JOURNAL_RULE.to_owned())
    } else {
        (
            format!("{LIFECYCLE_RULE}:{prefix}"),
            format!("{JOURNAL_RULE}:{prefix}"),
        )
    }
}

impl Archiver {
    /// Put the two rules of this archiver's prefix in the bucket's lifecycle
    /// configuration — abort uploads unfinished after `days`, expire the
    /// journal — replacing earlier versions of them and keeping every other
    /// rule. Returns the rule ids now in the bucket.
    pub async fn apply_lifecycle(&self, days: i32) -> Result<Vec<String>, S3Error> {
        let current = self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await;
        let mut rules: Vec<LifecycleRule> = match current {
            Ok(c) => c.rules().to_vec(),
            // No configuration yet: the usual answer of a bucket without rules.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Vec::new(),
            Err(e) => Err(S3Error::from_sdk("reading the bucket's lifecycle rules", e))?,
        };
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let (abort_id, journal_id) = rule_ids(&self.prefix);
        // Ours: this prefix's two rules, by id, or by the plain ids with this
        // prefix's filter (as written before ids carried the prefix). The
        // rules of another prefix in the same bucket (another app's) stay.
        let journal_prefix = format!("{prefix}{JOURNAL}/");
        rules.retain(|r| {
            let id = r.id().unwrap_or_default();
            let filtered = r.filter().and_then(|f| f.prefix()).unwrap_or_default();
            let ours = id == abort_id
                || id == journal_id
                || (id == LIFECYCLE_RULE && filtered == prefix)
                || (id == JOURNAL_RULE && filtered == journal_prefix);
            !ours
        });
        let rule = |id: &str, prefix: String| {
            LifecycleRule::builder()
                .id(id)
                .status(ExpirationStatus::Enabled)
                .filter(LifecycleRuleFilter::builder().prefix(prefix).build())
        };
        let abort = AbortIncompleteMultipartUpload::builder()
            .days_after_initiation(days)
            .build();
        rules.push(
            rule(&abort_id, prefix.clone())
                .abort_incomplete_multipart_upload(abort)
                .build()
                .map_err(|e| S3Error::protocol("building the lifecycle rule", e.to_string()))?,
        );
        let expiry = LifecycleExpiration::builder()
            .days(JOURNAL_EXPIRY_DAYS)
            .build();
        rules.push(
            rule(&journal_id, journal_prefix)
                .expiration(expiry)
                .build()
                .map_err(|e| S3Error::protocol("building the lifecycle rule", e.to_string()))?,
        );
        let ids = rules
            .iter()
            .filter_map(|r| r.id().map(str::to_owned))
            .collect();
        let configuration = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| S3Error::protocol("building the lifecycle rules", e.to_string()))?;
        self.client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .lifecycle_configuration(configuration)
            .send()
            .await
            .map_err(|e| S3Error::from_sdk("writing the bucket's lifecycle rules", e))?;
        Ok(ids)
    }
}
