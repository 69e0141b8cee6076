//! The media edge: the VOD files over HTTP and their copies in S3.
//! [`enrich::Media`] is what the worker calls; it uses [`fetch`] (behind the
//! [`guard`]), [`probe`] and [`archive`] (the transfer pipeline, the upload,
//! the worker's memory budget of part buffers), whose store failures
//! [`s3_error`] classifies once.

pub mod archive;
pub mod enrich;
pub mod fetch;
pub mod guard;
pub mod probe;
pub mod s3_error;
