//! OTLP export of the spans of an event's journey ([`crate::data::tracecontext`]).
//!
//! Off unless the standard OpenTelemetry environment names an endpoint:
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL of the traces resource) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL; `/v1/traces` is appended). With neither, no
//! exporter, no `tracing-opentelemetry` layer and no span exist, and nothing is sent anywhere.
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep it off even with an endpoint.
//!
//! The transport is OTLP/HTTP with protobuf bodies (`http/protobuf`), posted through Weir's
//! own HTTP client (rustls on ring; `https://` endpoints are verified against the system's
//! roots, `SSL_CERT_FILE`/`SSL_CERT_DIR` included). Another `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`grpc`, `http/json`) is refused at start-up rather than silently sent as protobuf.
//! The rest is read by the OpenTelemetry SDK as its specification says:
//! `OTEL_SERVICE_NAME` (default here: `weir`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
//! `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, `…_TIMEOUT` (default 10 s), `…_COMPRESSION`
//! (none only) and the batch processor's `OTEL_BSP_SCHEDULE_DELAY` (5 s),
//! `OTEL_BSP_MAX_QUEUE_SIZE` (2048: spans beyond it are dropped, never waited for),
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::Registry;

use crate::data::tracecontext::{self, SPAN_TARGET};

/// The service name spans are exported under unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "weir";
/// The only OTLP protocol Weir sends.
const PROTOCOL: &str = "http/protobuf";
/// `OTEL_TRACES_SAMPLER` values the SDK implements.
const SAMPLERS: &[&str] = &[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];
/// Default of `OTEL_EXPORTER_OTLP_TIMEOUT` (the OTLP specification's).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest collector answer read: an OTLP export answer is a few bytes (a partial-success
/// message at most); a misdirected endpoint streaming a large body cannot exhaust memory.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why tracing export could not be set up as the environment asks.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error(
        "{var}={value:?}: Weir exports OTLP over HTTP with protobuf bodies only; set it to \
         {PROTOCOL:?} or leave it unset"
    )]
    Protocol { var: &'static str, value: String },
    #[error("OTEL_TRACES_EXPORTER={0:?}: Weir exports traces with \"otlp\" only (or \"none\")")]
    Exporter(String),
    #[error("{var}={value:?}: not a number of milliseconds")]
    Timeout { var: &'static str, value: String },
    #[error(
        "OTEL_TRACES_SAMPLER={0:?}: Weir samples with always_on, always_off, traceidratio, \
         parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
    )]
    Sampler(String),
    #[error("OTEL_TRACES_SAMPLER_ARG={0:?}: the sampling ratio is a number from 0 to 1")]
    SamplerArg(String),
    #[error("the OTLP trace exporter: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("the OTLP exporter's HTTP client: {0}")]
    Client(String),
}

/// What the environment says about trace export.
#[derive(Debug, PartialEq, Eq)]
pub struct Settings {
    /// An endpoint is set and nothing turns export off.
    pub export: bool,
    /// How long one export request may take.
    pub timeout: Duration,
}

impl Settings {
    /// Reads the `OTEL_*` variables through `var` (the process environment in [`Settings::from_env`]).
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Settings, OtelError> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        // The protocol and timeout are read (and refused) only when spans are exported.
        let off = Settings {
            export: false,
            timeout: DEFAULT_TIMEOUT,
        };
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(off);
        }
        match set("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
            None => {}
            Some(v) if v == "otlp" => {}
            Some(v) if v == "none" => return Ok(off),
            Some(v) => return Err(OtelError::Exporter(v)),
        }
        if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .is_none()
        {
            return Ok(off);
        }
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(value) = set(var) {
                if value.trim().eq_ignore_ascii_case(PROTOCOL) {
                    break; // The traces-specific one wins over the general one.
                }
                return Err(OtelError::Protocol { var, value });
            }
        }
        // The SDK reads the sampler itself but falls back to its default on a value it does
        // not know: refused here instead, so a sampler that is set is the one in force.
        if let Some(sampler) = set("OTEL_TRACES_SAMPLER") {
            let sampler = sampler.trim().to_ascii_lowercase();
            if !SAMPLERS.contains(&sampler.as_str()) {
                return Err(OtelError::Sampler(sampler));
            }
            if sampler.ends_with("traceidratio")
                && let Some(arg) = set("OTEL_TRACES_SAMPLER_ARG")
                && !arg
                    .trim()
                    .parse::<f64>()
                    .is_ok_and(|r| (0.0..=1.0).contains(&r))
            {
                return Err(OtelError::SamplerArg(arg));
            }
        }
        let timeout = match [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]
        .into_iter()
        .find_map(|name| set(name).map(|v| (name, v)))
        {
            None => DEFAULT_TIMEOUT,
            Some((var, value)) => value
                .trim()
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| OtelError::Timeout { var, value })?,
        };
        Ok(Settings {
            export: true,
            timeout,
        })
    }

    pub fn from_env() -> Result<Settings, OtelError> {
        Settings::read(|name| std::env::var(name).ok())
    }
}

