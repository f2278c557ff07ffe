package harness

// A simulated GPU node: the node agent (the kubelet's device manager) plus
// our gpu-manager on the agent's device-plugin directory.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	v1 "k8s.io/api/core/v1"

	"gpumanager.local/e2e/internal/cluster"
)

// GPUNode is a node agent with our gpu-manager serving it.
type GPUNode struct {
	*Node
	// NodeFile is the simulated node description.
	NodeFile string
	// ManagerDir holds gpu-manager's checkpoint, limiter configs, dev root
	// and log.
	ManagerDir string
	// CheckpointPath is gpu-manager's checkpoint file.
	CheckpointPath string
	// MetricsAddr is gpu-manager's --metrics-addr (host:port).
	MetricsAddr string
	// ManagerLog is gpu-manager's log file.
	ManagerLog string
	// Inventory is what gpu-manager published on the Node.
	Inventory Inventory

	stack   *GPUStack
	args    []string
	manager *Process
	// managerStopped is set when the harness ended gpu-manager on purpose.
	managerStopped bool
}

// Inventory is the tencent.com/gpu-inventory annotation.
type Inventory struct {
	Version int             `json:"version"`
	Cards   []InventoryCard `json:"cards"`
}

// InventoryCard is one card of the inventory.
type InventoryCard struct {
	Index     int    `json:"index"`
	UUID      string `json:"uuid"`
	Model     string `json:"model"`
	MemoryMiB int64  `json:"memoryMib"`
	Minor     int    `json:"minor"`
	Healthy   bool   `json:"healthy"`
}

// Blocks is the card's vcuda-memory blocks (256 MiB each).
func (c InventoryCard) Blocks() int64 { return c.MemoryMiB / 256 }

// Capacity is the vcuda-core and vcuda-memory the node should advertise.
func (inv Inventory) Capacity() (cores, blocks int64) {
	for _, c := range inv.Cards {
		cores += 100
		blocks += c.Blocks()
	}
	return cores, blocks
}

// StartGPUNode starts a node agent named name and gpu-manager for it with
// the given node file (relative to deploy/examples/nodes or absolute),
// running as the gpu-manager ServiceAccount. It returns once gpu-manager
// is registered, the Node carries its inventory and its allocatable shows
// every vcuda-core and vcuda-memory device.
func (s *GPUStack) StartGPUNode(ctx context.Context, name, nodeFile string, extraArgs ...string) (*GPUNode, error) {
	if !filepath.IsAbs(nodeFile) {
		nodeFile = filepath.Join(s.RepoRoot, "deploy", "examples", "nodes", nodeFile)
	}
	if _, err := os.Stat(nodeFile); err != nil {
		return nil, fmt.Errorf("node file: %w", err)
	}
	node, err := s.Env.StartNode(ctx, name, NodeOptions{Labels: map[string]string{"nvidia.com/gpu.present": "true"}})
	if err != nil {
		return nil, err
	}
	port, err := cluster.FreePort()
	if err != nil {
		return nil, err
	}
	g := &GPUNode{
		Node:        node,
		NodeFile:    nodeFile,
		ManagerDir:  filepath.Join(node.Dir, "gpu-manager"),
		MetricsAddr: "127.0.0.1:" + strconv.Itoa(port),
		stack:       s,
	}
	g.CheckpointPath = filepath.Join(g.ManagerDir, "checkpoint", "gpu-manager.checkpoint.json")
	g.ManagerLog = filepath.Join(g.ManagerDir, "gpu-manager.log")
	for _, d := range []string{"dev", "proc", "cgroup"} {
		if err := os.MkdirAll(filepath.Join(g.ManagerDir, d), 0o755); err != nil {
			return nil, err
		}
	}
	library, err := limiterLibrary(g.ManagerDir)
	if err != nil {
		return nil, err
	}
	g.args = append([]string{
		"--backend=simulated",
		"--node-file=" + nodeFile,
		"--node-name=" + name,
		"--kubelet-dir=" + node.DevicePluginDir,
		"--pod-resources-socket=" + node.PodResourcesSocket,
		"--checkpoint-dir=" + filepath.Dir(g.CheckpointPath),
		"--limiter-dir=" + filepath.Join(g.ManagerDir, "vcuda"),
		// The in-container limiter gpu-manager installs and mounts into share
		// containers (no container runs here, so a stand-in does).
		"--limiter-library=" + library,
		"--limiter-install-dir=" + filepath.Join(g.ManagerDir, "lib"),
		"--limiter-state-dir=" + filepath.Join(g.ManagerDir, "vcuda-state"),
		// No /dev/nvidia*, /proc or cgroups of GPU containers here: empty
		// directories keep the daemon away from the host's.
		"--dev-root=" + filepath.Join(g.ManagerDir, "dev"),
		"--proc-root=" + filepath.Join(g.ManagerDir, "proc"),
		"--cgroup-root=" + filepath.Join(g.ManagerDir, "cgroup"),
		"--kubeconfig=" + s.ManagerKubeconfig,
		"--metrics-addr=" + g.MetricsAddr,
		// Reconcile with pod-resources every 2s instead of 30s, so that
		// released allocations leave the checkpoint within a test.
		"--gc-interval=2s",
	}, extraArgs...)
	if err := g.StartManager(ctx); err != nil {
		return nil, err
	}
	return g, nil
}

