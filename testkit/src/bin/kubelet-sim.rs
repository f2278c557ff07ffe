//! `kubelet-sim`: plays the kubelet's side of the device-plugin API for demos and development.
//!
//! It serves `kubelet.sock` in a device-plugin directory and a pod-resources socket, accepts
//! registrations, watches every plugin's ListAndWatch stream and prints device and health
//! changes, and admits a scripted set of pods the way the kubelet's device manager does
//! (per pod, per container, per resource: GetPreferredAllocation → Allocate, then
//! PreStartContainer), listing them in its pod-resources answers. It is a development tool,
//! not a kubelet: it runs no containers, keeps no checkpoint and knows nothing of the API
//! server.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use gm_core::devices::DeviceId;
use gm_core::ResourceNames;
use gm_proto::deviceplugin::v1beta1 as dp;
use gm_testkit::devicemanager::{Admission, ContainerRequest, DeviceManager, PodRequest};
use gm_testkit::{FakeKubelet, FakePodResources, KubeletEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

/// kubelet-sim: the kubelet's side of the device-plugin API, for demos and development (NOT a
/// kubelet: it runs no containers).
///
/// Serves kubelet.sock in --device-plugin-dir and the pod-resources API on
/// --pod-resources-socket, prints every registration and device/health change, admits the
/// given pods like the kubelet's device manager (GetPreferredAllocation → Allocate →
/// PreStartContainer, one pod at a time) and prints what each container got. Runs until
/// SIGINT/SIGTERM, or exits after the pods with --once.
#[derive(Debug, Parser)]
#[command(name = "kubelet-sim", version, about, long_about)]
struct Args {
    /// Device-plugin directory: kubelet.sock is served here and the plugins' sockets are
    /// dialled here (gpu-manager's --kubelet-dir).
    #[arg(long, env = "KUBELET_SIM_DEVICE_PLUGIN_DIR")]
    device_plugin_dir: PathBuf,

    /// Where to serve the pod-resources API (gpu-manager's --pod-resources-socket). Default:
    /// pod-resources/kubelet.sock next to the device-plugin directory, as on a real node.
    #[arg(long, env = "KUBELET_SIM_POD_RESOURCES_SOCKET")]
    pod_resources_socket: Option<PathBuf>,

    // (Plain `help` rather than a doc comment: the brackets are not rustdoc links.)
    #[arg(
        long = "pod",
        env = "KUBELET_SIM_PODS",
        value_delimiter = ',',
        help = "A pod to admit: [NAMESPACE/]NAME[/CONTAINER]:VCUDA_CORE[:VCUDA_MEMORY], e.g. \
                demo/train:30:20 (30 vcuda-core, 20 vcuda-memory blocks) or demo/infer:100 (a \
                whole card). Namespace defaults to \"default\", container to \"main\". Repeat \
                for more pods; in the environment variable, separate them with commas."
    )]
    pods: Vec<String>,

    /// A YAML file of pods to admit after the --pod ones (several containers per pod), e.g.
    /// `pods: [{namespace: demo, name: train, containers: [{name: main, vcudaCore: 30,
    /// vcudaMemory: 20}]}]`.
    #[arg(long, env = "KUBELET_SIM_PODS_FILE")]
    pods_file: Option<PathBuf>,

    /// Domain of the resource names (gpu-manager's --resource-domain).
    #[arg(
        long,
        env = "KUBELET_SIM_RESOURCE_DOMAIN",
        default_value = "tencent.com"
    )]
    resource_domain: String,

    /// Seconds to wait for both plugins to register and list their devices before admitting
    /// pods.
    #[arg(long, env = "KUBELET_SIM_REGISTER_TIMEOUT_SECS", default_value_t = 60)]
    register_timeout_secs: u64,

    /// Exit once the pods are processed (status 1 if one was not admitted) instead of running
    /// until SIGINT/SIGTERM.
    #[arg(long, env = "KUBELET_SIM_ONCE")]
    once: bool,

    /// Write a JSON summary of the admissions to this file once every pod is processed (for
    /// scripts waiting on kubelet-sim; written atomically).
    #[arg(long, env = "KUBELET_SIM_READY_FILE")]
    ready_file: Option<PathBuf>,

    /// Log level of kubelet-sim's own diagnostics on stderr (error, warn, info, debug, trace).
    #[arg(long, env = "KUBELET_SIM_LOG_LEVEL", default_value = "warn")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubelet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything `run` needs, validated.
