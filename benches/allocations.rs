//! Heap allocations per request on the hit path (and, for contrast, the miss path),
//! counted by an instrumented global allocator.
//!
//! Run: `cargo bench --bench allocations`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::alloc::System;

use std::sync::Arc;

use bytes::Bytes;
use diia_gateway::h1::encode_answer;
use diia_gateway::server::{ConnectionLimits, accept_loop};
use diia_gateway::service::{Reply, Shutdown};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use support::{Barcodes, InProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const REQUESTS: usize = 2_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bench = InProcess::start().await;
        let mut barcodes = Barcodes::new(338_979_807_000);
        let barcode = barcodes.next();
        let body = Bytes::from(format!(r#"{{"branchId":"bench-branch","barcode":"{}"}}"#, barcode.digits()));
        assert_eq!(bench.serve(bench.identification(barcode)).await.status(), 200);

        let requests: Vec<_> = (0..REQUESTS).map(|_| bench.identification_body(body.clone())).collect();
        let region = Region::new(GLOBAL);
        for request in requests {
            let response = bench.serve(request).await;
            debug_assert_eq!(response.status(), 200);
        }
        let hit = region.change();

        // The path the HTTP/1.1 loop takes: the reply, rendered into a reused buffer.
        let requests: Vec<_> = (0..REQUESTS).map(|_| bench.identification_body(body.clone())).collect();
        let mut out = Vec::with_capacity(1024);
        let region = Region::new(GLOBAL);
        for request in requests {
            out.clear();
            match bench.reply(request).await {
                Reply::Answer { answer, cache_status } => encode_answer(&answer, cache_status, false, &mut out),
                Reply::Response(_) => panic!("a hit is an answer"),
            }
        }
        let hit_reply = region.change();

        // The whole hit over a loopback socket: parse, request, reply, write (a raw
        // keep-alive client in this process that allocates nothing per request).
        let over_socket = hit_over_socket(&bench, &body).await;

        let misses: Vec<_> = (0..200).map(|_| bench.identification(barcodes.next())).collect();
        let region = Region::new(GLOBAL);
        for request in misses {
            let response = bench.serve(request).await;
            debug_assert_eq!(response.status(), 200);
        }
        let miss = region.change();

        // The hit's response alone: built from the answer (now) vs a pre-rendered HeaderMap
        // cloned per hit.
        let answer = diia_gateway::answer::Answer::new(
            http::StatusCode::OK,
            diia_gateway::answer::AnswerParts {
                body: br#"{"success":true}"#,
                content_type: Some(b"application/json; charset=utf-8"),
                trace_id: Some(b"0f8fad5b-d9cb-469f-a165-70867728950e"),
                ..Default::default()
            },
        );
        let status = http::HeaderValue::from_static("diia-gateway; hit");
        let mut template = diia_gateway::service::answer_response(&answer).into_parts().0.headers;
        template.insert("cache-status", status.clone());
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            let mut response = diia_gateway::service::answer_response(&answer);
            response.headers_mut().insert("cache-status", status.clone());
            std::hint::black_box(response);
        }
        let built = region.change();
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            let mut response = http::Response::new(http_body_util::Full::new(answer.body()));
            *response.headers_mut() = template.clone();
            std::hint::black_box(response);
        }
        let pre_rendered = region.change();

        // A log line into the log sink, and a per-thread value looked up (the Diia
        // pool and Redis lane path), after this thread's first use of each.
        let (sink, _flush) = diia_gateway::logsink::LogSink::spawn(
            std::io::sink(),
            diia_gateway::logsink::QUEUED_LINES,
        ).unwrap();
        let line = br#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","target":"diia_gateway::access","endpoint":"document_identification","status":200}"#;
        sink.push(line);
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            sink.push(line);
        }
        let logged = region.change();
        let per_thread = diia_gateway::per_thread::PerThread::<u64>::new();
        per_thread.with(|_| 0, |_| ());
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            per_thread.with(|_| 0, |value| std::hint::black_box(value.map(|v| *v += 1)));
        }
        let looked_up = region.change();

        let per = |n: usize, count: usize| n as f64 / count as f64;
        println!("allocations per request (request building excluded):");
        println!(
            "  cache hit : {:>6.1} allocations, {:>8.0} bytes",
            per(hit.allocations + hit.reallocations, REQUESTS),
            per(hit.bytes_allocated, REQUESTS)
        );
        println!(
            "  cache hit as the HTTP/1.1 loop serves it (reply + pre-rendered head): {:>4.1} allocations, {:>6.0} bytes",
            per(hit_reply.allocations + hit_reply.reallocations, REQUESTS),
            per(hit_reply.bytes_allocated, REQUESTS)
        );
        println!(
            "  cache hit over a loopback socket (head parse and request included): {:>4.1} allocations, {:>6.0} bytes",
            per(over_socket.allocations + over_socket.reallocations, REQUESTS),
            per(over_socket.bytes_allocated, REQUESTS)
        );
        println!(
            "  cache miss: {:>6.1} allocations, {:>8.0} bytes (client and simulator sides included)",
            per(miss.allocations + miss.reallocations, 200),
            per(miss.bytes_allocated, 200)
        );
        println!(
            "  hit response built per hit: {:>4.1} allocations; pre-rendered HeaderMap cloned: {:>4.1}",
            per(built.allocations + built.reallocations, REQUESTS),
            per(pre_rendered.allocations + pre_rendered.reallocations, REQUESTS)
        );
        println!(
            "  access line into the log sink: {:>4.1} allocations; per-thread value looked up: {:>4.1}",
            per(logged.allocations + logged.reallocations, REQUESTS),
            per(looked_up.allocations + looked_up.reallocations, REQUESTS)
        );
    });
}

/// Allocations of `REQUESTS` hits through a real listener and socket, one at a time.
async fn hit_over_socket(bench: &InProcess, body: &Bytes) -> stats_alloc::Stats {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let gateway = Arc::new(diia_gateway::gateway::Gateway::build(&bench.settings).unwrap());
    let shutdown = Shutdown::new();
    let server = tokio::spawn(accept_loop(
        listener,
        gateway,
        shutdown.clone(),
        ConnectionLimits::default(),
    ));
    let bearer = bench.bearer.to_str().unwrap();
    let mut request = format!(
        "POST /api/v1/acquirers/document-identification HTTP/1.1\r\nhost: bench\r\n\
         authorization: {bearer}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut answer = vec![0u8; 4096];
    // First request: a miss on this fresh gateway (its own cache; Diia's answer is a
    // definitive "already used", cached like a 200), then warm hits.
    for _ in 0..10 {
        stream.write_all(&request).await.unwrap();
        let n = stream.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 "));
    }
    let n = {
        stream.write_all(&request).await.unwrap();
        stream.read(&mut answer).await.unwrap()
    };
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.contains("cache-status: diia-gateway; hit"), "{head}");
    let region = Region::new(GLOBAL);
    for _ in 0..REQUESTS {
        stream.write_all(&request).await.unwrap();
        let n = stream.read(&mut answer).await.unwrap();
        debug_assert!(answer[..n].starts_with(b"HTTP/1.1 "));
    }
    let stats = region.change();
    shutdown.trigger();
    drop(stream);
    let _ = server.await;
    stats
}
