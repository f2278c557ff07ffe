//! Which container a host PID belongs to, read from cgroup files.
//!
//! Two ways, both supported for cgroup v1 and v2, the `cgroupfs` and `systemd` drivers,
//! containerd, CRI-O and Docker, and every QoS class:
//!
//! 1. **Per PID** (the normal way, needs `hostPID: true`): read `<proc-root>/<pid>/cgroup` and
//!    take the pod UID and container ID out of the cgroup path. Nothing is guessed from the
//!    runtime's name: the path is parsed whatever the scope prefix (`cri-containerd-`,
//!    `crio-`, `docker-`) or the QoS level, and paths seen through a private cgroup namespace
//!    (`/../../kubepods…`) work too.
//! 2. **Per cgroup tree** (the fallback for PIDs whose `/proc` entry cannot be read): walk the
//!    kubepods tree under `<cgroup-root>` (the v1 memory hierarchy, or the v2 unified tree),
//!    parse each directory's path the same way and read its `cgroup.procs`. The tree is walked
//!    at most once per sample, and only when some PID needs it.
//!
//! The cgroup version and driver are detected from the cgroup root unless configured.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

/// Deepest directory level below the kubepods root that the tree walk visits (kubepods, QoS,
/// pod, container and a few levels of nesting inside a container).
const MAX_WALK_DEPTH: usize = 8;

/// cgroup hierarchy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies (`/sys/fs/cgroup/memory/…`), including hybrid mode.
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup/…` with `cgroup.controllers` at the root).
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

impl FromStr for CgroupVersion {
    type Err = CgroupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(CgroupVersion::V1),
            "v2" | "2" => Ok(CgroupVersion::V2),
            _ => Err(CgroupError::BadChoice {
                what: "cgroup version",
                value: s.to_string(),
                allowed: "auto, v1 or v2",
            }),
        }
    }
}

/// The kubelet's cgroup driver: how pod and container cgroups are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `/kubepods/burstable/pod<uid>/<container-id>`.
    Cgroupfs,
    /// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<runtime>-<id>.scope`.
    Systemd,
}

impl fmt::Display for CgroupDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupDriver::Cgroupfs => "cgroupfs",
            CgroupDriver::Systemd => "systemd",
        })
    }
}

impl FromStr for CgroupDriver {
    type Err = CgroupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cgroupfs" => Ok(CgroupDriver::Cgroupfs),
            "systemd" => Ok(CgroupDriver::Systemd),
            _ => Err(CgroupError::BadChoice {
                what: "cgroup driver",
                value: s.to_string(),
                allowed: "auto, cgroupfs or systemd",
            }),
        }
    }
}

/// Pod QoS class, as the cgroup path shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum QosClass {
    /// No QoS level in the path.
    Guaranteed,
    /// `burstable` level.
    Burstable,
    /// `besteffort` level.
    BestEffort,
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        })
    }
}

/// Errors of cgroup configuration and detection.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A configured choice is not one of the allowed words.
    #[error("invalid {what} {value:?}: use {allowed}")]
    BadChoice {
        /// What was being configured.
        what: &'static str,
        /// The value given.
        value: String,
        /// The allowed values.
        allowed: &'static str,
    },
    /// The cgroup root does not look like a cgroup mount.
    #[error(
        "{} is not a cgroup mount: found neither cgroup.controllers (cgroup v2) nor a memory/ \
         directory (cgroup v1); mount the host's /sys/fs/cgroup into the container and point \
         --cgroup-root at it",
        path.display()
    )]
    NotACgroupRoot {
        /// The configured cgroup root.
        path: PathBuf,
    },
    /// No Kubernetes pod tree under the hierarchy.
    #[error(
        "no Kubernetes pod cgroups under {}: expected kubepods.slice (systemd driver) or \
         kubepods (cgroupfs driver); check --cgroup-root and --cgroup-driver (auto detects it)",
        path.display()
    )]
    NoKubepods {
        /// The hierarchy directory searched.
        path: PathBuf,
    },
}

/// Where to find cgroup files, and what to assume about them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupConfig {
    /// Mount point of the host's cgroup filesystem (default `/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// The host's procfs (default `/proc`; the daemon needs `hostPID: true`).
    pub proc_root: PathBuf,
    /// Force a cgroup version instead of detecting it.
    pub version: Option<CgroupVersion>,
    /// Force a cgroup driver instead of detecting it.
    pub driver: Option<CgroupDriver>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            version: None,
            driver: None,
        }
    }
}

