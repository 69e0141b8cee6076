//! Which VOD URLs may be fetched at all — the pure half of the URL guard,
//! part of the decision so that every command judges a message the same way.
//! Only http(s), only allowed hosts, and — unless explicitly allowed — never an
//! IP literal in a loopback, private, link-local (cloud metadata
//! 169.254.169.254), unspecified or multicast range. The addresses a host
//! *name* resolves to are checked at connect time by
//! [`crate::media::guard::GuardedResolver`], with [`UrlPolicy::check_ip`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
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

/// Why a URL as written cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlProblem {
    /// Not a usable URL as written (`invalid_field`): refused, not repaired.
    Malformed(String),
    /// A URL the policy forbids (`url_not_allowed`).
    NotAllowed(String),
}

impl std::fmt::Display for UrlProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlProblem::Malformed(why) | UrlProblem::NotAllowed(why) => f.write_str(why),
        }
    }
}

impl UrlPolicy {
    /// The canonical form of `raw`, checked: what a record carries and what
    /// is fetched, so that the record names exactly the URL that was judged.
    ///
    /// Repaired (the canonical form differs from the text, harmlessly): the
    /// case of scheme and host, `http:host/path` without slashes, default
    /// ports, percent-encoding of characters a URL cannot hold. Refused:
    /// control characters, whitespace and backslashes anywhere (parsers
    /// disagree about them: a header injection or a different host for a
    /// consumer that reads the text its own way), user names and passwords.
    pub fn canonical(&self, raw: &str) -> Result<Url, UrlProblem> {
        if let Some(c) = raw
            .chars()
            .find(|c| c.is_control() || c.is_whitespace() || *c == '\\')
        {
            return Err(UrlProblem::Malformed(format!(
                "contains {c:?}: control characters, whitespace and backslashes are refused, not repaired"
            )));
        }
        let url = Url::parse(raw).map_err(|e| UrlProblem::Malformed(format!("not a URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlProblem::NotAllowed(
                "a user name or password in a VOD URL is refused".into(),
            ));
        }
        self.check(&url).map_err(UrlProblem::NotAllowed)?;
        Ok(url)
    }

    /// [`canonical`](Self::canonical), for callers that only need the reason:
    /// every request and redirect hop of the fetcher.
    pub fn check_str(&self, raw: &str) -> Result<Url, String> {
        self.canonical(raw).map_err(|e| e.to_string())
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

/// IPv4 networks that are not globally reachable: the IANA IPv4
/// Special-Purpose Address Registry (RFC 6890 and its updates), plus
/// multicast and the reserved 240.0.0.0/4.
const NOT_GLOBAL_V4: &[&str] = &[
    "0.0.0.0/8",       // "this network"
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // shared address space (carrier-grade NAT)
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local (cloud metadata 169.254.169.254)
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation
    "192.88.99.0/24",  // 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation
    "203.0.113.0/24",  // documentation
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and the limited broadcast address
];

/// IPv6 networks that are not globally reachable (the IANA IPv6
/// Special-Purpose Address Registry), plus multicast. Networks that embed an
/// IPv4 address are judged by that address instead, see [`embedded_v4`].
const NOT_GLOBAL_V6: &[&str] = &[
    "::/128",         // unspecified
    "::1/128",        // loopback
    "64:ff9b:1::/48", // local-use IPv4/IPv6 translation
    "100::/64",       // discard-only
    "2001::/23",      // IETF protocol assignments (Teredo included)
    "2001:db8::/32",  // documentation
    "3fff::/20",      // documentation
    "5f00::/16",      // segment routing SIDs
    "fc00::/7",       // unique local
    "fe80::/10",      // link-local
    "ff00::/8",       // multicast
];

/// The IPv4 address an IPv6 address carries, for the forms that reach an
/// IPv4 host: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`,
/// deprecated), NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

/// Is `ip` a globally reachable unicast address?
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            // `::` and `::1` are IPv4-compatible in form: judge them as IPv6.
            Some(v4) if !v6.is_unspecified() && !v6.is_loopback() => is_public_v4(v4),
            _ => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    !NOT_GLOBAL_V4.iter().any(|net| {
        net.parse::<Ipv4Net>()
            .expect("a valid network")
            .contains(&ip)
    })
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    !NOT_GLOBAL_V6.iter().any(|net| {
        net.parse::<Ipv6Net>()
            .expect("a valid network")
            .contains(&ip)
    })
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
            // Forms that embed a private IPv4 address, and special ranges.
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.0.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.0.1",
            "255.255.255.255",
            "64:ff9b:1::1",
            "2001:db8::1",
            "::",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "119.29.29.29",
            "2400:da00::6666",
            // The same forms around a public IPv4 address are public.
            "64:ff9b::1.1.1.1",
            "2002:0101:0101::1",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
