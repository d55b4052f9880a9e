//! Prometheus metrics: counters and latency histograms kept as the daemon works, and gauges read
//! from the tables when scraped; rendered in the text exposition format (`prometheus-client`)
//! for `portres metrics` and, with `metrics_listen`, served at `/metrics` over HTTP (`hyper`).
//!
//! Nothing here names a user, a port or a token: only counts, by operation, outcome code, kind,
//! mode, protocol and layer, so the endpoint may be scraped by whoever monitors the machine.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Shared;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// What the daemon counts as it works (one set per process).
pub(crate) struct Metrics {
    /// Requests answered, by operation and outcome (`ok` or the refusal's code).
    requests: Family<Labels, Counter>,
    /// Time from a request's arrival to its answer, by operation.
    request_seconds: HistogramFamily,
    /// Durable store writes (journal and database, both fsynced).
    store_write_seconds: Histogram,
    /// Sessions accepted since start.
    sessions_accepted: Counter,
}

/// 50 µs to ~3 s in factors of 2.5: fast table operations and slow fsyncs alike.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.5, 13))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    requests: Family::default(),
    request_seconds: Family::new_with_constructor(latency_buckets),
    store_write_seconds: latency_buckets(),
    sessions_accepted: Counter::default(),
});

/// A request was answered.
pub(crate) fn request(operation: &'static str, outcome: &str, took: Duration) {
    METRICS
        .requests
        .get_or_create(&vec![
            ("operation", operation.to_string()),
            ("outcome", outcome.to_string()),
        ])
        .inc();
    METRICS
        .request_seconds
        .get_or_create(&vec![("operation", operation.to_string())])
        .observe(took.as_secs_f64());
}

/// A store write finished (successfully or not).
pub(crate) fn store_write(took: Duration) {
    METRICS.store_write_seconds.observe(took.as_secs_f64());
}

/// A session was accepted.
pub(crate) fn session_accepted() {
    METRICS.sessions_accepted.inc();
}

