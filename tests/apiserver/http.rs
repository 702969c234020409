//! The REST layer: routes Kubernetes API paths to the store, records every call, and
//! streams watches.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::Call;
use super::openapi;
use super::registry::ResourceType;
use super::review::Reviews;
use super::store::{ApiError, Patch, Selectors, Store, Sub, WatchEvent, WriteCtx};
use super::table;

/// How often a watch that allows bookmarks gets one. Real servers send one about every
/// minute; a short interval exercises clients' bookmark handling within a test's runtime.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);

/// A watch without `timeoutSeconds` ends after this long (real servers pick 30–60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Encoded watch lines buffered per watch connection; a client that does not read them
/// blocks its watch task, which then falls behind the broadcast and is disconnected.
const WATCH_BUFFER: usize = 64;

/// State shared by all requests.
pub struct Shared {
    pub store: Mutex<Store>,
    pub address: String,
    /// Issued service-account tokens and granted permissions (TokenReview,
    /// SubjectAccessReview).
    pub reviews: Mutex<Reviews>,
    /// When set, requests with a bearer token are authorized by these rules (requests without
    /// one are the test's own admin calls and always allowed).
    pub rbac: Mutex<Option<super::rbac::Rbac>>,
}

impl Shared {
    /// The store; a panic while holding the lock poisons it, and the data stays usable
    /// for the remaining requests of the failing test.
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reviews(&self) -> MutexGuard<'_, Reviews> {
        self.reviews.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    if std::env::var_os("WEIR_TEST_APISERVER_LOG").is_some() {
        eprintln!("apiserver: error {}: {}", e.code, e.message);
    }
    json_response(e.code, &e.status())
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

/// A resource request's coordinates.
struct Target {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(segs: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r, more @ ..]
            if !(more.is_empty() && (*r == "status" || *r == "finalize")) =>
        {
            (Some(ns.to_string()), &rest[2..])
        }
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (p, None, None),
        [p, n] => (p, Some(n.to_string()), None),
        [p, n, s] => (p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(Target {
        group,
        version,
        plural: plural.to_string(),
        namespace,
        name,
        sub,
    })
}

fn verb_of(method: &Method, target: &Target, query: &HashMap<String, String>) -> &'static str {
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    match (method, &target.name) {
        (&Method::GET, _) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, None) => "deletecollection",
        (&Method::DELETE, Some(_)) => "delete",
        _ => "unknown",
    }
}

/// The single entry point: every request is recorded, then served.
pub async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = parse_query(uri.query());
    let header_str = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let user_agent = header_str(header::USER_AGENT);
    let accept = header_str(header::ACCEPT);
    let content_type = header_str(header::CONTENT_TYPE);
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let target = parse_target(&segs);
    let method_name = method.to_string();

    let call = match &target {
        Some(t) => Call {
            verb: verb_of(&method, t, &query).into(),
            group: t.group.clone(),
            version: t.version.clone(),
            resource: t.plural.clone(),
            subresource: t.sub.clone(),
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            path: path.clone(),
            user_agent: user_agent.clone(),
            field_manager: query.get("fieldManager").cloned(),
        },
        None => Call {
            verb: method.as_str().to_lowercase(),
            group: String::new(),
            version: String::new(),
            resource: String::new(),
            subresource: None,
            namespace: None,
            name: None,
            path: path.clone(),
            user_agent: user_agent.clone(),
            field_manager: None,
        },
    };
    shared.lock().calls.push(call.clone());
    if let Some(denied) = authorize(&shared, &headers, &call) {
        return denied;
    }
    let response = route(
        &shared,
        method,
        &path,
        segs.as_slice(),
        target,
        query,
        accept,
        content_type,
        user_agent,
        body,
    );
    if std::env::var_os("WEIR_TEST_APISERVER_LOG").is_some() {
        eprintln!(
            "apiserver: {} {}?{} -> {}",
            method_name,
            path,
            uri.query().unwrap_or_default(),
            response.status()
        );
    }
    response
}

