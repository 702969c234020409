//! `GET /v1/namespaces/{ns}/streams/{stream}/subjects/{subject}/events`: one page of a
//! subject's events in version order (`from`, `limit`; `version` and `asOf` narrow it), with a
//! `Link: <…>; rel="next"` header while more events follow.
//!
//! A whole subject is never read in one request: a subject can hold any number of events,
//! and an answer (and its cache entry) must stay bounded. The cache keeps a subject whole
//! only while it has at most [`MAX_PAGE`] events (one page's worth); pages of a larger
//! subject are read from the database each time.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderValue, header};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::read::{parse_param, read_store};
use super::{
    DEFAULT_PAGE, HttpState, MAX_PAGE, batch_body, batch_response, readable, store_problem,
};
use crate::data::cache::{CacheKey, Cached, read_through};
use crate::data::event::StoredEvent;
use crate::data::problem::HttpProblem;
use axum::response::Response;

/// The query of a subject read. Numbers and times are parsed by the handler, which names a
/// bad one.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SubjectQuery {
    /// First version of the page (default 1); with `follow=true`, where the follow starts.
    #[param(value_type = Option<i64>, minimum = 1)]
    pub(super) from: Option<String>,
    /// Events per page (default 100, at most 1000).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    pub(super) limit: Option<String>,
    /// Time travel: only events recorded at or before this time (RFC 3339).
    #[serde(rename = "asOf")]
    #[param(rename = "asOf", value_type = Option<String>)]
    pub(super) as_of: Option<String>,
    /// Stop at this version.
    #[param(value_type = Option<i64>, minimum = 1)]
    pub(super) version: Option<String>,
    #[param(value_type = Option<super::read::Consistency>)]
    consistency: Option<String>,
    /// `true`: a live follow (Server-Sent Events; see `follow`).
    #[param(value_type = Option<bool>)]
    pub(super) follow: Option<String>,
}

/// The request's selection: versions `from..=version`, recorded at or before `as_of`.
struct Selection {
    from: i64,
    limit: i64,
    version: Option<i64>,
    as_of: Option<DateTime<Utc>>,
}

impl Selection {
    fn parse(q: &SubjectQuery) -> Result<Selection, HttpProblem> {
        let from = parse_param("from", q.from.as_deref(), 1, 1, i64::MAX)?;
        let limit = parse_param("limit", q.limit.as_deref(), DEFAULT_PAGE, 1, MAX_PAGE)?;
        let version = match q.version.as_deref() {
            None => None,
            Some(v) => Some(parse_param("version", Some(v), 1, 1, i64::MAX)?),
        };
        let as_of = match q.as_of.as_deref() {
            None => None,
            Some(t) => Some(
                DateTime::parse_from_rfc3339(t)
                    .map_err(|e| {
                        HttpProblem::bad_request(format!(
                            "query parameter asOf: expected an RFC 3339 time, got {t:?}: {e}"
                        ))
                    })?
                    .with_timezone(&Utc),
            ),
        };
        Ok(Selection {
            from,
            limit,
            version,
            as_of,
        })
    }

    fn unfiltered(&self) -> bool {
        self.version.is_none() && self.as_of.is_none()
    }

    fn selects(&self, e: &StoredEvent) -> bool {
        e.version.is_some_and(|v| v >= self.from)
            && self
                .version
                .is_none_or(|v| e.version.is_some_and(|ev| ev <= v))
            && self.as_of.is_none_or(|t| e.recorded_time <= t)
    }
}

