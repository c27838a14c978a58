//! Hot-path benchmarks: each stage a request passes through on its way to a cache hit,
//! then a whole cache-hit request over loopback.
//!
//! Run: `cargo bench --bench hot_path` (add `-- --quick` for a fast pass).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use diia_gateway::answer::{Answer, AnswerParts};
use diia_gateway::barcode::Barcode;
use diia_gateway::cache::{AnswerCache, Fetched, Lifetimes};
use diia_gateway::cache_policy::Policy;
use diia_gateway::config::{DiiaLimitConfig, FileConfig, RateConfig};
use diia_gateway::error::GatewayError;
use diia_gateway::h1::encode_answer;
use diia_gateway::keys::HashKey;
use diia_gateway::limit::{BudgetQuota, DiiaBrake, KeyedBudget, LimitScope, Who};
use diia_gateway::request::JsonBody;
use diia_gateway::service::Reply;
use diia_gateway::service::answer_response;
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{Barcodes, InProcess};

const BODY: &[u8] = br#"{"branchId":"a1b2c3d4e5f60718293a4b5c","barcode":"3389798072091"}"#;
const TOKEN: &[u8] = b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE3OTk5OTk5OTl9.c2lnbmF0dXJl";

fn barcode_validation(c: &mut Criterion) {
    let mut group = c.benchmark_group("barcode_validation");
    group.bench_function("valid", |b| {
        b.iter(|| Barcode::parse(black_box("3389798072091")));
    });
    group.bench_function("bad_check_digit", |b| {
        b.iter(|| Barcode::parse(black_box("3389798072090")));
    });
    group.finish();
}

fn request_parsing(c: &mut Criterion) {
    c.bench_function("request_parsing/identification_body", |b| {
        b.iter(|| {
            let body = JsonBody::parse(black_box(BODY)).unwrap();
            (body.branch_id().unwrap().len(), body.barcode().unwrap())
        });
    });
}

/// The key derivation before and after: keyed BLAKE3 updated part by part (the first
/// implementation) against SipHash-2-4 with 128-bit output (now). Same parts, same
/// length prefixes; only the keyed function differs.
fn cache_key(c: &mut Criterion) {
    let secrets = HashKey::fixed([9; 16]);
    let body = JsonBody::parse(BODY).unwrap();
    let current = || {
        let mut key = secrets.key("answer");
        key.part(black_box(TOKEN)).part(b"document_identification");
        body.key_into(&mut key);
        key.finish()
    };
    let fields: Vec<(&[u8], &[u8])> = vec![
        (b"barcode", br#""3389798072091""#),
        (b"branchId", br#""a1b2c3d4e5f60718293a4b5c""#),
    ];
    let incremental = || {
        let mut hasher = blake3::Hasher::new_keyed(&[9; 32]);
        let mut part = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        part(b"answer");
        part(black_box(TOKEN));
        part(b"document_identification");
        for (name, value) in &fields {
            part(name);
            part(value);
        }
        *hasher.finalize().as_bytes()
    };
    let mut group = c.benchmark_group("cache_key");
    group.bench_function("old_blake3_keyed", |b| b.iter(incremental));
    group.bench_function("new_siphash24_128", |b| b.iter(current));
    group.finish();
}

fn answer() -> Answer {
    Answer::new(
        StatusCode::OK,
        AnswerParts {
            body: br#"{"success":true}"#,
            ..AnswerParts::default()
        },
    )
}

fn cache_lookup(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = AnswerCache::new(64 * 1024 * 1024);
    let lifetimes = Lifetimes {
        policy: Policy::Verification {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
        },
        stale_if_error: Duration::ZERO,
        longest_call: Duration::from_secs(10),
    };
    let secrets = HashKey::fixed([9; 16]);
    let key = secrets.key("answer").part(TOKEN).finish();
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(10);
    runtime.block_on(async {
        cache
            .get_or_fetch(key, None, lifetimes, deadline(), || async {
                Fetched::diia(Ok(answer()))
            })
            .await
            .unwrap();
        cache.sync();
    });
    c.bench_function("cache/hit", |b| {
        b.to_async(&runtime).iter(|| async {
            cache
                .get_or_fetch(black_box(key), None, lifetimes, deadline(), || async {
                    Fetched::diia(Ok(answer()))
                })
                .await
                .unwrap()
        });
    });
    let mut n = 0u64;
    c.bench_function("cache/insert_miss", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            let key = secrets.key("insert").part(&n.to_le_bytes()).finish();
            let cache = &cache;
            async move {
                cache
                    .get_or_fetch(key, None, lifetimes, deadline(), || async {
                        Fetched::diia(Ok(answer()))
                    })
                    .await
                    .unwrap()
            }
        });
    });
}

