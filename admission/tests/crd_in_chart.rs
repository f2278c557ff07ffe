//! The GpuQuota CRD shipped in the Helm chart (and so in deploy/manifests) is exactly the one
//! generated from the Rust type the webhook reads, so the API server and the webhook can never
//! disagree about the schema.

#[test]
fn helm_chart_ships_the_crd_generated_from_the_rust_type() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/gpu-manager/crds/gpuquota.yaml"
    );
    let shipped = std::fs::read_to_string(path).expect("the chart's CRD file is readable");
    let body: String = shipped
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let generated = gm_admission::crd_yaml().expect("CRD renders");
    assert_eq!(
        body.trim(),
        generated.trim(),
        "deploy/helm/gpu-manager/crds/gpuquota.yaml is stale: regenerate it with \
         `cargo run -p gm-admission --example print_crd`"
    );
}