/// With RBAC enforced: 401 for an unknown bearer token, 403 for a call its rules do not
/// allow; `None` lets the request through. The caller is the bearer token's account, or the
/// user an unrestricted caller impersonates (`Impersonate-User`/`Impersonate-Group`, what
/// `kubectl --as` sends: client-go sends no credentials over plain HTTP, impersonation
/// headers it does).
fn authorize(shared: &Shared, headers: &HeaderMap, call: &Call) -> Option<Response> {
    let rbac = shared
        .rbac
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let impersonated = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok());
    let (user, groups) = match (token, impersonated) {
        (Some(token), _) => match shared.reviews().identity(token) {
            Some(identity) => identity,
            None => return Some(json_response(401, &super::rbac::unauthorized())),
        },
        (None, Some(user)) => {
            let mut groups: Vec<String> = headers
                .get_all("impersonate-group")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(String::from)
                .collect();
            // As the real server does for an impersonated service account.
            if let Some(ns) = user
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split(':').next())
            {
                groups.push("system:serviceaccounts".into());
                groups.push(format!("system:serviceaccounts:{ns}"));
            }
            groups.push("system:authenticated".into());
            (user.to_string(), groups)
        }
        (None, None) => return None,
    };
    if rbac.allows(&user, &groups, call) {
        None
    } else {
        Some(json_response(403, &super::rbac::forbidden(&user, call)))
    }
}

#[allow(clippy::too_many_arguments)]
fn route(
    shared: &Arc<Shared>,
    method: Method,
    path: &str,
    segs: &[&str],
    target: Option<Target>,
    query: HashMap<String, String>,
    accept: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
) -> Response {
    let _ = path;

    match (segs, target) {
        (["api"], _) => json_response(200, &shared.lock().registry.api_versions(&shared.address)),
        (["apis"], _) => json_response(200, &shared.lock().registry.api_group_list()),
        (["api", v], _) => match shared.lock().registry.resource_list("", v) {
            Some(doc) => json_response(200, &doc),
            None => not_found_path(),
        },
        (["apis", g], _) => match shared.lock().registry.api_group(g) {
            Some(doc) => json_response(200, &doc),
            None => not_found_path(),
        },
        (["apis", g, v], _) => match shared.lock().registry.resource_list(g, v) {
            Some(doc) => json_response(200, &doc),
            None => not_found_path(),
        },
        (["openapi", "v3"], _) => json_response(200, &openapi::index(&shared.lock().registry)),
        (["openapi", "v3", "api", v], _) => openapi_doc(shared, "", v),
        (["openapi", "v3", "apis", g, v], _) => openapi_doc(shared, g, v),
        (["version"], _) => json_response(
            200,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
            }),
        ),
        (["healthz" | "readyz" | "livez"], _) => (StatusCode::OK, "ok").into_response(),
        (["apis", "authentication.k8s.io", "v1", "tokenreviews"], _) if method == Method::POST => {
            review(&body, |b| shared.reviews().token_review(b))
        }
        (["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"], _)
            if method == Method::POST =>
        {
            review(&body, |b| shared.reviews().access_review(b))
        }
        (_, Some(t)) => {
            let req = Request {
                method,
                query,
                accept,
                content_type,
                user_agent,
                body,
            };
            match serve_resource(shared, t, req) {
                Ok(r) => r,
                Err(e) => error_response(&e),
            }
        }
        _ => not_found_path(),
    }
}

/// A review (create-only, never stored): the request body answered with its status.
fn review(body: &Bytes, decide: impl FnOnce(&Value) -> Result<Value, ApiError>) -> Response {
    let answer = serde_json::from_slice::<Value>(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
        .and_then(|b| decide(&b));
    match answer {
        Ok(v) => json_response(201, &v),
        Err(e) => error_response(&e),
    }
}

fn not_found_path() -> Response {
    error_response(&ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    ))
}

fn openapi_doc(shared: &Shared, group: &str, version: &str) -> Response {
    match openapi::document(&shared.lock().registry, group, version) {
        Some(doc) => json_response(200, &doc),
        None => not_found_path(),
    }
}

struct Request {
    method: Method,
    query: HashMap<String, String>,
    accept: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
}

