//! The metric families, built from a [`NodeReport`].
//!
//! The four TKEStack families keep their names, labels and units exactly (see the README for
//! the list and the deliberate differences); everything else is prefixed `gpu_manager_`.

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use crate::report::NodeReport;

/// Bytes in a MiB.
const MIB: f64 = 1024.0 * 1024.0;

/// `container_gpu_utilization`: SM percent used by the container's processes.
pub const CONTAINER_GPU_UTILIZATION: &str = "container_gpu_utilization";
/// `container_gpu_memory_total`: GPU memory used by the container's processes, MiB.
pub const CONTAINER_GPU_MEMORY_TOTAL: &str = "container_gpu_memory_total";
/// `container_request_gpu_utilization`: requested vcuda-core / 100.
pub const CONTAINER_REQUEST_GPU_UTILIZATION: &str = "container_request_gpu_utilization";
/// `container_request_gpu_memory`: requested memory, MiB.
pub const CONTAINER_REQUEST_GPU_MEMORY: &str = "container_request_gpu_memory";

/// Things the report does not carry but the exposition shows.
#[derive(Debug, Clone, Copy)]
pub struct RenderInfo<'a> {
    /// The daemon's version string.
    pub version: &'a str,
    /// The GPU backend kind (`nvml`, `simulated`).
    pub backend: &'a str,
}

struct Family {
    mf: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Self { mf }
    }

    fn gauge(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::GAUGE)
    }

    fn counter(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::COUNTER)
    }

    fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        let pairs = labels
            .iter()
            .map(|(n, v)| {
                let mut lp = LabelPair::default();
                lp.set_name((*n).to_string());
                lp.set_value((*v).to_string());
                lp
            })
            .collect();
        let mut m = Metric::from_label(pairs);
        if self.mf.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.mf.mut_metric().push(m);
    }
}

type Label<'a> = (&'static str, &'a str);

