//! The Grafana dashboard in deploy/grafana/: valid Grafana JSON with a datasource variable,
//! cluster, node, card and pod views, queries that parse (promtool) and only use families the
//! server exposes.

mod support;

use std::collections::BTreeSet;
use std::process::Command;

use support::{dashboard, dashboard_queries, get, parse_samples, sim_node, tool};

#[test]
fn the_dashboard_has_a_datasource_variable_used_by_every_panel_and_query() {
    let d = dashboard();
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .unwrap_or_else(|| panic!("no datasource variable"));
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["node", "namespace", "pod"] {
        assert!(vars.iter().any(|v| v["name"] == name), "no {name} variable");
    }
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64()),
            "duplicate panel id in {title}"
        );
        for key in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][key].is_u64(), "{title}: gridPos.{key} missing");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    assert!(d["uid"].is_string() && d["title"].is_string() && d["schemaVersion"].is_u64());
}

#[test]
fn the_dashboard_has_cluster_node_card_and_pod_rows_in_that_order() {
    let d = dashboard();
    let rows: Vec<&str> = d["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(rows, ["Cluster", "Node", "Card", "Pod"]);
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exposed_and_the_four_tkestack_families_are_shown() {
    let node = sim_node();
    let (_, _, text) = get(&node.router(), "/metrics", None).await;
    let exposed: BTreeSet<String> = parse_samples(&text).into_iter().map(|s| s.name).collect();
    let mut used = BTreeSet::new();
    let d = dashboard();
    let var_queries = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["definition"].as_str().map(str::to_string));
    let exprs = dashboard_queries()
        .into_iter()
        .map(|(_, e)| e)
        .chain(var_queries);
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            // `container_name` is a label, not a family.
            let family = word.starts_with("gpu_manager_") || word.starts_with("container_");
            if family && word != "container_name" {
                assert!(
                    exposed.contains(word),
                    "the dashboard queries {word}, which the server does not expose: {expr}"
                );
                used.insert(word.to_string());
            }
        }
    }
    for family in [
        "container_gpu_utilization",
        "container_gpu_memory_total",
        "container_request_gpu_utilization",
        "container_request_gpu_memory",
        "gpu_manager_card_xid_errors_total",
        "gpu_manager_card_healthy",
        "gpu_manager_card_info",
    ] {
        assert!(used.contains(family), "the dashboard never shows {family}");
    }
}

#[test]
fn every_dashboard_query_is_valid_promql_for_promtool() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in dashboard_queries().iter().enumerate() {
        rules.push_str(&format!(
            "      # {title}\n      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::Value::String(expr.clone())
        ));
    }
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    assert!(
        out.status.success(),
        "promtool rejected a dashboard query:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