/// Parse an `auto`-or-value setting (`auto` and the empty string mean "detect").
pub fn parse_choice<T: FromStr<Err = CgroupError>>(s: &str) -> Result<Option<T>, CgroupError> {
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("auto") {
        Ok(None)
    } else {
        t.parse().map(Some)
    }
}

/// The cgroup layout of the node, detected or configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupLayout {
    pub version: CgroupVersion,
    pub driver: CgroupDriver,
    /// The hierarchy the tree walk reads (the cgroup root for v2, its `memory/` for v1).
    pub hierarchy: PathBuf,
    /// The kubepods root inside the hierarchy (`kubepods.slice` or `kubepods`).
    pub kubepods: PathBuf,
    /// Whether anything was detected (false when version and driver were both configured).
    pub detected: bool,
}

/// Detect (or take from `config`) the node's cgroup layout.
pub fn detect_layout(config: &CgroupConfig) -> Result<CgroupLayout, CgroupError> {
    let root = &config.cgroup_root;
    let version = match config.version {
        Some(v) => v,
        None if root.join("cgroup.controllers").is_file() => CgroupVersion::V2,
        None if root.join("memory").is_dir() => CgroupVersion::V1,
        None => {
            return Err(CgroupError::NotACgroupRoot { path: root.clone() });
        }
    };
    let hierarchy = match version {
        CgroupVersion::V2 => root.clone(),
        // The memory controller is always mounted where Kubernetes runs; others as fallbacks.
        CgroupVersion::V1 => ["memory", "pids", "cpu,cpuacct", "cpu", "systemd"]
            .iter()
            .map(|c| root.join(c))
            .find(|p| p.is_dir())
            .ok_or_else(|| CgroupError::NotACgroupRoot { path: root.clone() })?,
    };
    let systemd = hierarchy.join("kubepods.slice");
    let cgroupfs = hierarchy.join("kubepods");
    let driver = match config.driver {
        Some(d) => d,
        // Both can exist after a driver change; the systemd tree is the live one then.
        None if systemd.is_dir() => CgroupDriver::Systemd,
        None if cgroupfs.is_dir() => CgroupDriver::Cgroupfs,
        None => return Err(CgroupError::NoKubepods { path: hierarchy }),
    };
    let kubepods = match driver {
        CgroupDriver::Systemd => systemd,
        CgroupDriver::Cgroupfs => cgroupfs,
    };
    if !kubepods.is_dir() {
        return Err(CgroupError::NoKubepods { path: hierarchy });
    }
    Ok(CgroupLayout {
        version,
        driver,
        hierarchy,
        kubepods,
        detected: config.version.is_none() || config.driver.is_none(),
    })
}

/// The container a cgroup path belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerIdentity {
    /// Pod UID with dashes (`0b5f1e0c-…`), as the API server shows it.
    pub pod_uid: String,
    /// Container ID without runtime prefix, lowercase hex.
    pub container_id: String,
    pub qos: QosClass,
}

/// Why a cgroup path names no container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// No pod level in the path: a host process or a system service.
    #[error("cgroup {0:?} is not a Kubernetes pod's (host process or system service)")]
    NotKubernetes(String),
    /// The pod level with no container below it.
    #[error("cgroup {0:?} is a pod's but no container's")]
    PodOnly(String),
    /// The level below the pod is not a container (e.g. CRI-O's `crio-conmon-<id>.scope`).
    #[error("cgroup {0:?} is a container runtime helper, not a container")]
    NotAContainer(String),
}

impl PathProblem {
    fn specificity(&self) -> u8 {
        match self {
            PathProblem::NotKubernetes(_) => 0,
            PathProblem::PodOnly(_) => 1,
            PathProblem::NotAContainer(_) => 2,
        }
    }
}

/// Take the pod UID, container ID and QoS class out of a cgroup path, for every supported
/// driver and runtime. Leading components (a private cgroup namespace's `/../..`, a custom
/// kubelet cgroup root) are skipped.
pub fn identity_from_path(path: &str) -> Result<ContainerIdentity, PathProblem> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut qos = QosClass::Guaranteed;
    let mut pod: Option<(usize, String)> = None;
    for (i, part) in parts.iter().enumerate() {
        if let Some(q) = qos_of(part) {
            qos = q;
        }
        if let Some((uid, slice_qos)) = pod_uid_of(part) {
            if let Some(q) = slice_qos {
                qos = q;
            }
            pod = Some((i, uid));
            break;
        }
    }
    let Some((at, pod_uid)) = pod else {
        return Err(PathProblem::NotKubernetes(path.to_string()));
    };
    let Some(next) = parts.get(at + 1) else {
        return Err(PathProblem::PodOnly(path.to_string()));
    };
    let container_id =
        container_id_of(next).ok_or_else(|| PathProblem::NotAContainer(path.to_string()))?;
    Ok(ContainerIdentity {
        pod_uid,
        container_id,
        qos,
    })
}

