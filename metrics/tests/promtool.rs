//! The Prometheus text exposition checked by an independent parser and linter: `promtool
//! check metrics` from Debian's prometheus package (installed by scripts/test.sh).

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use gm_backend::GpuBackend;
use support::{get, sim_node, tool};

/// Lint findings we accept, each for a documented reason: the TKEStack family
/// `container_gpu_memory_total` is a gauge whose name must stay as TKEStack spelled it.
const ACCEPTED_LINT: &[&str] =
    &["container_gpu_memory_total non-counter metrics should not have \"_total\" suffix"];

/// Run `promtool check metrics` on `text`; fail on a parse error or on any lint finding not
/// in [`ACCEPTED_LINT`].
fn promtool_check(text: &str, what: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing to promtool: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for promtool: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => {}
        // 3: lint problems only (the exposition parsed).
        Some(3) => {
            let unexpected: Vec<&str> = report
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !ACCEPTED_LINT.contains(l))
                .collect();
            assert!(
                unexpected.is_empty(),
                "promtool found problems in {what}:\n{}",
                unexpected.join("\n")
            );
        }
        other => panic!("promtool rejected {what} (exit {other:?}):\n{report}\n---\n{text}"),
    }
}

#[tokio::test]
async fn the_exposition_of_a_busy_node_passes_promtool() {
    let node = sim_node();
    let (_, _, text) = get(&node.router(), "/metrics", None).await;
    assert!(text.contains("container_gpu_memory_total{"), "{text}");
    promtool_check(&text, "the busy simulated node");
}

#[tokio::test]
async fn the_exposition_with_odd_label_values_and_a_down_backend_passes_promtool() {
    let node = sim_node();
    node.source.update(|s| {
        s.inventory.cards[0].model = "Weird \"Model\" \\ with\nnewline".into();
        s.allocations[0].pod_name = "pod-with-ünïcödé".into();
        s.xid_errors = vec![(0, 79, 1), (0, 48, 3)];
    });
    let (_, _, text) = get(&node.router(), "/metrics", None).await;
    promtool_check(&text, "odd label values");

    // A backend that is not there: usage families disappear, the rest still parses.
    let (_, _, text) = get(&node.router_with(Arc::new(Down)), "/metrics", None).await;
    assert!(
        text.contains("gpu_manager_backend_up{node=\"sim-h100\"} 0"),
        "{text}"
    );
    promtool_check(&text, "a down backend");
}

/// A backend whose every call fails.
#[derive(Debug)]
struct Down;

impl GpuBackend for Down {
    fn kind(&self) -> &'static str {
        "down"
    }
    fn inventory(&self) -> Result<gm_core::NodeInventory, gm_backend::BackendError> {
        Err(down())
    }
    fn wait_events(
        &self,
        _: std::time::Duration,
    ) -> Result<Vec<gm_backend::HealthEvent>, gm_backend::BackendError> {
        Err(down())
    }
    fn probe(&self, _: &str) -> Result<gm_backend::ProbeResult, gm_backend::BackendError> {
        Err(down())
    }
    fn processes(&self) -> Result<Vec<gm_backend::ProcessSample>, gm_backend::BackendError> {
        Err(down())
    }
    fn card_usage(&self) -> Result<Vec<gm_backend::CardUsage>, gm_backend::BackendError> {
        Err(down())
    }
}

fn down() -> gm_backend::BackendError {
    gm_backend::BackendError::NvmlUnavailable {
        cause: "no driver".into(),
        hint: "install the driver".into(),
    }
}
