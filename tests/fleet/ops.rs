//! The dashboard's scale-out panels against the real thing: a real Prometheus scrapes three
//! gateways sharing one Redis while a re-scan lands on another instance (a remote hit), and
//! every scale-out panel query answers with data. (The single-instance ops test checks every
//! other panel; it skips these, whose metrics exist only with `[scaleout]`.)

use http::StatusCode;

use crate::processes::{World, fresh_barcode};
use diia_gateway_testkit::prometheus::{
    Prometheus, assert_data, dashboard_queries, is_scaleout, tool,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scaleout_dashboard_query_returns_data_from_a_fleet() {
    let Some(binary) = tool("prometheus") else {
        return;
    };
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let admins: Vec<_> = world.gateways.iter().map(|gateway| gateway.admin).collect();
    let prometheus = Prometheus::start(&binary, &admins, None, &world.http).await;
    prometheus
        .wait_until_scraped(&world.http, admins.len())
        .await;
    let token = world.token().await;
    // Misses on the first instance, re-scans on the others (remote, then near hits), for
    // a few scrapes so that every rate has two samples.
    for _ in 0..8 {
        let barcode = fresh_barcode();
        for gateway in &world.gateways {
            let reply = gateway.identify(&world.http, &token, &barcode).await;
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
        let rescan = world.gateways[1]
            .identify(&world.http, &token, &barcode)
            .await;
        assert_eq!(rescan.status, StatusCode::OK);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    let queries: Vec<_> = dashboard_queries()
        .into_iter()
        .filter(|(_, promql)| is_scaleout(promql))
        .collect();
    assert!(queries.len() >= 5, "{} scale-out queries", queries.len());
    assert_data(&prometheus, &world.http, &queries).await;
    // The panels show what happened: remote hits counted, Redis up on every instance.
    let remote = prometheus
        .query(
            &world.http,
            r#"sum(diia_gateway_shared_lookups_total{result="remote_hit"})"#,
        )
        .await;
    let remote: f64 = remote["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(remote >= 8.0, "{remote} remote hits scraped");
    let up = prometheus
        .query(&world.http, r#"min(diia_gateway_redis_up{job=~".*"})"#)
        .await;
    assert_eq!(up["data"]["result"][0]["value"][1], "1");
}
