package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"

	"gpumanager.local/e2e/internal/cluster"
	"gpumanager.local/e2e/internal/nodeagent"
)

// NodeOptions tunes a simulated node.
type NodeOptions struct {
	// Labels are extra node labels.
	Labels map[string]string
	// Args are extra gpu-node-agent flags.
	Args []string
}

// Node is one simulated GPU node: a gpu-node-agent process and its
// directories. Our gpu-manager for this node is pointed at DevicePluginDir
// and PodResourcesSocket.
type Node struct {
	Name string
	// Dir holds everything of this node.
	Dir string
	// DevicePluginDir is the node's /var/lib/kubelet/device-plugins.
	DevicePluginDir string
	// KubeletSocket is DevicePluginDir/kubelet.sock.
	KubeletSocket string
	// PodResourcesSocket is the node's pod-resources/kubelet.sock.
	PodResourcesSocket string
	// StateDir holds the stand-in runtime's containers.json.
	StateDir string

	env  *Env
	args []string
	proc *cluster.Process
	// stopped is set when the harness ended the agent on purpose.
	stopped bool
}

// StartNode starts a gpu-node-agent for name and waits until its Node is Ready.
func (e *Env) StartNode(ctx context.Context, name string, opts NodeOptions) (*Node, error) {
	dir := filepath.Join(e.RunDir, "nodes", name)
	n := &Node{
		Name:               name,
		Dir:                dir,
		DevicePluginDir:    filepath.Join(dir, "device-plugins"),
		PodResourcesSocket: filepath.Join(dir, "pod-resources", "kubelet.sock"),
		StateDir:           filepath.Join(dir, "state"),
		env:                e,
	}
	n.KubeletSocket = filepath.Join(n.DevicePluginDir, "kubelet.sock")
	if len(n.KubeletSocket) > 100 {
		return nil, fmt.Errorf("socket path %s is too long for a unix socket; use a shorter TMPDIR", n.KubeletSocket)
	}
	labels := ""
	for k, v := range opts.Labels {
		if labels != "" {
			labels += ","
		}
		labels += k + "=" + v
	}
	n.args = append([]string{
		"--kubeconfig=" + e.Cluster.Kubeconfig,
		"--node-name=" + name,
		"--device-plugin-dir=" + n.DevicePluginDir,
		"--pod-resources-socket=" + n.PodResourcesSocket,
		"--state-dir=" + n.StateDir,
		"--node-labels=" + labels,
		"--v=4",
	}, opts.Args...)
	e.nodes = append(e.nodes, n)
	if err := n.Start(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

// Start (re)starts the agent process with the same directories, i.e. a
// kubelet restart: the device manager re-reads its checkpoint and recreates
// kubelet.sock. It waits until the agent reports ready (node registered, pods
// already bound to it re-admitted) and the Node is Ready.
func (n *Node) Start(ctx context.Context) error {
	if n.proc != nil {
		if exited, _ := n.proc.Exited(); !exited {
			return fmt.Errorf("node agent %s is already running", n.Name)
		}
	}
	p, err := cluster.StartProcess("gpu-node-agent["+n.Name+"]", filepath.Join(n.env.BinDir, cluster.NodeAgentBin), n.args,
		filepath.Join(n.Dir, "agent.log"))
	if err != nil {
		return err
	}
	n.proc, n.stopped = p, false
	readyFile := filepath.Join(n.StateDir, nodeagent.ReadyFile)
	want := strconv.Itoa(p.Pid())
	deadline := time.Now().Add(30 * time.Second)
	for {
		if exited, werr := p.Exited(); exited {
			return fmt.Errorf("node agent %s exited (%v):\n%s", n.Name, werr, p.Tail(30))
		}
		if data, err := os.ReadFile(readyFile); err == nil && strings.TrimSpace(string(data)) == want {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node agent %s not ready within 30s:\n%s", n.Name, p.Tail(30))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	_, err = n.env.WaitNode(ctx, n.Name, 30*time.Second, "Ready", NodeReady)
	return err
}

// Stop ends the agent with SIGTERM.
func (n *Node) Stop() {
	if n.proc != nil {
		n.stopped = true
		n.proc.Stop(10 * time.Second)
	}
}

// Kill ends the agent with SIGKILL, like a kubelet crash.
func (n *Node) Kill() {
	if n.proc != nil {
		n.stopped = true
		n.proc.Kill()
	}
}

// Crashed returns an error with the log tail if the agent ended on its own.
func (n *Node) Crashed() error {
	if n.proc == nil || n.stopped {
		return nil
	}
	if exited, err := n.proc.Exited(); exited {
		return fmt.Errorf("node agent %s exited on its own (%v); log %s:\n%s", n.Name, err, n.LogPath(), n.proc.Tail(40))
	}
	return nil
}

// Pid is the agent's process id (0 when not started).
func (n *Node) Pid() int {
	if n.proc == nil {
		return 0
	}
	return n.proc.Pid()
}

// LogPath is the agent's log file.
func (n *Node) LogPath() string { return filepath.Join(n.Dir, "agent.log") }

// Containers returns what the node's stand-in runtime recorded.
func (n *Node) Containers() ([]nodeagent.Container, error) {
	return nodeagent.ReadRuntimeState(n.StateDir)
}

// PodResources dials the node's pod-resources API with the kubelet's client.
func (n *Node) PodResources(ctx context.Context) (podresourcesv1.PodResourcesListerClient, *grpc.ClientConn, error) {
	return podresources.GetV1Client(ctx, "unix://"+n.PodResourcesSocket, 10*time.Second, 16*1024*1024)
}

// Remove stops the agent and deletes its Node object, so the scheduler
// stops considering it (no node-lifecycle controller runs here). It reports
// an agent that had crashed before.
func (n *Node) Remove(ctx context.Context) error {
	crashed := n.Crashed()
	n.Stop()
	err := n.env.Client.CoreV1().Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting node %s: %w", n.Name, err)
	}
	return crashed
}
