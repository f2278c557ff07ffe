//! What a container gets: the `ContainerAllocateResponse` of the vcuda-core plugin and the
//! limiter config file mounted into the container (format: `docs/limiter-config.md`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gm_core::resources::ResourceNames;
use gm_core::NodeInventory;
use gm_proto::deviceplugin::v1beta1 as dp;
use serde::{Deserialize, Serialize};

use crate::config::{CONTAINER_LIMITER_DIR, LIMITER_FILE};
use crate::fsutil::write_atomic;
use crate::state::{PodRef, Record};

/// Control device nodes added when they exist under the device root.
pub const CONTROL_DEVICES: [&str; 3] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];
/// Environment variable naming the limiter config inside the container.
pub const CONFIG_ENV: &str = "VCUDA_CONFIG";
/// Environment variable naming the visible cards for the NVIDIA container runtime.
pub const VISIBLE_DEVICES_ENV: &str = "NVIDIA_VISIBLE_DEVICES";
/// Version of the limiter config format.
pub const LIMITER_VERSION: u32 = 1;

/// Where the response's paths come from.
#[derive(Debug, Clone)]
pub struct ResponseContext<'a> {
    pub inventory: &'a NodeInventory,
    pub names: &'a ResourceNames,
    pub dev_root: &'a Path,
    pub limiter_dir: &'a Path,
}

/// The host directory of a record's limiter config.
pub fn limiter_host_dir(limiter_dir: &Path, record_id: &str) -> PathBuf {
    limiter_dir.join(record_id)
}

/// The vcuda-core response for a record: a function of the record and the node only, so a
/// repeated `Allocate` gets the same answer.
pub fn core_response(rec: &Record, ctx: &ResponseContext<'_>) -> dp::ContainerAllocateResponse {
    let cards = rec.cards();
    let card_info: Vec<&gm_core::Card> = cards
        .iter()
        .filter_map(|c| ctx.inventory.card(*c))
        .collect();
    let mut devices: Vec<dp::DeviceSpec> = card_info
        .iter()
        .map(|c| dp::DeviceSpec {
            container_path: format!("/dev/nvidia{}", c.minor),
            host_path: ctx
                .dev_root
                .join(format!("nvidia{}", c.minor))
                .to_string_lossy()
                .into_owned(),
            permissions: "rw".into(),
        })
        .collect();
    for name in CONTROL_DEVICES {
        let host = ctx.dev_root.join(name);
        if host.exists() {
            devices.push(dp::DeviceSpec {
                container_path: format!("/dev/{name}"),
                host_path: host.to_string_lossy().into_owned(),
                permissions: "rw".into(),
            });
        }
    }
    let uuids: Vec<&str> = card_info.iter().map(|c| c.uuid.as_str()).collect();
    let mut envs = HashMap::new();
    envs.insert(VISIBLE_DEVICES_ENV.to_string(), uuids.join(","));
    envs.insert(
        CONFIG_ENV.to_string(),
        format!("{CONTAINER_LIMITER_DIR}/{LIMITER_FILE}"),
    );
    let mounts = vec![dp::Mount {
        container_path: CONTAINER_LIMITER_DIR.to_string(),
        host_path: limiter_host_dir(ctx.limiter_dir, &rec.id)
            .to_string_lossy()
            .into_owned(),
        read_only: true,
    }];
    let mut annotations = HashMap::new();
    annotations.insert(ctx.names.core().to_string(), rec.cores().to_string());
    if let Some(bytes) = rec.memory_bytes(ctx.inventory) {
        annotations.insert(ctx.names.memory().to_string(), bytes.to_string());
    }
    annotations.insert(
        format!("{}/vcuda-device", ctx.names.domain()),
        card_info
            .iter()
            .map(|c| format!("/dev/nvidia{}", c.minor))
            .collect::<Vec<_>>()
            .join(","),
    );
    dp::ContainerAllocateResponse {
        envs,
        mounts,
        devices,
        annotations,
        cdi_devices: Vec::new(),
    }
}

/// Has the limiter config been confirmed by PreStartContainer?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LimiterState {
    /// Written at Allocate with what was known then.
    Allocated,
    /// Rewritten at PreStartContainer: the pod is confirmed and both halves are known.
    Confirmed,
}

/// The limiter config of one container (`limits.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimiterConfig {
    pub version: u32,
    pub record_id: String,
    pub state: LimiterState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub cards: Vec<LimiterCard>,
}

/// Limits on one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimiterCard {
    pub index: u32,
    pub uuid: String,
    pub minor: u32,
    /// Share of the card's compute in percent (100 for a whole card).
    pub cores_limit: u32,
    /// Device memory the container may allocate on this card, in bytes; `null` while a
    /// share's vcuda-memory half is not allocated yet.
    pub memory_limit_bytes: Option<u64>,
}

