//! An ordered writer for the limiter config files (`limits.json`, `vcuda.cfg`) and state
//! directories, on a thread of its own.
//!
//! `Allocate` must be fast, and file-system metadata operations can stall for milliseconds
//! while another file on the same file system is being fsynced (the checkpoint). So
//! `Allocate` only queues its write; `PreStartContainer`, which runs before the container
//! starts, queues a durable rewrite and waits for it (failing the start if it cannot be
//! written). Jobs run strictly in queue order, so a later write of a record always wins.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::config::LIMITER_FILE;
use crate::response::{remove_limiter, write_limiter, LimiterConfig, LimiterDirs};

enum Job {
    Write {
        config: LimiterConfig,
        durable: bool,
        only_if_missing: bool,
        done: Option<oneshot::Sender<std::io::Result<()>>>,
    },
    Remove {
        record_id: String,
    },
    /// Other work on the limiter directories that must be ordered with the writes and
    /// removals (the `hostpids` files: never written into a directory being removed).
    Run(Box<dyn FnOnce(&LimiterDirs) + Send>),
}

/// Handle to the writer thread.
#[derive(Debug, Clone)]
pub struct LimiterWriter {
    dirs: LimiterDirs,
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Write { config, .. } => write!(f, "Write({})", config.record_id),
            Job::Remove { record_id } => write!(f, "Remove({record_id})"),
            Job::Run(_) => f.write_str("Run"),
        }
    }
}

impl LimiterWriter {
    /// Start the writer thread for `dirs`. It ends when every handle is dropped.
    pub fn spawn(dirs: LimiterDirs) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_dir = dirs.clone();
        std::thread::Builder::new()
            .name("limiter-writer".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    run(&thread_dir, job);
                }
            })?;
        Ok(Self { dirs, tx })
    }

    /// Queue a write and return at once; a failure is logged.
    pub fn queue(&self, config: LimiterConfig) {
        self.send(Job::Write {
            config,
            durable: false,
            only_if_missing: false,
            done: None,
        });
    }

    /// Queue a write that only happens if the record has no file yet.
    pub fn queue_if_missing(&self, config: LimiterConfig) {
        self.send(Job::Write {
            config,
            durable: false,
            only_if_missing: true,
            done: None,
        });
    }

    /// Write durably and wait for it (after every write queued before).
    pub async fn write(&self, config: LimiterConfig) -> std::io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.send(Job::Write {
            config,
            durable: true,
            only_if_missing: false,
            done: Some(done),
        });
        wait.await.unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the limiter writer thread has stopped",
            ))
        })
    }

    /// Queue the removal of a record's directory.
    pub fn remove(&self, record_id: &str) {
        self.send(Job::Remove {
            record_id: record_id.to_string(),
        });
    }

    /// Run `f` on the writer thread, after every job queued before, and wait for its result
    /// (`None` if the thread stopped first). `f` must be short: Allocate's writes queue behind it.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&LimiterDirs) -> R + Send + 'static,
    ) -> Option<R> {
        let (done, wait) = oneshot::channel();
        self.send(Job::Run(Box::new(move |dirs| {
            let _ = done.send(f(dirs));
        })));
        wait.await.ok()
    }

    fn send(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            // The thread is gone (only at shutdown): do it here.
            run(&self.dirs, job);
        }
    }
}

fn run(dirs: &LimiterDirs, job: Job) {
    match job {
        Job::Write {
            config,
            durable,
            only_if_missing,
            done,
        } => {
            let skip = only_if_missing
                && dirs
                    .config_dir(&config.record_id)
                    .join(LIMITER_FILE)
                    .exists();
            let result = if skip {
                Ok(())
            } else {
                write_limiter(dirs, &config, durable).map(|_| ())
            };
            if let Err(e) = &result {
                tracing::error!(
                    dir = %dirs.config_dir(&config.record_id).display(), error = %e,
                    "cannot write the limiter config; check that --limiter-dir and --limiter-state-dir are writable and the disk is not full"
                );
            }
            if let Some(done) = done {
                let _ = done.send(result);
            }
        }
        Job::Remove { record_id } => {
            if let Err(e) = remove_limiter(dirs, &record_id) {
                tracing::warn!(record = %record_id, error = %e, "cannot remove the limiter directory");
            }
        }
        Job::Run(f) => f(dirs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::{LimiterCard, LimiterMode, LimiterState, LIMITER_VERSION};

    fn cfg(cores: u32) -> LimiterConfig {
        LimiterConfig {
            version: LIMITER_VERSION,
            record_id: "r-0123456789abcdef0123".into(),
            state: LimiterState::Allocated,
            mode: LimiterMode::Hard,
            pod: None,
            cards: vec![LimiterCard {
                index: 0,
                uuid: "GPU-x".into(),
                minor: 0,
                cores_limit: cores,
                cores_upper_limit: cores,
                memory_limit_bytes: None,
            }],
        }
    }

    fn dirs(root: &std::path::Path) -> LimiterDirs {
        LimiterDirs::new(root.to_path_buf(), root.join("state"))
    }

    #[tokio::test]
    async fn writes_land_in_queue_order_and_a_waited_write_sees_the_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let w = LimiterWriter::spawn(dirs(dir.path())).unwrap();
        w.queue(cfg(10));
        w.queue_if_missing(cfg(20));
        w.write(cfg(30)).await.unwrap();
        let path = dir.path().join("r-0123456789abcdef0123/limits.json");
        let back: LimiterConfig = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.cards[0].cores_limit, 30);
        let state = dir.path().join("state/r-0123456789abcdef0123");
        assert!(state.is_dir());
        let binary = dir.path().join("r-0123456789abcdef0123/vcuda.cfg");
        let b = gm_limiter_core::config::Config::decode(&std::fs::read(&binary).unwrap()).unwrap();
        assert_eq!(b.cards[0].cores, 30);
        assert!(b.incomplete, "the memory half is not known");
        w.remove("r-0123456789abcdef0123");
        w.write(cfg(40)).await.unwrap();
        w.remove("r-0123456789abcdef0123");
        // A waited write after the removal proves the removal ran.
        let other = LimiterConfig {
            record_id: "r-ffffffffffffffffffff".into(),
            ..cfg(1)
        };
        w.write(other).await.unwrap();
        assert!(!path.exists());
        assert!(!state.exists());
    }

    #[tokio::test]
    async fn a_failed_durable_write_is_reported_to_the_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let w = LimiterWriter::spawn(LimiterDirs::new(file.clone(), file)).unwrap();
        assert!(w.write(cfg(10)).await.is_err());
    }
}
