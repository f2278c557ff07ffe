//! The host pids of every share container's GPU processes, published for the in-container
//! limiter's feedback loop (`docs/limiter-config.md`, "Host pids for the feedback loop").
//!
//! NVML names processes by their host pid, which a process in a container cannot learn. Every
//! `--limiter-pids-interval` the daemon takes one usage sample as the metrics do
//! ([`UsageSample::take`] on a blocking thread, with a deadline), maps its processes to
//! allocations with the metrics' join ([`gm_metrics::report::host_pids`]) and, for each share
//! record (one card, 1–99 vcuda-core) whose set changed, replaces
//! `<--limiter-state-dir>/<record-id>/hostpids` (`/run/vcuda/hostpids` in the container;
//! format [`gm_limiter_core::hostpids`]) atomically.
//!
//! The files are written on the limiter writer thread (in slices of a few records, so a
//! `PreStartContainer` write queued meanwhile waits for a few files at most), ordered with the
//! config writes and the removal of released records' directories, so a file is never written into a directory
//! being removed and no directory is created for it: a record without a state directory gets
//! no file. Nothing here runs on the kubelet's request paths.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_core::resources::CORES_PER_CARD;
use gm_limiter_core::hostpids::{encode, HOSTPIDS_FILE};
use gm_metrics::report::host_pids;
use gm_metrics::{NodeSnapshot, PidResolver, SnapshotSource, UsageSample};
use tokio::task::JoinHandle;

use crate::fsutil::{write_atomic, FileId};
use crate::shared::Shared;

/// How long a tick waits for the GPU backend when no metrics server sets
/// `--usage-sample-timeout-ms` (the metrics server's default).
const DEFAULT_SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Records handled per job on the limiter writer thread.
const WRITES_PER_JOB: usize = 32;

/// The host pids to publish: for every share allocation of the snapshot (a record with one
/// card and 1–99 vcuda-core on it), its processes' pids on that card, keyed by record ID.
/// `None` when the sample did not list processes (the pids are unknown; nothing is written).
pub fn wanted(snapshot: &NodeSnapshot, sample: &UsageSample) -> Option<BTreeMap<String, Vec<u32>>> {
    let pids = host_pids(snapshot, sample)?;
    Some(
        snapshot
            .allocations
            .iter()
            .zip(pids)
            .filter_map(|(a, mut by_card)| {
                let [card] = a.cards.as_slice() else {
                    return None;
                };
                let share = (1..CORES_PER_CARD).contains(&card.cores);
                (share && !a.record_id.is_empty()).then(|| {
                    let pids = by_card.remove(&card.card).unwrap_or_default();
                    (a.record_id.clone(), pids)
                })
            })
            .collect(),
    )
}

/// What one [`HostPidsTracker::publish`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Share records considered.
    pub shares: usize,
    /// Files written.
    pub written: usize,
    /// Writes that failed (retried on the next tick).
    pub failed: usize,
}

#[derive(Debug)]
struct Written {
    pids: Vec<u32>,
    /// The file as it was right after the write: a file deleted or replaced since (or a
    /// state directory removed and created again for a new container) is written again.
    file: Option<FileId>,
}

/// The last set written per record, so that only changes are written.
#[derive(Debug, Default)]
pub struct HostPidsTracker {
    written: HashMap<String, Written>,
    /// Records whose last write failed; the failure is logged once, until a write succeeds.
    failing: HashSet<String>,
}

impl HostPidsTracker {
    /// Bring the `hostpids` files under `state_root` (the `--limiter-state-dir`) in line with
    /// `wanted`: [`HostPidsTracker::forget_others`], then [`HostPidsTracker::update`] for all.
    /// Blocking file I/O.
    pub fn publish(
        &mut self,
        state_root: &Path,
        wanted: &BTreeMap<String, Vec<u32>>,
    ) -> PublishStats {
        self.forget_others(wanted);
        self.update(state_root, wanted.iter())
    }

    /// Forget the records not in `wanted` (released: their directories go with them).
    pub fn forget_others(&mut self, wanted: &BTreeMap<String, Vec<u32>>) {
        self.written.retain(|id, _| wanted.contains_key(id));
        self.failing.retain(|id| wanted.contains_key(id));
    }

