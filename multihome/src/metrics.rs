//! `run --metrics ADDR:PORT`: `/metrics` in the OpenMetrics text format
//! (prometheus-client, from the [`Status`] model read at each scrape) and
//! `/healthz`, served by hyper. Anything else is 404.
use std::{convert::Infallible, net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use log::{info, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    maps::Maps,
    status::{self, Status, UplinkStatus},
};

/// Binds `addr` and serves until the process ends.
pub async fn spawn(addr: SocketAddr, pin_dir: PathBuf) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics {addr}: pick a free address and port"))?;
    info!("serving Prometheus metrics on http://{addr}/metrics, health on /healthz");
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let pin_dir = pin_dir.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, pin_dir.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), service)
                    .await;
            });
        }
    });
    Ok(())
}

async fn answer(
    req: Request<Incoming>,
    pin_dir: PathBuf,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path != "/metrics" && path != "/healthz" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ));
    }
    // A walk of the flow table: off the event loop, which must keep
    // serving probes, netlink events and signals.
    let done = tokio::task::spawn_blocking(move || {
        let maps = Maps::open(&pin_dir)?;
        if path == "/healthz" {
            let (ok, body) = health(&status::uplinks(&maps)?);
            let code = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Ok((code, "text/plain", body));
        }
        Ok((
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&maps)?,
        ))
    })
    .await
    .unwrap_or_else(|e| Err(anyhow::anyhow!("rendering: {e}")));
    Ok(match done {
        Ok((code, kind, body)) => reply(code, kind, body),
        Err(e) => {
            warn!("metrics: {e:#}");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e:#}\n"),
            )
        }
    })
}

