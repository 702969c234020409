//! The sink guard: a Subscription's sink (and `deadLetterSink`) cannot be turned against the
//! worker or the node it runs on (SSRF).
//!
//! Refused destinations, after unwrapping IPv4-mapped IPv6 (`::ffff:127.0.0.1` is 127.0.0.1):
//! - loopback: 127.0.0.0/8, `::1`;
//! - link-local: 169.254.0.0/16 (cloud metadata services live at 169.254.169.254), `fe80::/10`;
//! - unspecified: 0.0.0.0/8 (Linux connects 0.0.0.0 to the local host), `::`;
//! - the worker's own ingest and admin ports on any address of this host, always: with
//!   loopback allowed for local development, a sink at the worker's own admin API is still
//!   the attack.
//!
//! Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) stay allowed: in-cluster sinks live
//! there. [`SinkPolicy`] re-enables ranges on purpose (`--sink-allow-cidrs`, and
//! `--allow-loopback-sinks` for `weir run`).
//!
//! Where it is checked:
//! - validation ([`SinkPolicy::check_url`]): a sink URL whose host is a refused literal
//!   address or `localhost` is an invalid spec, naming the field;
//! - delivery, on the address actually connected to: names go through a resolver that drops
//!   refused addresses ([`resolve`]), so a DNS or `/etc/hosts` answer of 127.0.0.1 for a
//!   public-looking name (DNS rebinding) is refused too; literal addresses, which no resolver
//!   sees, are checked before the request ([`SinkGuard::check_url`]).
//!
//! A refused delivery is a permanent failure (code `refused`): retrying the same address
//! cannot help, so it dead-letters at once with the reason in `weirerrordata`.

mod resolve;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;

/// The flags named in refusals, where an operator turns a range back on.
const ALLOW_HINT: &str = "see --sink-allow-cidrs";
const LOOPBACK_HINT: &str =
    "see --sink-allow-cidrs, or --allow-loopback-sinks for local development";

/// What the operator allows beyond the default (everything but the refused classes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkPolicy {
    /// Loopback sinks allowed (`weir run --allow-loopback-sinks`, local development).
    pub allow_loopback: bool,
    /// Ranges allowed although their class is refused (`--sink-allow-cidrs`).
    pub allow: Vec<IpNet>,
}

/// Why an address is refused by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Loopback,
    LinkLocal,
    Unspecified,
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Class::Loopback => "loopback",
            Class::LinkLocal => "link-local",
            Class::Unspecified => "unspecified",
        })
    }
}

/// The refused class of `ip`, if any (IPv4-mapped addresses count as their IPv4 address).
pub fn classify(ip: IpAddr) -> Option<Class> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Class> {
    if ip.is_loopback() {
        Some(Class::Loopback)
    } else if ip.is_link_local() {
        Some(Class::LinkLocal)
    } else if ip.octets()[0] == 0 {
        // 0.0.0.0/8 is "this network"; a connect to 0.0.0.0 reaches the local host.
        Some(Class::Unspecified)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Class> {
    if ip.is_loopback() {
        Some(Class::Loopback)
    } else if ip.is_unicast_link_local() {
        Some(Class::LinkLocal)
    } else if ip.is_unspecified() {
        Some(Class::Unspecified)
    } else {
        None
    }
}

/// Why a sink address is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    Class(Class),
    /// The worker's own ingest or admin port on an address of this host.
    OwnPort(u16),
}

/// A refused sink address: the error of validation, of the resolver and of a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub ip: IpAddr,
    /// The name that resolved to `ip`, when the sink URL names a host.
    pub host: Option<String>,
    pub why: Why,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sink address {}", self.ip)?;
        if let Some(h) = &self.host {
            write!(f, " (resolved from {h})")?;
        }
        match &self.why {
            Why::Class(c @ Class::Loopback) => write!(f, " is {c}: refused ({LOOPBACK_HINT})"),
            Why::Class(c) => write!(f, " is {c}: refused ({ALLOW_HINT})"),
            Why::OwnPort(p) => write!(
                f,
                " port {p} is this worker's own ingest or admin port: refused (always)"
            ),
        }
    }
}

impl std::error::Error for Refused {}