impl Request {
    fn json_body(&self) -> Result<Value, ApiError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        if self.content_type.contains("protobuf") {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "this test server reads JSON only; kubectl sends protobuf from its typed subcommands (`kubectl create namespace|secret|...`): use `kubectl apply -f` instead",
            ));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }

    fn ctx(&self) -> WriteCtx {
        // Without fieldManager, the manager is the user agent's program name, as on a real server.
        let manager = self.query.get("fieldManager").cloned().unwrap_or_else(|| {
            let ua = self.user_agent.split('/').next().unwrap_or_default();
            if ua.is_empty() {
                "unknown".into()
            } else {
                ua.into()
            }
        });
        WriteCtx {
            manager,
            dry_run: self.query.get("dryRun").is_some_and(|v| v == "All"),
            strict: self
                .query
                .get("fieldValidation")
                .is_some_and(|v| v == "Strict"),
            force: self.query.get("force").is_some_and(|v| v == "true"),
        }
    }
}

fn serve_resource(shared: &Arc<Shared>, t: Target, req: Request) -> Result<Response, ApiError> {
    let rt = shared
        .lock()
        .registry
        .find(&t.group, &t.version, &t.plural)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        })?;
    if t.namespace.is_some() && !rt.namespaced {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    if rt.namespaced && t.namespace.is_none() && t.name.is_some() {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let ns = t.namespace.clone().unwrap_or_default();
    let sub = match t.sub.as_deref() {
        None => Sub::Main,
        Some("status") if rt.status_subresource => Sub::Status,
        Some("scale") if rt.scale.is_some() => Sub::Scale,
        Some(_) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let sel = Selectors::parse(
        req.query.get("labelSelector").map(String::as_str),
        req.query.get("fieldSelector").map(String::as_str),
    )?;
    let ctx = req.ctx();
    let verb = verb_of(&req.method, &t, &req.query);
    let include = req.query.get("includeObject").cloned().unwrap_or_default();
    match (verb, &t.name) {
        ("watch", name) => {
            let mut sel = sel;
            if let Some(n) = name {
                sel = Selectors::parse(
                    req.query.get("labelSelector").map(String::as_str),
                    Some(&format!("metadata.name={n}")),
                )?;
            }
            watch(shared, rt, t.namespace.clone(), sel, &req)
        }
        ("list", _) => list(shared, &rt, t.namespace.as_deref(), &sel, &req),
        ("get", Some(name)) => {
            let store = shared.lock();
            let obj = store.get(&rt, &ns, name)?;
            match sub {
                Sub::Scale => Ok(json_response(200, &store.scale_of(&rt, &obj)?)),
                Sub::Status => Ok(json_response(200, &obj)),
                Sub::Main if table::wants_table(&req.accept) => {
                    let rv = store.resource_version().to_string();
                    Ok(json_response(
                        200,
                        &table::table(&rt, &[obj], &rv, &include),
                    ))
                }
                Sub::Main => Ok(json_response(200, &obj)),
            }
        }
        ("create", None) => {
            let body = req.json_body()?;
            let out = shared.lock().create(&rt, &ns, body, &ctx)?;
            Ok(json_response(201, &out))
        }
        ("update", Some(name)) => {
            let body = req.json_body()?;
            let out = shared.lock().update(&rt, &ns, name, body, sub, &ctx)?;
            Ok(json_response(200, &out))
        }
        ("patch", Some(name)) => {
            let ct = req
                .content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim();
            let patch = match ct {
                "application/json-patch+json" => Patch::Json(req.json_body()?),
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    Patch::Merge(req.json_body()?)
                }
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                    if !req.query.contains_key("fieldManager") {
                        return Err(ApiError::invalid(
                            &rt,
                            name,
                            &["fieldManager: Required value: is required for apply patch".into()],
                        ));
                    }
                    // YAML is a superset of JSON, so this reads both encodings.
                    let body: Value = weir::yaml::from_slice(&req.body).map_err(|e| {
                        ApiError::bad_request(format!("the apply patch is not valid YAML: {e}"))
                    })?;
                    Patch::Apply(body)
                }
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml ({other})"
                        ),
                    ));
                }
            };
            let out = shared.lock().patch(&rt, &ns, name, patch, sub, &ctx)?;
            Ok(json_response(200, &out))
        }
        ("delete", Some(name)) => {
            let options = req.json_body()?;
            let out = shared.lock().delete(&rt, &ns, name, &options, &ctx)?;
            Ok(delete_response(&rt, out))
        }
        ("deletecollection", None) => {
            let options = req.json_body()?;
            let mut store = shared.lock();
            let (items, _) = store.list(&rt, t.namespace.as_deref(), &sel);
            let mut deleted = Vec::new();
            for item in items {
                let ons = item["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let oname = item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                deleted.push(store.delete(&rt, &ons, &oname, &options, &ctx)?);
            }
            let rv = store.resource_version().to_string();
            Ok(json_response(200, &list_doc(&rt, deleted, &rv, None)))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{verb} is not supported on this path"),
        )),
    }
}

