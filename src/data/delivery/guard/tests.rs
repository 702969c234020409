//! The address classification and the policy, row by row.

use super::*;
use crate::data::tracecontext::Outgoing;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn addresses_are_classified() {
    use Class::*;
    let rows: [(&str, Option<Class>); 22] = [
        ("127.0.0.1", Some(Loopback)),
        ("127.255.1.2", Some(Loopback)),
        ("169.254.169.254", Some(LinkLocal)),
        ("169.254.0.1", Some(LinkLocal)),
        ("0.0.0.0", Some(Unspecified)),
        ("0.1.2.3", Some(Unspecified)),
        ("10.0.0.1", None),
        ("172.16.5.4", None),
        ("192.168.1.1", None),
        ("8.8.8.8", None),
        ("169.255.0.1", None),
        ("128.0.0.1", None),
        ("::1", Some(Loopback)),
        ("::", Some(Unspecified)),
        ("fe80::1", Some(LinkLocal)),
        ("febf::1", Some(LinkLocal)),
        ("fec0::1", None),
        ("fd00::1", None),
        ("2001:db8::1", None),
        // IPv4-mapped IPv6 is its IPv4 address.
        ("::ffff:127.0.0.1", Some(Loopback)),
        ("::ffff:169.254.169.254", Some(LinkLocal)),
        ("::ffff:10.0.0.1", None),
    ];
    for (addr, want) in rows {
        assert_eq!(classify(ip(addr)), want, "{addr}");
    }
    assert_eq!(classify(ip("::ffff:0.0.0.0")), Some(Unspecified));
}

#[test]
fn the_policy_allows_on_purpose_only() {
    let strict = SinkPolicy::default();
    let loopback = SinkPolicy {
        allow_loopback: true,
        allow: vec![],
    };
    let cidrs = SinkPolicy {
        allow_loopback: false,
        allow: SinkPolicy::parse_cidrs("169.254.169.0/24, ::1").unwrap(),
    };
    // (policy, address, allowed)
    let rows = [
        (&strict, "127.0.0.1", false),
        (&strict, "::ffff:127.0.0.1", false),
        (&strict, "10.0.0.1", true),
        (&strict, "192.168.0.10", true),
        (&strict, "169.254.169.254", false),
        (&loopback, "127.0.0.1", true),
        (&loopback, "::1", true),
        (&loopback, "::ffff:127.0.0.2", true),
        (&loopback, "169.254.169.254", false),
        (&loopback, "0.0.0.0", false),
        (&cidrs, "169.254.169.254", true),
        (&cidrs, "::ffff:169.254.169.254", true),
        (&cidrs, "169.254.1.1", false),
        (&cidrs, "::1", true),
        (&cidrs, "127.0.0.1", false),
    ];
    for (policy, addr, allowed) in rows {
        assert_eq!(
            policy.check_ip(ip(addr)).is_ok(),
            allowed,
            "{addr} under {policy:?}"
        );
    }
    let r = strict.check_ip(ip("::ffff:127.0.0.1")).unwrap_err();
    assert_eq!(
        r.to_string(),
        "sink address 127.0.0.1 is loopback: refused (see --sink-allow-cidrs, or --allow-loopback-sinks for local development)"
    );
}

#[test]
fn allow_lists_parse_or_say_what_is_wrong() {
    assert_eq!(
        SinkPolicy::parse_cidrs("127.0.0.0/8,::1/128, 10.1.2.3").unwrap(),
        vec![
            "127.0.0.0/8".parse::<IpNet>().unwrap(),
            "::1/128".parse().unwrap(),
            "10.1.2.3/32".parse().unwrap()
        ]
    );
    // Host bits are dropped: 127.0.0.1/8 means 127.0.0.0/8.
    assert_eq!(
        SinkPolicy::parse_cidrs("127.0.0.1/8").unwrap(),
        vec!["127.0.0.0/8".parse::<IpNet>().unwrap()]
    );
    assert!(SinkPolicy::parse_cidrs("").unwrap().is_empty());
    let e = SinkPolicy::parse_cidrs("10.0.0.0/8,10.0.0/8").unwrap_err();
    assert!(e.contains("\"10.0.0/8\" is not a CIDR range"), "{e}");
    assert!(SinkPolicy::parse_cidrs("10.0.0.0/33").is_err());
}

