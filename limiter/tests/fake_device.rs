//! Self-test of the fake driver libraries (`limiter/fakes`), with no limiter loaded: the
//! other limiter tests trust these fakes, so their version routing, memory accounting, timing
//! model and NVML sampling are checked here through `tests/progs/fake_selftest.c`.
//!
//! Wall-clock bands are generous (CI has two noisy cores); exact checks use model time from
//! the fakes' ring buffer.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use support::{layout, FakeGpu, KernelRun};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn selftest_bin() -> &'static std::path::Path {
    static BIN: OnceLock<std::path::PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        support::compile_program(
            "fake_selftest",
            &support::progs_dir().join("fake_selftest.c"),
            false,
        )
    })
}

fn command(gpu: &FakeGpu, args: &[&str]) -> Command {
    let mut c = Command::new(selftest_bin());
    c.args(args)
        .env("FAKE_CUDA_LIB", support::fake_cuda())
        .env("FAKE_NVML_LIB", support::fake_nvml())
        .env_remove("LD_PRELOAD");
    gpu.apply(&mut c);
    c
}

/// The self-test's stdout, split into `key=value` pairs and other lines.
#[derive(Debug)]
struct Out {
    text: String,
    kv: HashMap<String, String>,
}

impl Out {
    fn new(text: String) -> Out {
        let kv = text
            .lines()
            .filter(|l| !l.contains(' '))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Out { text, kv }
    }
    fn get(&self, key: &str) -> &str {
        self.kv
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in:\n{}", self.text))
    }
    fn num(&self, key: &str) -> f64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number:\n{}", self.text))
    }
    /// Lines starting with `prefix ` as maps of their `k=v` words.
    fn records(&self, prefix: &str) -> Vec<HashMap<String, u64>> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
            .map(|rest| {
                rest.split(' ')
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.parse().expect("a number")))
                    .collect()
            })
            .collect()
    }
    /// Every PASS/FAIL check passed.
    fn assert_passed(&self) {
        let failed: Vec<&str> = self
            .text
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect();
        assert!(
            failed.is_empty(),
            "failed checks:\n{}\n\nfull output:\n{}",
            failed.join("\n"),
            self.text
        );
        assert!(
            self.text.contains("DONE failures=0"),
            "the self-test did not finish:\n{}",
            self.text
        );
    }
}

fn run(gpu: &FakeGpu, args: &[&str]) -> Out {
    let out = command(gpu, args).output().expect("run the self-test");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code().is_some(),
        "self-test {args:?} died: {:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Out::new(text)
}

/// A process holding an allocation until it is told to let go.
struct Holder {
    child: Child,
    pid: u32,
}

impl Holder {
    fn start(gpu: &FakeGpu, bytes: u64) -> Holder {
        let mut child = command(gpu, &["hold", &bytes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a holder");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("the holder's first line");
        assert!(
            line.starts_with("held rc=0"),
            "holder could not allocate: {line}"
        );
        let pid = child.id();
        Holder { child, pid }
    }
    fn release(mut self) {
        let _ = self
            .child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"quit\n");
        let status = self.child.wait().expect("holder exits");
        assert!(status.success(), "holder failed: {status:?}");
    }
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the holder");
        let _ = self.child.wait();
    }
}

fn runs_of(gpu: &FakeGpu, pid: u32) -> Vec<KernelRun> {
    gpu.kernel_runs()
        .into_iter()
        .filter(|r| r.pid == pid)
        .collect()
}

#[test]
fn state_layout_matches_the_c_headers() {
    let out = run(&FakeGpu::new(), &["layout"]);
    let expect = [
        ("off_devices", layout::OFF_DEVICES),
        ("device_size", layout::DEVICE_SIZE),
        ("off_procs", layout::OFF_PROCS),
        ("proc_size", layout::PROC_SIZE),
        ("off_ring_write", layout::OFF_RING_WRITE),
        ("off_ring", layout::OFF_RING),
        ("entry_size", layout::ENTRY_SIZE),
        ("ring_size", layout::RING_SIZE),
        ("state_size", layout::STATE_SIZE),
        ("off_realtime_offset", layout::OFF_REALTIME_OFFSET),
        ("off_used_bytes", layout::DEV_USED_BYTES),
        ("off_device_free_at", layout::DEV_DEVICE_FREE_AT),
    ];
    for (key, want) in expect {
        assert_eq!(out.num(key) as usize, want, "{key}");
    }
}

#[test]
fn get_proc_address_returns_the_exact_variant_for_version_and_stream_flags() {
    run(&FakeGpu::new(), &["procaddr"]).assert_passed();
}