impl SinkPolicy {
    /// `Err` when `ip` is of a refused class this policy does not allow.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        let ip = ip.to_canonical();
        let Some(class) = classify(ip) else {
            return Ok(());
        };
        let allowed = (class == Class::Loopback && self.allow_loopback)
            || self.allow.iter().any(|net| net.contains(&ip));
        if allowed {
            Ok(())
        } else {
            Err(Refused {
                ip,
                host: None,
                why: Why::Class(class),
            })
        }
    }

    /// Validation of a sink URL: `Err` (the reason) when its host is a refused literal address
    /// or a `localhost` name (RFC 6761: always loopback). Other names are checked when they
    /// are resolved, at delivery. A URL that does not parse is left to the URL checks.
    pub fn check_url(&self, uri: &str) -> Result<(), Refused> {
        let Ok(u) = url::Url::parse(uri) else {
            return Ok(());
        };
        match u.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(ip.into()),
            Some(url::Host::Ipv6(ip)) => self.check_ip(ip.into()),
            Some(url::Host::Domain(d)) if is_localhost(d) => self
                .check_ip(Ipv4Addr::LOCALHOST.into())
                .map_err(|r| Refused {
                    host: Some(d.to_string()),
                    ..r
                }),
            _ => Ok(()),
        }
    }

    /// Parses `--sink-allow-cidrs`: comma-separated CIDRs (a bare address is a single host).
    pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        format!("{p:?} is not a CIDR range (such as 10.1.0.0/16 or fd00::/8)")
                    })
            })
            .collect()
    }
}

/// `localhost` and `*.localhost`, which resolvers answer with loopback (RFC 6761).
fn is_localhost(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost")
}

/// Whether `ip` is an address of this host: loopback, unspecified, or one an interface holds.
/// Binding a socket to an address succeeds only for the host's own addresses, which spares
/// reading the interface table (and sees addresses added after start-up). On a host with
/// `ip_nonlocal_bind` set every bind succeeds: sinks on the worker's own ports are then refused
/// everywhere, the safe side.
fn is_own_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback()
        || ip.is_unspecified()
        || matches!(classify(ip), Some(Class::Unspecified))
        || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// The guard of one worker: its policy, its own listen ports, and the HTTP clients whose
/// resolver enforces both. One per process (the clients' connection pools are shared by every
/// subscription; see [`resolve`]).
pub struct SinkGuard {
    inner: Arc<Inner>,
    /// Built at first use: the client for sinks on any port but the worker's own.
    client: OnceLock<Result<reqwest::Client, String>>,
    /// One client per own port, for sinks on that port: their resolver also drops this
    /// host's own addresses (the resolver sees a name, never the port).
    own_clients: Vec<(u16, OnceLock<Result<reqwest::Client, String>>)>,
}

struct Inner {
    policy: SinkPolicy,
    own_ports: Vec<u16>,
}

impl Inner {
    /// The check of one connect target: `ip`, and the sink's `port` when it is known (a
    /// resolver sees only names; its client knows which own port, if any, its sinks use).
    fn check(&self, ip: IpAddr, port: Option<u16>) -> Result<(), Refused> {
        if let Some(p) = port.filter(|p| self.own_ports.contains(p))
            && is_own_address(ip)
        {
            return Err(Refused {
                ip: ip.to_canonical(),
                host: None,
                why: Why::OwnPort(p),
            });
        }
        self.policy.check_ip(ip)
    }
}

impl SinkGuard {
    /// A guard for a worker listening on `own_ports` (ingest and admin).
    pub fn new(policy: SinkPolicy, own_ports: &[u16]) -> Arc<SinkGuard> {
        let mut ports = own_ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        Arc::new(SinkGuard {
            own_clients: ports.iter().map(|p| (*p, OnceLock::new())).collect(),
            inner: Arc::new(Inner {
                policy,
                own_ports: ports,
            }),
            client: OnceLock::new(),
        })
    }

    pub fn policy(&self) -> &SinkPolicy {
        &self.inner.policy
    }

    /// The client for a sink on `port`.
    pub fn client(&self, port: Option<u16>) -> Result<reqwest::Client, String> {
        let (cell, own) = match self.own_clients.iter().find(|(p, _)| Some(*p) == port) {
            Some((p, cell)) => (cell, Some(*p)),
            None => (&self.client, None),
        };
        cell.get_or_init(|| resolve::client(self.inner.clone(), own))
            .clone()
    }

    /// The check of a sink URL before a request: its literal address (which no resolver
    /// sees), with its port. Names pass here and are checked by the client's resolver.
    pub fn check_url(&self, sink: &url::Url) -> Result<(), Refused> {
        let ip: IpAddr = match sink.host() {
            Some(url::Host::Ipv4(ip)) => ip.into(),
            Some(url::Host::Ipv6(ip)) => ip.into(),
            _ => return Ok(()),
        };
        self.inner.check(ip, sink.port_or_known_default())
    }
}

#[cfg(test)]
mod tests;