/// The whole exposition: the counters above, and gauges read now from every namespace's table.
pub(crate) fn render(shared: &Shared) -> String {
    let mut registry = Registry::with_prefix("portres");
    registry.register(
        "requests",
        "Requests answered, by operation and outcome (ok, or the refusal's code)",
        METRICS.requests.clone(),
    );
    registry.register(
        "request_duration_seconds",
        "Time from a request's arrival to its answer, by operation",
        METRICS.request_seconds.clone(),
    );
    registry.register(
        "store_write_duration_seconds",
        "Durable writes of persistent reservations (journal and store, fsynced)",
        METRICS.store_write_seconds.clone(),
    );
    registry.register(
        "sessions_accepted",
        "Client sessions accepted since the daemon started",
        METRICS.sessions_accepted.clone(),
    );

    let reservations = Family::<Labels, Gauge>::default();
    let ports = Family::<Labels, Gauge>::default();
    let handed_out = Family::<Labels, Gauge>::default();
    let held = Gauge::<i64>::default();
    let sessions = Gauge::<i64>::default();
    let namespaces = Gauge::<i64>::default();
    let layers = Family::<Labels, Gauge>::default();
    // Every combination is present, at 0 when nothing has it: a dashboard sees 0, not "no data".
    for kind in ["runtime", "persistent"] {
        for mode in ["hold", "exclude"] {
            for protocol in ["tcp", "udp"] {
                let labels = vec![
                    ("kind", kind.to_string()),
                    ("mode", mode.to_string()),
                    ("protocol", protocol.to_string()),
                ];
                reservations.get_or_create(&labels).set(0);
                ports.get_or_create(&labels).set(0);
            }
        }
    }
    for protocol in ["tcp", "udp"] {
        handed_out
            .get_or_create(&vec![("protocol", protocol.to_string())])
            .set(0);
    }
    {
        let all = shared.spaces();
        sessions.set(all.session_count() as i64);
        let mut served = 0;
        for st in all.all() {
            served += 1;
            held.inc_by(st.enforcer.held_ports() as i64);
            for r in st.table.reservations() {
                let kind = if r.is_persistent() {
                    "persistent"
                } else {
                    "runtime"
                };
                let labels = vec![
                    ("kind", kind.to_string()),
                    ("mode", r.mode.as_str().to_string()),
                    ("protocol", r.protocol.as_str().to_string()),
                ];
                reservations.get_or_create(&labels).inc();
                ports
                    .get_or_create(&labels)
                    .inc_by(i64::from(r.range.count()));
                handed_out
                    .get_or_create(&vec![("protocol", r.protocol.as_str().to_string())])
                    .inc_by(r.handed_out().len() as i64);
            }
        }
        namespaces.set(served);
        for layer in all.home.enforcer.layers(all.session_count()) {
            layers
                .get_or_create(&vec![("layer", layer.name.clone())])
                .set(i64::from(layer.active));
        }
    }
    registry.register(
        "reservations",
        "Live reservations, by kind, mode and protocol (all network namespaces served)",
        reservations,
    );
    registry.register(
        "reserved_ports",
        "Ports in live reservations, by kind, mode and protocol",
        ports,
    );
    registry.register(
        "held_ports",
        "Ports held by placeholder sockets (hold layer)",
        held,
    );
    registry.register(
        "handed_out_ports",
        "Ports handed out as bound sockets from reservations, by protocol",
        handed_out,
    );
    registry.register("sessions", "Open client sessions", sessions);
    registry.register(
        "network_namespaces",
        "Network namespaces served (the daemon's own included)",
        namespaces,
    );
    registry.register(
        "layer_up",
        "Whether an enforcement layer is in force in the daemon's namespace (1) or not (0)",
        layers,
    );
    let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    uptime.set(shared.started.elapsed().as_secs_f64());
    registry.register("uptime_seconds", "Seconds since the daemon started", uptime);
    #[cfg(feature = "cluster")]
    if let Some(c) = &shared.cluster {
        let m = c.metrics();
        let gauge = |v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            g
        };
        registry.register(
            "cluster_connected",
            "Cluster mode: whether this member is linked to etcd and registered (1) or not (0)",
            gauge(i64::from(m.connected)),
        );
        registry.register(
            "cluster_members",
            "Cluster mode: live members of the cluster, as this member last saw them",
            gauge(m.members as i64),
        );
        registry.register(
            "cluster_reservations",
            "Cluster mode: cluster reservations (persistent and runtime) this member knows",
            gauge(m.reservations as i64),
        );
        registry.register(
            "cluster_enforce_failures",
            "Cluster mode: cluster reservations this member cannot enforce now",
            gauge(m.failures as i64),
        );
        registry.register(
            "cluster_revisions_behind",
            "Cluster mode: revisions between etcd's last known revision and this member's applied one",
            gauge((m.revision - m.applied).max(0)),
        );
    }
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
        .set(1);
    registry.register("build_info", "The daemon's version (value 1)", info);

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String does not fail");
    out
}

/// Connections the metrics endpoint serves at once; more are closed at once (a scraper needs
/// one; descriptors are the placeholders' budget).
const MAX_METRICS_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `listener` (HTTP/1.1), until the daemon stops. Anything else gets
/// 404 (another path) or 405 (another method). Each connection is its own task, at most
/// [`MAX_METRICS_CONNECTIONS`] at once; a connection is closed after 10 s whatever it does.
pub(crate) async fn serve_http(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};

    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, most likely: wait for one to come free.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: closed at once (dropped), rather than queued.
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let shared = shared.clone();
                async move {
                    let (status, body) = match (req.method(), req.uri().path()) {
                        (&Method::GET | &Method::HEAD, "/metrics") => {
                            (StatusCode::OK, render(&shared))
                        }
                        (_, "/metrics") => (
                            StatusCode::METHOD_NOT_ALLOWED,
                            "only GET /metrics\n".to_string(),
                        ),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "portres serves /metrics only\n".to_string(),
                        ),
                    };
                    Response::builder()
                        .status(status)
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        });
    }
}