    /// Write the file of each of these records whose set differs from the last one written (or
    /// whose file is gone or was replaced). A record with no process gets an empty list only if
    /// it has a file (written before, perhaps by an earlier run of the daemon): a stale list
    /// could name pids reused by other processes. Blocking file I/O.
    pub fn update<'a>(
        &mut self,
        state_root: &Path,
        wanted: impl IntoIterator<Item = (&'a String, &'a Vec<u32>)>,
    ) -> PublishStats {
        let mut stats = PublishStats::default();
        for (id, pids) in wanted {
            stats.shares += 1;
            let mut pids: Vec<u32> = pids.iter().copied().filter(|&p| p != 0).collect();
            pids.sort_unstable();
            pids.dedup();
            let path = state_root.join(id).join(HOSTPIDS_FILE);
            let on_disk = FileId::of(&path);
            let unchanged = match self.written.get(id) {
                Some(w) => w.pids == pids && w.file.is_some() && w.file == on_disk,
                None => pids.is_empty() && on_disk.is_none(),
            };
            if unchanged {
                continue;
            }
            match write_atomic(&path, &encode(&pids), false) {
                Ok(()) => {
                    stats.written += 1;
                    let file = FileId::of(&path);
                    self.written.insert(id.clone(), Written { pids, file });
                    if self.failing.remove(id) {
                        tracing::info!(record = %id, "hostpids written again");
                    }
                }
                Err(e) => {
                    stats.failed += 1;
                    self.written.remove(id);
                    if !self.failing.insert(id.clone()) {
                        continue;
                    }
                    if e.kind() == std::io::ErrorKind::NotFound {
                        // Released (its directory is being removed) or not set up yet.
                        tracing::debug!(record = %id, path = %path.display(), "no limiter state directory for this share; its hostpids are not published");
                    } else {
                        tracing::warn!(
                            record = %id, path = %path.display(), error = %e,
                            "cannot write hostpids; the container's limiter runs open loop (without its own utilisation) until it is written; check that --limiter-state-dir is writable and the disk is not full"
                        );
                    }
                }
            }
        }
        stats
    }
}