fn with_label<'a>(base: [Label<'a>; 4], extra: Label<'a>) -> [Label<'a>; 5] {
    let [a, b, c, d] = base;
    [a, b, c, d, extra]
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Every family with at least one series, in a fixed order.
pub fn metric_families(report: &NodeReport, info: RenderInfo<'_>) -> Vec<MetricFamily> {
    let node = report.node.as_str();
    let mut out: Vec<Family> = Vec::with_capacity(32);

    // --- The four TKEStack families -----------------------------------------------------
    let mut util = Family::gauge(
        CONTAINER_GPU_UTILIZATION,
        "GPU utilisation of the container's processes in percent of a card's SM time, per card \
         (gpu=\"gpu<index>\") and summed over its cards (gpu=\"total\").",
    );
    let mut mem = Family::gauge(
        CONTAINER_GPU_MEMORY_TOTAL,
        "GPU memory used by the container's processes in MiB, per card (gpu_memory=\"gpu<index>\") \
         and summed over its cards (gpu_memory=\"total\").",
    );
    let mut req_util = Family::gauge(
        CONTAINER_REQUEST_GPU_UTILIZATION,
        "GPU the container requested, in cards: vcuda-core / 100 (0.3 for 30 vcuda-core).",
    );
    let mut req_mem = Family::gauge(
        CONTAINER_REQUEST_GPU_MEMORY,
        "GPU memory the container requested in MiB (vcuda-memory blocks x 256; whole cards: \
         their memory).",
    );
    for c in &report.containers {
        let base = [
            ("pod_name", c.pod_name.as_str()),
            ("namespace", c.namespace.as_str()),
            ("node", node),
            ("container_name", c.container_name.as_str()),
        ];
        let with = |extra| with_label(base, extra);
        if let Some(total) = &c.usage {
            for card in &c.cards {
                if let Some(u) = &card.usage {
                    util.push(&with(("gpu", &card.gpu)), u.utilization_percent as f64);
                    mem.push(&with(("gpu_memory", &card.gpu)), u.memory_used_mib as f64);
                }
            }
            util.push(&with(("gpu", "total")), total.utilization_percent as f64);
            mem.push(&with(("gpu_memory", "total")), total.memory_used_mib as f64);
        }
        req_util.push(
            &with(("req_of_gpu", "total")),
            f64::from(c.request_cores) / 100.0,
        );
        req_mem.push(
            &with(("req_of_gpu_memory", "total")),
            c.request_memory_mib as f64,
        );
    }
    out.extend([util, mem, req_util, req_mem]);

    // --- Node --------------------------------------------------------------------------
    let mut build = Family::gauge(
        "gpu_manager_build_info",
        "Always 1; the labels say which gpu-manager version and GPU backend serve this node.",
    );
    build.push(
        &[
            ("node", node),
            ("version", info.version),
            ("backend", info.backend),
        ],
        1.0,
    );
    let mut up = Family::gauge(
        "gpu_manager_backend_up",
        "1 when the GPU backend answered the last usage sample (processes and card usage), \
         0 when it failed or timed out; container usage series are absent while it is 0.",
    );
    up.push(&[("node", node)], flag(report.backend.up));
    let mut sample_secs = Family::gauge(
        "gpu_manager_usage_sample_duration_seconds",
        "Time the last usage sample took: asking the GPU backend and mapping PIDs to containers.",
    );
    sample_secs.push(&[("node", node)], report.backend.sample_seconds);
    let mut registered = Family::gauge(
        "gpu_manager_device_plugin_registered",
        "1 when both device plugins (vcuda-core and vcuda-memory) are registered with the kubelet.",
    );
    registered.push(&[("node", node)], flag(report.registered));
    let mut registrations = Family::counter(
        "gpu_manager_device_plugin_registrations_total",
        "Successful registrations with the kubelet since the daemon started, per resource.",
    );
    for r in &report.registrations {
        registrations.push(&[("node", node), ("resource", &r.resource)], r.count as f64);
    }
    let mut containers = Family::gauge(
        "gpu_manager_allocated_containers",
        "Containers holding a GPU allocation on this node.",
    );
    containers.push(&[("node", node)], report.containers.len() as f64);
    let mut pods = Family::gauge(
        "gpu_manager_allocated_pods",
        "Pods with at least one container holding a GPU allocation on this node.",
    );
    let pod_keys: std::collections::BTreeSet<(&str, &str)> = report
        .containers
        .iter()
        .map(|c| (c.namespace.as_str(), c.pod_name.as_str()))
        .collect();
    pods.push(&[("node", node)], pod_keys.len() as f64);
    out.extend([
        build,
        up,
        sample_secs,
        registered,
        registrations,
        containers,
        pods,
    ]);

    // --- Cards -------------------------------------------------------------------------
    let mut card_info = Family::gauge(
        "gpu_manager_card_info",
        "Always 1; the labels describe the card (model, uuid, /dev/nvidia minor, PCI bus ID, \
         NUMA node).",
    );
    let mut healthy = Family::gauge(
        "gpu_manager_card_healthy",
        "1 when the card is healthy and offered to pods, 0 when it is not.",
    );
    let mut core_cap = Family::gauge(
        "gpu_manager_card_vcuda_core_capacity",
        "vcuda-core units the card offers (100 per card).",
    );
    let mut core_alloc = Family::gauge(
        "gpu_manager_card_vcuda_core_allocated",
        "vcuda-core units of the card held by containers (100 for a whole card).",
    );
    let mut mem_cap = Family::gauge(
        "gpu_manager_card_memory_capacity_bytes",
        "Memory of the card in bytes.",
    );
    let mut mem_alloc = Family::gauge(
        "gpu_manager_card_memory_allocated_bytes",
        "Memory of the card held by containers in bytes (vcuda-memory blocks x 256 MiB; whole \
         cards: all of it).",
    );
    let mut card_util = Family::gauge(
        "gpu_manager_card_utilization_ratio",
        "Share of time a kernel ran on the card (0 to 1), as the GPU backend reports it.",
    );
    let mut card_mem_used = Family::gauge(
        "gpu_manager_card_memory_used_bytes",
        "Memory in use on the card in bytes, as the GPU backend reports it.",
    );
    let mut card_procs = Family::gauge("gpu_manager_card_processes", "Processes using the card.");
    let mut card_unmapped = Family::gauge(
        "gpu_manager_card_unmapped_processes",
        "Processes using the card that belong to no container holding an allocation (host \
         processes, or PIDs that could not be mapped: see /usage for the reason).",
    );
    let mut xid = Family::counter(
        "gpu_manager_card_xid_errors_total",
        "XID errors the driver reported for the card since the daemon started, per XID code.",
    );
    for c in &report.cards {
        let card = [("node", node), ("gpu", c.gpu.as_str())];
        let minor = c.minor.to_string();
        let numa = c.numa_node.map(|n| n.to_string()).unwrap_or_default();
        card_info.push(
            &[
                ("node", node),
                ("gpu", &c.gpu),
                ("uuid", &c.uuid),
                ("model", &c.model),
                ("minor", &minor),
                ("pci_bus_id", &c.pci_bus_id),
                ("numa_node", &numa),
            ],
            1.0,
        );
        healthy.push(&card, flag(c.healthy));
        core_cap.push(&card, f64::from(c.cores_capacity));
        core_alloc.push(&card, c.cores_allocated as f64);
        mem_cap.push(&card, c.memory_mib as f64 * MIB);
        mem_alloc.push(&card, c.memory_allocated_mib as f64 * MIB);
        if let Some(u) = c.utilization_percent {
            card_util.push(&card, f64::from(u) / 100.0);
        }
        if let Some(m) = c.memory_used_mib {
            card_mem_used.push(&card, m as f64 * MIB);
        }
        if let Some(p) = c.processes {
            card_procs.push(&card, p as f64);
        }
        if let Some(p) = c.unmapped_processes {
            card_unmapped.push(&card, p as f64);
        }
        for x in &c.xid_errors {
            let code = x.code.to_string();
            xid.push(
                &[("node", node), ("gpu", &c.gpu), ("xid", &code)],
                x.count as f64,
            );
        }
    }
    out.extend([
        card_info,
        healthy,
        core_cap,
        core_alloc,
        mem_cap,
        mem_alloc,
        card_util,
        card_mem_used,
        card_procs,
        card_unmapped,
        xid,
    ]);

    // --- Per-container allocations, per card ---------------------------------------------
    let mut alloc_cores = Family::gauge(
        "gpu_manager_container_allocated_vcuda_core",
        "vcuda-core units the container holds on the card.",
    );
    let mut alloc_mem = Family::gauge(
        "gpu_manager_container_allocated_memory_bytes",
        "Memory the container holds on the card in bytes.",
    );
    for c in &report.containers {
        for card in c.cards.iter().filter(|x| x.cores > 0 || x.memory_mib > 0) {
            let labels = [
                ("pod_name", c.pod_name.as_str()),
                ("namespace", c.namespace.as_str()),
                ("node", node),
                ("container_name", c.container_name.as_str()),
                ("gpu", card.gpu.as_str()),
            ];
            alloc_cores.push(&labels, f64::from(card.cores));
            alloc_mem.push(&labels, card.memory_mib as f64 * MIB);
        }
    }
    out.extend([alloc_cores, alloc_mem]);

    out.into_iter()
        .map(|f| f.mf)
        .filter(|mf| !mf.get_metric().is_empty())
        .collect()
}
