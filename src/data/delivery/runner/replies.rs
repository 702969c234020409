//! The events a delivery appends to a stream: a sink's reply (`reply.stream`) and the
//! `dev.weir.delivery.failed` record of a dead letter (`deadLetterSink: {stream}`).

use super::*;

/// Weir's stored-event extensions, which the target stream assigns anew. `weirpublisher`
/// goes too: Weir appends these events itself, no publisher authenticated them.
fn strip_stored(ev: &mut CloudEvent) {
    for k in [EXT_POSITION, EXT_VERSION, EXT_RECORDED_TIME, EXT_PUBLISHER] {
        ev.extensions.remove(k);
    }
}

/// A sink's reply as appended to `reply.stream`: the delivered event's `correlationid`
/// (kept when the reply has its own) and `causationid` = the delivered event's id.
pub fn reply_event(mut reply: CloudEvent, cause: &CloudEvent) -> CloudEvent {
    strip_stored(&mut reply);
    if let Some(c) = cause.correlation_id() {
        reply
            .extensions
            .entry(EXT_CORRELATION_ID.into())
            .or_insert(ExtValue::String(c));
    }
    reply
        .extensions
        .insert(EXT_CAUSATION_ID.into(), ExtValue::String(cause.id.clone()));
    reply
}

/// The `dev.weir.delivery.failed` event appended to a `deadLetterSink: {stream}`: the dead
/// letter with a derived id (stable, so that appending it twice stores it once), the failed
/// event's id as `causationid`, its `correlationid` kept and its type in `weirfailedtype`.
pub fn failed_event(dead: &CloudEvent, subscription: &str) -> CloudEvent {
    let mut ev = dead.clone();
    strip_stored(&mut ev);
    ev.id = format!("{}.failed.{subscription}", dead.id);
    ev.extensions
        .insert("weirfailedtype".into(), ExtValue::String(dead.ty.clone()));
    ev.ty = DELIVERY_FAILED_TYPE.into();
    ev.extensions
        .insert(EXT_CAUSATION_ID.into(), ExtValue::String(dead.id.clone()));
    ev
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ev(id: &str, ext: &[(&str, &str)]) -> CloudEvent {
        CloudEvent {
            id: id.into(),
            source: "/s".into(),
            ty: "order.created".into(),
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: None,
            extensions: ext
                .iter()
                .map(|(k, v)| (k.to_string(), ExtValue::String(v.to_string())))
                .collect::<BTreeMap<_, _>>(),
            data: None,
        }
    }

    #[test]
    fn replies_keep_the_correlation_and_name_their_cause() {
        let cause = ev("c1", &[("correlationid", "saga-1"), ("weirposition", "9")]);
        let r = reply_event(ev("r1", &[("weirposition", "3")]), &cause);
        assert_eq!(r.correlation_id().as_deref(), Some("saga-1"));
        assert_eq!(r.extension_str("causationid").as_deref(), Some("c1"));
        assert!(r.extension_str("weirposition").is_none());
        // A reply's own correlationid wins.
        let r = reply_event(ev("r2", &[("correlationid", "own")]), &cause);
        assert_eq!(r.correlation_id().as_deref(), Some("own"));
    }

    #[test]
    fn failed_events_keep_the_correlation_and_have_a_stable_id() {
        let dead = ev(
            "p1",
            &[
                ("correlationid", "saga-1"),
                ("weirposition", "4"),
                ("weirerrorcode", "400"),
            ],
        );
        let f = failed_event(&dead, "payments");
        assert_eq!(f.ty, DELIVERY_FAILED_TYPE);
        assert_eq!(f.id, "p1.failed.payments");
        assert_eq!(f.correlation_id().as_deref(), Some("saga-1"));
        assert_eq!(f.extension_str("causationid").as_deref(), Some("p1"));
        assert_eq!(
            f.extension_str("weirfailedtype").as_deref(),
            Some("order.created")
        );
        assert_eq!(f.extension_str("weirerrorcode").as_deref(), Some("400"));
        assert!(f.extension_str("weirposition").is_none());
        assert_eq!(failed_event(&dead, "payments"), f);
    }
}