#[test]
fn cuda_and_nvml_agree_on_identity_and_the_profile() {
    let gpu = FakeGpu::new()
        .devices(2)
        .sms(16)
        .threads_per_sm(1024)
        .mem_bytes(8 * GIB);
    let out = run(&gpu, &["identity"]);
    out.assert_passed();
    assert_eq!(out.get("sms"), "16");
    assert_eq!(out.get("threads_per_sm"), "1024");
    assert_eq!(out.get("threads_per_block"), "1024");
    assert_eq!(out.num("total_mem") as u64, 8 * GIB);
    assert_eq!(out.get("driver_version"), "12080");
    let uuid = out.get("uuid0");
    assert!(uuid.starts_with("GPU-") && uuid.len() == 40, "{uuid}");
    assert_ne!(uuid, out.get("uuid1"), "devices have distinct UUIDs");
    // Another process sees the same, already initialised device.
    let again = run(&gpu, &["identity"]);
    assert_eq!(again.get("uuid0"), uuid);
}

#[test]
fn every_allocation_entry_point_is_charged_and_freed() {
    let gpu = FakeGpu::new().mem_bytes(GIB);
    run(&gpu, &["mem-api"]).assert_passed();
    assert!(
        gpu.used_bytes_by_pid().is_empty(),
        "a finished process holds nothing"
    );
}

#[test]
fn memory_is_shared_across_processes_and_nvml_reports_each_pid() {
    let overhead = 256 * MIB;
    let gpu = FakeGpu::new().mem_bytes(10 * GIB).ctx_overhead(overhead);
    let a = Holder::start(&gpu, 3 * GIB);
    let b = Holder::start(&gpu, 5 * GIB);

    let used = gpu.used_bytes_by_pid();
    assert_eq!(used.get(&a.pid), Some(&(3 * GIB + overhead)), "{used:?}");
    assert_eq!(used.get(&b.pid), Some(&(5 * GIB + overhead)), "{used:?}");

    let procs = run(&gpu, &["nvml-procs"]);
    procs.assert_passed();
    let by_pid: HashMap<u64, u64> = procs
        .records("proc")
        .iter()
        .map(|r| (r["pid"], r["used"]))
        .collect();
    assert_eq!(
        by_pid.get(&u64::from(a.pid)),
        Some(&(3 * GIB + overhead)),
        "{}",
        procs.text
    );
    assert_eq!(
        by_pid.get(&u64::from(b.pid)),
        Some(&(5 * GIB + overhead)),
        "{}",
        procs.text
    );
    let mem = &procs.records("mem")[0];
    assert_eq!(mem["total"], 10 * GIB);
    assert_eq!(mem["used"], 8 * GIB + 2 * overhead);

    // A PID namespace: NVML reports host pids.
    let mut c = command(&gpu, &["nvml-procs"]);
    c.env("FAKEGPU_PID_OFFSET", "100000");
    let shifted = Out::new(String::from_utf8_lossy(&c.output().expect("run").stdout).into());
    let pids: Vec<u64> = shifted.records("proc").iter().map(|r| r["pid"]).collect();
    assert!(
        pids.contains(&(u64::from(a.pid) + 100_000)),
        "{}",
        shifted.text
    );

    // Physical capacity: 8.5 GiB held, a third process's context and 3 GiB do not fit.
    let refused = run(&gpu, &["try-alloc", &(3 * GIB).to_string()]);
    assert_eq!(refused.get("alloc_rc"), "2", "{}", refused.text);
    assert_eq!(
        refused.num("free") as u64,
        10 * GIB - 8 * GIB - 3 * overhead
    );

    // A killed holder's memory comes back once a fake notices it is dead.
    let a_pid = a.pid;
    a.kill();
    let fits = run(&gpu, &["try-alloc", &(3 * GIB).to_string()]);
    assert_eq!(fits.get("alloc_rc"), "0", "{}", fits.text);
    let procs = run(&gpu, &["nvml-procs"]);
    let pids: Vec<u64> = procs.records("proc").iter().map(|r| r["pid"]).collect();
    assert!(
        !pids.contains(&u64::from(a_pid)),
        "dead pid still listed: {}",
        procs.text
    );
    assert!(pids.contains(&u64::from(b.pid)));
    b.release();
    assert!(gpu.used_bytes_by_pid().is_empty());
    // Exited processes' context overhead stays charged until a fake reclaims it (NVML does).
    assert!(gpu.device_used_bytes(0) > 0);
    let procs = run(&gpu, &["nvml-procs"]);
    assert_eq!(procs.records("mem")[0]["used"], 0, "{}", procs.text);
    assert_eq!(gpu.device_used_bytes(0), 0);
}