/// The running exporter: flushes what is queued and stops when [`Exporter::shutdown`] is
/// called (at the end of `weir run` / `weir operator`).
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports the spans still queued (within the export timeout) and stops.
    pub fn shutdown(self) {
        tracecontext::set_exporting(false);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the last spans were not exported");
        }
    }
}

/// The layer exporting the journey spans, when the environment asks for export (else
/// `None`): spans of other targets (libraries', Weir's log) are left out.
pub type OtelLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Sets up OTLP export as the environment says; `None` when it is off.
pub fn from_env() -> Result<Option<(OtelLayer, Exporter)>, OtelError> {
    let settings = Settings::from_env()?;
    if !settings.export {
        return Ok(None);
    }
    let client = OtlpClient::new(settings.timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .build()?;
    let mut resource = Resource::builder();
    if !names_service(
        std::env::var("OTEL_SERVICE_NAME").ok().as_deref(),
        std::env::var("OTEL_RESOURCE_ATTRIBUTES").ok().as_deref(),
    ) {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("weir");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // The journey spans are never entered (each names its parent), and the attributes
        // below would only cost allocations per span.
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target() == SPAN_TARGET
        }));
    tracecontext::set_exporting(true);
    Ok(Some((Box::new(layer), Exporter { provider })))
}

/// Whether the environment names the service (else Weir names it `weir`).
fn names_service(service_name: Option<&str>, resource_attributes: Option<&str>) -> bool {
    service_name.is_some_and(|s| !s.trim().is_empty())
        || resource_attributes.is_some_and(|a| {
            a.split(',').any(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, _)| k.trim() == "service.name")
            })
        })
}

/// The exporter's HTTP client: Weir's reqwest client (rustls on ring) on a runtime of its
/// own. The SDK's batch processor exports from a thread of its own with a plain executor, so
/// the request is run on this runtime and awaited from there; one worker thread is plenty for
/// one export at a time (`OTEL_BSP_MAX_CONCURRENT_EXPORTS` is 1).
#[derive(Debug)]
struct OtlpClient {
    client: reqwest::Client,
    timeout: Duration,
    runtime: Option<tokio::runtime::Runtime>,
    /// The last export failed: said once when exports start failing and once when they
    /// work again, not every few seconds while a collector is away.
    failing: std::sync::atomic::AtomicBool,
}

impl OtlpClient {
    fn new(timeout: Duration) -> Result<OtlpClient, OtelError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weir-otlp")
            .enable_all()
            .build()
            .map_err(|e| OtelError::Client(e.to_string()))?;
        let client = crate::tls_provider::http_client_builder()
            .timeout(timeout)
            // An endpoint is a collector, not a browser: a redirect is a misconfiguration.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OtelError::Client(e.to_string()))?;
        Ok(OtlpClient {
            client,
            timeout,
            runtime: Some(runtime),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Logs a change between exports working and failing.
    fn outcome(&self, endpoint: &str, failure: Option<String>) {
        use std::sync::atomic::Ordering;
        match failure {
            Some(why) => {
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(endpoint, error = %why, "span export failing; spans are dropped while it does");
                }
            }
            None => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(endpoint, "span export works again");
                }
            }
        }
    }
}

