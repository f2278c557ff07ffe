//! What a container gets: the `ContainerAllocateResponse` of the vcuda-core plugin and the
//! limiter config files mounted into the container, `limits.json` and `vcuda.cfg` (format:
//! `docs/limiter-config.md`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gm_core::devices::CoreShape;
use gm_core::resources::ResourceNames;
use gm_core::NodeInventory;
use gm_limiter_core::config as bin;
use gm_proto::deviceplugin::v1beta1 as dp;
use serde::{Deserialize, Serialize};

use crate::config::{CONTAINER_LIMITER_DIR, LIMITER_FILE};
use crate::fsutil::write_atomic;
use crate::library::{InstalledLibrary, CONTAINER_LIBRARY, CONTAINER_PRELOAD, CONTAINER_STATE_DIR};
use crate::state::{PodRef, Record};

/// Mode of a share container's state directory: every user may create files (the container's
/// processes may run as any uid and share one region), nobody may delete or replace another
/// user's files (the sticky bit, as on `/tmp`).
pub const STATE_DIR_MODE: u32 = 0o1777;

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
    /// Host directory of the per-container state directories.
    pub state_dir: &'a Path,
    /// Mount the limiter into a share container with this library; `None`: no limiter mounts
    /// (the pod opted out; whole cards never get them).
    pub library: Option<&'a InstalledLibrary>,
}

/// The host directory of a record's limiter config.
pub fn limiter_host_dir(limiter_dir: &Path, record_id: &str) -> PathBuf {
    limiter_dir.join(record_id)
}

/// The host directories of the limiter files: configs (read-only in the container) and state
/// (read-write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterDirs {
    pub config: PathBuf,
    pub state: PathBuf,
}

impl LimiterDirs {
    pub fn new(config: impl Into<PathBuf>, state: impl Into<PathBuf>) -> Self {
        Self {
            config: config.into(),
            state: state.into(),
        }
    }

    /// A record's config directory (`/etc/vcuda` in the container).
    pub fn config_dir(&self, record_id: &str) -> PathBuf {
        self.config.join(record_id)
    }

    /// A record's state directory (`/run/vcuda` in the container).
    pub fn state_dir(&self, record_id: &str) -> PathBuf {
        self.state.join(record_id)
    }
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
    let mut mounts = vec![dp::Mount {
        container_path: CONTAINER_LIMITER_DIR.to_string(),
        host_path: limiter_host_dir(ctx.limiter_dir, &rec.id)
            .to_string_lossy()
            .into_owned(),
        read_only: true,
    }];
    if let (Some(lib), Some(CoreShape::Share { .. })) = (ctx.library, &rec.shape) {
        let mount = |container: &str, host: &Path, read_only: bool| dp::Mount {
            container_path: container.to_string(),
            host_path: host.to_string_lossy().into_owned(),
            read_only,
        };
        mounts.push(mount(CONTAINER_LIBRARY, &lib.path, true));
        mounts.push(mount(CONTAINER_PRELOAD, &lib.preload, true));
        mounts.push(mount(
            CONTAINER_STATE_DIR,
            &ctx.state_dir.join(&rec.id),
            false,
        ));
    }
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

/// How a share's compute is limited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LimiterMode {
    /// At most `coresLimit` percent.
    #[default]
    Hard,
    /// `coresLimit` percent, up to `coresUpperLimit` while the card has idle time (the pod's
    /// `vcuda-core-limit` annotation).
    Soft,
}

/// The limiter config of one container (`limits.json`; `vcuda.cfg` is derived from it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimiterConfig {
    pub version: u32,
    pub record_id: String,
    pub state: LimiterState,
    #[serde(default)]
    pub mode: LimiterMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub cards: Vec<LimiterCard>,
}

impl LimiterConfig {
    /// A share of one card (the limiter runs only for shares).
    pub fn is_share(&self) -> bool {
        matches!(self.cards.as_slice(), [c] if c.cores_limit < 100)
    }
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
    /// Soft mode's upper bound in percent (`coresLimit` to 100); equals `coresLimit` in hard
    /// mode.
    #[serde(default)]
    pub cores_upper_limit: u32,
    /// Device memory the container may allocate on this card, in bytes; `null` while a
    /// share's vcuda-memory half is not allocated yet.
    pub memory_limit_bytes: Option<u64>,
}