// limiterLibrary is the libvcuda.so gpu-manager gets: $E2E_LIMITER_LIBRARY
// when set (e.g. a real build, $CARGO_TARGET_DIR/debug/libvcuda.so), else a
// stand-in written into dir. The stand-in only needs the ELF magic that
// gpu-manager checks: the node agent's runtime starts no processes, so
// nothing ever loads it.
func limiterLibrary(dir string) (string, error) {
	if p := os.Getenv("E2E_LIMITER_LIBRARY"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("E2E_LIMITER_LIBRARY: %w", err)
		}
		return p, nil
	}
	p := filepath.Join(dir, "libvcuda-standin.so")
	if err := os.WriteFile(p, []byte("\x7fELF stand-in for libvcuda.so (e2e)\n"), 0o644); err != nil {
		return "", err
	}
	return p, nil
}

// StartManager (re)starts gpu-manager with the same directories and waits
// until both plugins are registered (/readyz), the inventory is on the Node
// and the Node's allocatable shows every device.
func (g *GPUNode) StartManager(ctx context.Context) error {
	if g.manager != nil {
		if exited, _ := g.manager.Exited(); !exited {
			return fmt.Errorf("gpu-manager on %s is already running", g.Name)
		}
	}
	p, err := cluster.StartProcess("gpu-manager["+g.Name+"]", g.stack.ManagerBin, g.args, g.ManagerLog)
	if err != nil {
		return err
	}
	g.manager, g.managerStopped = p, false
	if err := waitHTTP(ctx, p, "http://"+g.MetricsAddr+"/readyz", 30*time.Second); err != nil {
		return err
	}
	var inv Inventory
	_, err = g.Node.env.WaitNode(ctx, g.Name, 30*time.Second, "showing gpu-manager's inventory and devices", func(n *v1.Node) bool {
		raw := n.Annotations[AnnotInventory]
		if raw == "" || jsonUnmarshal("inventory", []byte(raw), &inv) != nil || len(inv.Cards) == 0 {
			return false
		}
		cores, blocks := inv.Capacity()
		return Allocatable(n, VcudaCore) == cores && Allocatable(n, VcudaMemory) == blocks
	})
	if err != nil {
		return fmt.Errorf("%w; gpu-manager log %s:\n%s", err, g.ManagerLog, p.Tail(20))
	}
	g.Inventory = inv
	return nil
}

// KillManager ends gpu-manager with SIGKILL.
func (g *GPUNode) KillManager() {
	if g.manager != nil {
		g.managerStopped = true
		g.manager.Kill()
	}
}

// StopManager ends gpu-manager with SIGTERM (it unregisters and writes its
// checkpoint).
func (g *GPUNode) StopManager() {
	if g.manager != nil {
		g.managerStopped = true
		g.manager.Stop(10 * time.Second)
	}
}

// ManagerCrashed returns an error with the log tail if gpu-manager ended
// on its own.
func (g *GPUNode) ManagerCrashed() error {
	if g.manager == nil || g.managerStopped {
		return nil
	}
	if exited, err := g.manager.Exited(); exited {
		return fmt.Errorf("gpu-manager on %s exited (%v); log %s:\n%s", g.Name, err, g.ManagerLog, g.manager.Tail(40))
	}
	return nil
}

// ManagerPid is gpu-manager's process id.
func (g *GPUNode) ManagerPid() int {
	if g.manager == nil {
		return 0
	}
	return g.manager.Pid()
}

// Remove stops gpu-manager and the agent and deletes the Node.
func (g *GPUNode) Remove(ctx context.Context) error {
	crashed := g.ManagerCrashed()
	g.StopManager()
	if err := g.Node.Remove(ctx); err != nil {
		return err
	}
	return crashed
}

// Metrics scrapes gpu-manager's /metrics and parses the exposition.
func (g *GPUNode) Metrics(ctx context.Context) (map[string]*dto.MetricFamily, error) {
	return ScrapeMetrics(ctx, "http://"+g.MetricsAddr+"/metrics")
}