/// Publish every `every` until aborted. Samples the backend on a blocking thread with the
/// metrics server's deadline (`--usage-sample-timeout-ms`); a sample that outlives it is not
/// waited for again and no second one is started while it runs.
pub fn spawn_publisher(shared: Arc<Shared>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let metrics = shared.config.metrics.as_ref();
        let cgroup = metrics.map(|m| m.cgroup.clone()).unwrap_or_default();
        let deadline = metrics.map_or(DEFAULT_SAMPLE_TIMEOUT, |m| m.sample_timeout);
        let resolver = Arc::new(PidResolver::new(cgroup));
        let mut tracker = HostPidsTracker::default();
        let mut stuck: Option<(Instant, JoinHandle<UsageSample>)> = None;
        let mut sample_failing = false;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some((since, h)) = stuck.take() {
                if !h.is_finished() {
                    tracing::debug!(
                        waited_s = since.elapsed().as_secs_f64(),
                        "the GPU backend has not answered the last hostpids sample yet"
                    );
                    stuck = Some((since, h));
                    continue;
                }
            }
            let backend = Arc::clone(&shared.backend);
            let r = Arc::clone(&resolver);
            let started = Instant::now();
            let mut handle =
                tokio::task::spawn_blocking(move || UsageSample::take(backend.as_ref(), &r));
            let sample = match tokio::time::timeout(deadline, &mut handle).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => UsageSample::unavailable(format!("usage sampling failed: {e}")),
                Err(_) => {
                    stuck = Some((started, handle));
                    UsageSample::unavailable(format!(
                        "the GPU backend did not answer within {} ms",
                        deadline.as_millis()
                    ))
                }
            };
            let snapshot = shared.snapshot();
            let Some(wanted) = wanted(&snapshot, &sample) else {
                if !sample_failing {
                    let why = sample.processes.err().unwrap_or_default();
                    tracing::warn!(error = %why, "cannot list the GPU processes; the hostpids files are left as they are");
                }
                sample_failing = true;
                continue;
            };
            if sample_failing {
                tracing::info!("the GPU processes are listed again; publishing hostpids");
                sample_failing = false;
            }
            // In slices, so that a PreStartContainer write queued meanwhile waits for a few
            // files at most, not for every share of the node.
            tracker.forget_others(&wanted);
            let entries: Vec<(String, Vec<u32>)> = wanted.into_iter().collect();
            let mut stats = PublishStats::default();
            for chunk in entries.chunks(WRITES_PER_JOB) {
                let chunk = chunk.to_vec();
                let mut t = std::mem::take(&mut tracker);
                let done = shared
                    .limiter
                    .run(move |dirs| {
                        let s = t.update(&dirs.state, chunk.iter().map(|(id, p)| (id, p)));
                        (t, s)
                    })
                    .await;
                let Some((t, s)) = done else {
                    return; // the writer thread is gone: shutting down
                };
                tracker = t;
                stats.shares += s.shares;
                stats.written += s.written;
                stats.failed += s.failed;
            }
            if stats.written > 0 || stats.failed > 0 {
                tracing::debug!(
                    shares = stats.shares,
                    written = stats.written,
                    failed = stats.failed,
                    "hostpids published"
                );
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_backend::ProcessSample;
    use gm_core::{Link, NodeInventory};
    use gm_limiter_core::hostpids::decode;
    use gm_metrics::cgroup::{ContainerIdentity, LookupSource, PidLookup, QosClass};
    use gm_metrics::{CardAllocation, ContainerAllocation};

    const A: &str = "r-00000000000000000001";
    const B: &str = "r-00000000000000000002";

    fn read(root: &Path, id: &str) -> Option<Vec<u32>> {
        let bytes = std::fs::read(root.join(id).join(HOSTPIDS_FILE)).ok()?;
        Some(decode(&bytes).unwrap())
    }

    fn wanted(sets: &[(&str, &[u32])]) -> BTreeMap<String, Vec<u32>> {
        sets.iter()
            .map(|(id, p)| (id.to_string(), p.to_vec()))
            .collect()
    }

    fn root_with(ids: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for id in ids {
            std::fs::create_dir(root.path().join(id)).unwrap();
        }
        root
    }

    fn allocation(record: &str, uid: &str, cards: &[(u32, u32)]) -> ContainerAllocation {
        ContainerAllocation {
            record_id: record.into(),
            namespace: "ns".into(),
            pod_name: format!("pod-{uid}"),
            pod_uid: uid.into(),
            container_name: "main".into(),
            container_id: None,
            qos_class: None,
            cards: cards
                .iter()
                .map(|&(card, cores)| CardAllocation {
                    card,
                    cores,
                    memory_mib: 256,
                })
                .collect(),
            request_cores: cards.iter().map(|c| c.1).sum(),
            request_memory_mib: 256,
        }
    }

    #[test]
    fn only_shares_are_published_with_their_pids_on_their_own_card() {
        let inventory = NodeInventory::uniform(2, "Tesla T4", 15360, Link::Pix);
        let snapshot = NodeSnapshot {
            node: "n".into(),
            inventory: inventory.clone(),
            xid_errors: vec![],
            allocations: vec![
                allocation(A, "p-share", &[(0, 30)]),
                allocation(B, "p-whole", &[(1, 100)]),
                allocation("m-00000000000000000003", "p-mem", &[(0, 0)]),
            ],
            registrations: vec![],
            registered: true,
            unregistered: vec![],
        };
        // (pid, card, pod): the share's pids 7 (its card) and 8 (the other card), the whole
        // card's 9.
        let procs = [(7, 0, "p-share"), (8, 1, "p-share"), (9, 1, "p-whole")];
        let sample = UsageSample {
            processes: Ok(procs
                .iter()
                .map(|&(pid, card, _)| ProcessSample {
                    uuid: inventory.cards[card].uuid.clone(),
                    pid,
                    used_memory_mib: 10,
                    sm_percent: 1,
                })
                .collect()),
            card_usage: Ok(vec![]),
            lookups: procs
                .iter()
                .map(|&(pid, _, pod)| {
                    let identity = ContainerIdentity {
                        pod_uid: pod.into(),
                        container_id: format!("c{pid}"),
                        qos: QosClass::Guaranteed,
                    };
                    let source = LookupSource::Proc;
                    (pid, PidLookup::Found { identity, source })
                })
                .collect(),
            cgroup: Err("not needed".into()),
            duration: Duration::ZERO,
        };
        let w = super::wanted(&snapshot, &sample).unwrap();
        assert_eq!(w, wanted(&[(A, &[7])]));
        let failed = UsageSample::unavailable("NVML is gone".into());
        assert_eq!(super::wanted(&snapshot, &failed), None);
    }

    #[test]
    fn only_changed_sets_are_written_and_an_exited_process_leaves_the_file() {
        let root = root_with(&[A, B]);
        let mut t = HostPidsTracker::default();
        let s = t.publish(root.path(), &wanted(&[(A, &[42, 7]), (B, &[])]));
        assert_eq!((s.shares, s.written, s.failed), (2, 1, 0));
        assert_eq!(read(root.path(), A), Some(vec![7, 42]));
        assert_eq!(
            read(root.path(), B),
            None,
            "no process, never written: no file"
        );

        let s = t.publish(root.path(), &wanted(&[(A, &[7, 42]), (B, &[])]));
        assert_eq!(s.written, 0, "nothing changed");

        let s = t.publish(root.path(), &wanted(&[(A, &[7]), (B, &[])]));
        assert_eq!(s.written, 1);
        assert_eq!(read(root.path(), A), Some(vec![7]));
        t.publish(root.path(), &wanted(&[(A, &[]), (B, &[])]));
        assert_eq!(
            read(root.path(), A),
            Some(vec![]),
            "written before: now empty"
        );
    }

    #[test]
    fn a_deleted_file_is_written_again_and_a_stale_file_from_an_earlier_run_is_emptied() {
        let root = root_with(&[A, B]);
        std::fs::write(root.path().join(B).join(HOSTPIDS_FILE), encode(&[99])).unwrap();
        let mut t = HostPidsTracker::default();
        t.publish(root.path(), &wanted(&[(A, &[5]), (B, &[])]));
        assert_eq!(read(root.path(), B), Some(vec![]), "pid 99 may be reused");
        std::fs::remove_file(root.path().join(A).join(HOSTPIDS_FILE)).unwrap();
        let s = t.publish(root.path(), &wanted(&[(A, &[5]), (B, &[])]));
        assert_eq!(s.written, 1);
        assert_eq!(read(root.path(), A), Some(vec![5]));
    }

    #[test]
    fn a_record_without_a_state_directory_gets_no_directory_and_is_retried() {
        let root = root_with(&[]);
        let mut t = HostPidsTracker::default();
        let s = t.publish(root.path(), &wanted(&[(A, &[5])]));
        assert_eq!((s.written, s.failed), (0, 1));
        assert!(!root.path().join(A).exists(), "never creates the directory");
        std::fs::create_dir(root.path().join(A)).unwrap();
        let s = t.publish(root.path(), &wanted(&[(A, &[5])]));
        assert_eq!((s.written, s.failed), (1, 0));
        assert_eq!(read(root.path(), A), Some(vec![5]));
    }

    #[test]
    fn a_released_record_is_forgotten_and_its_recreated_directory_is_written_afresh() {
        let root = root_with(&[A]);
        let mut t = HostPidsTracker::default();
        t.publish(root.path(), &wanted(&[(A, &[5])]));
        // Released (directory removed), then the same IDs allocated to a new container.
        t.publish(root.path(), &wanted(&[]));
        std::fs::remove_dir_all(root.path().join(A)).unwrap();
        std::fs::create_dir(root.path().join(A)).unwrap();
        let s = t.publish(root.path(), &wanted(&[(A, &[5])]));
        assert_eq!(s.written, 1);
        assert_eq!(read(root.path(), A), Some(vec![5]));
    }
}