fn delete_response(rt: &ResourceType, object: Value) -> Response {
    // Custom resources and CRDs return the object; built-in kinds deleted at once return a
    // Status, as the real server does.
    if rt.custom || rt.generation || object["metadata"]["deletionTimestamp"].is_string() {
        return json_response(200, &object);
    }
    json_response(
        200,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": object["metadata"]["name"],
                "group": rt.group,
                "kind": rt.plural,
                "uid": object["metadata"]["uid"],
            },
        }),
    )
}

fn list_doc(
    rt: &ResourceType,
    items: Vec<Value>,
    rv: &str,
    cont: Option<(String, usize)>,
) -> Value {
    let mut metadata = json!({"resourceVersion": rv});
    if let Some((token, remaining)) = cont {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(remaining);
    }
    json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": metadata,
        "items": items,
    })
}

/// `list`, with `resourceVersion`/`resourceVersionMatch` and `limit`/`continue`. Lists are
/// always served from the current state: `resourceVersionMatch=Exact` of an older version
/// gets 410 (no snapshots are kept), and a continued list is not a consistent snapshot.
fn list(
    shared: &Shared,
    rt: &ResourceType,
    ns: Option<&str>,
    sel: &Selectors,
    req: &Request,
) -> Result<Response, ApiError> {
    let store = shared.lock();
    let current = store.resource_version();
    let asked = req.query.get("resourceVersion").filter(|v| !v.is_empty());
    if let Some(asked) = asked {
        let n: u64 = asked
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {asked}")))?;
        match req.query.get("resourceVersionMatch").map(String::as_str) {
            Some("Exact") if n != current => {
                return Err(ApiError::gone(format!(
                    "too old resource version: {n} ({current})"
                )));
            }
            _ if n > current => {
                return Err(ApiError::new(
                    504,
                    "Timeout",
                    format!("Too large resource version: {n}, current: {current}"),
                ));
            }
            _ => {}
        }
    }
    let (mut items, rv) = store.list(rt, ns, sel);
    drop(store);
    let key_of = |o: &Value| {
        format!(
            "{}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or_default(),
            o["metadata"]["name"].as_str().unwrap_or_default()
        )
    };
    if let Some(token) = req.query.get("continue").filter(|c| !c.is_empty()) {
        items.retain(|o| key_of(o) > *token);
    }
    let mut cont = None;
    if let Some(limit) = req
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        // The continue token is the last returned key; a real server's is opaque too.
        cont = items.last().map(|o| (key_of(o), remaining));
    }
    let rv = rv.to_string();
    if table::wants_table(&req.accept) {
        let include = req.query.get("includeObject").cloned().unwrap_or_default();
        let mut t = table::table(rt, &items, &rv, &include);
        if let Some((token, remaining)) = cont {
            t["metadata"]["continue"] = json!(token);
            t["metadata"]["remainingItemCount"] = json!(remaining);
        }
        return Ok(json_response(200, &t));
    }
    Ok(json_response(200, &list_doc(rt, items, &rv, cont)))
}