fn qos_of(part: &str) -> Option<QosClass> {
    let p = part.strip_suffix(".slice").unwrap_or(part);
    match p {
        "burstable" | "kubepods-burstable" => Some(QosClass::Burstable),
        "besteffort" | "kubepods-besteffort" => Some(QosClass::BestEffort),
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods[-qos]-pod<uid_with_underscores>.slice` (systemd); the
/// systemd slice also names the QoS class.
fn pod_uid_of(part: &str) -> Option<(String, Option<QosClass>)> {
    let (raw, qos) = if let Some(slice) = part.strip_suffix(".slice") {
        let rest = slice.strip_prefix("kubepods-")?;
        let at = rest.find("pod")?;
        // Only `pod<uid>`, `burstable-pod<uid>`, `besteffort-pod<uid>`.
        let qos = match &rest[..at] {
            "" => None,
            "burstable-" => Some(QosClass::Burstable),
            "besteffort-" => Some(QosClass::BestEffort),
            _ => return None,
        };
        (&rest[at + 3..], qos)
    } else {
        (part.strip_prefix("pod")?, None)
    };
    let uid = raw.replace('_', "-");
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| (uid.to_ascii_lowercase(), qos))
}

/// `<id>`, `crio-<id>`, or `<runtime>-<id>.scope`; `None` for runtime helpers (conmon).
fn container_id_of(part: &str) -> Option<String> {
    let p = part.strip_suffix(".scope").unwrap_or(part);
    if p.contains("conmon") {
        return None;
    }
    let id = p.rsplit('-').next().unwrap_or(p);
    let ok = id.len() >= 12 && id.len() <= 128 && id.chars().all(|c| c.is_ascii_hexdigit());
    ok.then(|| id.to_ascii_lowercase())
}

/// The container ID of a Kubernetes container status (`containerd://<id>`, `cri-o://<id>`,
/// `docker://<id>` or a bare ID), lowercase and without the runtime prefix.
pub fn strip_runtime_prefix(container_id: &str) -> String {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id);
    id.trim().to_ascii_lowercase()
}

/// Read the container of a process from the content of `/proc/<pid>/cgroup`.
///
/// Lines are `hierarchy-id:controllers:path`. The v2 line (`0::`) and the v1 memory line are
/// preferred; any other line naming a container is accepted.
pub fn identity_from_proc_cgroup(content: &str) -> Result<ContainerIdentity, PathProblem> {
    let mut lines: Vec<(u8, &str)> = content
        .lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let (_id, controllers, path) = (it.next()?, it.next()?, it.next()?);
            let rank = if controllers.is_empty() {
                0
            } else if controllers.split(',').any(|c| c == "memory") {
                1
            } else {
                2
            };
            Some((rank, path))
        })
        .collect();
    lines.sort_by_key(|(rank, _)| *rank);
    // When no line names a container, report the most telling problem: a hybrid host's
    // `0::/` line says less than the v1 line that points at a pod.
    let mut best: Option<PathProblem> = None;
    for (_, path) in lines {
        match identity_from_path(path) {
            Ok(id) => return Ok(id),
            Err(p) => {
                if best
                    .as_ref()
                    .is_none_or(|b| p.specificity() > b.specificity())
                {
                    best = Some(p);
                }
            }
        }
    }
    Err(best.unwrap_or_else(|| PathProblem::NotKubernetes(content.trim().to_string())))
}

/// How a PID was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LookupSource {
    /// From `<proc-root>/<pid>/cgroup`.
    Proc,
    /// From a `cgroup.procs` file in the cgroup tree.
    CgroupTree,
}

/// The outcome of looking up one PID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum PidLookup {
    /// The PID runs in this container.
    Found {
        identity: ContainerIdentity,
        source: LookupSource,
    },
    /// The PID could not be placed in a container.
    NotFound {
        /// Why, in words a user can act on.
        reason: String,
    },
}

