//! The VOD URL guard at the network: the worker fetches URLs taken from
//! messages, a server-side request forgery risk. [`UrlPolicy::check`] judges
//! scheme, host and IP literals before each request and on every redirect hop;
//! [`GuardedResolver`] drops the addresses a host name resolves to that the
//! policy refuses, when the HTTP client connects (so DNS rebinding cannot slip
//! past, and pooled connections cost no lookup).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::decision::url_policy::UrlPolicy;

/// A host name resolved only to refused addresses (kept in the error chain so
/// the fetcher can tell it from a DNS failure: this one is permanent).
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves to no allowed address")]
pub struct Refused(pub String);

/// A DNS resolver for reqwest that drops refused addresses.
pub struct GuardedResolver(pub Arc<UrlPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| policy.check_ip(a.ip()).is_ok())
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(Refused(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