// ScrapeMetrics fetches and parses a Prometheus text exposition.
func ScrapeMetrics(ctx context.Context, url string) (map[string]*dto.MetricFamily, error) {
	body, err := Get(ctx, url)
	if err != nil {
		return nil, err
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", url, err)
	}
	return fams, nil
}

// MetricValue returns the value of the sample of family name whose labels
// include all of want, and whether there is exactly one such sample.
func MetricValue(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
	var found []float64
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		match := true
		for k, v := range want {
			if labels[k] != v {
				match = false
				break
			}
		}
		if !match {
			continue
		}
		switch {
		case m.Gauge != nil:
			found = append(found, m.GetGauge().GetValue())
		case m.Counter != nil:
			found = append(found, m.GetCounter().GetValue())
		case m.Untyped != nil:
			found = append(found, m.GetUntyped().GetValue())
		}
	}
	if len(found) != 1 {
		return 0, false
	}
	return found[0], true
}

// Checkpoint is gpu-manager's checkpoint file
// (device-plugin/src/state/checkpoint.rs, format version 1).
type Checkpoint struct {
	Version  int    `json:"version"`
	Checksum string `json:"checksum"`
	Data     struct {
		Node    string             `json:"node"`
		Records []CheckpointRecord `json:"records"`
	} `json:"data"`
}

// CheckpointRecord is one container's allocation in the checkpoint.
type CheckpointRecord struct {
	ID      string  `json:"id"`
	Core    string  `json:"core"`
	Memory  string  `json:"memory"`
	Matched *PodRef `json:"matched,omitempty"`
	Owner   *PodRef `json:"owner,omitempty"`
}

// PodRef names a container in the checkpoint.
type PodRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
	Container string `json:"container"`
}

// Pod is the record's owner (confirmed through pod-resources), else the pod
// it was matched to at Allocate.
func (r CheckpointRecord) Pod() *PodRef {
	if r.Owner != nil {
		return r.Owner
	}
	return r.Matched
}

// CoreIDs expands the record's vcuda-core IDs (vcore-<card>-<k>), sorted.
func (r CheckpointRecord) CoreIDs() ([]string, error) { return ExpandIDs("vcore", r.Core) }

// MemoryIDs expands the record's vcuda-memory IDs (vmem-<card>-<k>), sorted.
func (r CheckpointRecord) MemoryIDs() ([]string, error) { return ExpandIDs("vmem", r.Memory) }

// ReadCheckpoint reads and decodes gpu-manager's checkpoint.
func (g *GPUNode) ReadCheckpoint() (*Checkpoint, error) {
	data, err := os.ReadFile(g.CheckpointPath)
	if err != nil {
		return nil, err
	}
	var c Checkpoint
	if err := jsonUnmarshal("checkpoint "+g.CheckpointPath, data, &c); err != nil {
		return nil, err
	}
	if c.Version != 1 {
		return nil, fmt.Errorf("checkpoint %s has version %d, the e2e reads version 1", g.CheckpointPath, c.Version)
	}
	return &c, nil
}

// ExpandIDs expands the checkpoint's compact ID form ("3:0-29;5:0,2") to
// device IDs "<prefix>-<card>-<k>", sorted.
func ExpandIDs(prefix, encoded string) ([]string, error) {
	var out []string
	if encoded == "" {
		return out, nil
	}
	for _, part := range strings.Split(encoded, ";") {
		card, ranges, ok := strings.Cut(part, ":")
		if !ok {
			return nil, fmt.Errorf("ID set %q: %q is not card:ranges", encoded, part)
		}
		if _, err := strconv.Atoi(card); err != nil {
			return nil, fmt.Errorf("ID set %q: card %q: %w", encoded, card, err)
		}
		for _, r := range strings.Split(ranges, ",") {
			a, b, isRange := strings.Cut(r, "-")
			if !isRange {
				b = a
			}
			lo, err1 := strconv.Atoi(a)
			hi, err2 := strconv.Atoi(b)
			if err1 != nil || err2 != nil || hi < lo {
				return nil, fmt.Errorf("ID set %q: bad range %q", encoded, r)
			}
			for k := lo; k <= hi; k++ {
				out = append(out, fmt.Sprintf("%s-%s-%d", prefix, card, k))
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

// CardOf returns the card index of a device ID (vcore-3-17 → 3).
func CardOf(id string) (int, error) {
	parts := strings.Split(id, "-")
	if len(parts) != 3 || (parts[0] != "vcore" && parts[0] != "vmem") {
		return 0, fmt.Errorf("device ID %q is not vcore-<card>-<k> or vmem-<card>-<k>", id)
	}
	return strconv.Atoi(parts[1])
}
