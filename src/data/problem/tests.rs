use super::*;

async fn body_json(response: Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn response_has_problem_shape_and_headers() {
    let problem = HttpProblem::new(ProblemKind::SchemaViolation, "bad data").with_error(
        FieldError::new("\"orderId\" is a required property")
            .at(2)
            .pointer("/data/orderId")
            .keyword("required"),
    );
    let response = problem.into_response();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    assert!(response.headers().get(header::RETRY_AFTER).is_none());
    let body = body_json(response).await;
    assert_eq!(
        body,
        serde_json::json!({
            "type": "https://weir.dev/problems/schema-violation",
            "title": "Schema violation",
            "status": 422,
            "detail": "bad data",
            "errors": [{
                "index": 2,
                "pointer": "/data/orderId",
                "keyword": "required",
                "message": "\"orderId\" is a required property"
            }]
        })
    );
}

#[tokio::test]
async fn retry_after_is_a_header_not_a_member() {
    let response = HttpProblem::rate_limited(7).into_response();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    let body = body_json(response).await;
    assert!(body.get("retry_after").is_none());
    assert_eq!(body["errors"], serde_json::json!([]));
}

#[test]
fn field_errors_are_capped_and_counted() {
    let mut errors = FieldErrors::new();
    for i in 0..(MAX_REPORTED_ERRORS + 5) {
        errors.push(FieldError::new("x").at(i));
    }
    let problem = errors.into_problem(ProblemKind::InvalidEvent, "bad");
    assert_eq!(problem.errors.len(), MAX_REPORTED_ERRORS);
    assert_eq!(problem.status, 400);
    assert!(
        problem
            .detail
            .contains(&format!("of {}", MAX_REPORTED_ERRORS + 5)),
        "{}",
        problem.detail
    );
}

#[test]
fn every_kind_has_a_distinct_uri_and_an_error_status() {
    let kinds = ProblemKind::ALL;
    let uris: std::collections::HashSet<_> = kinds.iter().map(|k| k.uri()).collect();
    assert_eq!(uris.len(), kinds.len());
    assert!(kinds.iter().all(|k| (400..600).contains(&k.status())));
}

#[test]
fn payload_too_large_names_size_and_limit() {
    let p = HttpProblem::payload_too_large(Some(5000), 4096);
    assert_eq!(p.status, 413);
    assert!(p.detail.contains("5000") && p.detail.contains("4096"));
    let p = HttpProblem::payload_too_large(None, 4096);
    assert!(p.detail.contains("4096"));
}

#[test]
fn an_unreadable_body_is_a_400_that_says_why() {
    let p = HttpProblem::unreadable_body("invalid chunk size line");
    assert_eq!(p.status, 400);
    assert_eq!(p.kind, ProblemKind::UnreadableBody);
    assert_eq!(
        p.detail,
        "the request body could not be read: invalid chunk size line"
    );
}
