// Package harness is what scenarios use: one control plane per test binary,
// simulated GPU nodes (gpu-node-agent processes), kubectl, and waits.
package harness

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"gpumanager.local/e2e/internal/cluster"
)

// Environment variables the harness reads.
const (
	// EnvBinDir overrides where the Go binaries are (default: $E2E_CACHE/bin).
	EnvBinDir = "E2E_BIN_DIR"
	// EnvCache is the cache root (default: $HOME/.cache/gpu-manager-e2e).
	EnvCache = "E2E_CACHE"
	// EnvKeep keeps the run directory (logs, data) even when tests pass.
	EnvKeep = "E2E_KEEP"
	// EnvSchedulerConfig is the KubeSchedulerConfiguration the scheduler
	// starts with (default: the scheduler's own defaults, no extender).
	EnvSchedulerConfig = "E2E_SCHEDULER_CONFIG"
	// EnvGPUManagerBin and EnvGPUAdmissionBin locate our Rust binaries
	// (run.sh builds them with cargo and sets both). Scenarios that need
	// them fail, never skip, when they are unset or missing.
	EnvGPUManagerBin   = "GPU_MANAGER_BIN"
	EnvGPUAdmissionBin = "GPU_ADMISSION_BIN"
	// EnvHelmBin locates helm (run.sh builds it with scripts/tools.sh's
	// ensure_helm), for rendering the chart in scenario g.
	EnvHelmBin = "HELM_BIN"
)

// BinDir is where run.sh puts the Go binaries.
func BinDir() string {
	if d := os.Getenv(EnvBinDir); d != "" {
		return d
	}
	return filepath.Join(CacheDir(), "bin")
}

// CacheDir is the harness cache root, outside the repository.
func CacheDir() string {
	if d := os.Getenv(EnvCache); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "gpu-manager-e2e-cache")
	}
	return filepath.Join(home, ".cache", "gpu-manager-e2e")
}

// Env is a running control plane plus the nodes started on it.
type Env struct {
	BinDir  string
	RunDir  string
	Cluster *cluster.Cluster
	Client  kubernetes.Interface
	nodes   []*Node
	closers []func()
}

// Start creates a run directory under the system temp dir (short, because
// unix socket paths are limited to 108 bytes) and starts the control plane
// with the given KubeSchedulerConfiguration file ("" = scheduler defaults).
func Start(ctx context.Context, schedulerConfig string) (*Env, error) {
	runDir, err := os.MkdirTemp("", "gme2e-")
	if err != nil {
		return nil, err
	}
	e := &Env{BinDir: BinDir(), RunDir: runDir}
	c, err := cluster.Start(ctx, cluster.Options{
		BinDir:          e.BinDir,
		RunDir:          runDir,
		SchedulerConfig: schedulerConfig,
	})
	if err != nil {
		return nil, fmt.Errorf("starting control plane (logs in %s): %w", runDir, err)
	}
	e.Cluster, e.Client = c, c.Client
	return e, nil
}

// Close stops every node and the control plane. The run directory is removed
// unless keep is true or E2E_KEEP is set; its path is returned when kept.
func (e *Env) Close(keep bool) string {
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
	for _, n := range e.nodes {
		n.Stop()
	}
	if e.Cluster != nil {
		e.Cluster.Stop()
	}
	if keep || os.Getenv(EnvKeep) != "" {
		return e.RunDir
	}
	_ = os.RemoveAll(e.RunDir)
	return ""
}

// OnClose registers f to run first in Close (last registered runs first),
// e.g. to stop processes that need the API server for a clean shutdown.
func (e *Env) OnClose(f func()) { e.closers = append(e.closers, f) }

// NewNamespace creates a namespace with a random suffix and its default
// ServiceAccount.
func (e *Env) NewNamespace(ctx context.Context, prefix string) (string, error) {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	ns := prefix + "-" + hex.EncodeToString(b)
	return ns, cluster.EnsureServiceAccount(ctx, e.Client, ns)
}

// Kubectl runs kubectl against the cluster with optional stdin.
func (e *Env) Kubectl(ctx context.Context, stdin string, args ...string) (stdout, stderr string, err error) {
	return e.kubectl(ctx, e.Cluster.Kubeconfig, stdin, args...)
}

func (e *Env) kubectl(ctx context.Context, kubeconfig, stdin string, args ...string) (stdout, stderr string, err error) {
	cmd := exec.CommandContext(ctx, filepath.Join(e.BinDir, cluster.KubectlBin), append([]string{"--kubeconfig", kubeconfig}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	return out.String(), errb.String(), err
}

// WaitPod polls the pod until cond holds; on timeout the error shows the
// pod's last phase, reason, message and conditions.
func (e *Env) WaitPod(ctx context.Context, ns, name string, timeout time.Duration, what string, cond func(*v1.Pod) bool) (*v1.Pod, error) {
	var last *v1.Pod
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		p, err := e.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		last = p
		return cond(p), nil
	})
	if err != nil {
		return last, fmt.Errorf("pod %s/%s not %s within %s: %s", ns, name, what, timeout, DescribePod(last))
	}
	return last, nil
}

// DescribePod is a one-line summary of a pod for failure messages.
func DescribePod(p *v1.Pod) string {
	if p == nil {
		return "pod never seen"
	}
	var conds []string
	for _, c := range p.Status.Conditions {
		conds = append(conds, fmt.Sprintf("%s=%s(%s: %s)", c.Type, c.Status, c.Reason, c.Message))
	}
	return fmt.Sprintf("node=%q phase=%s reason=%q message=%q conditions=[%s]",
		p.Spec.NodeName, p.Status.Phase, p.Status.Reason, p.Status.Message, strings.Join(conds, "; "))
}

// WaitNode polls the node until cond holds.
func (e *Env) WaitNode(ctx context.Context, name string, timeout time.Duration, what string, cond func(*v1.Node) bool) (*v1.Node, error) {
	var last *v1.Node
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		n, err := e.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		last = n
		return cond(n), nil
	})
	if err != nil {
		if last == nil {
			return nil, fmt.Errorf("node %s not %s within %s: never seen", name, what, timeout)
		}
		return last, fmt.Errorf("node %s not %s within %s: capacity=%v allocatable=%v", name, what, timeout, last.Status.Capacity, last.Status.Allocatable)
	}
	return last, nil
}

// NodeReady reports whether the node's Ready condition is True.
func NodeReady(n *v1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == v1.NodeReady {
			return c.Status == v1.ConditionTrue
		}
	}
	return false
}

// Allocatable returns the node's allocatable count of resource.
func Allocatable(n *v1.Node, resource string) int64 {
	q, ok := n.Status.Allocatable[v1.ResourceName(resource)]
	if !ok {
		return -1
	}
	return q.Value()
}