fn rate_limits(c: &mut Criterion) {
    let branches = KeyedBudget::new(
        LimitScope::Branch,
        RateConfig::new(u32::MAX, u32::MAX),
        50_000,
    );
    c.bench_function("rate_limit/branch_check", |b| {
        b.iter(|| branches.check(Who::Branch(black_box("a1b2c3d4e5f60718293a4b5c"))));
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let quota = BudgetQuota::new(&DiiaLimitConfig {
        per_second: NonZeroU32::new(u32::MAX).unwrap(),
        burst: NonZeroU32::new(u32::MAX).unwrap(),
        ..DiiaLimitConfig::default()
    });
    let brake = DiiaBrake::new();
    c.bench_function("rate_limit/diia_budget_acquire", |b| {
        b.to_async(&runtime).iter(|| brake.acquire(&quota, None));
    });
}

/// The response of a cache hit: built from the stored answer per request (now) against a
/// pre-rendered `HeaderMap` cloned per hit (the idea issue #10 suggested). Both allocate the
/// map's two tables; the pre-rendered one skips header validation and hashing.
fn hit_response(c: &mut Criterion) {
    let answer = Answer::new(
        StatusCode::OK,
        AnswerParts {
            body: br#"{"success":true}"#,
            content_type: Some(b"application/json; charset=utf-8"),
            trace_id: Some(b"0f8fad5b-d9cb-469f-a165-70867728950e"),
            retry_after: None,
            location: None,
        },
    );
    let hit = http::HeaderValue::from_static("diia-gateway; hit");
    let mut template = answer_response(&answer).into_parts().0.headers;
    template.insert("cache-status", hit.clone());
    let mut group = c.benchmark_group("hit_response");
    group.bench_function("built_per_hit", |b| {
        b.iter(|| {
            let mut response = answer_response(black_box(&answer));
            response.headers_mut().insert("cache-status", hit.clone());
            response
        });
    });
    group.bench_function("pre_rendered_clone", |b| {
        b.iter(|| {
            let mut response = http::Response::new(Full::new(black_box(&answer).body()));
            *response.status_mut() = answer.status;
            *response.headers_mut() = template.clone();
            response
        });
    });
    // What the HTTP/1.1 loop does now: the answer's pre-rendered head and body copied into
    // the connection's reused write buffer, as wire bytes (no HeaderMap, no allocation).
    let mut out = Vec::with_capacity(1024);
    group.bench_function("h1_pre_rendered_bytes", |b| {
        b.iter(|| {
            out.clear();
            encode_answer(black_box(&answer), Some(&hit), false, &mut out);
            out.len()
        });
    });
    group.finish();
}

/// A whole hit as the HTTP/1.1 loop serves it: `Gateway::reply` (no response built) and
/// the pre-rendered bytes, against `Gateway::serve` (a response with a `HeaderMap`).
fn in_process_reply(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bench = runtime.block_on(InProcess::start());
    let mut barcodes = Barcodes::new(338_979_900_000);
    let barcode = barcodes.next();
    let body = Bytes::from(format!(
        r#"{{"branchId":"bench-branch","barcode":"{}"}}"#,
        barcode.digits()
    ));
    runtime.block_on(bench.serve(bench.identification(barcode)));
    let mut group = c.benchmark_group("end_to_end");
    group.bench_function("in_process_cache_hit_reply_h1_bytes", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            let request = bench.identification_body(body.clone());
            runtime.block_on(async {
                out.clear();
                match bench.reply(request).await {
                    Reply::Answer {
                        answer,
                        cache_status,
                    } => encode_answer(&answer, cache_status, false, &mut out),
                    Reply::Response(_) => unreachable!("a hit is an answer"),
                }
            });
            out.len()
        });
    });
    group.finish();
}