#[test]
fn sink_urls_are_checked_at_validation() {
    let strict = SinkPolicy::default();
    // (url, refused class)
    let rows = [
        ("http://127.0.0.1:9090/v1/status", Some(Class::Loopback)),
        (
            "http://169.254.169.254/latest/meta-data/",
            Some(Class::LinkLocal),
        ),
        ("http://[::1]:8080/", Some(Class::Loopback)),
        ("http://[::ffff:127.0.0.1]/", Some(Class::Loopback)),
        ("http://[fe80::1]/", Some(Class::LinkLocal)),
        ("http://0.0.0.0:9090/", Some(Class::Unspecified)),
        // The URL parser reads these as 127.0.0.1, as reqwest does.
        ("http://2130706433/", Some(Class::Loopback)),
        ("http://0x7f.1/", Some(Class::Loopback)),
        ("http://localhost:8888/", Some(Class::Loopback)),
        ("https://LocalHost./", Some(Class::Loopback)),
        ("http://api.localhost/", Some(Class::Loopback)),
        ("http://10.0.0.7:8080/hook", None),
        ("http://notifier.shop.svc:8080/", None),
        ("https://example.com/", None),
        ("not a url", None),
    ];
    for (url, want) in rows {
        let got = strict.check_url(url).err().map(|r| match r.why {
            Why::Class(c) => c,
            Why::OwnPort(_) => panic!("{url}: own port at validation"),
        });
        assert_eq!(got, want, "{url}");
    }
    let loopback = SinkPolicy {
        allow_loopback: true,
        allow: vec![],
    };
    assert!(loopback.check_url("http://127.0.0.1:9090/").is_ok());
    assert!(loopback.check_url("http://localhost/").is_ok());
    assert!(loopback.check_url("http://169.254.169.254/").is_err());
    let e = strict.check_url("http://localhost/").unwrap_err();
    assert_eq!(
        e.to_string(),
        "sink address 127.0.0.1 (resolved from localhost) is loopback: refused (see --sink-allow-cidrs, or --allow-loopback-sinks for local development)"
    );
}

#[test]
fn the_workers_own_ports_stay_refused_on_its_own_addresses() {
    let guard = SinkGuard::new(
        SinkPolicy {
            allow_loopback: true,
            allow: SinkPolicy::parse_cidrs("0.0.0.0/0").unwrap(),
        },
        &[9090, 8080],
    );
    let check = |u: &str| guard.check_url(&reqwest::Url::parse(u).unwrap());
    for u in [
        "http://127.0.0.1:9090/v1/status",
        "http://127.0.0.2:8080/",
        "http://[::1]:9090/",
        "http://0.0.0.0:9090/",
        "http://[::ffff:127.0.0.1]:9090/",
    ] {
        let e = check(u).unwrap_err();
        assert!(matches!(e.why, Why::OwnPort(_)), "{u}: {e}");
    }
    assert!(
        check("http://127.0.0.1:9090/")
            .unwrap_err()
            .to_string()
            .contains("port 9090 is this worker's own ingest or admin port")
    );
    // Other ports of this host, and the same port elsewhere, are allowed by this policy.
    assert!(check("http://127.0.0.1:9091/").is_ok());
    assert!(check("http://192.0.2.1:9090/").is_ok());
    // A name is the resolver's business.
    assert!(check("http://localhost:9090/").is_ok());
}

// Sends through the guard: the senders' answers to refused sinks and redirects.

use std::time::Duration;

use crate::data::delivery::sender::{Outcome, REFUSED_CODE, Sender};
use crate::data::event::CloudEvent;
use crate::topology::SinkFormat;

fn event() -> CloudEvent {
    CloudEvent {
        id: "e1".into(),
        source: "/s".into(),
        ty: "order.created".into(),
        datacontenttype: None,
        dataschema: None,
        subject: None,
        time: None,
        extensions: Default::default(),
        data: None,
    }
}