#[test]
fn kernels_take_model_time_and_synchronisation_waits_for_it() {
    let gpu = FakeGpu::new();
    let out = run(&gpu, &["timing"]);
    out.assert_passed();
    assert_eq!(
        out.get("query_before"),
        "600",
        "event not ready before the kernel ends"
    );
    assert_eq!(out.get("stream_query_before"), "600");
    assert_eq!(out.get("elapsed_before"), "600");
    assert_eq!(out.get("query_after"), "0");
    assert_eq!(out.get("stream_query_after"), "0");
    let elapsed = out.num("elapsed_ms");
    assert!(
        (20.0..25.0).contains(&elapsed),
        "event elapsed {elapsed} ms for a 20 ms kernel"
    );
    let waited = out.num("sync_wait_ms");
    assert!(
        (10.0..1000.0).contains(&waited),
        "stream sync waited {waited} ms"
    );

    let pid = gpu
        .kernel_runs()
        .first()
        .expect("kernels were recorded")
        .pid;
    let runs = runs_of(&gpu, pid);
    let durations: Vec<u64> = runs.iter().map(|r| r.end_ns - r.start_ns).collect();
    // busy 20 ms; block_ns_1000 at 2 blocks/SM, 3 waves; block_ns_500 at 8 blocks/SM, 2 waves
    // (one block over); any other name: 1000 ns a wave; then the graph: 1, 2 and 3 ms.
    assert_eq!(
        durations,
        vec![20_000_000, 3000, 1000, 1000, 1_000_000, 2_000_000, 3_000_000],
        "{runs:?}"
    );
    for w in runs.windows(2) {
        assert!(
            w[1].start_ns >= w[0].end_ns,
            "one stream runs in order: {runs:?}"
        );
    }
    let graph_launch = out.num("graph_launch_ns") as u64;
    let graph = &runs[4..];
    assert!(
        graph[0].start_ns >= graph_launch,
        "captured kernels ran only at graph launch"
    );
    assert_eq!(
        graph[1].start_ns, graph[0].end_ns,
        "graph kernels run back to back"
    );
    assert_eq!(graph[2].start_ns, graph[1].end_ns);
}

