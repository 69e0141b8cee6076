//! Which VOD URLs may be fetched at all — the pure half of the URL guard,
//! part of the decision so that every command judges a message the same way.
//! Only http(s), only allowed hosts, and — unless explicitly allowed — never an
//! IP literal in a loopback, private, link-local (cloud metadata
//! 169.254.169.254), unspecified or multicast range. The addresses a host
//! *name* resolves to are checked at connect time by
//! [`crate::media::guard::GuardedResolver`], with [`UrlPolicy::check_ip`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// Where TIC's VOD files live: the default `vod_allowed_hosts`.
pub const TIC_VOD_HOSTS: &str = "*.vod2.myqcloud.com";

#[derive(Debug, Clone)]
pub struct UrlPolicy {
    /// Exact host names or `*.suffix` patterns (the suffix also matches itself).
    pub allowed_hosts: Vec<String>,
    pub allow_private_networks: bool,
}

impl Default for UrlPolicy {
    /// TIC's VOD hosts only, no private addresses: the defaults of the settings.
    fn default() -> Self {
        UrlPolicy {
            allowed_hosts: vec![TIC_VOD_HOSTS.to_owned()],
            allow_private_networks: false,
        }
    }
}

impl UrlPolicy {
    /// Parse `raw` and [`check`](Self::check) it: the one test every VOD URL
    /// of a message passes, in the decision and again before each request.
    pub fn check_str(&self, raw: &str) -> Result<Url, String> {
        let url = Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        self.check(&url)?;
        Ok(url)
    }

    /// Check scheme, host pattern and (for IP literals) the address.
    pub fn check(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme {:?} is not http or https", url.scheme()));
        }
        let host = url.host().ok_or("the URL has no host")?;
        let name = match &host {
            Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => ip.to_string(),
        };
        if !self
            .allowed_hosts
            .iter()
            .any(|pattern| host_matches(pattern, &name))
        {
            return Err(format!("host {name:?} is not in vod_allowed_hosts"));
        }
        match host {
            Host::Ipv4(ip) => self.check_ip(IpAddr::V4(ip)),
            Host::Ipv6(ip) => self.check_ip(IpAddr::V6(ip)),
            Host::Domain(_) => Ok(()),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        if self.allow_private_networks || is_public(ip) {
            Ok(())
        } else {
            Err(format!(
                "{ip} is a loopback, private, link-local, unspecified or multicast address"
            ))
        }
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host == suffix || host.ends_with(&format!(".{suffix}")),
        None => host == pattern,
    }
}

/// Is `ip` a globally routed unicast address?
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80) // link-local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(private: bool) -> UrlPolicy {
        UrlPolicy {
            allowed_hosts: vec![
                "*.vod2.myqcloud.com".into(),
                "127.0.0.1".into(),
                "169.254.169.254".into(),
            ],
            allow_private_networks: private,
        }
    }

    fn check(p: &UrlPolicy, url: &str) -> Result<(), String> {
        p.check(&Url::parse(url).unwrap())
    }

    #[test]
    fn only_allowed_hosts_pass() {
        let p = policy(false);
        assert!(check(&p, "http://1253488539.vod2.myqcloud.com/a.mp4").is_ok());
        assert!(check(&p, "https://VOD2.MYQCLOUD.COM./a.mp4").is_ok());
        assert!(check(&p, "http://evil.com/a.mp4").is_err());
        assert!(check(&p, "http://vod2.myqcloud.com.evil.com/a.mp4").is_err());
        assert!(check(&p, "http://evilvod2.myqcloud.com/a.mp4").is_err());
        assert!(check(&p, "ftp://1.vod2.myqcloud.com/a.mp4").is_err());
        assert!(check(&p, "file:///etc/passwd").is_err());
    }

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        assert!(check(&policy(false), "http://169.254.169.254/latest/meta-data/").is_err());
        assert!(check(&policy(false), "http://127.0.0.1:8080/a.mp4").is_err());
        assert!(check(&policy(true), "http://127.0.0.1:8080/a.mp4").is_ok());
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "119.29.29.29", "2400:da00::6666"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