/// The limiter config for a record. `soft`: the pod's checked `vcuda-core-limit` (soft mode,
/// for a share only).
pub fn limiter_config(
    rec: &Record,
    inv: &NodeInventory,
    state: LimiterState,
    soft: Option<u32>,
) -> LimiterConfig {
    let share = matches!(rec.shape, Some(CoreShape::Share { .. }));
    let soft = soft.filter(|_| share);
    LimiterConfig {
        version: LIMITER_VERSION,
        record_id: rec.id.clone(),
        state,
        mode: if soft.is_some() {
            LimiterMode::Soft
        } else {
            LimiterMode::Hard
        },
        pod: rec.pod().cloned(),
        cards: rec
            .cards()
            .into_iter()
            .filter_map(|c| inv.card(c))
            .map(|c| {
                let cores = rec.cores_on(c.index);
                LimiterCard {
                    index: c.index,
                    uuid: c.uuid.clone(),
                    minor: c.minor,
                    cores_limit: cores,
                    cores_upper_limit: soft.unwrap_or(cores).max(cores),
                    memory_limit_bytes: rec.memory_bytes_on(c.index, inv),
                }
            })
            .collect(),
    }
}

/// The binary form (`vcuda.cfg`) of a config. A card whose memory limit is not known yet
/// makes it `incomplete` (the limiter then refuses to run rather than run uncapped).
pub fn binary_config(config: &LimiterConfig) -> bin::Config {
    let pod = config.pod.as_ref();
    bin::Config {
        mode: match config.mode {
            LimiterMode::Hard => bin::Mode::Hard,
            LimiterMode::Soft => bin::Mode::Soft,
        },
        incomplete: config.cards.iter().any(|c| c.memory_limit_bytes.is_none()),
        pod_uid: pod.map(|p| p.uid.clone()).unwrap_or_default(),
        namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
        container: pod.map(|p| p.container.clone()).unwrap_or_default(),
        cards: config
            .cards
            .iter()
            .map(|c| bin::CardLimit {
                index: c.index,
                minor: c.minor,
                uuid: c.uuid.clone(),
                cores: c.cores_limit,
                core_limit: match config.mode {
                    LimiterMode::Hard => c.cores_limit,
                    LimiterMode::Soft => c.cores_upper_limit,
                },
                memory_limit: c.memory_limit_bytes.unwrap_or(0),
            })
            .collect(),
    }
}

/// Write a record's `vcuda.cfg` and `limits.json` atomically (creating its directory) and,
/// for a share, make sure its state directory exists. `durable` also fsyncs. A whole-card
/// config that the binary form cannot hold (more than 16 cards) gets no `vcuda.cfg`: the
/// limiter never runs for whole cards.
pub fn write_limiter(
    dirs: &LimiterDirs,
    config: &LimiterConfig,
    durable: bool,
) -> std::io::Result<PathBuf> {
    let dir = dirs.config_dir(&config.record_id);
    std::fs::create_dir_all(&dir)?;
    let cfg_path = dir.join(bin::CONFIG_FILE);
    match binary_config(config).encode() {
        Ok(bytes) => write_atomic(&cfg_path, &bytes, durable)?,
        Err(e) if config.is_share() => {
            return Err(std::io::Error::other(format!(
                "cannot encode {}: {e}",
                cfg_path.display()
            )))
        }
        Err(e) => {
            tracing::debug!(record = %config.record_id, error = %e, "no vcuda.cfg for this whole-card container");
            match std::fs::remove_file(&cfg_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    let path = dir.join(LIMITER_FILE);
    let mut bytes = serde_json::to_vec_pretty(config).unwrap_or_default();
    bytes.push(b'\n');
    write_atomic(&path, &bytes, durable)?;
    if config.is_share() {
        ensure_state_dir(&dirs.state_dir(&config.record_id))?;
    }
    Ok(path)
}

/// Create a share's state directory with [`STATE_DIR_MODE`] (the umask would narrow it).
fn ensure_state_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o7777 != STATE_DIR_MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))?;
    }
    Ok(())
}

