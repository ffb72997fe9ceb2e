//! `run --metrics ADDR:PORT`: Prometheus text format over plain HTTP, read
//! from the pinned maps at each scrape.
use std::{fmt::Write as _, net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{maps::Maps, status};

/// Binds `addr` and serves scrapes until the process ends.
pub async fn spawn(addr: SocketAddr, pin_dir: PathBuf) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics {addr}: pick a free address and port"))?;
    info!("serving Prometheus metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let pin_dir = pin_dir.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                // A walk of the flow table: off the event loop, which
                // must keep serving probes, netlink events and signals.
                let rendered = tokio::task::spawn_blocking(move || {
                    Maps::open(&pin_dir).and_then(|m| render(&m))
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("rendering metrics: {e}")));
                let (code, body) = match rendered {
                    Ok(body) => ("200 OK", body),
                    Err(e) => {
                        warn!("metrics: {e:#}");
                        ("500 Internal Server Error", format!("{e:#}\n"))
                    }
                };
                let head = format!(
                    "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP multihome_{name} {help}\n# TYPE multihome_{name} {kind}"
    );
}

/// The metrics, as Prometheus text.
pub fn render(maps: &Maps) -> anyhow::Result<String> {
    let st = status::collect(maps)?;
    let mut out = String::new();
    type Field = fn(&status::UplinkStatus) -> f64;
    let per_uplink: [(&str, &str, &str, Field); 15] = [
        (
            "uplink_up",
            "gauge",
            "1 if the uplink takes new flows (a share of them while on trial, only \
             when no healthy uplink can while degraded)",
            |u| f64::from(u8::from(matches!(u.state, "up" | "trial" | "degraded"))),
        ),
        ("uplink_weight", "gauge", "configured weight", |u| {
            u.weight.into()
        }),
        (
            "uplink_flows",
            "gauge",
            "live flows pinned to the uplink",
            |u| u.flows as f64,
        ),
        (
            "uplink_new_flows_total",
            "counter",
            "flows pinned to the uplink",
            |u| u.new_flows as f64,
        ),
        (
            "uplink_tx_packets_total",
            "counter",
            "packets sent out the uplink",
            |u| u.tx_packets as f64,
        ),
        (
            "uplink_tx_bytes_total",
            "counter",
            "bytes sent out the uplink",
            |u| u.tx_bytes as f64,
        ),
        (
            "uplink_rx_packets_total",
            "counter",
            "reply packets received",
            |u| u.rx_packets as f64,
        ),
        (
            "uplink_rx_bytes_total",
            "counter",
            "reply bytes received",
            |u| u.rx_bytes as f64,
        ),
        (
            "uplink_slow_path_total",
            "counter",
            "packets handed to the kernel",
            |u| u.slow_path as f64,
        ),
        (
            "uplink_rtt_seconds",
            "gauge",
            "probe round-trip time",
            |u| u.rtt_ms.unwrap_or(f64::NAN) / 1000.0,
        ),
        (
            "uplink_loss_ratio",
            "gauge",
            "probe loss over the probe window",
            |u| u.loss_pct / 100.0,
        ),
        (
            "uplink_syns_total",
            "counter",
            "TCP flows opened by a LAN SYN",
            |u| u.syns as f64,
        ),
        (
            "uplink_synacks_total",
            "counter",
            "TCP flows whose first reply was a SYN-ACK",
            |u| u.synacks as f64,
        ),
        (
            "uplink_syn_retries_total",
            "counter",
            "SYNs LAN hosts sent again on flows that saw no reply",
            |u| u.syn_retries as f64,
        ),
        (
            "uplink_syn_rtt_seconds",
            "gauge",
            "mean time from a LAN SYN to its SYN-ACK since the counters started",
            |u| u.syn_rtt_ms.unwrap_or(f64::NAN) / 1000.0,
        ),
    ];
    for (name, kind, help, value) in per_uplink {
        family(&mut out, name, kind, help);
        for u in &st.uplinks {
            let _ = writeln!(
                out,
                "multihome_{name}{{uplink=\"{}\",interface=\"{}\"}} {}",
                u.name,
                u.interface,
                value(u)
            );
        }
    }
    family(
        &mut out,
        "packets_total",
        "counter",
        "packets that left the fast path, by reason",
    );
    for (reason, n) in &st.drops {
        let _ = writeln!(out, "multihome_packets_total{{reason=\"{reason}\"}} {n}");
    }
    let capacity = maps.flow_capacity()?;
    family(&mut out, "flows", "gauge", "live flows");
    let _ = writeln!(out, "multihome_flows {}", st.flows);
    family(
        &mut out,
        "flow_capacity",
        "gauge",
        "connection map capacity, in flows",
    );
    let _ = writeln!(out, "multihome_flow_capacity {capacity}");
    family(
        &mut out,
        "flow_fill_ratio",
        "gauge",
        "live flows / capacity",
    );
    let _ = writeln!(
        out,
        "multihome_flow_fill_ratio {}",
        st.flows as f64 / capacity as f64
    );
    Ok(out)
}