/// A sink on 127.0.0.1 answering `status` (with `location`), counting requests.
async fn sink(
    status: u16,
    location: Option<String>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        let location = location.clone();
        async move {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut r = axum::response::Response::new(axum::body::Body::from("moved"));
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
            if let Some(l) = location {
                r.headers_mut()
                    .insert(http::header::LOCATION, l.parse().unwrap());
            }
            r
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, hits)
}

fn loopback_allowed(own_ports: &[u16]) -> Arc<SinkGuard> {
    SinkGuard::new(
        SinkPolicy {
            allow_loopback: true,
            allow: vec![],
        },
        own_ports,
    )
}

fn hits(h: &std::sync::atomic::AtomicUsize) -> usize {
    h.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test]
async fn a_redirect_is_a_final_failure_and_is_not_followed() {
    let (target, target_hits) = sink(200, None).await;
    let (url, redirect_hits) = sink(302, Some(target.clone())).await;
    let s = Sender::to_url(
        &url,
        SinkFormat::Binary,
        None,
        Duration::from_secs(2),
        &loopback_allowed(&[]),
    )
    .unwrap();
    let (out, _) = s.send(&event(), &Outgoing::default()).await;
    let Outcome::Failed(f) = out else {
        panic!("{out:?}")
    };
    assert_eq!(f.code, "302");
    assert!(!f.retryable);
    assert_eq!(f.data, format!("redirect to {target} not followed"));
    assert_eq!(hits(&redirect_hits), 1);
    assert_eq!(hits(&target_hits), 0, "the redirect was followed");
}

#[tokio::test]
async fn refused_addresses_fail_at_once_and_say_why() {
    let (url, sink_hits) = sink(200, None).await;
    let port = reqwest::Url::parse(&url).unwrap().port().unwrap();
    let send = |u: String, g: Arc<SinkGuard>| async move {
        let s = Sender::to_url(&u, SinkFormat::Binary, None, Duration::from_secs(2), &g).unwrap();
        match s.send(&event(), &Outgoing::default()).await.0 {
            Outcome::Failed(f) => f,
            o => panic!("{u}: {o:?}"),
        }
    };
    let strict = SinkGuard::new(SinkPolicy::default(), &[]);
    // A literal address, checked before the request.
    let f = send(url.clone(), strict.clone()).await;
    assert_eq!((f.code.as_str(), f.retryable), (REFUSED_CODE, false));
    assert!(
        f.data
            .starts_with("sink address 127.0.0.1 is loopback: refused"),
        "{}",
        f.data
    );
    // A name, checked by the resolver on the address it answers.
    let f = send(format!("http://localhost:{port}/"), strict).await;
    assert_eq!((f.code.as_str(), f.retryable), (REFUSED_CODE, false));
    assert!(
        f.data
            .contains("(resolved from localhost) is loopback: refused"),
        "{}",
        f.data
    );
    // Loopback allowed, but the port is the worker's own: by address and by name.
    let own = loopback_allowed(&[port]);
    for u in [url.clone(), format!("http://localhost:{port}/")] {
        let f = send(u.clone(), own.clone()).await;
        assert_eq!(f.code, REFUSED_CODE, "{u}");
        assert!(
            f.data.contains("own ingest or admin port"),
            "{u}: {}",
            f.data
        );
    }
    assert_eq!(hits(&sink_hits), 0, "a refused sink was reached");
    // The same sink with loopback allowed and other own ports is delivered to.
    let (out, _) = Sender::to_url(
        &url,
        SinkFormat::Binary,
        None,
        Duration::from_secs(2),
        &loopback_allowed(&[port.wrapping_add(1)]),
    )
    .unwrap()
    .send(&event(), &Outgoing::default())
    .await;
    assert!(
        matches!(out, Outcome::Delivered { status: 200, .. }),
        "{out:?}"
    );
    assert_eq!(hits(&sink_hits), 1);
}
