//! Test support: builds the fake NVML library from `tests/fake-nvml/fake_nvml.c` and turns a
//! node description into the fake's spec file, so the nvml backend can be compared with the
//! simulated backend on the same node.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gm_backend::node_file::{NodeDescription, ScriptedEventKind};
use gm_backend::{NvmlBackend, NvmlConfig};
use gm_core::Link;

/// Where the example node files live.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/nodes")
}

/// Every example node file.
pub fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples directory is readable")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// The fake library, compiled once per test process with the system C compiler.
pub fn fake_library() -> &'static Path {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match LIB.get_or_init(compile_fake) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn compile_fake() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-nvml/fake_nvml.c");
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-nvml-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let out = dir.join("libnvidia-ml.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let output = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-o"])
        .arg(&out)
        .arg(&src)
        .args(["-lpthread", "-ldl"])
        .output()
        .map_err(|e| {
            format!(
                "the NVML tests need a C compiler to build the fake libnvidia-ml.so, but `{cc}` \
                 could not be run ({e}); install one (e.g. apt-get install gcc) or set CC"
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "compiling {} with `{cc}` failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(out)
}

/// One instance of the fake NVML: a private copy of the library with its spec beside it, plus
/// an empty sysfs tree for the NUMA fallback.
pub struct FakeNvml {
    pub dir: tempfile::TempDir,
    pub lib: PathBuf,
}

impl FakeNvml {
    /// An instance answering from this spec text.
    pub fn with_spec(spec: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(fake_library(), &lib).expect("copy fake library");
        std::fs::write(dir.path().join("fake_nvml.spec"), spec).expect("write spec");
        std::fs::create_dir_all(dir.path().join("sys")).expect("sysfs dir");
        Self { dir, lib }
    }

    /// An instance playing this node description.
    pub fn for_node(desc: &NodeDescription) -> Self {
        Self::with_spec(&fake_spec(desc).expect("node can be expressed for the fake"))
    }

    /// The sysfs root the backend is pointed at.
    pub fn sysfs(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    /// Open the nvml backend on this instance.
    pub fn open(&self) -> NvmlBackend {
        match NvmlBackend::open(NvmlConfig {
            lib_path: Some(self.lib.clone()),
            sysfs_root: self.sysfs(),
        }) {
            Ok(b) => b,
            Err(e) => panic!("opening the nvml backend on the fake failed: {e}"),
        }
    }
}

fn nvml_level(link: Link) -> u32 {
    match link {
        Link::Pix => 10,
        Link::Pxb => 20,
        Link::Phb => 30,
        Link::Node => 40,
        _ => 50,
    }
}

/// Most NVLinks one card has.
const MAX_LINKS: u32 = 18;
/// pciDeviceId of an H100 SXM5 and of a third-generation NVSwitch (device << 16 | vendor).
const GPU_DEVICE_ID: &str = "233010de";
const SWITCH_DEVICE_ID: &str = "22a310de";

/// The fake's spec for a node description. Cards are written in FILE order (the NVML
/// enumeration order of the fake), so the backend has to sort them itself.
///
/// NVLinks: a group of NVLink-connected cards whose links fit in 18 per card gets direct
/// links; a group where every pair has the same count but the total exceeds 18 per card (an
/// NVSwitch board) gets that many links per card to one fake NVSwitch.
pub fn fake_spec(desc: &NodeDescription) -> Result<String, String> {
    let n = desc.cards.len();
    // Card index -> fake (file-order) position.
    let mut by_file: Vec<usize> = (0..n).collect();
    by_file.sort_by_key(|&i| desc.cards[i].file_position);
    let mut fake_pos = vec![0usize; n];
    for (pos, &i) in by_file.iter().enumerate() {
        fake_pos[i] = pos;
    }
    let uuid_pos = |uuid: &str| {
        desc.cards
            .iter()
            .position(|c| c.uuid == uuid)
            .map(|i| fake_pos[i])
            .ok_or_else(|| format!("unknown card {uuid}"))
    };

    let mut out = String::from("driver 550.54.15\n");
    for &i in &by_file {
        let c = &desc.cards[i];
        let bus = c
            .pci_bus_id
            .ok_or_else(|| format!("card {} has no pciBusId; the fake needs one", c.uuid))?;
        let numa = c.numa_node.map_or(-1, i64::from);
        writeln!(
            out,
            "card {} {} {} {} {} {}",
            bus.nvml_form(),
            c.uuid,
            c.minor,
            numa,
            c.memory_mib,
            c.model
        )
        .map_err(|e| e.to_string())?;
    }

    let nv = |i: usize, j: usize| match desc.links[i][j] {
        Link::NvLink(k) => u32::from(k),
        _ => 0,
    };
    for i in 0..n {
        for j in (i + 1)..n {
            let level = match desc.links[i][j] {
                Link::NvLink(_) => {
                    let same_numa = desc.cards[i].numa_node.is_some()
                        && desc.cards[i].numa_node == desc.cards[j].numa_node;
                    if same_numa {
                        40
                    } else {
                        50
                    }
                }
                other => nvml_level(other),
            };
            writeln!(out, "topo {} {} {level}", fake_pos[i], fake_pos[j])
                .map_err(|e| e.to_string())?;
        }
    }

    // NVLink groups (connected components of the NVLink graph).
    let mut seen = vec![false; n];
    for (group_no, start) in (0..n).enumerate() {
        if seen[start] {
            continue;
        }
        let mut group = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            if !group.insert(i) {
                continue;
            }
            seen[i] = true;
            stack.extend((0..n).filter(|&j| j != i && nv(i, j) > 0));
        }
        if group.len() < 2 {
            continue;
        }
        let total = |i: usize| {
            (0..n)
                .map(|j| if i == j { 0 } else { nv(i, j) })
                .sum::<u32>()
        };
        if group.iter().all(|&i| total(i) <= MAX_LINKS) {
            for &i in &group {
                for &j in &group {
                    if i != j && nv(i, j) > 0 {
                        let bus = desc.cards[j].pci_bus_id.ok_or("missing bus id")?;
                        writeln!(
                            out,
                            "nvlink {} {} {} {GPU_DEVICE_ID}",
                            fake_pos[i],
                            bus.nvml_form(),
                            nv(i, j)
                        )
                        .map_err(|e| e.to_string())?;
                    }
                }
            }
            continue;
        }
        let members: Vec<usize> = group.iter().copied().collect();
        let k = nv(members[0], members[1]);
        let uniform = members
            .iter()
            .all(|&i| members.iter().all(|&j| i == j || nv(i, j) == k));
        if !uniform || k > MAX_LINKS {
            return Err(format!(
                "cards {members:?} need more than {MAX_LINKS} NVLinks each and are not a uniform \
                 NVSwitch mesh"
            ));
        }
        for &i in &members {
            writeln!(
                out,
                "nvlink {} 00000001:{:02X}:00.0 {k} {SWITCH_DEVICE_ID}",
                fake_pos[i], group_no
            )
            .map_err(|e| e.to_string())?;
        }
    }

    for p in &desc.processes {
        let end = p.end_ms.map_or_else(|| "-".to_string(), |e| e.to_string());
        writeln!(
            out,
            "proc {} {} {} {} {} {end}",
            uuid_pos(&p.card)?,
            p.pid,
            p.used_memory_mib,
            p.sm_percent,
            p.start_ms
        )
        .map_err(|e| e.to_string())?;
    }
    for u in &desc.usage {
        writeln!(
            out,
            "util {} {} {} {}",
            uuid_pos(&u.card)?,
            u.at_ms,
            u.sm_percent,
            u.memory_used_mib
        )
        .map_err(|e| e.to_string())?;
    }
    for e in &desc.events {
        let what = match e.kind {
            ScriptedEventKind::Xid { code } => format!("xid {code}"),
            ScriptedEventKind::DoubleBitEcc => "dbe".to_string(),
            ScriptedEventKind::Lost => "lost".to_string(),
            ScriptedEventKind::Recovered => "recovered".to_string(),
        };
        writeln!(out, "event {} {} {what}", uuid_pos(&e.card)?, e.at_ms)
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}
