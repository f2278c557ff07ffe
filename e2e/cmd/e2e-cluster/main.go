// Command e2e-cluster starts the e2e control plane (and optionally simulated
// GPU nodes) and keeps it running until interrupted, for poking at by hand:
//
//	e2e/run.sh cluster --nodes 2
//	export KUBECONFIG=<printed path>; kubectl get nodes
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"gpumanager.local/e2e/internal/harness"
)

func main() {
	nodes := flag.Int("nodes", 0, "number of simulated GPU nodes (gpu-node-agent) to start, named gpu-node-1..N")
	schedCfg := flag.String("scheduler-config", os.Getenv(harness.EnvSchedulerConfig), "KubeSchedulerConfiguration file for kube-scheduler (default: scheduler defaults)")
	keep := flag.Bool("keep", false, "keep the run directory (logs, etcd data) on exit")
	flag.Parse()
	if err := run(*nodes, *schedCfg, *keep); err != nil {
		fmt.Fprintf(os.Stderr, "e2e-cluster: %v\n", err)
		os.Exit(1)
	}
}

func run(nodes int, schedCfg string, keep bool) error {
	if nodes < 0 {
		return fmt.Errorf("--nodes must be >= 0, got %d", nodes)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	env, err := harness.Start(ctx, schedCfg)
	if err != nil {
		return err
	}
	defer func() {
		if kept := env.Close(keep); kept != "" {
			fmt.Printf("run dir kept: %s\n", kept)
		}
	}()
	t := env.Cluster.Timings
	fmt.Printf("control plane ready in %s (kube-apiserver %s)\n", t.Total.Round(1e6), t.APIServerReady.Round(1e6))
	fmt.Printf("run dir:    %s (logs in logs/)\n", env.RunDir)
	fmt.Printf("kubeconfig: %s\n", env.Cluster.Kubeconfig)
	for i := 1; i <= nodes; i++ {
		n, err := env.StartNode(ctx, fmt.Sprintf("gpu-node-%d", i), harness.NodeOptions{})
		if err != nil {
			return err
		}
		fmt.Printf("node %s: device-plugin dir %s, pod-resources socket %s, log %s\n", n.Name, n.DevicePluginDir, n.PodResourcesSocket, n.LogPath())
	}
	fmt.Printf("\nexport KUBECONFIG=%s\nCtrl-C to stop.\n", env.Cluster.Kubeconfig)
	<-ctx.Done()
	return nil
}
