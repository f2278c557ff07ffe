//! `/usage` as a human-readable table: cards, then containers per card, then processes that
//! belong to no allocated container (with the reason).

use std::fmt::Write as _;

use crate::report::{NodeReport, Usage};

const NONE: &str = "-";

/// Render the report as aligned text tables.
pub fn render(report: &NodeReport) -> String {
    let mut out = String::new();
    let backend = if report.backend.up {
        format!(
            "up (sample took {:.1} ms)",
            report.backend.sample_seconds * 1000.0
        )
    } else {
        format!(
            "DOWN: {}",
            report.backend.error.as_deref().unwrap_or("unknown error")
        )
    };
    let cgroup = match (
        &report.cgroup.version,
        &report.cgroup.driver,
        &report.cgroup.error,
    ) {
        (Some(v), Some(d), _) => format!("{v}/{d}"),
        (_, _, Some(e)) => format!("tree lookups unavailable ({e})"),
        _ => NONE.to_string(),
    };
    let _ = writeln!(out, "node:           {}", report.node);
    let _ = writeln!(out, "gpu backend:    {backend}");
    let _ = writeln!(
        out,
        "device plugins: {}",
        if report.registered {
            "registered with the kubelet"
        } else {
            "NOT registered with the kubelet"
        }
    );
    let _ = writeln!(out, "cgroup:         {cgroup}");
    out.push('\n');

    let rows = report
        .cards
        .iter()
        .map(|c| {
            let xid = c
                .xid_errors
                .iter()
                .map(|x| format!("{}x{}", x.code, x.count))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                c.gpu.clone(),
                c.model.clone(),
                if c.healthy { "healthy" } else { "UNHEALTHY" }.to_string(),
                format!("{}/{}", c.cores_allocated, c.cores_capacity),
                format!("{}/{}", c.memory_allocated_mib, c.memory_mib),
                opt(c.utilization_percent),
                opt(c.memory_used_mib),
                opt(c.processes),
                opt(c.unmapped_processes),
                if xid.is_empty() { NONE.into() } else { xid },
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "CARD",
            "MODEL",
            "HEALTH",
            "CORES ALLOC/CAP",
            "MiB ALLOC/CAP",
            "UTIL %",
            "MiB USED",
            "PROCS",
            "UNMAPPED",
            "XID (code x count)",
        ],
        rows,
    );
    out.push('\n');

    if report.containers.is_empty() {
        out.push_str("no container holds a GPU allocation on this node\n");
    } else {
        let mut rows = Vec::new();
        for c in &report.containers {
            let first = |i: usize, s: &str| if i == 0 { s.to_string() } else { String::new() };
            for (i, card) in c.cards.iter().enumerate() {
                rows.push(
                    [
                        first(i, &c.namespace),
                        first(i, &c.pod_name),
                        first(i, &c.container_name),
                        card.gpu.clone(),
                        card.cores.to_string(),
                        card.memory_mib.to_string(),
                    ]
                    .into_iter()
                    .chain(usage_cells(card.usage.as_ref()))
                    .collect(),
                );
            }
            if c.cards.len() != 1 {
                let label = if c.cards.is_empty() { "none" } else { "total" };
                rows.push(
                    [
                        first(c.cards.len(), &c.namespace),
                        first(c.cards.len(), &c.pod_name),
                        first(c.cards.len(), &c.container_name),
                        label.to_string(),
                        c.request_cores.to_string(),
                        c.request_memory_mib.to_string(),
                    ]
                    .into_iter()
                    .chain(usage_cells(c.usage.as_ref()))
                    .collect(),
                );
            }
        }
        table(
            &mut out,
            &[
                "NAMESPACE",
                "POD",
                "CONTAINER",
                "CARD",
                "CORES",
                "MiB",
                "UTIL %",
                "MiB USED",
                "PIDS",
            ],
            rows,
        );
    }

    if !report.unmapped_processes.is_empty() {
        out.push_str("\nprocesses on the cards that belong to no allocated container:\n");
        let rows = report
            .unmapped_processes
            .iter()
            .map(|p| {
                vec![
                    if p.gpu.is_empty() {
                        p.uuid.clone()
                    } else {
                        p.gpu.clone()
                    },
                    p.pid.to_string(),
                    p.used_memory_mib.to_string(),
                    p.sm_percent.to_string(),
                    p.reason.clone(),
                ]
            })
            .collect();
        table(
            &mut out,
            &["CARD", "PID", "MiB USED", "UTIL %", "REASON"],
            rows,
        );
    }
    out
}

fn usage_cells(u: Option<&Usage>) -> [String; 3] {
    match u {
        Some(u) => [
            u.utilization_percent.to_string(),
            u.memory_used_mib.to_string(),
            if u.pids.is_empty() {
                NONE.to_string()
            } else {
                u.pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ],
        None => [NONE.into(), NONE.into(), NONE.into()],
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| NONE.to_string(), |v| v.to_string())
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            if i + 1 < widths.len() {
                l.extend(std::iter::repeat_n(
                    ' ',
                    w.saturating_sub(cell.chars().count()),
                ));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
}