impl Drop for OtlpClient {
    fn drop(&mut self) {
        // Dropped by the processor's thread or, at shutdown, wherever the provider goes: never
        // block there on the runtime's threads.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| HttpError::from("the OTLP client is shut down"))?;
        let request = reqwest::Request::try_from(request)?;
        let endpoint = request.url().to_string();
        let client = self.client.clone();
        let timeout = self.timeout;
        let answer = rt.spawn(async move {
            tokio::time::timeout(timeout, async move {
                let mut resp = client.execute(request).await?;
                let mut out = Response::builder().status(resp.status());
                for (k, v) in resp.headers() {
                    out = out.header(k, v);
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await? {
                    if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok::<_, HttpError>(out.body(Bytes::from(body))?)
            })
            .await
            .map_err(|_| HttpError::from(format!("no answer within {timeout:?}")))?
        });
        let answer = answer.await.map_err(HttpError::from).and_then(|a| a);
        match &answer {
            Ok(r) if r.status().is_success() => self.outcome(&endpoint, None),
            Ok(r) => self.outcome(&endpoint, Some(format!("answered {}", r.status()))),
            Err(e) => self.outcome(&endpoint, Some(e.to_string())),
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<Settings, OtelError> {
        Settings::read(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        assert!(!read(&[]).unwrap().export);
        assert!(
            !read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])
                .unwrap()
                .export
        );
        assert!(!read(&[("OTEL_SERVICE_NAME", "x")]).unwrap().export);
    }

    #[test]
    fn an_endpoint_turns_it_on_unless_something_turns_it_off() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert!(read(&[ep]).unwrap().export);
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        );
        assert!(read(&[traces]).unwrap().export);
        assert!(!read(&[ep, ("OTEL_SDK_DISABLED", "TRUE")]).unwrap().export);
        assert!(read(&[ep, ("OTEL_SDK_DISABLED", "false")]).unwrap().export);
        assert!(
            !read(&[ep, ("OTEL_TRACES_EXPORTER", "none")])
                .unwrap()
                .export
        );
        assert!(
            read(&[ep, ("OTEL_TRACES_EXPORTER", "otlp")])
                .unwrap()
                .export
        );
        let e = read(&[ep, ("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(e.to_string().contains("zipkin"), "{e}");
    }

    #[test]
    fn a_protocol_other_than_http_protobuf_is_refused() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let e = read(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\""),
            "{e}"
        );
        let e = read(&[ep, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")]).unwrap_err();
        assert!(e.to_string().contains("TRACES_PROTOCOL"), "{e}");
        // The traces-specific variable wins over the general one.
        assert!(
            read(&[
                ep,
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ])
            .unwrap()
            .export
        );
        // Without an endpoint nothing is exported, so nothing is refused either.
        assert!(
            !read(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
                .unwrap()
                .export
        );
    }

    #[test]
    fn a_sampler_the_sdk_lacks_or_a_bad_ratio_is_refused() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        for ok in ["always_on", "PARENTBASED_TRACEIDRATIO", "always_off"] {
            assert!(
                read(&[ep, ("OTEL_TRACES_SAMPLER", ok)]).unwrap().export,
                "{ok}"
            );
        }
        let e = read(&[ep, ("OTEL_TRACES_SAMPLER", "jaeger_remote")]).unwrap_err();
        assert!(e.to_string().contains("jaeger_remote"), "{e}");
        let ratio = ("OTEL_TRACES_SAMPLER", "traceidratio");
        assert!(read(&[ep, ratio, ("OTEL_TRACES_SAMPLER_ARG", "0.25")]).is_ok());
        for bad in ["1.5", "-0.1", "half"] {
            let e = read(&[ep, ratio, ("OTEL_TRACES_SAMPLER_ARG", bad)]).unwrap_err();
            assert!(e.to_string().contains("from 0 to 1"), "{bad}: {e}");
        }
        // The argument of a sampler that takes none is not looked at.
        let on = ("OTEL_TRACES_SAMPLER", "always_on");
        assert!(read(&[ep, on, ("OTEL_TRACES_SAMPLER_ARG", "half")]).is_ok());
    }

    #[test]
    fn the_timeout_is_milliseconds() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(read(&[ep]).unwrap().timeout, DEFAULT_TIMEOUT);
        let t = read(&[ep, ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]).unwrap();
        assert_eq!(t.timeout, Duration::from_millis(2500));
        let t = read(&[
            ep,
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ])
        .unwrap();
        assert_eq!(t.timeout, Duration::from_millis(100));
        let e = read(&[ep, ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]).unwrap_err();
        assert!(e.to_string().contains("milliseconds"), "{e}");
        // Export off: not read, so not refused.
        assert!(
            !read(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")])
                .unwrap()
                .export
        );
    }

    #[test]
    fn the_service_is_weir_unless_named() {
        assert!(!names_service(None, None));
        assert!(!names_service(
            Some(""),
            Some("deployment.environment=prod")
        ));
        assert!(names_service(Some("orders-weir"), None));
        assert!(names_service(None, Some("a=b, service.name=x")));
    }
}
