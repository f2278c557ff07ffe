//! Print the GpuQuota CustomResourceDefinition: `cargo run -p gm-admission --example print_crd`.

fn main() -> Result<(), serde_yaml_ng::Error> {
    print!("{}", gm_admission::crd_yaml()?);
    Ok(())
}
