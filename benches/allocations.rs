//! Heap allocations per request on the hit path (and, for contrast, the miss path),
//! counted by an instrumented global allocator.
//!
//! Run: `cargo bench --bench allocations`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::alloc::System;

use bytes::Bytes;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use support::{Barcodes, InProcess};

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
        let mut template = diia_gateway::proxy::answer_response(&answer).into_parts().0.headers;
        template.insert("cache-status", status.clone());
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            let mut response = diia_gateway::proxy::answer_response(&answer);
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

        let per = |n: usize, count: usize| n as f64 / count as f64;
        println!("allocations per request (request building excluded):");
        println!(
            "  cache hit : {:>6.1} allocations, {:>8.0} bytes",
            per(hit.allocations + hit.reallocations, REQUESTS),
            per(hit.bytes_allocated, REQUESTS)
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
    });
}