/// Remove a record's config and state directories; missing is fine.
pub fn remove_limiter(dirs: &LimiterDirs, record_id: &str) -> std::io::Result<()> {
    let mut result = Ok(());
    for dir in [dirs.config_dir(record_id), dirs.state_dir(record_id)] {
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => result = Err(e),
            _ => {}
        }
    }
    result
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

    fn whole_record(inv: &NodeInventory) -> Record {
        let ids: Vec<String> = (0..200)
            .map(|k| format!("vcore-{}-{}", k / 100, k % 100))
            .collect();
        let core = IdSet::parse(DeviceKind::Core, &ids, inv).unwrap();
        Record::for_core(core.clone(), core_shape(&core).unwrap(), 0)
    }

    fn library() -> InstalledLibrary {
        InstalledLibrary {
            path: "/var/lib/gpu-manager/lib/libvcuda-0.1.0-0123456789ab.so".into(),
            preload: "/var/lib/gpu-manager/lib/ld.so.preload".into(),
            sha256: "0123456789ab".into(),
            written: false,
        }
    }

    fn mounts(resp: &dp::ContainerAllocateResponse) -> Vec<(&str, &str, bool)> {
        resp.mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.read_only))
            .collect()
    }

    #[test]
    fn a_share_gets_its_card_the_existing_control_devices_env_mounts_and_annotations() {
        let inv = NodeInventory::uniform(2, "T4", 15360, Link::Phb);
        let dev = tempfile::tempdir().unwrap();
        std::fs::write(dev.path().join("nvidiactl"), b"").unwrap();
        std::fs::write(dev.path().join("nvidia-uvm"), b"").unwrap();
        let names = ResourceNames::default();
        let lib = library();
        let ctx = ResponseContext {
            inventory: &inv,
            names: &names,
            dev_root: dev.path(),
            limiter_dir: Path::new("/var/lib/gpu-manager/vcuda"),
            state_dir: Path::new("/var/lib/gpu-manager/vcuda-state"),
            library: Some(&lib),
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
        let config = format!("/var/lib/gpu-manager/vcuda/{}", rec.id);
        let state = format!("/var/lib/gpu-manager/vcuda-state/{}", rec.id);
        assert_eq!(
            mounts(&resp),
            [
                ("/etc/vcuda", config.as_str(), true),
                (
                    "/usr/local/vcuda/libvcuda.so",
                    "/var/lib/gpu-manager/lib/libvcuda-0.1.0-0123456789ab.so",
                    true
                ),
                (
                    "/etc/ld.so.preload",
                    "/var/lib/gpu-manager/lib/ld.so.preload",
                    true
                ),
                ("/run/vcuda", state.as_str(), false),
            ]
        );
        assert_eq!(resp.annotations["tencent.com/vcuda-core"], "30");
        assert_eq!(
            resp.annotations["tencent.com/vcuda-memory"],
            (8u64 * 256 * 1024 * 1024).to_string()
        );
        assert_eq!(resp.annotations["tencent.com/vcuda-device"], "/dev/nvidia1");

        // Opted out: only the config directory.
        let ctx = ResponseContext {
            library: None,
            ..ctx
        };
        assert_eq!(
            mounts(&core_response(&rec, &ctx)),
            [("/etc/vcuda", config.as_str(), true)]
        );
    }

    #[test]
    fn whole_cards_get_no_limiter_mounts() {
        let inv = NodeInventory::uniform(2, "T4", 15360, Link::Phb);
        let names = ResourceNames::default();
        let lib = library();
        let ctx = ResponseContext {
            inventory: &inv,
            names: &names,
            dev_root: Path::new("/nonexistent"),
            limiter_dir: Path::new("/v"),
            state_dir: Path::new("/s"),
            library: Some(&lib),
        };
        let rec = whole_record(&inv);
        let resp = core_response(&rec, &ctx);
        let dir = format!("/v/{}", rec.id);
        assert_eq!(mounts(&resp), [("/etc/vcuda", dir.as_str(), true)]);
        assert_eq!(resp.envs[VISIBLE_DEVICES_ENV], "GPU-T4-0000,GPU-T4-0001");
    }

    fn dirs(root: &Path) -> LimiterDirs {
        LimiterDirs::new(root.join("vcuda"), root.join("state"))
    }

    #[test]
    fn the_limiter_config_lists_each_card_with_its_limits_in_both_forms() {
        let inv = NodeInventory::uniform(2, "T4", 15360, Link::Phb);
        let mut rec = share_record(&inv);
        rec.owner = Some(PodRef {
            namespace: "ml".into(),
            name: "train".into(),
            uid: "uid-1".into(),
            container: "main".into(),
        });
        let cfg = limiter_config(&rec, &inv, LimiterState::Confirmed, None);
        assert_eq!(cfg.cards.len(), 1);
        assert_eq!(cfg.mode, LimiterMode::Hard);
        assert_eq!(cfg.cards[0].cores_limit, 30);
        assert_eq!(cfg.cards[0].cores_upper_limit, 30);
        assert_eq!(cfg.cards[0].memory_limit_bytes, Some(8 * 256 * 1024 * 1024));
        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path());
        let path = write_limiter(&d, &cfg, true).unwrap();
        let back: LimiterConfig = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let raw = std::fs::read(d.config_dir(&rec.id).join("vcuda.cfg")).unwrap();
        let b = bin::Config::decode(&raw).unwrap();
        assert_eq!(b.mode, bin::Mode::Hard);
        assert!(!b.incomplete);
        assert_eq!(
            (
                b.pod_uid.as_str(),
                b.namespace.as_str(),
                b.container.as_str()
            ),
            ("uid-1", "ml", "main")
        );
        let c = b.card_by_uuid("GPU-T4-0001").unwrap();
        assert_eq!((c.index, c.minor, c.cores, c.core_limit), (1, 1, 30, 30));
        assert_eq!(c.memory_limit, 8 * 256 * 1024 * 1024);
        let state = d.state_dir(&rec.id);
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o7777,
            0o1777
        );
        remove_limiter(&d, &rec.id).unwrap();
        assert!(!path.exists());
        assert!(!state.exists());
        remove_limiter(&d, &rec.id).unwrap();
    }

    #[test]
    fn soft_mode_and_a_missing_memory_half_reach_the_binary_config() {
        let inv = NodeInventory::uniform(2, "T4", 15360, Link::Phb);
        let rec = share_record(&inv);
        let cfg = limiter_config(&rec, &inv, LimiterState::Allocated, Some(80));
        assert_eq!(cfg.mode, LimiterMode::Soft);
        assert_eq!(cfg.cards[0].cores_upper_limit, 80);
        let b = binary_config(&cfg);
        assert_eq!(b.mode, bin::Mode::Soft);
        assert_eq!((b.cards[0].cores, b.cards[0].core_limit), (30, 80));

        let ids: Vec<String> = (0..30).map(|k| format!("vcore-0-{k}")).collect();
        let core = IdSet::parse(DeviceKind::Core, &ids, &inv).unwrap();
        let half = Record::for_core(core.clone(), core_shape(&core).unwrap(), 0);
        let cfg = limiter_config(&half, &inv, LimiterState::Allocated, None);
        let b = binary_config(&cfg);
        assert!(b.incomplete);
        assert_eq!(b.cards[0].memory_limit, 0);
        assert!(b.encode().is_ok());

        // A whole card ignores the soft limit.
        let whole = whole_record(&inv);
        let cfg = limiter_config(&whole, &inv, LimiterState::Allocated, Some(80));
        assert_eq!(cfg.mode, LimiterMode::Hard);
        assert!(!cfg.is_share());
        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path());
        write_limiter(&d, &cfg, false).unwrap();
        let b =
            bin::Config::decode(&std::fs::read(d.config_dir(&whole.id).join("vcuda.cfg")).unwrap())
                .unwrap();
        assert_eq!(b.cards.len(), 2);
        assert!(b.cards.iter().all(|c| c.cores == 100));
        assert!(
            !d.state_dir(&whole.id).exists(),
            "no state directory for whole cards"
        );
    }
}
