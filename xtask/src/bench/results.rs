//! What a bench run measured: samples per (metric, mode), the machine it
//! ran on, and the summary statistics the report prints.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The ways of running the gateway, in the order they alternate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Routing over one uplink, no NAT: the floor cost.
    Plain,
    /// The seed's iptables recipe (CONNMARK, SNAT per mark).
    Seed,
    /// The same recipe in nftables.
    Nft,
    /// multihome as configured by default (`xdp = "auto"`: TC alone on
    /// veth).
    Multihome,
    /// multihome with XDP forced native on every interface (and GRO on
    /// at both ends of every link, which XDP redirects into veth need).
    #[serde(rename = "multihome-xdp")]
    MultihomeXdp,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Plain,
        Mode::Seed,
        Mode::Nft,
        Mode::Multihome,
        Mode::MultihomeXdp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Seed => "seed",
            Mode::Nft => "nft",
            Mode::Multihome => "multihome",
            Mode::MultihomeXdp => "multihome-xdp",
        }
    }

    /// multihome's daemon runs the gateway (with BPF programs).
    pub fn is_multihome(self) -> bool {
        matches!(self, Mode::Multihome | Mode::MultihomeXdp)
    }
}

/// One measured quantity.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Key in the results file.
    pub id: &'static str,
    /// Row label in the report.
    pub title: &'static str,
    pub unit: &'static str,
    /// False for latencies, CPU and memory.
    pub higher_is_better: bool,
}

const fn metric(id: &'static str, title: &'static str, unit: &'static str, hib: bool) -> Metric {
    Metric {
        id,
        title,
        unit,
        higher_is_better: hib,
    }
}

/// Every metric, in report order.
pub const METRICS: &[Metric] = &[
    metric("tcp1", "TCP bulk, 1 stream", "Gbit/s", true),
    metric("tcp8", "TCP bulk, 8 streams", "Gbit/s", true),
    metric("udp_pps", "UDP 64 B, 256 flows", "kpps", true),
    metric(
        "udp_pps_nooff",
        "UDP 64 B, 256 flows, offloads off",
        "kpps",
        true,
    ),
    metric(
        "udp_pps_seed",
        "UDP 64 B, 256 flows, the seed's topology (ISP routers; counted out of the gateway)",
        "kpps",
        true,
    ),
    metric(
        "udp6_pps",
        "IPv6 UDP 64 B, 256 flows (multihome: NPTv6; nft: snat prefix)",
        "kpps",
        true,
    ),
    metric(
        "newflow_pps",
        "UDP 64 B, every packet a new flow",
        "kpps",
        true,
    ),
    metric(
        "newflow_rules_ratio",
        "New flows with 100 policy rules ÷ with none",
        "×",
        true,
    ),
    metric(
        "conn_rate",
        "New TCP connections (wrk, Connection: close)",
        "conn/s",
        true,
    ),
    metric("rr_p50", "Request/response latency p50", "µs", false),
    metric("rr_p99", "Request/response latency p99", "µs", false),
    metric(
        "cpu_ns_pkt",
        "CPU per delivered packet (UDP 256 flows)",
        "ns",
        false,
    ),
    metric(
        "bpf_ns_pkt",
        "BPF programs' run time per packet (UDP 256 flows)",
        "ns",
        false,
    ),
    metric(
        "bpf_xdp_ns_pkt",
        "of which the XDP programs (UDP 256 flows)",
        "ns",
        false,
    ),
    metric(
        "bpf_ns_newflow",
        "BPF programs' run time per packet (every packet a new flow)",
        "ns",
        false,
    ),
    metric(
        "scale_100k_ratio",
        "UDP rate with 100k live flows ÷ empty",
        "×",
        true,
    ),
    metric(
        "scale_1m_ratio",
        "UDP rate with 1M live flows ÷ empty",
        "×",
        true,
    ),
    metric("mem_100k", "Memory per flow, 100k live flows", "B", false),
    metric("mem_1m", "Memory per flow, 1M live flows", "B", false),
];

pub fn metric_by_id(id: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.id == id)
}

/// Where and how the run was made.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// UTC, RFC 3339.
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub rounds: usize,
    pub quick: bool,
    /// Seconds the whole run took.
    pub seconds: f64,
    /// Free-form facts about the setup, one per line in the report.
    pub notes: Vec<String>,
}

/// All samples of a run: `samples[metric id][mode]`, one value per round.
/// A cell a mode cannot fill (nf_conntrack at 1M flows, BPF time without
/// BPF) has no samples and a reason in `skipped`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub samples: BTreeMap<String, BTreeMap<Mode, Vec<f64>>>,
    pub skipped: BTreeMap<String, BTreeMap<Mode, String>>,
}

impl Results {
    pub fn add(&mut self, metric: &str, mode: Mode, value: f64) {
        debug_assert!(metric_by_id(metric).is_some(), "unknown metric {metric}");
        self.samples
            .entry(metric.to_string())
            .or_default()
            .entry(mode)
            .or_default()
            .push(value);
    }

    pub fn skip(&mut self, metric: &str, mode: Mode, why: &str) {
        self.skipped
            .entry(metric.to_string())
            .or_default()
            .insert(mode, why.to_string());
    }

    pub fn summary(&self, metric: &str, mode: Mode) -> Option<Summary> {
        Summary::of(self.samples.get(metric)?.get(&mode)?)
    }

    pub fn skipped_why(&self, metric: &str, mode: Mode) -> Option<&str> {
        self.skipped.get(metric)?.get(&mode).map(String::as_str)
    }
}

/// Median and spread of one cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_and_nan_ignored() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, f64::NAN, 2.0, 3.0]).expect("summary");
        assert_eq!((s.median, s.n), (2.5, 4));
        assert!(Summary::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn results_round_trip_through_json() {
        let mut r = Results::default();
        r.add("tcp1", Mode::Plain, 10.0);
        r.add("tcp1", Mode::Multihome, 11.0);
        r.skip("mem_1m", Mode::Seed, "over nf_conntrack_max");
        let text = serde_json::to_string(&r).expect("json");
        let back: Results = serde_json::from_str(&text).expect("parse");
        assert_eq!(
            back.summary("tcp1", Mode::Multihome).map(|s| s.median),
            Some(11.0)
        );
        assert_eq!(
            back.skipped_why("mem_1m", Mode::Seed),
            Some("over nf_conntrack_max")
        );
    }

    #[test]
    fn every_metric_id_is_unique() {
        for (i, m) in METRICS.iter().enumerate() {
            assert!(METRICS[i + 1..].iter().all(|o| o.id != m.id), "{}", m.id);
        }
    }
}