/// Parses the simple Go durations clients send (`30s`, `1m30s`, `2h`).
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = std::mem::take(&mut num).parse().ok()?;
        total += n * match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
    }
    if !num.is_empty() {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

fn watch_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": type_, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// `watch`: replays from `resourceVersion` (or the current state as ADDED events), then
/// streams changes, with bookmarks when allowed. A too-old version gets an `ERROR` event
/// carrying a 410 `Status`, as from a real server.
fn watch(
    shared: &Arc<Shared>,
    rt: ResourceType,
    ns: Option<String>,
    sel: Selectors,
    req: &Request,
) -> Result<Response, ApiError> {
    let q = &req.query;
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial = flag("sendInitialEvents");
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(_) if send_initial => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v}")))?,
        ),
    };
    // `timeoutSeconds`, else the request's `timeout` (a Go duration such as `4s` or `1m`).
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .or_else(|| q.get("timeout").and_then(|t| go_duration(t)))
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let as_table = table::wants_table(&req.accept);
    let include = q.get("includeObject").cloned().unwrap_or_default();
    let encode = move |rt: &ResourceType, type_: &str, object: &Value, rv: u64| {
        if as_table && type_ != "BOOKMARK" && type_ != "ERROR" {
            watch_line(
                type_,
                &table::table(rt, std::slice::from_ref(object), &rv.to_string(), &include),
            )
        } else {
            watch_line(type_, object)
        }
    };

    let (tx, rx) = mpsc::channel::<Bytes>(WATCH_BUFFER);
    let (started, kick) = {
        let store = shared.lock();
        (
            store.watch_start(&rt, ns.as_deref(), from),
            store.kick.subscribe(),
        )
    };
    match started {
        Err(e) if e.code == 410 => {
            // Sent before the stream starts, so this cannot fail for lack of room.
            let _ = tx.try_send(watch_line("ERROR", &e.status()));
            drop(tx);
        }
        Err(e) => return Err(e),
        Ok((initial, live, start_rv)) => {
            tokio::spawn(watch_task(
                rt,
                ns,
                sel,
                initial,
                live,
                kick,
                start_rv,
                bookmarks,
                send_initial,
                timeout,
                tx,
                encode,
            ));
        }
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// How a change shows in a watch with selectors: an object that starts matching is ADDED,
/// one that stops matching is DELETED, as from a real server's watch cache.
fn visible_as(
    sel: &Selectors,
    type_: &'static str,
    object: &Value,
    old: Option<&Value>,
) -> Option<&'static str> {
    let now = sel.matches(object);
    let before = old.is_some_and(|o| sel.matches(o));
    match (type_, before, now) {
        ("MODIFIED", true, true) => Some("MODIFIED"),
        ("MODIFIED", false, true) => Some("ADDED"),
        ("MODIFIED", true, false) => Some("DELETED"),
        ("MODIFIED", false, false) => None,
        ("DELETED", _, _) if before || now => Some("DELETED"),
        ("ADDED", _, true) => Some("ADDED"),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn watch_task(
    rt: ResourceType,
    ns: Option<String>,
    sel: Selectors,
    initial: Vec<(&'static str, Value, Option<Value>)>,
    mut live: broadcast::Receiver<Arc<WatchEvent>>,
    mut kick: tokio::sync::watch::Receiver<u64>,
    start_rv: u64,
    bookmarks: bool,
    send_initial: bool,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
    encode: impl Fn(&ResourceType, &str, &Value, u64) -> Bytes + Send + 'static,
) {
    let bookmark = |rv: u64, end_of_initial: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if end_of_initial {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        watch_line(
            "BOOKMARK",
            &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
        )
    };
    for (type_, object, old) in initial {
        let Some(type_) = visible_as(&sel, type_, &object, old.as_ref()) else {
            continue;
        };
        if tx
            .send(encode(&rt, type_, &object, start_rv))
            .await
            .is_err()
        {
            return;
        }
    }
    if send_initial && bookmarks && tx.send(bookmark(start_rv, true)).await.is_err() {
        return;
    }
    let mut last_rv = start_rv;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut ticker = tokio::time::interval(BOOKMARK_INTERVAL);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            _ = kick.changed() => return,
            _ = ticker.tick(), if bookmarks => {
                if tx.send(bookmark(last_rv, false)).await.is_err() {
                    return;
                }
            }
            event = live.recv() => {
                let event = match event {
                    Ok(e) => e,
                    // Lagged or closed: end the watch, the client re-lists or resumes.
                    Err(_) => return,
                };
                if event.rv <= last_rv {
                    continue;
                }
                last_rv = event.rv;
                if event.key != rt.key() || ns.as_ref().is_some_and(|n| *n != event.namespace) {
                    continue;
                }
                let object = Store::with_type_meta(&rt, event.object.clone());
                let old = event.old.clone().map(|o| Store::with_type_meta(&rt, o));
                let Some(type_) = visible_as(&sel, event.type_, &object, old.as_ref()) else {
                    continue;
                };
                if tx.send(encode(&rt, type_, &object, event.rv)).await.is_err() {
                    return;
                }
            }
        }
    }
}
