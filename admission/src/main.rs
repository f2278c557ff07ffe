//! `gpu-admission`: the scheduler extender and the admission webhook in one process
//! (`serve`), the trace simulator (`simulate`), the webhook certificates (`certgen`) and the
//! GpuQuota CRD (`crd`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gm_admission::certgen::CertgenArgs;
use gm_admission::cluster::NodeVisitor;
use gm_admission::{ClusterView, WebhookArgs};
use gm_extender::{ClusterState, Extender, ExtenderArgs, Leadership};
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    name = "gpu-admission",
    version,
    about = "GPU scheduler extender and admission webhook for vcuda-core / vcuda-memory",
    long_about = "GPU scheduler extender and admission webhook for vcuda-core / vcuda-memory.\n\n\
                  Every flag can also be set by an environment variable, shown in [env: ...]."
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "GPU_ADMISSION_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log level or filter (error, warn, info, debug, trace, or e.g. "info,gm_extender=debug").
    #[arg(
        long,
        global = true,
        env = "GPU_ADMISSION_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the scheduler extender (filter, prioritize, bind, predicates) and the admission
    /// webhook (validate, mutate, quota).
    Serve(Box<ServeArgs>),
    /// Replay openb cluster traces through the placement policies and report GPU allocation,
    /// fragmentation and decision latency.
    Simulate(gm_sim::SimulateArgs),
    /// Create the webhook's CA and serving certificate in a Secret and set the webhook
    /// configurations' caBundle (the chart's self-signed certificate Job).
    Certgen(CertgenCmd),
    /// Print the GpuQuota CustomResourceDefinition as YAML.
    Crd,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    extender: ExtenderArgs,
    #[command(flatten)]
    webhook: WebhookArgs,
    /// Kubeconfig file (default: in-cluster configuration, then $KUBECONFIG / ~/.kube/config).
    #[arg(long, env = "GPU_ADMISSION_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct CertgenCmd {
    #[command(flatten)]
    args: CertgenArgs,
    /// Kubeconfig file (default: in-cluster configuration, then $KUBECONFIG / ~/.kube/config).
    #[arg(long, env = "GPU_ADMISSION_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-admission: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_format, &cli.log_level)?;
    match cli.command {
        // The simulator is CPU-bound and runs its own worker threads.
        Command::Simulate(args) => gm_sim::run(args),
        Command::Crd => {
            print!("{}", gm_admission::crd_yaml().context("rendering the CRD")?);
            Ok(())
        }
        Command::Serve(args) => runtime()?.block_on(serve(*args)),
        Command::Certgen(cmd) => runtime()?.block_on(async {
            let client = kube_client(cmd.kubeconfig.as_ref()).await?;
            gm_admission::certgen::run(&cmd.args, client)
                .await
                .context("certgen failed")
        }),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("gpu-admission")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| {
        anyhow::anyhow!(
            "invalid --log-level {level:?}: {e}; use error, warn, info, debug or trace (optionally per module, e.g. info,gm_extender=debug)"
        )
    })?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    gm_extender::ensure_crypto_provider();
    let hint = "use --kubeconfig, run in a pod with a service account, or (webhook only) pass --standalone";
    let config = match kubeconfig {
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

/// The extender's informer-fed cluster state, as the webhook reads it.
struct SharedCluster {
    state: Arc<ClusterState>,
    leadership: Arc<Leadership>,
}

impl ClusterView for SharedCluster {
    fn synced(&self) -> bool {
        self.state.is_synced()
    }
    fn nodes_generation(&self) -> u64 {
        self.state.node_generation()
    }
    fn for_each_gpu_node(&self, visit: &mut NodeVisitor<'_>) {
        self.state
            .for_each_gpu_node(&mut |name, labels, inv| visit(name, labels, inv));
    }
    fn namespace_gpu_pods(&self, namespace: &str) -> Vec<Arc<Pod>> {
        self.state.namespace_gpu_pods(namespace)
    }
    fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }
}

/// SIGINT or SIGTERM, seen by every task that holds a receiver.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; stop with SIGINT");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

async fn until(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        extender,
        mut webhook,
        kubeconfig,
    } = args;
    // One --resource-domain for both halves.
    webhook.resource_domain = extender.resource_domain.clone();
    let stop = shutdown_signal();
    if webhook.standalone {
        tracing::warn!(
            "--standalone: serving only the admission webhook, without an API server; the \
             scheduler extender needs cluster state and is not started"
        );
        return gm_admission::run_webhook(webhook, None, None, until(stop))
            .await
            .context("admission webhook");
    }
    let client = kube_client(kubeconfig.as_ref()).await?;
    let ext = Extender::new(&extender).context("scheduler extender")?;
    let cluster: Arc<dyn ClusterView> = Arc::new(SharedCluster {
        state: ext.state(),
        leadership: ext.leadership(),
    });
    let webhook_done = gm_admission::run_webhook(
        webhook,
        Some(client.clone()),
        Some(cluster),
        until(stop.clone()),
    );
    let extender_done = ext.run(client, until(stop));
    tokio::pin!(webhook_done, extender_done);
    // Either half failing stops the process (the orchestrator restarts it). After a signal both
    // drain, and the extender releases its Lease before the process exits.
    tokio::select! {
        r = &mut webhook_done => {
            r.context("admission webhook")?;
            extender_done.await.context("scheduler extender")?;
        }
        r = &mut extender_done => {
            r.context("scheduler extender")?;
            webhook_done.await.context("admission webhook")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_subcommand_has_consistent_flags_and_env_vars() {
        // clap's own consistency checks: no flag defined twice (the extender and the webhook
        // share one --resource-domain), valid defaults, unique env vars per flag.
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_accepts_the_helm_charts_flags() {
        let cli = Cli::try_parse_from([
            "gpu-admission",
            "--log-format=json",
            "serve",
            "--extender-addr=0.0.0.0:3456",
            "--webhook-addr=0.0.0.0:8443",
            "--tls-cert=/etc/gpu-admission/tls/tls.crt",
            "--tls-key=/etc/gpu-admission/tls/tls.key",
            "--resource-domain=tencent.com",
            "--policy=binpack",
            "--leader-elect",
            "--lease-namespace=kube-system",
            "--set-scheduler-name=gpu-scheduler",
            "--default-vcuda-memory=4",
            "--quota-configmap=kube-system/gpuquota",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Serve(serve) = cli.command else {
            panic!("not serve");
        };
        assert!(serve.extender.leader_elect);
        assert_eq!(serve.webhook.default_vcuda_memory, Some(4));
    }

    #[test]
    fn certgen_accepts_the_helm_charts_flags() {
        let cli = Cli::try_parse_from([
            "gpu-admission",
            "certgen",
            "--namespace=kube-system",
            "--secret-name=gpu-admission-tls",
            "--service=gpu-admission",
            "--webhook-config=gpu-admission",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(cli.command, Command::Certgen(_)));
    }
}