#[test]
fn two_processes_kernels_serialise_through_the_device() {
    let gpu = FakeGpu::new();
    // Create the state before both start so they share it from the first launch.
    run(&gpu, &["layout"]);
    let spawn = || {
        command(&gpu, &["burst", "20", "5"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (pa, pb) = (a.id(), b.id());
    let oa = Out::new(String::from_utf8_lossy(&a.wait_with_output().unwrap().stdout).into());
    let ob = Out::new(String::from_utf8_lossy(&b.wait_with_output().unwrap().stdout).into());

    let mut runs: Vec<KernelRun> = gpu
        .kernel_runs()
        .into_iter()
        .filter(|r| r.pid == pa || r.pid == pb)
        .collect();
    runs.sort_by_key(|r| r.start_ns);
    assert_eq!(runs.len(), 10, "{runs:?}");
    assert!(runs.iter().all(|r| r.end_ns - r.start_ns == 20_000_000));
    for w in runs.windows(2) {
        assert!(
            w[1].start_ns >= w[0].end_ns,
            "kernels overlap on the device: {runs:?}"
        );
    }
    let span = runs.last().unwrap().end_ns - runs[0].start_ns;
    assert!(
        span >= 200_000_000,
        "ten 20 ms kernels took {span} ns of device time"
    );
    for (out, pid) in [(&oa, pa), (&ob, pb)] {
        let last = runs
            .iter()
            .filter(|r| r.pid == pid)
            .map(|r| r.end_ns)
            .max()
            .unwrap();
        assert!(
            out.num("burst_end_ns") as u64 >= last,
            "sync returned before the last kernel"
        );
    }
    let busy = gpu.busy_ns_by_pid(0, u64::MAX);
    assert_eq!(busy.get(&pa), Some(&100_000_000));
    assert_eq!(busy.get(&pb), Some(&100_000_000));
}

/// Run a 50 % duty cycle (20 ms busy every 40 ms) for `ms`, then wait until NVML shows its
/// last periods; returns (pid, start, end) in model time.
fn half_duty(gpu: &FakeGpu, ms: u64) -> (u32, u64, u64) {
    let out = run(gpu, &["duty", "20", "20", &ms.to_string()]);
    out.assert_passed();
    let (start, end) = (
        out.num("duty_start_ns") as u64,
        out.num("duty_end_ns") as u64,
    );
    // default period 1/6 s, visible one period after it ends
    std::thread::sleep(Duration::from_millis(400));
    (out.num("pid") as u32, start, end)
}

#[test]
fn nvml_process_utilisation_reads_a_half_duty_cycle_as_about_50() {
    let gpu = FakeGpu::new();
    let (pid, start, end) = half_duty(&gpu, 2500);
    let share = gpu.busy_ns_by_pid(start, end)[&pid] as f64 / (end - start) as f64;
    assert!((0.42..0.58).contains(&share), "ring busy share {share}");

    let out = run(&gpu, &["nvml-util"]);
    out.assert_passed();
    assert_eq!(
        out.get("size_rc"),
        "7",
        "samples == NULL: INSUFFICIENT_SIZE"
    );
    assert_eq!(out.get("util_rc"), "0");
    assert_eq!(
        out.get("after_newest_rc"),
        "6",
        "nothing newer than the newest: NOT_FOUND"
    );
    let period = 166_667;
    let (lo, hi) = (
        gpu.sample_timestamp_us(start) + period,
        gpu.sample_timestamp_us(end),
    );
    let samples: Vec<u64> = out
        .records("sample")
        .iter()
        .filter(|s| s["pid"] == u64::from(pid) && s["ts"] - period >= lo && s["ts"] <= hi)
        .map(|s| s["sm"])
        .collect();
    assert!(
        samples.len() >= 5,
        "too few whole periods sampled: {}",
        out.text
    );
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
    assert!(
        (44.0..=56.0).contains(&mean),
        "mean smUtil {mean}: {samples:?}"
    );
    assert!(samples.iter().all(|s| (30..=70).contains(s)), "{samples:?}");
    // The newer entry point reports the same samples.
    let info: Vec<(u64, u64, u64)> = out
        .records("info")
        .iter()
        .map(|s| (s["pid"], s["ts"], s["sm"]))
        .collect();
    let old: Vec<(u64, u64, u64)> = out
        .records("sample")
        .iter()
        .map(|s| (s["pid"], s["ts"], s["sm"]))
        .collect();
    assert!(
        info.iter().all(|s| old.contains(s)) && !info.is_empty(),
        "{}",
        out.text
    );
}

#[test]
fn process_utilisation_can_be_made_unsupported_while_the_newer_api_still_answers() {
    let gpu = FakeGpu::new().process_util_unsupported(true);
    half_duty(&gpu, 600);
    let out = run(&gpu, &["nvml-util"]);
    assert_eq!(
        out.get("size_rc"),
        "3",
        "NVML_ERROR_NOT_SUPPORTED: {}",
        out.text
    );
    assert_eq!(out.get("info_size_rc"), "7", "{}", out.text);
    assert_eq!(out.get("info_rc"), "0", "{}", out.text);
}

#[test]
fn sample_noise_is_deterministic_bounded_and_clamped() {
    let gpu = FakeGpu::new();
    let (pid, _, _) = half_duty(&gpu, 1200);
    let samples = |noise: &str| -> HashMap<u64, u64> {
        let mut c = command(&gpu, &["nvml-util"]);
        c.env("FAKEGPU_SAMPLE_NOISE", noise);
        let out = Out::new(String::from_utf8_lossy(&c.output().unwrap().stdout).into());
        out.records("sample")
            .iter()
            .filter(|s| s["pid"] == u64::from(pid))
            .map(|s| (s["ts"], s["sm"]))
            .collect()
    };
    let (clean, noisy, again) = (samples("0"), samples("10"), samples("10"));
    let mut compared = 0;
    let mut moved = 0;
    for (ts, v) in &noisy {
        assert!(*v <= 100);
        if let Some(c) = clean.get(ts) {
            compared += 1;
            moved += usize::from(c != v);
            assert!(c.abs_diff(*v) <= 10, "noise beyond ±10 at {ts}: {c} vs {v}");
        }
        if let Some(a) = again.get(ts) {
            assert_eq!(a, v, "noise is deterministic");
        }
    }
    assert!(
        compared >= 3 && moved >= 1,
        "{compared} compared, {moved} moved"
    );
}

#[test]
fn noop_launches_cost_tens_of_nanoseconds() {
    let out = run(&FakeGpu::new(), &["noop-bench", "1000000"]);
    let ns = out.num("noop_ns_per_launch");
    eprintln!("fake noop cuLaunchKernel: {ns:.1} ns");
    assert!(
        ns < 1000.0,
        "the benchmark baseline costs {ns} ns per launch"
    );
}