#[derive(Debug)]
struct Setup {
    dir: PathBuf,
    pod_resources: PathBuf,
    names: ResourceNames,
    pods: Vec<PodRequest>,
    register_timeout: Duration,
    once: bool,
    ready_file: Option<PathBuf>,
}

fn setup(args: Args) -> anyhow::Result<Setup> {
    let names = ResourceNames::new(&args.resource_domain)
        .map_err(|e| anyhow::anyhow!("--resource-domain: {e}"))?;
    let mut pods = Vec::new();
    for spec in &args.pods {
        pods.push(parse_pod(spec).map_err(|e| anyhow::anyhow!("--pod {spec:?}: {e}"))?);
    }
    if let Some(file) = &args.pods_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --pods-file {}", file.display()))?;
        let from_file = parse_pods_file(&text)
            .map_err(|e| anyhow::anyhow!("--pods-file {}: {e}", file.display()))?;
        pods.extend(from_file);
    }
    let mut seen = HashSet::new();
    for p in &pods {
        if !seen.insert(p.key()) {
            bail!(
                "pod {} is given twice; every pod needs its own namespace/name",
                p.key()
            );
        }
    }
    if args.register_timeout_secs == 0 {
        bail!("--register-timeout-secs must be at least 1");
    }
    let pod_resources = match args.pod_resources_socket {
        Some(p) => p,
        None => args
            .device_plugin_dir
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("pod-resources")
            .join("kubelet.sock"),
    };
    Ok(Setup {
        dir: args.device_plugin_dir,
        pod_resources,
        names,
        pods,
        register_timeout: Duration::from_secs(args.register_timeout_secs),
        once: args.once,
        ready_file: args.ready_file,
    })
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let level = args.log_level.clone();
    let filter = tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
        anyhow::anyhow!("invalid --log-level {level:?}: {e}; use error, warn, info, debug or trace")
    })?;
    let setup = setup(args)?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(simulate(setup))
}

// ---------------------------------------------------------------------------------------------
// Pod specs