fn error_rendering(c: &mut Criterion) {
    c.bench_function("error/render_invalid_barcode", |b| {
        b.iter(|| black_box(GatewayError::InvalidBarcode).to_response());
    });
}

/// A whole cache-hit request: hyper client → gateway over loopback → cached answer.
fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (gateway, client, token, body) = runtime.block_on(async {
        let mut config = FileConfig::default();
        config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.server.admin_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.limits.branch.per_minute = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.branch.burst = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.client.per_minute = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.client.burst = NonZeroU32::new(u32::MAX).unwrap();
        let sim = support::auto_issuing_simulator().await;
        config.upstream.base_url = sim.base_url();
        let settings = diia_gateway::Settings::build(&config).unwrap();
        let gateway = (diia_gateway::start(settings).await.unwrap(), sim);
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let url = format!(
            "http://{}/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}",
            gateway.0.addr()
        );
        let request = http::Request::get(url)
            .header("authorization", format!("Basic {DEMO_AUTH_TOKEN}"))
            .body(Full::default())
            .unwrap();
        let response = client.request(request).await.unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes())
                .unwrap();
        let token = format!("Bearer {}", json["token"].as_str().unwrap());
        let barcode = Barcode::from_base(338_979_807_209).unwrap().digits();
        let body = Bytes::from(format!(r#"{{"branchId":"bench","barcode":"{barcode}"}}"#));
        (gateway, client, token, body)
    });
    let url = format!(
        "http://{}/api/v1/acquirers/document-identification",
        gateway.0.addr()
    );
    let send = || {
        let request = http::Request::post(url.as_str())
            .header("authorization", token.as_str())
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        let client = client.clone();
        async move {
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().collect().await.unwrap()
        }
    };
    runtime.block_on(send()); // fill the cache
    c.bench_function("end_to_end/cache_hit_over_loopback", |b| {
        b.to_async(&runtime).iter(send);
    });
    runtime.block_on(gateway.0.stop());
}

/// The gateway driven in-process (no client socket): a cache hit, and a miss that goes
/// to the simulator over loopback (the simulator's own time included).
fn in_process(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bench = runtime.block_on(support::InProcess::start());
    let mut barcodes = support::Barcodes::new(338_979_000_000);
    let barcode = barcodes.next();
    let body = Bytes::from(format!(
        r#"{{"branchId":"bench-branch","barcode":"{}"}}"#,
        barcode.digits()
    ));
    runtime.block_on(async {
        assert_eq!(
            bench.serve(bench.identification(barcode)).await.status(),
            200
        );
    });
    c.bench_function("end_to_end/in_process_cache_hit", |b| {
        b.to_async(&runtime)
            .iter(|| bench.serve(bench.identification_body(body.clone())));
    });
    c.bench_function("end_to_end/in_process_miss_via_simulator", |b| {
        b.to_async(&runtime).iter(|| {
            let request = bench.identification(barcodes.next());
            bench.serve(request)
        });
    });
    c.bench_function("end_to_end/baseline_direct_to_simulator", |b| {
        b.to_async(&runtime).iter(|| bench.direct(barcodes.next()));
    });
}

criterion_group!(
    benches,
    in_process,
    barcode_validation,
    request_parsing,
    cache_key,
    cache_lookup,
    rate_limits,
    hit_response,
    in_process_reply,
    error_rendering,
    end_to_end
);
criterion_main!(benches);
