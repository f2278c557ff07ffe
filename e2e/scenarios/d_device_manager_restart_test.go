package scenarios

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"

	"gpumanager.local/e2e/internal/harness"
)

// Scenario d — the kubelet's device manager restarts (the node agent is
// SIGKILLed and started again on the same directories, as a kubelet
// restart): it recreates kubelet.sock, our gpu-manager notices and
// registers both plugins again, the Node's GPU capacity comes back (the
// restarted device manager offers no device until its plugin re-registers),
// the running pods keep exactly their devices — no second Allocate — and a
// new pod gets only free devices.
func TestScenarioD_DeviceManagerRestartReRegistersOurPluginAndKeepsRunningAllocations(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	node := startGPUNode(ctx, t, s, "d-t4", "t4-pcie-4.yaml")
	nodes := []*harness.GPUNode{node}
	ns := newGPUNamespace(ctx, t, e, "restart")
	// One at a time: this scenario is about the restart, not about bursts.
	for _, p := range []*v1.Pod{gpuPod("share-a", 30, 20), gpuPod("whole", 100, 0), gpuPod("share-b", 50, 8)} {
		waitRunning(ctx, t, e, createPod(ctx, t, e, ns, p))
	}
	before := eventuallyConsistent(ctx, t, e, nodes, ns, 20*time.Second)
	registrations := countLogLines(t, node.ManagerLog, "registered with the kubelet")
	allocations := countLogLines(t, node.ManagerLog, "allocated resource=")
	oldSock := harness.FileIdentity(node.KubeletSocket)

	node.Kill()
	if err := node.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if harness.FileIdentity(node.KubeletSocket) == oldSock {
		t.Fatal("the restarted device manager did not recreate kubelet.sock")
	}
	cores, blocks := node.Inventory.Capacity()
	if _, err := e.WaitNode(ctx, node.Name, 30*time.Second, "offering every GPU device again", func(n *v1.Node) bool {
		return harness.Allocatable(n, harness.VcudaCore) == cores && harness.Allocatable(n, harness.VcudaMemory) == blocks
	}); err != nil {
		t.Fatalf("%v; gpu-manager log %s", err, node.ManagerLog)
	}
	// Both plugins registered again (one line per resource).
	if got := countLogLines(t, node.ManagerLog, "registered with the kubelet"); got < registrations+2 {
		t.Fatalf("gpu-manager logged %d registrations after the restart, want at least %d (see %s)", got, registrations+2, node.ManagerLog)
	}
	if _, err := harness.Get(ctx, "http://"+node.MetricsAddr+"/readyz"); err != nil {
		t.Fatalf("gpu-manager not ready after the device manager restart: %v", err)
	}

	// Running allocations survived, unchanged, without a new Allocate.
	after := eventuallyConsistent(ctx, t, e, nodes, ns, 20*time.Second)
	for name, b := range before {
		a, ok := after[name]
		if !ok {
			t.Fatalf("pod %s no longer running after the restart", name)
		}
		if !equal(a.CoreIDs, b.CoreIDs) || !equal(a.MemIDs, b.MemIDs) || !equalInts(a.Cards, b.Cards) {
			t.Fatalf("pod %s changed devices across the restart: cards %v→%v, %d→%d core IDs, %d→%d memory IDs",
				name, b.Cards, a.Cards, len(b.CoreIDs), len(a.CoreIDs), len(b.MemIDs), len(a.MemIDs))
		}
	}
	if got := countLogLines(t, node.ManagerLog, "allocated resource="); got != allocations {
		t.Fatalf("gpu-manager saw %d new Allocate calls for containers that were already running", got-allocations)
	}

	// New pods get free devices only.
	waitRunning(ctx, t, e, createPod(ctx, t, e, ns, gpuPod("after-restart", 40, 30)))
	waitRunning(ctx, t, e, createPod(ctx, t, e, ns, gpuPod("whole-after", 100, 0)))
	final := eventuallyConsistent(ctx, t, e, nodes, ns, 20*time.Second)
	if len(final) != 5 {
		t.Fatalf("%d pods running, want 5", len(final))
	}
	for name, pl := range final {
		t.Logf("%s: cards %v, %d vcuda-core, %d vcuda-memory", name, pl.Cards, len(pl.CoreIDs), len(pl.MemIDs))
	}
}

// countLogLines counts the lines of a log file containing substr (colour
// escapes removed).
func countLogLines(t *testing.T, path, substr string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(ansi.ReplaceAllString(string(data), ""), "\n") {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

var ansi = regexp.MustCompile("\x1b\\[[0-9;]*m")
