// Command gpu-node-agent is one simulated GPU node for the end-to-end tests:
// the kubelet's device manager, admission, pod-resources server and node
// status, without containers. See internal/nodeagent and e2e/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"gpumanager.local/e2e/internal/nodeagent"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "gpu-node-agent: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("gpu-node-agent", flag.ContinueOnError)
	klog.InitFlags(fs)
	var (
		cfg          nodeagent.Config
		kubeconfig   = fs.String("kubeconfig", "", "kubeconfig of the API server (required)")
		cpu          = fs.String("cpu", "32", "CPU capacity of the node")
		memory       = fs.String("memory", "128Gi", "memory capacity of the node")
		labels       = fs.String("node-labels", "", "extra node labels, k=v[,k=v...]")
		featureGates = fs.String("feature-gates", "", "kubelet feature gates, Name=bool[,Name=bool...]")
		qps          = fs.Float64("kube-api-qps", 50, "client QPS towards the API server")
	)
	fs.StringVar(&cfg.NodeName, "node-name", "", "name of the Node object (required)")
	fs.StringVar(&cfg.DevicePluginDir, "device-plugin-dir", "", "directory for kubelet.sock, plugin sockets and the device manager checkpoint (required)")
	fs.StringVar(&cfg.PodResourcesSocket, "pod-resources-socket", "", "path of the pod-resources API socket (required)")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "directory for the stand-in runtime's container records and boot id (required)")
	fs.IntVar(&cfg.MaxPods, "max-pods", 110, "pod capacity of the node")
	fs.DurationVar(&cfg.StatusUpdateFrequency, "node-status-update-frequency", time.Second, "how often node status is recomputed (patched when changed)")
	fs.DurationVar(&cfg.StatusReportFrequency, "node-status-report-frequency", time.Minute, "how often node status is patched even when unchanged")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if *kubeconfig == "" || cfg.NodeName == "" || cfg.DevicePluginDir == "" || cfg.PodResourcesSocket == "" || cfg.StateDir == "" {
		return fmt.Errorf("--kubeconfig, --node-name, --device-plugin-dir, --pod-resources-socket and --state-dir are required")
	}
	var err error
	if cfg.CPU, err = resource.ParseQuantity(*cpu); err != nil {
		return fmt.Errorf("--cpu %q is not a quantity: %w", *cpu, err)
	}
	if cfg.Memory, err = resource.ParseQuantity(*memory); err != nil {
		return fmt.Errorf("--memory %q is not a quantity: %w", *memory, err)
	}
	cfg.NodeLabels = map[string]string{}
	for _, kv := range strings.Split(*labels, ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("--node-labels entry %q is not k=v", kv)
		}
		cfg.NodeLabels[k] = v
	}
	if *featureGates != "" {
		if err := utilfeature.DefaultMutableFeatureGate.Set(*featureGates); err != nil {
			return fmt.Errorf("--feature-gates: %w", err)
		}
	}

	restCfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return fmt.Errorf("loading kubeconfig %q: %w", *kubeconfig, err)
	}
	restCfg.QPS, restCfg.Burst = float32(*qps), int(*qps*2)
	restCfg.UserAgent = "gpu-node-agent/" + cfg.NodeName
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("creating client: %w", err)
	}
	agent, err := nodeagent.New(cfg, client)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx = klog.NewContext(ctx, klog.Background().WithValues("node", cfg.NodeName))
	return agent.Run(ctx)
}
