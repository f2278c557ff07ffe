//! The Grafana dashboard shipped in `deploy/grafana/gpu-manager.json`, for tests that check its
//! queries (against a server's families, with promtool, or through a real Prometheus).

/// The dashboard's JSON (panics with the path if it is missing or invalid).
pub fn dashboard() -> serde_json::Value {
    let path = crate::repo_root().join("deploy/grafana/gpu-manager.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()))
}

/// Every PromQL expression of the dashboard's panels, as (panel title, expression) with the
/// template variables replaced by what "All" and a Grafana interval give.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((
                p["title"].as_str().unwrap_or_default().to_string(),
                expr.replace("$__rate_interval", "1m")
                    .replace("$node", ".*")
                    .replace("$namespace", ".*")
                    .replace("$pod", ".*"),
            ));
        }
    }
    out
}