fn check_label(what: &str, s: &str, max: usize, dots: bool) -> Result<(), String> {
    let allowed = if dots {
        "lowercase letters, digits, '-' and '.'"
    } else {
        "lowercase letters, digits and '-'"
    };
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'));
    let ends = s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric);
    if s.is_empty() || s.len() > max || !ok_chars || !ends {
        return Err(format!(
            "{what} {s:?} is not a valid name: use 1-{max} {allowed}, starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn parse_count(what: &str, s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| format!("{what} {s:?} is not a whole number (0 or more)"))
}

const POD_FORM: &str =
    "use [NAMESPACE/]NAME[/CONTAINER]:VCUDA_CORE[:VCUDA_MEMORY], e.g. demo/train:30:20";

/// `[NAMESPACE/]NAME[/CONTAINER]:VCUDA_CORE[:VCUDA_MEMORY]`
fn parse_pod(spec: &str) -> Result<PodRequest, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (who, core, memory) = match parts.as_slice() {
        [who, core] => (*who, *core, "0"),
        [who, core, memory] => (*who, *core, *memory),
        _ => return Err(format!("expected 2 or 3 ':'-separated fields; {POD_FORM}")),
    };
    let path: Vec<&str> = who.split('/').collect();
    let (namespace, name, container) = match path.as_slice() {
        [name] => ("default", *name, "main"),
        [ns, name] => (*ns, *name, "main"),
        [ns, name, container] => (*ns, *name, *container),
        _ => return Err(format!("too many '/' in {who:?}; {POD_FORM}")),
    };
    let pod = PodRequest::single(
        namespace,
        name,
        container,
        parse_count("vcuda-core", core).map_err(|e| format!("{e}; {POD_FORM}"))?,
        parse_count("vcuda-memory", memory).map_err(|e| format!("{e}; {POD_FORM}"))?,
    );
    check_pod(&pod)?;
    Ok(pod)
}

fn check_pod(pod: &PodRequest) -> Result<(), String> {
    check_label("namespace", &pod.namespace, 63, false)?;
    check_label("pod name", &pod.name, 253, true)?;
    if pod.containers.is_empty() {
        return Err(format!("pod {} has no containers", pod.key()));
    }
    let mut names = HashSet::new();
    for c in &pod.containers {
        check_label("container name", &c.name, 63, false)?;
        if !names.insert(&c.name) {
            return Err(format!(
                "pod {} has two containers called {:?}",
                pod.key(),
                c.name
            ));
        }
        if c.vcuda_core == 0 && c.vcuda_memory == 0 {
            return Err(format!(
                "container {:?} of pod {} asks for no vcuda-core and no vcuda-memory; give at least one",
                c.name,
                pod.key()
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsFile {
    pods: Vec<PodEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodEntry {
    #[serde(default = "default_namespace")]
    namespace: String,
    name: String,
    containers: Vec<ContainerEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ContainerEntry {
    name: String,
    #[serde(default)]
    vcuda_core: u32,
    #[serde(default)]
    vcuda_memory: u32,
}

fn default_namespace() -> String {
    "default".into()
}

fn parse_pods_file(text: &str) -> Result<Vec<PodRequest>, String> {
    let file: PodsFile = serde_yaml_ng::from_str(text).map_err(|e| {
        format!(
            "{e}. Expected `pods:` with entries {{namespace (optional), name, containers: [{{name, vcudaCore, vcudaMemory}}]}}"
        )
    })?;
    file.pods
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let pod = PodRequest {
                namespace: p.namespace,
                name: p.name,
                containers: p
                    .containers
                    .into_iter()
                    .map(|c| ContainerRequest {
                        name: c.name,
                        vcuda_core: c.vcuda_core,
                        vcuda_memory: c.vcuda_memory,
                    })
                    .collect(),
            };
            check_pod(&pod).map_err(|e| format!("pods[{i}]: {e}"))?;
            Ok(pod)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Printing

/// Per card: (healthy, unhealthy) device counts. `None`: IDs that name no card.
type CardHealth = BTreeMap<Option<u32>, (usize, usize)>;

fn card_health(list: &dp::ListAndWatchResponse) -> CardHealth {
    let mut out = CardHealth::new();
    for d in &list.devices {
        let card = DeviceId::parse(&d.id).map(|x| x.card);
        let e = out.entry(card).or_default();
        if d.health == dp::HEALTHY {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    out
}

fn card_name(card: Option<u32>) -> String {
    card.map_or_else(|| "(no card)".to_string(), |c| format!("card {c}"))
}

fn describe_list(resource: &str, health: &CardHealth) -> String {
    let total: usize = health.values().map(|(h, u)| h + u).sum();
    let unhealthy: Vec<String> = health
        .iter()
        .filter(|(_, (_, u))| *u > 0)
        .map(|(c, _)| card_name(*c))
        .collect();
    let state = if unhealthy.is_empty() {
        "all healthy".to_string()
    } else {
        format!("unhealthy: {}", unhealthy.join(", "))
    };
    format!(
        "{resource}: {total} devices on {} cards, {state}",
        health.len()
    )
}

fn describe_changes(resource: &str, before: &CardHealth, after: &CardHealth) -> Vec<String> {
    let mut out = Vec::new();
    let cards: BTreeSet<Option<u32>> = before.keys().chain(after.keys()).copied().collect();
    for card in cards {
        let (b, a) = (before.get(&card), after.get(&card));
        let word = |x: Option<&(usize, usize)>| match x {
            None => "gone".to_string(),
            Some((_, 0)) => "Healthy".to_string(),
            Some((0, _)) => "Unhealthy".to_string(),
            Some((h, u)) => format!("{h} healthy / {u} unhealthy"),
        };
        if b != a {
            let n = a.map_or(0, |(h, u)| h + u);
            out.push(format!(
                "{resource}: {} {} -> {} ({n} devices)",
                card_name(card),
                word(b),
                word(a)
            ));
        }
    }
    out
}

fn describe_options(o: &dp::DevicePluginOptions) -> String {
    let mut v = Vec::new();
    if o.pre_start_required {
        v.push("preStartRequired");
    }
    if o.get_preferred_allocation_available {
        v.push("getPreferredAllocationAvailable");
    }
    if v.is_empty() {
        "no options".into()
    } else {
        v.join(", ")
    }
}

/// Prints what the kubelet sees, deduplicating registrations it already printed.
#[derive(Debug, Default)]
struct Printer {
    lists: BTreeMap<String, CardHealth>,
    printed: HashSet<(String, Instant)>,
}

impl Printer {
    fn event(&mut self, e: KubeletEvent) {
        match e {
            KubeletEvent::Registered(r) => {
                if self.printed.insert((r.request.resource_name.clone(), r.at)) {
                    println!(
                        "registered {} (endpoint {}; {})",
                        r.request.resource_name,
                        r.request.endpoint,
                        describe_options(&r.options)
                    );
                }
            }
            KubeletEvent::Refused { resource, reason } => {
                println!("refused a registration of {resource}: {reason}");
            }
            KubeletEvent::Devices { resource, list } => self.list(&resource, &list),
            KubeletEvent::StreamEnded { resource, error } => {
                self.lists.remove(&resource);
                match error {
                    Some(e) => println!(
                        "{resource}: ListAndWatch ended with {e} (the plugin stopped or restarts)"
                    ),
                    None => {
                        println!("{resource}: ListAndWatch ended (the plugin stopped or restarts)")
                    }
                }
            }
        }
    }

    fn list(&mut self, resource: &str, list: &dp::ListAndWatchResponse) {
        let health = card_health(list);
        match self.lists.get(resource) {
            None => println!("{}", describe_list(resource, &health)),
            Some(before) => {
                for line in describe_changes(resource, before, &health) {
                    println!("{line}");
                }
            }
        }
        self.lists.insert(resource.to_string(), health);
    }
}

/// `vcore-0-0 … vcore-0-29` style summary of an ID list.
fn id_range(ids: &[String]) -> String {
    match ids {
        [] => String::new(),
        [one] => one.clone(),
        [first, .., last] => format!("{first} … {last}"),
    }
}

fn print_admission(a: &Admission, names: &ResourceNames) {
    println!("pod {}/{} admitted", a.namespace, a.pod);
    for c in &a.containers {
        let cards: Vec<String> = c.cards().iter().map(u32::to_string).collect();
        let mut parts = vec![format!(
            "card{} {}",
            if cards.len() == 1 { "" } else { "s" },
            cards.join(",")
        )];
        if !c.core.is_empty() {
            parts.push(format!(
                "{} {} ({})",
                names.core(),
                c.core.len(),
                id_range(&c.core)
            ));
        }
        if !c.memory.is_empty() {
            parts.push(format!(
                "{} {} ({})",
                names.memory(),
                c.memory.len(),
                id_range(&c.memory)
            ));
        }
        println!("  container {}: {}", c.name, parts.join("; "));
        if let Some(v) = c.env("NVIDIA_VISIBLE_DEVICES") {
            println!("    NVIDIA_VISIBLE_DEVICES={v}");
        }
        for m in c.mounts() {
            println!(
                "    limiter mount: {} -> {} ({})",
                m.host_path,
                m.container_path,
                if m.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            );
        }
        let devices: Vec<&str> = c.devices().iter().map(|d| d.host_path.as_str()).collect();
        if !devices.is_empty() {
            println!("    device nodes: {}", devices.join(", "));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The ready file

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    admitted: Vec<AdmittedPod>,
    failed: Vec<FailedPod>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AdmittedPod {
    namespace: String,
    name: String,
    containers: Vec<AdmittedContainerSummary>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AdmittedContainerSummary {
    name: String,
    cards: Vec<u32>,
    vcuda_core: usize,
    vcuda_memory: usize,
    nvidia_visible_devices: Option<String>,
    limiter_dir: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FailedPod {
    namespace: String,
    name: String,
    error: String,
}

fn summarize(a: &Admission) -> AdmittedPod {
    AdmittedPod {
        namespace: a.namespace.clone(),
        name: a.pod.clone(),
        containers: a
            .containers
            .iter()
            .map(|c| AdmittedContainerSummary {
                name: c.name.clone(),
                cards: c.cards(),
                vcuda_core: c.core.len(),
                vcuda_memory: c.memory.len(),
                nvidia_visible_devices: c.env("NVIDIA_VISIBLE_DEVICES").map(str::to_string),
                limiter_dir: c.mounts().first().map(|m| m.host_path.clone()),
            })
            .collect(),
    }
}

fn write_ready_file(path: &Path, summary: &Summary) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(summary).context("cannot encode the summary")?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json)
        .with_context(|| format!("cannot write --ready-file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot write --ready-file {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The run

async fn wait_for_plugins(
    kubelet: &FakeKubelet,
    names: &ResourceNames,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing: Vec<&str> = [names.core(), names.memory()]
            .into_iter()
            .filter(|r| kubelet.latest(r).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no device plugin registered and listed its devices for {} within {}s. Is gpu-manager running with --kubelet-dir {} (and the same --resource-domain)?",
                missing.join(" and "),
                timeout.as_secs(),
                kubelet.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn simulate(s: Setup) -> anyhow::Result<ExitCode> {
    let mut kubelet = FakeKubelet::try_start(&s.dir)
        .await
        .with_context(|| format!("cannot serve kubelet.sock in {}", s.dir.display()))?;
    let mut events = kubelet.events();
    let podres =
        match FakePodResources::try_start(&s.pod_resources, s.names.core(), s.names.memory()).await
        {
            Ok(p) => p,
            Err(e) => {
                kubelet.stop().await;
                return Err(e).with_context(|| {
                    format!(
                        "cannot serve the pod-resources API on {}",
                        s.pod_resources.display()
                    )
                });
            }
        };
    println!(
        "kubelet-sim (a development tool, not a kubelet): serving {} and pod-resources on {}",
        s.dir.join(dp::KUBELET_SOCKET).display(),
        s.pod_resources.display()
    );
    // Print what happened before we subscribed, then every event.
    let mut printer = Printer::default();
    for r in kubelet.registrations() {
        printer.event(KubeletEvent::Registered(r));
    }
    for resource in [s.names.core(), s.names.memory()] {
        if let Some(list) = kubelet.latest(resource) {
            printer.event(KubeletEvent::Devices {
                resource: resource.to_string(),
                list,
            });
        }
    }
    let printing = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(e) => printer.event(e),
                Err(RecvError::Lagged(n)) => println!("({n} kubelet events not shown)"),
                Err(RecvError::Closed) => return,
            }
        }
    });

    let outcome = admit_all(&kubelet, &podres, &s).await;
    let code = match outcome {
        Err(e) => Err(e),
        Ok(all_admitted) if s.once => Ok(if all_admitted {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Ok(_) => {
            println!("watching the plugins; Ctrl-C (SIGINT) or SIGTERM stops kubelet-sim");
            wait_for_signal().await.map(|()| ExitCode::SUCCESS)
        }
    };
    // Let the printer show the last events, then remove our sockets.
    tokio::time::sleep(Duration::from_millis(50)).await;
    printing.abort();
    kubelet.stop().await;
    drop(podres);
    let _ = std::fs::remove_file(&s.pod_resources);
    println!("kubelet-sim stopped");
    code
}

/// Admit the scripted pods; `Ok(true)` when every one was admitted and started.
async fn admit_all(
    kubelet: &FakeKubelet,
    podres: &FakePodResources,
    s: &Setup,
) -> anyhow::Result<bool> {
    wait_for_plugins(kubelet, &s.names, s.register_timeout).await?;
    let mut dm = DeviceManager::new(kubelet, podres, s.names.clone());
    let mut summary = Summary {
        admitted: Vec::new(),
        failed: Vec::new(),
    };
    for pod in &s.pods {
        match dm.admit(pod).await {
            Ok(a) => {
                print_admission(&a, &s.names);
                summary.admitted.push(summarize(&a));
            }
            Err(e) => {
                println!("pod {} NOT admitted: {e}", pod.key());
                summary.failed.push(FailedPod {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    error: e.to_string(),
                });
            }
        }
    }
    if !s.pods.is_empty() {
        println!(
            "{} of {} pods admitted",
            summary.admitted.len(),
            s.pods.len()
        );
    }
    if let Some(path) = &s.ready_file {
        write_ready_file(path, &summary)?;
    }
    Ok(summary.failed.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_specs_take_namespace_container_and_memory_optionally() {
        let p = parse_pod("demo/train:30:20").unwrap();
        assert_eq!(p, PodRequest::single("demo", "train", "main", 30, 20));
        let p = parse_pod("infer:100").unwrap();
        assert_eq!(p, PodRequest::single("default", "infer", "main", 100, 0));
        let p = parse_pod("ml/job.v2/worker:200").unwrap();
        assert_eq!(p, PodRequest::single("ml", "job.v2", "worker", 200, 0));
    }

    #[test]
    fn bad_pod_specs_say_what_is_wrong_and_show_the_form() {
        let e = parse_pod("demo/train").unwrap_err();
        assert!(
            e.contains("2 or 3 ':'-separated fields") && e.contains("demo/train:30:20"),
            "{e}"
        );
        let e = parse_pod("demo/train:thirty").unwrap_err();
        assert!(
            e.contains("vcuda-core \"thirty\" is not a whole number"),
            "{e}"
        );
        let e = parse_pod("demo/train:30:-1").unwrap_err();
        assert!(e.contains("vcuda-memory \"-1\""), "{e}");
        let e = parse_pod("Demo/train:30").unwrap_err();
        assert!(e.contains("namespace \"Demo\" is not a valid name"), "{e}");
        let e = parse_pod("a/b/c/d:1").unwrap_err();
        assert!(e.contains("too many '/'"), "{e}");
        let e = parse_pod("demo/idle:0:0").unwrap_err();
        assert!(
            e.contains("asks for no vcuda-core and no vcuda-memory"),
            "{e}"
        );
    }

    #[test]
    fn a_pods_file_gives_several_containers_and_reports_the_bad_entry() {
        let pods = parse_pods_file(
            "pods:\n  - name: train\n    namespace: demo\n    containers:\n      - {name: a, vcudaCore: 30, vcudaMemory: 20}\n      - {name: b, vcudaCore: 100}\n  - name: solo\n    containers: [{name: main, vcudaMemory: 4}]\n",
        )
        .unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].containers.len(), 2);
        assert_eq!(pods[0].containers[1].vcuda_core, 100);
        assert_eq!(pods[1].namespace, "default");
        assert_eq!(pods[1].containers[0].vcuda_memory, 4);

        let e = parse_pods_file("pods:\n  - name: x\n    containers: [{name: m, vcudaCores: 3}]\n")
            .unwrap_err();
        assert!(
            e.contains("unknown field `vcudaCores`") && e.contains("line 3"),
            "{e}"
        );
        let e = parse_pods_file("pods:\n  - name: x\n    containers: [{name: m, vcudaCore: 1}, {name: m, vcudaCore: 2}]\n")
            .unwrap_err();
        assert!(
            e.starts_with("pods[0]: pod default/x has two containers called \"m\""),
            "{e}"
        );
    }

    #[test]
    fn health_changes_are_reported_per_card() {
        let list = |unhealthy: u32| dp::ListAndWatchResponse {
            devices: (0..2)
                .flat_map(|c| (0..3).map(move |k| (c, k)))
                .map(|(c, k)| dp::Device {
                    id: format!("vcore-{c}-{k}"),
                    health: if c == unhealthy {
                        dp::UNHEALTHY
                    } else {
                        dp::HEALTHY
                    }
                    .into(),
                    topology: None,
                })
                .collect(),
        };
        let all_ok = card_health(&list(9));
        assert_eq!(
            describe_list("r", &all_ok),
            "r: 6 devices on 2 cards, all healthy"
        );
        let one_bad = card_health(&list(1));
        assert_eq!(
            describe_list("r", &one_bad),
            "r: 6 devices on 2 cards, unhealthy: card 1"
        );
        assert_eq!(
            describe_changes("r", &all_ok, &one_bad),
            vec!["r: card 1 Healthy -> Unhealthy (3 devices)".to_string()]
        );
        assert!(describe_changes("r", &one_bad, &one_bad).is_empty());
    }
}
