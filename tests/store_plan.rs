//! The append path's lookup keeps one primary-key probe per key when the table statistics
//! are stale: a plain join, planned with statistics from when the stream was empty, once
//! hash-joined every batch against all of the stream's dedup keys (tens of milliseconds per
//! batch, growing with the stream). This checks the plan, not a time.

mod common;

use bytes::Bytes;
use common::*;
use serde_json::Value;
use weir::data::event::{CloudEvent, Data};
use weir::data::store::{AppendInput, LOOKUP_SQL, Store};
use weir::topology::CompressionPlan;

fn event(i: usize) -> CloudEvent {
    CloudEvent {
        id: format!("id-{i}"),
        source: "/plan".into(),
        ty: "order.created".into(),
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        subject: Some(format!("order-{}", i % 500)),
        time: None,
        extensions: Default::default(),
        data: Some(Data::Json(Bytes::from(format!("{{\"n\":{i}}}")))),
    }
}

/// Every plan node, depth first.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    for child in plan["Plans"].as_array().into_iter().flatten() {
        nodes(child, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedup_lookup_probes_keys_even_with_stale_statistics() {
    let url = fresh_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let store = Store::new(pool.clone());
    store.migrate().await.unwrap();
    let stream = store.ensure_stream("plan", "orders").await.unwrap();
    // Statistics of empty tables, frozen: what a young stream's tables look like to the
    // planner until autovacuum catches up.
    for t in ["weir_event_ids", "weir_subjects"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {t} SET (autovacuum_enabled = false)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {t}")))
            .execute(&pool)
            .await
            .unwrap();
    }
    let events: Vec<CloudEvent> = (0..30_000).map(event).collect();
    let compression = CompressionPlan {
        min_bytes: usize::MAX,
        ..Default::default()
    };
    for chunk in events.chunks(1000) {
        store
            .append(stream, &[AppendInput { events: chunk }], &compression)
            .await
            .unwrap();
    }

    // A batch of 100 new events, as the append path looks it up.
    let sources: Vec<String> = (0..100).map(|_| "/plan".to_string()).collect();
    let ids: Vec<String> = (0..100).map(|i| format!("new-{i}")).collect();
    let subjects: Vec<String> = (0..100).map(|i| format!("order-{i}")).collect();
    let mut conn = pool.acquire().await.unwrap();
    let (plan,): (Value,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON) {LOOKUP_SQL}"
    )))
    .bind(stream)
    .bind(&sources)
    .bind(&ids)
    .bind(&subjects)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let mut all = Vec::new();
    nodes(&plan[0]["Plan"], &mut all);
    let on = |table: &str| {
        all.iter()
            .filter(|n| n["Relation Name"] == table)
            .cloned()
            .collect::<Vec<_>>()
    };
    for table in ["weir_event_ids", "weir_subjects"] {
        let scans = on(table);
        assert!(!scans.is_empty(), "{table} not in the plan: {plan}");
        for scan in scans {
            assert_eq!(
                scan["Node Type"], "Index Scan",
                "{table} is not probed by key: {plan}"
            );
            assert!(
                scan["Index Cond"]
                    .as_str()
                    .is_some_and(|c| c.contains("stream_id") && c.contains("= u")),
                "{table}'s probe does not use the batch's keys: {plan}"
            );
        }
    }
    assert!(
        all.iter().all(|n| n["Node Type"] != "Hash Join"),
        "a hash join: {plan}"
    );
    pool.close().await;
}