/// Maps host PIDs to containers. Detects the layout once, at construction.
#[derive(Debug)]
pub struct PidResolver {
    config: CgroupConfig,
    layout: Result<CgroupLayout, String>,
}

impl PidResolver {
    /// A resolver for `config`. A cgroup root that cannot be used is not fatal (the per-PID
    /// path does not need it); [`PidResolver::layout`] tells why.
    pub fn new(config: CgroupConfig) -> Self {
        let layout = detect_layout(&config).map_err(|e| e.to_string());
        match &layout {
            Ok(l) => tracing::info!(
                version = %l.version, driver = %l.driver, kubepods = %l.kubepods.display(),
                "cgroup layout"
            ),
            Err(e) => tracing::warn!(
                "cgroup tree lookups disabled: {e}; PIDs are mapped through {}/<pid>/cgroup only",
                config.proc_root.display()
            ),
        }
        Self { config, layout }
    }

    /// The configuration.
    pub fn config(&self) -> &CgroupConfig {
        &self.config
    }

    /// The detected layout, or why there is none.
    pub fn layout(&self) -> Result<&CgroupLayout, &str> {
        self.layout.as_ref().map_err(String::as_str)
    }

    /// Look up every PID: through `/proc` first, then (only for PIDs whose `/proc` entry
    /// could not be read) through one walk of the cgroup tree. Blocking file I/O.
    pub fn resolve(&self, pids: impl IntoIterator<Item = u32>) -> BTreeMap<u32, PidLookup> {
        let mut out = BTreeMap::new();
        let mut unread: Vec<(u32, String)> = Vec::new();
        let pids: std::collections::BTreeSet<u32> = pids.into_iter().collect();
        for pid in pids {
            let file = self.config.proc_root.join(pid.to_string()).join("cgroup");
            match fs::read_to_string(&file) {
                Ok(content) => {
                    let lookup = match identity_from_proc_cgroup(&content) {
                        Ok(identity) => PidLookup::Found {
                            identity,
                            source: LookupSource::Proc,
                        },
                        Err(p) => PidLookup::NotFound {
                            reason: p.to_string(),
                        },
                    };
                    out.insert(pid, lookup);
                }
                Err(e) => {
                    let why = if e.kind() == io::ErrorKind::NotFound {
                        format!(
                            "{} does not exist (the process exited, or the daemon does not \
                             see host PIDs: set hostPID: true)",
                            file.display()
                        )
                    } else {
                        format!("cannot read {}: {e}", file.display())
                    };
                    unread.push((pid, why));
                }
            }
        }
        if unread.is_empty() {
            return out;
        }
        let tree = match &self.layout {
            Ok(layout) => Ok(walk_tree(layout)),
            Err(e) => Err(e.clone()),
        };
        for (pid, why) in unread {
            let lookup = match &tree {
                Ok(map) => match map.get(&pid) {
                    Some(identity) => PidLookup::Found {
                        identity: identity.clone(),
                        source: LookupSource::CgroupTree,
                    },
                    None => PidLookup::NotFound {
                        reason: format!(
                            "{why}; and no cgroup.procs under the kubepods tree lists it"
                        ),
                    },
                },
                Err(e) => PidLookup::NotFound {
                    reason: format!("{why}; and the cgroup tree cannot be searched: {e}"),
                },
            };
            out.insert(pid, lookup);
        }
        out
    }
}