pub(super) async fn read_subject_page(
    st: &HttpState,
    ns: &str,
    stream: &str,
    subject: &str,
    q: &SubjectQuery,
    headers: &http::HeaderMap,
) -> Result<Response, HttpProblem> {
    let sel = Selection::parse(q)?;
    let (rt, id) = readable(st, ns, stream, headers).await?;
    let (store, replica) = read_store(st, &rt, q.consistency.as_deref())?;
    let store = &store;
    // Invalidations come from the primary; a lagging replica could refill the cache with a
    // subject older than the invalidation, so subjects read from a replica are not cached.
    let cache = super::read_cache(st, &rt).filter(|_| !replica);
    // A first page without filters, through a cache, reads one page's worth more than asked:
    // if that is the whole subject, it is cached whole and later pages come from memory.
    let whole = cache.is_some() && sel.from == 1 && sel.unfiltered();
    let key = CacheKey::Subject {
        stream: rt.plan.key.clone(),
        stream_id: id,
        subject: subject.to_string(),
    };
    let got = read_through(cache.as_deref(), key, || async {
        if whole {
            let mut events = store
                .read_subject(id, subject, 1, MAX_PAGE + 1, None, None)
                .await
                .map_err(store_problem)?;
            super::reveal(&rt, id, &mut events).await?;
            if events.len() as i64 <= MAX_PAGE {
                let body = batch_body(&events);
                return Ok::<_, HttpProblem>((
                    Cached {
                        body,
                        events: Some(events),
                    },
                    true,
                ));
            }
            return Ok((
                Cached {
                    body: Bytes::new(),
                    events: Some(events),
                },
                false,
            ));
        }
        // One more than the page, to learn whether a next page exists.
        let mut events = store
            .read_subject(id, subject, sel.from, sel.limit + 1, sel.version, sel.as_of)
            .await
            .map_err(store_problem)?;
        super::reveal(&rt, id, &mut events).await?;
        Ok((
            Cached {
                body: Bytes::new(),
                events: Some(events),
            },
            false,
        ))
    })
    .await?;
    // `events` holds, in version order, either the whole subject (cached) or events from the
    // selection's start (a fresh read): selecting again is the identity on the latter.
    let all = got.events.as_deref().unwrap_or_default();
    let mut selected = all.iter().filter(|e| sel.selects(e));
    let page: Vec<StoredEvent> = selected
        .by_ref()
        .take(usize::try_from(sel.limit).unwrap_or(usize::MAX))
        .cloned()
        .collect();
    let next = selected.next().and_then(|e| e.version);
    // The cached body is the whole subject: answer it as is when the page is exactly that.
    let body = if !got.body.is_empty() && sel.from == 1 && sel.unfiltered() && next.is_none() {
        got.body.clone()
    } else {
        batch_body(&page)
    };
    let mut resp = batch_response(body);
    if let Some(next) = next
        && let Ok(link) = HeaderValue::from_str(&next_link(ns, stream, subject, next, &sel, q))
    {
        resp.headers_mut().insert(header::LINK, link);
    }
    Ok(resp)
}

/// Characters percent-encoded in a path segment or query value: all but RFC 3986's
/// unreserved ones, so a subject with `/`, `?`, `&` or spaces round-trips.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `</v1/…/events?from=N&limit=L…>; rel="next"`: the same request from version `next`.
fn next_link(
    ns: &str,
    stream: &str,
    subject: &str,
    next: i64,
    sel: &Selection,
    q: &SubjectQuery,
) -> String {
    let enc = |s: &str| utf8_percent_encode(s, COMPONENT).to_string();
    let mut url = format!(
        "/v1/namespaces/{}/streams/{}/subjects/{}/events?from={next}&limit={}",
        enc(ns),
        enc(stream),
        enc(subject),
        sel.limit
    );
    if let Some(v) = sel.version {
        url.push_str(&format!("&version={v}"));
    }
    if let Some(t) = &q.as_of {
        url.push_str(&format!("&asOf={}", enc(t)));
    }
    if let Some(c) = &q.consistency {
        url.push_str(&format!("&consistency={}", enc(c)));
    }
    format!("<{url}>; rel=\"next\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_encodes_the_subject_and_keeps_the_filters() {
        let q = SubjectQuery {
            from: Some("1".into()),
            limit: Some("2".into()),
            as_of: Some("2024-05-01T00:00:00+02:00".into()),
            version: Some("9".into()),
            consistency: None,
            follow: None,
        };
        let sel = Selection::parse(&q).unwrap();
        assert_eq!(
            next_link("shop", "orders", "order/1 a", 3, &sel, &q),
            "</v1/namespaces/shop/streams/orders/subjects/order%2F1%20a/events?from=3&limit=2\
             &version=9&asOf=2024-05-01T00%3A00%3A00%2B02%3A00>; rel=\"next\""
        );
    }

    #[test]
    fn paging_parameters_are_bounded() {
        let q = |from: &str, limit: &str| SubjectQuery {
            from: Some(from.into()),
            limit: Some(limit.into()),
            as_of: None,
            version: None,
            consistency: None,
            follow: None,
        };
        assert!(Selection::parse(&q("1", "1000")).is_ok());
        assert!(Selection::parse(&q("1", "1001")).is_err());
        assert!(Selection::parse(&q("0", "10")).is_err());
        assert!(Selection::parse(&q("1", "0")).is_err());
    }
}
