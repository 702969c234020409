//! `weir bench ingest --pii`: the same publish load against two streams of one worker, one
//! encrypting two personal-data fields (`spec.pii`, AES-256-GCM per subject) and one not;
//! the encrypted stream's rate over the plain one's is the cost of encryption.

use base64::Engine as _;

use super::load;
use super::pipeline::Pipeline;
use super::report::{Measurement, Report};
use super::scenarios::{stream_yaml, versions};
use super::{BenchArgs, BenchError};

/// Both streams, and the key ring of the encrypted one (a fixed test key: the benchmark's
/// database is dropped at the end).
fn manifests() -> String {
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let store = "  store: {urlSecretRef: {name: pg, key: url}}\n  batching: {maxEvents: 1000}\n";
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: pii-keys, namespace: bench}}\nstringData: {{keys: \"bench:{key}\"}}\n---\n{}\n---\n{}",
        stream_yaml("plain", store),
        stream_yaml(
            "encrypted",
            &format!(
                "{store}  pii: {{fields: [/customer/email, /customer/phone], keySecretRef: {{name: pii-keys, key: keys}}}}\n"
            )
        ),
    )
}

pub async fn ingest_pii(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    super::own_pipeline(args, "ingest --pii starts its own worker (two streams)")?;
    let versions = versions(&args.pg_url).await;
    eprintln!("starting a weir pipeline (plain and encrypted streams)…");
    let pipe = Pipeline::start(&args.pg_url, &args.amqp_url, |_| manifests()).await?;
    pipe.wait_ready(&["plain", "encrypted"]).await?;
    let batches = args.batch.map_or_else(|| vec![1, 100], |b| vec![b]);
    let run_id = format!("{:x}", rand::random::<u32>());
    let mut reports = vec![];
    for batch in batches {
        let (events, concurrency) = if batch == 1 {
            (args.events.min(50_000), args.concurrency.max(64))
        } else {
            (args.events, args.concurrency)
        };
        let run = |stream: &'static str, label: String, events: usize, progress: bool| {
            let url = pipe.events_url(stream);
            async move {
                load::publish(&load::LoadSpec {
                    rate: args.rate,
                    max_duration: args.duration,
                    show_progress: progress,
                    customer: true,
                    ..load::LoadSpec::new(&url, &label, events, batch, concurrency, args.payload)
                })
                .await
            }
        };
        // Warm-up of both (the encrypted one creates its 1000 subjects' keys here).
        for stream in ["plain", "encrypted"] {
            eprintln!("ingest --pii batch={batch}: warm-up {stream}");
            let warm = (events / 20).clamp(1_000, 5_000);
            run(stream, format!("w{run_id}-{stream}-{batch}"), warm, false).await?;
        }
        eprintln!("ingest --pii batch={batch} concurrency={concurrency}: plain");
        let plain = run("plain", format!("m{run_id}-p-{batch}"), events, true).await?;
        eprintln!("ingest --pii batch={batch} concurrency={concurrency}: encrypted");
        let enc = run("encrypted", format!("m{run_id}-e-{batch}"), events, true).await?;
        reports.push(Report::new(
            "ingest-pii",
            format!(
                "batch={batch} c={concurrency} payload={}B, 2 pii fields, 1000 subjects",
                args.payload
            ),
            Measurement::from_load("weir, 2 pii fields encrypted", &enc, args.rate),
            Measurement::from_load("weir, same stream without pii", &plain, args.rate),
            versions.clone(),
        ));
    }
    pipe.stop().await?;
    Ok(reports)
}
