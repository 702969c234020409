//! The OpenAPI 3.1 documents of Weir's two HTTP APIs, generated from the code: each handler
//! carries its operation (`#[utoipa::path]`) and each router is built with `utoipa-axum`, which
//! registers a route and its operation together, so the server cannot answer a route its
//! document does not list. Each port serves its own API's document at `/openapi.json`; the
//! same documents are committed under `docs/openapi/` (`tests/openapi.rs` fails when they
//! drift; `WEIR_UPDATE_OPENAPI=1` rewrites them).
//!
//! The schemas are the real response types (`ToSchema` derived where they are declared). The
//! few written here by hand describe bodies that are encoded by Weir's own code rather than
//! by serde: the problem body, CloudEvents in the JSON format, and the shapes a publish reads.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::Extension;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr};
use utoipa::{Modify, PartialSchema, ToSchema};

use crate::data::problem::{HttpProblem, ProblemKind};

/// Where the committed documents live, relative to the repository root.
pub const INGEST_FILE: &str = "docs/openapi/ingest.json";
pub const ADMIN_FILE: &str = "docs/openapi/admin.json";

/// The name of the bearer-token security scheme in both documents.
pub const BEARER: &str = "bearer";

/// The ingest/read API's document (what the ingest port serves at `/openapi.json`).
pub fn ingest() -> OpenApi {
    crate::data::http::routes().split_for_parts().1
}

/// The admin API's document (what the admin port serves at `/openapi.json`).
pub fn admin() -> OpenApi {
    crate::admin::routes().split_for_parts().1
}

/// A document as the files and `/openapi.json` hold it: pretty JSON, ending in a newline.
pub fn to_json(doc: &OpenApi) -> String {
    // A document is strings, numbers and maps with string keys: it always serialises.
    let mut text = serde_json::to_string_pretty(doc).unwrap_or_default();
    text.push('\n');
    text
}

/// Both committed files with what the code generates for them.
pub fn files() -> [(&'static str, String); 2] {
    [
        (INGEST_FILE, to_json(&ingest())),
        (ADMIN_FILE, to_json(&admin())),
    ]
}

/// The serialised document a router serves, handed to [`openapi_json`] as an extension.
#[derive(Clone)]
pub struct Document(Arc<Bytes>);

impl Document {
    pub fn new(doc: &OpenApi) -> Document {
        Document(Arc::new(Bytes::from(to_json(doc))))
    }
}

/// The 401 and 403 every admin operation answers (bearer token, then RBAC), documented once
/// for all of them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Documentation only: the handlers answer `HttpProblem`s.
pub(crate) enum AdminAuthFailures {
    #[response(
        status = 401,
        description = "No bearer token, or a wrong or unknown one",
        content_type = "application/problem+json",
        headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"weir\"`"))
    )]
    Unauthorized(HttpProblem),
    #[response(
        status = 403,
        description = "Authenticated, but RBAC does not allow this check",
        content_type = "application/problem+json"
    )]
    Forbidden(HttpProblem),
}

/// `GET /openapi.json`: the document of the API this port serves.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses(
        (status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json", body = Object),
    ),
)]
pub async fn openapi_json(Extension(doc): Extension<Document>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::clone(&doc.0),
    )
        .into_response()
}

/// Adds the bearer-token scheme the operations refer to.
pub struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The problem body (RFC 7807, `application/problem+json`) of every error.
impl PartialSchema for HttpProblem {
    fn schema() -> RefOr<Schema> {
        let types = ProblemKind::ALL.iter().map(|k| k.uri());
        let statuses = ProblemKind::ALL.iter().map(|k| k.status());
        ObjectBuilder::new()
            .description(Some(
                "An RFC 7807 problem: what is wrong, and with which event of the request",
            ))
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(types)),
            )
            .property("title", ObjectBuilder::new().schema_type(Type::String))
            .property(
                "status",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .enum_values(Some(statuses.collect::<std::collections::BTreeSet<_>>())),
            )
            .property("detail", ObjectBuilder::new().schema_type(Type::String))
            .property(
                "errors",
                ArrayBuilder::new().items(crate::data::problem::FieldError::schema()),
            )
            .property(
                "lastEventId",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some("Follows only: the position of the last event sent")),
            )
            .required("type")
            .required("title")
            .required("status")
            .required("detail")
            .required("errors")
            .into()
    }
}

impl ToSchema for HttpProblem {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Problem")
    }
}

/// A CloudEvent in the JSON event format (structured mode), as reads answer it and as a
/// structured or batched publish sends it. Encoded by `crate::data::event`, not by serde.
pub struct CloudEventJson;

impl PartialSchema for CloudEventJson {
    fn schema() -> RefOr<Schema> {
        let string = || ObjectBuilder::new().schema_type(Type::String);
        let required = || string().min_length(Some(1));
        ObjectBuilder::new()
            .description(Some(
                "A CloudEvent 1.0 in the JSON event format. Extensions are further members \
                 (string, integer or boolean); reads add weirposition, weirversion (events \
                 with a subject), weirrecordedtime and, on streams with ingest.auth, \
                 weirpublisher. `data` is JSON, or a string for text payloads; \
                 `data_base64` carries other bytes",
            ))
            .property("specversion", string().enum_values(Some(["1.0"])))
            .property("id", required())
            .property("source", required())
            .property("type", required())
            .property("datacontenttype", string())
            .property("dataschema", string())
            .property("subject", string())
            .property("time", string())
            .property("data", Schema::default())
            .property("data_base64", string())
            .required("specversion")
            .required("id")
            .required("source")
            .required("type")
            .into()
    }
}

impl ToSchema for CloudEventJson {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CloudEvent")
    }
}

/// One event of Weir's simple publish shape (`application/json` without `ce-` headers).
#[derive(ToSchema, serde::Deserialize)]
#[allow(dead_code)] // A schema only: the parser reads this shape member by member.
pub struct SimpleEvent {
    /// The event's `type`.
    #[schema(min_length = 1)]
    r#type: String,
    /// The payload, any JSON value; stored as the exact JSON text received.
    data: serde_json::Value,
    /// Default `/weir/namespaces/{ns}/streams/{stream}`.
    source: Option<String>,
    /// Default a new UUIDv7.
    id: Option<String>,
    subject: Option<String>,
    /// Becomes the `correlationid` extension.
    #[serde(rename = "correlationId")]
    correlation_id: Option<String>,
}

/// A publish in the simple shape: one event or an array of them.
#[derive(ToSchema, serde::Deserialize)]
#[serde(untagged)]
#[allow(dead_code)] // A schema only.
pub enum SimplePublish {
    One(SimpleEvent),
    Many(Vec<SimpleEvent>),
}

/// A binary-mode body: the event's data, any bytes, typed by `Content-Type`.
pub struct BinaryData;

impl PartialSchema for BinaryData {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .description(Some(
                "The event's data as raw bytes; the attributes are in ce- headers",
            ))
            .into()
    }
}

impl ToSchema for BinaryData {}

/// A text body (`text/plain`, `text/event-stream`).
pub struct Text;

impl PartialSchema for Text {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new().schema_type(Type::String).into()
    }
}

impl ToSchema for Text {}
