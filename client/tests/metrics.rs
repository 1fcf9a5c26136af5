//! The client's metrics reach an installed recorder when published (`telemetry::publish`,
//! as a scrape handler does): streams by outcome, bytes received, active streams and
//! connections back to zero, pool evictions by reason. One test in this file: the recorder is
//! process-wide.
#![allow(clippy::unwrap_used)]

use metrics_exporter_prometheus::PrometheusBuilder;
use nexus_client::{Client, ClientConfig, Item, StreamOptions};
use nexus_server::Backend;
use nexus_testkit::{prometheus_sample as sample, start_server, wait_until, TempDir};

#[test]
fn client_metrics_reach_the_recorder() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();
    let dir = TempDir::new("client-metrics");
    let server = start_server(Backend::Epoll, dir.path());
    let client = Client::new(ClientConfig {
        threads: 1,
        ..ClientConfig::default()
    })
    .unwrap();
    let render = || {
        nexus_client::telemetry::publish(&client);
        handle.render()
    };
    let endpoint = server.local_addr();
    let mut done = client.initiate(endpoint, "synthetic:3MiB", StreamOptions::default());
    let mut bytes = 0;
    let end = loop {
        match done.recv() {
            Some(Item::Chunk(data)) => bytes += data.len(),
            Some(Item::End(end)) => break end,
            None => panic!("the stream ended without its end marker"),
        }
    };
    assert!(end.is_complete());
    assert_eq!(bytes, 3 << 20);
    let cancelled = client.initiate(endpoint, "synthetic:1TiB", StreamOptions::default());
    cancelled.cancel();
    wait_until("the cancel to be counted", || {
        sample(
            &render(),
            "nexus_client_streams_finished_total{outcome=\"cancelled\"}",
        ) == Some(1.0)
    });
    drop(cancelled);
    client.close();
    wait_until("the connection to close", || {
        sample(&render(), "nexus_client_connections") == Some(0.0)
    });
    let scrape = render();
    assert_eq!(
        sample(
            &scrape,
            "nexus_client_streams_finished_total{outcome=\"complete\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "nexus_client_streams_active"),
        Some(0.0),
        "{scrape}"
    );
    // The cancelled stream may have received some data before its cancel.
    let received = sample(&scrape, "nexus_client_bytes_received_total").unwrap();
    assert!(received >= (3 << 20) as f64, "{scrape}");
    assert_eq!(
        sample(
            &scrape,
            "nexus_client_pool_evictions_total{reason=\"closed\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
}
