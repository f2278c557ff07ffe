//! The `gpu-manager` binary: flags → configuration → dependencies → [`Daemon`], until SIGINT
//! or SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use gm_core::devices::DeviceKind;
use gm_device_plugin::cli::{init_logging, Args, Setup};
use gm_device_plugin::cluster::{Cluster, KubeCluster};
use gm_device_plugin::config::{CORE_SOCKET, MEMORY_SOCKET};
use gm_device_plugin::pods::kube::KubePods;
use gm_device_plugin::pods::PodSource;
use gm_device_plugin::{Daemon, Dependencies};

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-manager: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let setup = args.into_setup()?;
    init_logging(setup.log_format, &setup.log_level)?;
    // Two workers are plenty for a node daemon and keep its memory small.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .thread_name("gpu-manager")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(setup))
}

async fn kube_client(setup: &Setup) -> anyhow::Result<kube::Client> {
    let hint = "use --kubeconfig, run in a pod with a service account, or pass --standalone to run without an API server";
    let config = match &setup.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}; {hint}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("invalid kubeconfig {}; {hint}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .with_context(|| format!("no API server configuration found; {hint}"))?,
    };
    kube::Client::try_from(config).with_context(|| format!("cannot build the API client; {hint}"))
}

async fn serve(setup: Setup) -> anyhow::Result<()> {
    let choice = setup.backend.clone();
    let backend = tokio::task::spawn_blocking(move || choice.open())
        .await
        .context("opening the GPU backend panicked")??;
    let backend: Arc<dyn gm_backend::GpuBackend> = Arc::from(backend);
    let config = setup.config.clone();
    let mut pods: Option<Arc<dyn PodSource>> = None;
    let mut cluster: Option<Arc<dyn Cluster>> = None;
    if !config.standalone {
        let client = kube_client(&setup).await?;
        let keys = gm_core::annotations::Keys::new(&config.names);
        let (watch, _task) = KubePods::spawn(
            client.clone(),
            &config.node_name,
            config.names.clone(),
            keys,
        );
        pods = Some(watch);
        cluster = Some(Arc::new(KubeCluster::new(client)));
    }
    let daemon = Daemon::start(
        config.clone(),
        Dependencies {
            backend,
            pods,
            cluster,
        },
    )
    .await?;
    print_summary(&daemon, &setup);
    wait_for_signal().await?;
    tracing::info!("stopping: unregistering and writing the checkpoint");
    daemon.shutdown().await;
    Ok(())
}

fn print_summary(daemon: &Daemon, setup: &Setup) {
    let c = &setup.config;
    let snap = daemon.handle().snapshot();
    let inv = &snap.inventory;
    let mut models: Vec<String> = Vec::new();
    for m in inv.models() {
        let n = inv.cards.iter().filter(|card| card.model == m).count();
        let mib = inv
            .cards
            .iter()
            .find(|card| card.model == m)
            .map_or(0, |card| card.memory_mib);
        models.push(format!("{n} x {m} ({mib} MiB)"));
    }
    let count = |k: DeviceKind| -> u64 {
        inv.cards
            .iter()
            .map(|card| u64::from(k.per_card(inv, card.index)))
            .sum()
    };
    tracing::info!(
        "gpu-manager {} on node {:?}: backend {}, {}",
        env!("CARGO_PKG_VERSION"),
        c.node_name,
        daemon.handle().shared().backend.kind(),
        if c.standalone {
            "standalone (no API server; node-local placement policy)".to_string()
        } else {
            "with the API server".to_string()
        }
    );
    tracing::info!("cards: {}", models.join(", "));
    tracing::info!(
        "devices: {} x {}, {} x {}",
        count(DeviceKind::Core),
        c.names.core(),
        count(DeviceKind::Memory),
        c.names.memory()
    );
    tracing::info!(
        "sockets: {} and {} in {} (kubelet: kubelet.sock there)",
        CORE_SOCKET,
        MEMORY_SOCKET,
        c.kubelet_dir.display()
    );
    tracing::info!(
        "checkpoint: {}; limiter configs under {}",
        c.checkpoint_path().display(),
        c.limiter_dir.display()
    );
    match &daemon.handle().shared().library {
        Ok(lib) => tracing::info!(
            "limiter: {} (preload {}), state under {}; share containers get them mounted",
            lib.path.display(),
            lib.preload.display(),
            c.limiter_state_dir.display()
        ),
        Err(e) => tracing::error!("limiter: not installed ({e}); share containers are refused"),
    }
    if let Some(addr) = daemon.handle().metrics_addr() {
        tracing::info!("health: http://{addr}/healthz and http://{addr}/readyz");
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