/// Every PID listed in a container's cgroup (or below it) in the kubepods tree.
pub fn walk_tree(layout: &CgroupLayout) -> HashMap<u32, ContainerIdentity> {
    let mut out = HashMap::new();
    let mut stack: Vec<(PathBuf, usize)> = vec![(layout.kubepods.clone(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let rel = relative_path(&layout.hierarchy, &dir);
        if let Ok(identity) = identity_from_path(&rel) {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    out.entry(pid).or_insert_with(|| identity.clone());
                }
            }
        }
        if depth >= MAX_WALK_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    out
}

fn relative_path(base: &Path, dir: &Path) -> String {
    let rel = dir.strip_prefix(base).unwrap_or(dir);
    format!("/{}", rel.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b5f1e0c-7d2a-4c4e-9a51-3f7e2b9c8d10";
    const CID: &str = "6f1c2a9e0b8d47c3a5e4f2d1c0b9a8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1";

    fn found(path: &str) -> ContainerIdentity {
        match identity_from_path(path) {
            Ok(id) => id,
            Err(e) => panic!("{path}: {e}"),
        }
    }

    #[test]
    fn cgroupfs_paths_give_pod_container_and_qos() {
        let g = found(&format!("/kubepods/pod{UID}/{CID}"));
        assert_eq!((g.pod_uid.as_str(), g.container_id.as_str()), (UID, CID));
        assert_eq!(g.qos, QosClass::Guaranteed);
        let b = found(&format!("/kubepods/burstable/pod{UID}/crio-{CID}"));
        assert_eq!((b.container_id.as_str(), b.qos), (CID, QosClass::Burstable));
        let e = found(&format!("/kubepods/besteffort/pod{UID}/{CID}"));
        assert_eq!(e.qos, QosClass::BestEffort);
    }

    #[test]
    fn systemd_paths_with_every_runtime_prefix_give_the_container() {
        let uid_ = UID.replace('-', "_");
        for prefix in ["cri-containerd", "crio", "docker", "some-future-runtime"] {
            let p = format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/{prefix}-{CID}.scope"
            );
            let id = found(&p);
            assert_eq!(id.pod_uid, UID, "{p}");
            assert_eq!(id.container_id, CID, "{p}");
            assert_eq!(id.qos, QosClass::BestEffort);
        }
        let g = found(&format!(
            "/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(g.qos, QosClass::Guaranteed);
    }

    #[test]
    fn paths_seen_through_a_private_cgroup_namespace_still_map() {
        let uid_ = UID.replace('-', "_");
        let p =
            format!("/../../kubepods-burstable-pod{uid_}.slice/cri-containerd-{CID}.scope/init");
        let id = found(&p);
        assert_eq!((id.pod_uid.as_str(), id.qos), (UID, QosClass::Burstable));
    }

    #[test]
    fn host_processes_pod_cgroups_and_conmon_are_not_containers() {
        assert!(matches!(
            identity_from_path("/system.slice/nvidia-persistenced.service"),
            Err(PathProblem::NotKubernetes(_))
        ));
        assert!(matches!(
            identity_from_path(&format!("/kubepods/pod{UID}")),
            Err(PathProblem::PodOnly(_))
        ));
        let uid_ = UID.replace('-', "_");
        assert!(matches!(
            identity_from_path(&format!(
                "/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{CID}.scope"
            )),
            Err(PathProblem::NotAContainer(_))
        ));
        // A slice that merely starts with "kubepods-" but is not a pod slice.
        assert!(identity_from_path("/kubepods.slice/kubepods-burstable.slice").is_err());
    }

    #[test]
    fn proc_cgroup_prefers_the_memory_or_unified_line() {
        let v1 = format!(
            "12:pids:/kubepods/pod{UID}/{CID}\n\
             11:memory:/kubepods/pod{UID}/{CID}\n\
             1:name=systemd:/system.slice/containerd.service\n"
        );
        assert_eq!(
            identity_from_proc_cgroup(&v1).map(|i| i.container_id),
            Ok(CID.into())
        );
        let v2 = format!("0::/kubepods/besteffort/pod{UID}/{CID}\n");
        assert_eq!(
            identity_from_proc_cgroup(&v2).map(|i| i.qos),
            Ok(QosClass::BestEffort)
        );
        let host = "0::/user.slice/user-1000.slice/session-3.scope\n";
        assert!(matches!(
            identity_from_proc_cgroup(host),
            Err(PathProblem::NotKubernetes(_))
        ));
        assert!(identity_from_proc_cgroup("garbage without colons").is_err());
    }

    #[test]
    fn runtime_prefixes_are_stripped_from_status_container_ids() {
        assert_eq!(strip_runtime_prefix(&format!("containerd://{CID}")), CID);
        assert_eq!(
            strip_runtime_prefix(&format!("cri-o://{}", CID.to_uppercase())),
            CID
        );
        assert_eq!(strip_runtime_prefix(CID), CID);
    }

    #[test]
    fn choices_accept_auto_and_reject_unknown_words_with_the_allowed_list() {
        assert_eq!(parse_choice::<CgroupDriver>("auto").ok(), Some(None));
        assert_eq!(parse_choice::<CgroupDriver>("").ok(), Some(None));
        assert_eq!(
            parse_choice::<CgroupDriver>("Systemd").ok(),
            Some(Some(CgroupDriver::Systemd))
        );
        assert_eq!(
            parse_choice::<CgroupVersion>("2").ok(),
            Some(Some(CgroupVersion::V2))
        );
        let err = parse_choice::<CgroupDriver>("openrc")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("invalid cgroup driver \"openrc\": use auto, cgroupfs or systemd")
        );
    }
}