/// The limiter config for a record.
pub fn limiter_config(rec: &Record, inv: &NodeInventory, state: LimiterState) -> LimiterConfig {
    LimiterConfig {
        version: LIMITER_VERSION,
        record_id: rec.id.clone(),
        state,
        pod: rec.pod().cloned(),
        cards: rec
            .cards()
            .into_iter()
            .filter_map(|c| inv.card(c))
            .map(|c| LimiterCard {
                index: c.index,
                uuid: c.uuid.clone(),
                minor: c.minor,
                cores_limit: rec.cores_on(c.index),
                memory_limit_bytes: rec.memory_bytes_on(c.index, inv),
            })
            .collect(),
    }
}

/// Write a record's `limits.json` atomically (creating its directory). `durable` also fsyncs.
pub fn write_limiter(
    limiter_dir: &Path,
    config: &LimiterConfig,
    durable: bool,
) -> std::io::Result<PathBuf> {
    let dir = limiter_host_dir(limiter_dir, &config.record_id);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(LIMITER_FILE);
    let mut bytes = serde_json::to_vec_pretty(config).unwrap_or_default();
    bytes.push(b'\n');
    write_atomic(&path, &bytes, durable)?;
    Ok(path)
}

/// Remove a record's limiter directory; missing is fine.
pub fn remove_limiter(limiter_dir: &Path, record_id: &str) -> std::io::Result<()> {
    match std::fs::remove_dir_all(limiter_host_dir(limiter_dir, record_id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_core::devices::{core_shape, DeviceKind, IdSet};
    use gm_core::Link;

    fn share_record(inv: &NodeInventory) -> Record {
        let ids: Vec<String> = (0..30).map(|k| format!("vcore-1-{k}")).collect();
        let core = IdSet::parse(DeviceKind::Core, &ids, inv).unwrap();
        let mut r = Record::for_core(core.clone(), core_shape(&core).unwrap(), 0);
        let mem: Vec<String> = (0..8).map(|k| format!("vmem-1-{k}")).collect();
        r.set_memory(IdSet::parse(DeviceKind::Memory, &mem, inv).unwrap());
        r
    }

    #[test]
    fn a_share_gets_its_card_the_existing_control_devices_env_mount_and_annotations() {
        let inv = NodeInventory::uniform(2, "T4", 15360, Link::Phb);
        let dev = tempfile::tempdir().unwrap();
        std::fs::write(dev.path().join("nvidiactl"), b"").unwrap();
        std::fs::write(dev.path().join("nvidia-uvm"), b"").unwrap();
        let names = ResourceNames::default();
        let ctx = ResponseContext {
            inventory: &inv,
            names: &names,
            dev_root: dev.path(),
            limiter_dir: Path::new("/var/lib/gpu-manager/vcuda"),
        };
        let rec = share_record(&inv);
        let resp = core_response(&rec, &ctx);
        let paths: Vec<&str> = resp
            .devices
            .iter()
            .map(|d| d.container_path.as_str())
            .collect();
        assert_eq!(paths, ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]);
        assert!(resp.devices.iter().all(|d| d.permissions == "rw"));
        assert_eq!(resp.envs[VISIBLE_DEVICES_ENV], "GPU-T4-0001");
        assert_eq!(resp.envs[CONFIG_ENV], "/etc/vcuda/limits.json");
        assert_eq!(resp.mounts.len(), 1);
        assert!(resp.mounts[0].read_only);
        assert_eq!(
            resp.mounts[0].host_path,
            format!("/var/lib/gpu-manager/vcuda/{}", rec.id)
        );
        assert_eq!(resp.annotations["tencent.com/vcuda-core"], "30");
        assert_eq!(
            resp.annotations["tencent.com/vcuda-memory"],
            (8u64 * 256 * 1024 * 1024).to_string()
        );
        assert_eq!(resp.annotations["tencent.com/vcuda-device"], "/dev/nvidia1");
    }

    #[test]
    fn the_limiter_config_lists_each_card_with_its_limits() {
        let inv = NodeInventory::uniform(2, "T4", 15360, Link::Phb);
        let rec = share_record(&inv);
        let cfg = limiter_config(&rec, &inv, LimiterState::Allocated);
        assert_eq!(cfg.cards.len(), 1);
        assert_eq!(cfg.cards[0].cores_limit, 30);
        assert_eq!(cfg.cards[0].memory_limit_bytes, Some(8 * 256 * 1024 * 1024));
        let dir = tempfile::tempdir().unwrap();
        let path = write_limiter(dir.path(), &cfg, true).unwrap();
        let back: LimiterConfig = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, cfg);
        remove_limiter(dir.path(), &rec.id).unwrap();
        assert!(!path.exists());
        remove_limiter(dir.path(), &rec.id).unwrap();
    }
}