fn reply(code: StatusCode, kind: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

/// `/healthz`: healthy while some uplink takes new flows (`up`, on
/// `trial`, or `degraded`); the body names every uplink's state.
fn health(uplinks: &[UplinkStatus]) -> (bool, String) {
    let ok = uplinks
        .iter()
        .any(|u| matches!(u.state, "up" | "trial" | "degraded"));
    let states: Vec<String> = uplinks
        .iter()
        .map(|u| match u.reason {
            Some(why) if u.state != "up" => format!("{} {} ({why})", u.name, u.state),
            _ => format!("{} {}", u.name, u.state),
        })
        .collect();
    let verdict = if ok { "ok" } else { "no usable uplink" };
    (ok, format!("{verdict}: {}\n", states.join(", ")))
}

/// The metrics as OpenMetrics text.
pub fn render(maps: &Maps) -> anyhow::Result<String> {
    let scrape = Scrape {
        status: status::collect(maps)?,
        capacity: maps.flow_capacity()?,
    };
    let mut registry = Registry::with_prefix("multihome");
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    encode(&mut out, &registry).context("encoding the metrics")?;
    Ok(out)
}

/// One scrape's model, handed to prometheus-client as a collector: the
/// counters live in BPF maps, so each scrape reads them afresh.
#[derive(Debug)]
struct Scrape {
    status: Status,
    capacity: u32,
}

/// A per-uplink series: name (counters without `_total`, which the
/// encoder appends), type, help, value.
type Series = (
    &'static str,
    MetricType,
    &'static str,
    fn(&UplinkStatus) -> f64,
);

const PER_UPLINK: [Series; 19] = [
    (
        "uplink_up",
        MetricType::Gauge,
        "1 if the uplink takes new flows (a share of them while on trial, only when no healthy uplink can while degraded)",
        |u| f64::from(u8::from(matches!(u.state, "up" | "trial" | "degraded"))),
    ),
    (
        "uplink_weight",
        MetricType::Gauge,
        "configured weight",
        |u| u.weight.into(),
    ),
    (
        "uplink_flows",
        MetricType::Gauge,
        "live flows pinned to the uplink",
        |u| u.flows as f64,
    ),
    (
        "uplink_ipv6_flows",
        MetricType::Gauge,
        "live IPv6 flows pinned to the uplink",
        |u| u.flows6 as f64,
    ),
    (
        "uplink_new_flows",
        MetricType::Counter,
        "flows pinned to the uplink",
        |u| u.new_flows as f64,
    ),
    (
        "uplink_tx_packets",
        MetricType::Counter,
        "packets sent out the uplink",
        |u| u.tx_packets as f64,
    ),
    (
        "uplink_tx_bytes",
        MetricType::Counter,
        "bytes sent out the uplink",
        |u| u.tx_bytes as f64,
    ),
    (
        "uplink_rx_packets",
        MetricType::Counter,
        "reply packets received",
        |u| u.rx_packets as f64,
    ),
    (
        "uplink_rx_bytes",
        MetricType::Counter,
        "reply bytes received",
        |u| u.rx_bytes as f64,
    ),
    (
        "uplink_slow_path",
        MetricType::Counter,
        "packets handed to the kernel",
        |u| u.slow_path as f64,
    ),
    (
        "uplink_rtt_seconds",
        MetricType::Gauge,
        "probe round-trip time",
        |u| u.rtt_ms.unwrap_or(f64::NAN) / 1000.0,
    ),
    (
        "uplink_loss_ratio",
        MetricType::Gauge,
        "probe loss over the probe window",
        |u| u.loss_pct / 100.0,
    ),
    (
        "uplink_syns",
        MetricType::Counter,
        "TCP flows opened by a LAN SYN",
        |u| u.syns as f64,
    ),
    (
        "uplink_synacks",
        MetricType::Counter,
        "TCP flows whose first reply was a SYN-ACK",
        |u| u.synacks as f64,
    ),
    (
        "uplink_syn_retries",
        MetricType::Counter,
        "SYNs LAN hosts sent again on flows that saw no reply",
        |u| u.syn_retries as f64,
    ),
    (
        "uplink_retransmits",
        MetricType::Counter,
        "TCP data segments LAN hosts sent again",
        |u| u.retransmits as f64,
    ),
    (
        "uplink_xdp_tx_packets",
        MetricType::Counter,
        "packets to the uplink that took the XDP path (also in uplink_tx_packets)",
        |u| u.xdp_tx_packets as f64,
    ),
    (
        "uplink_xdp_rx_packets",
        MetricType::Counter,
        "packets from the uplink that took the XDP path (also in uplink_rx_packets)",
        |u| u.xdp_rx_packets as f64,
    ),
    (
        "uplink_syn_rtt_seconds",
        MetricType::Gauge,
        "mean time from a LAN SYN to its SYN-ACK since the counters started",
        |u| u.syn_rtt_ms.unwrap_or(f64::NAN) / 1000.0,
    ),
];

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = &self.status;
        for (name, kind, help, value) in PER_UPLINK {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for u in &st.uplinks {
                let labels = [
                    ("uplink", u.name.as_str()),
                    ("interface", u.interface.as_str()),
                ];
                let metric = family.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(u)).encode(metric)?,
                    _ => ConstGauge::new(value(u)).encode(metric)?,
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "packets",
            "packets that left the fast path, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &st.drops {
            ConstCounter::new(*n).encode(family.encode_family(&[("reason", *reason)])?)?;
        }
        let flows = st.flows as f64;
        let capacity = f64::from(self.capacity);
        for (name, help, value) in [
            ("flows", "live flows", flows),
            (
                "flow_capacity",
                "connection map capacity, in flows",
                capacity,
            ),
            ("flow_fill_ratio", "live flows / capacity", flows / capacity),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink(name: &str, state: &'static str, reason: Option<&'static str>) -> UplinkStatus {
        UplinkStatus {
            reason,
            new_flows: 7,
            ..UplinkStatus::sample(name, state)
        }
    }

    #[test]
    fn healthz_is_ok_while_some_uplink_takes_new_flows_and_names_every_state() {
        let (ok, body) = health(&[
            uplink("x", "degraded", Some("slow")),
            uplink("y", "down", None),
        ]);
        assert!(ok);
        assert_eq!(body, "ok: x degraded (slow), y down\n");
        let (ok, body) = health(&[uplink("x", "down", Some("probes fail"))]);
        assert!(!ok);
        assert_eq!(body, "no usable uplink: x down (probes fail)\n");
    }

    #[test]
    fn counters_keep_their_names_with_one_total_suffix() {
        let scrape = Scrape {
            status: Status {
                uplinks: vec![uplink("x", "up", None)],
                interfaces: vec![],
                flows: 3,
                top_hosts: vec![],
                lan_prefixes6: Vec::new(),
                flows6: 0,
                drops: [("port_exhausted", 2)].into_iter().collect(),
            },
            capacity: 4,
        };
        let mut registry = Registry::with_prefix("multihome");
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        encode(&mut out, &registry).expect("encode");
        let x = "{uplink=\"x\",interface=\"wanx\"}";
        assert!(
            out.contains(&format!("multihome_uplink_new_flows_total{x} 7.0\n")),
            "{out}"
        );
        assert!(!out.contains("_total_total"), "{out}");
        assert!(
            out.contains("multihome_packets_total{reason=\"port_exhausted\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("multihome_flow_fill_ratio 0.75\n"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
    }
}
