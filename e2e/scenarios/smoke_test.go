package scenarios

// Smoke tests of the harness itself, with the kubelet's own stub device
// plugin standing in for gpu-manager: they prove that pods requesting device
// plugin resources go through the real kube-scheduler and the kubelet's real
// device manager, and that the node agent restarts like a kubelet.

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"gpumanager.local/e2e/internal/harness"
)

const podTimeout = 30 * time.Second

func TestStubPluginPodIsScheduledAllocatedAndRunningOnTheDevicesThePluginPrefers(t *testing.T) {
	e := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const res = "e2e.gpumanager.local/smoke"

	node, stub := startStubNode(ctx, t, e, "smoke-1", res, 4)
	ns := newNamespace(ctx, t, e, "smoke")

	// 1. A pod asking for 2 devices is placed by the real scheduler, admitted
	// by the device manager and reported Running with the two devices the
	// plugin preferred (the highest IDs).
	first := createPod(ctx, t, e, ns, devicePod("two-devices", res, 2, ""))
	first = waitRunning(ctx, t, e, first)
	if first.Spec.NodeName != node.Name {
		t.Fatalf("pod scheduled to %q, want %q (the only node with %s)", first.Spec.NodeName, node.Name, res)
	}
	want := []string{"dev-2", "dev-3"}
	if got := statusDeviceIDs(first, res); !equal(got, want) {
		t.Fatalf("allocatedResourcesStatus shows devices %v, want the plugin's preference %v", got, want)
	}
	if reqs := stub.PreferredRequests(); len(reqs) == 0 || reqs[0].ContainerRequests[0].AllocationSize != 2 ||
		len(reqs[0].ContainerRequests[0].AvailableDeviceIDs) != 4 {
		t.Fatalf("GetPreferredAllocation requests = %v, want one for 2 of the 4 devices", reqs)
	}
	if allocs := stub.Allocations(); len(allocs) != 1 || !equal(sorted(allocs[0]), want) {
		t.Fatalf("Allocate calls = %v, want exactly one for %v", allocs, want)
	}

	// 2. The container was "created" with what Allocate returned, after
	// PreStartContainer (the stub asks for it).
	rec := findContainer(t, node, first, "main")
	if rec.DeviceOptions == nil || !hasEnv(rec, "STUB_DEVICES", "dev-2,dev-3") || len(rec.DeviceOptions.Devices) != 2 {
		t.Fatalf("container run options = %+v, want STUB_DEVICES=dev-2,dev-3 and 2 device nodes", rec.DeviceOptions)
	}
	logData, err := os.ReadFile(node.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(logData), "Issuing a PreStartContainer call for container") {
		t.Fatalf("device manager never called PreStartContainer (see %s)", node.LogPath())
	}

	// 3. The pod-resources API answers from the device manager's state.
	if got := podResourcesDevices(ctx, t, node, ns, first.Name, "main", res); !equal(got, want) {
		t.Fatalf("pod-resources List shows %v for the pod, want %v", got, want)
	}
	if got := allocatableDevices(ctx, t, node, res); len(got) != 4 {
		t.Fatalf("pod-resources GetAllocatableResources shows %v, want the 4 registered devices", got)
	}

	// 4. The scheduler does not over-commit: 3 more do not fit.
	pending := createPod(ctx, t, e, ns, devicePod("three-devices", res, 3, ""))
	if _, err := e.WaitPod(ctx, ns, pending.Name, podTimeout, "unschedulable", func(p *v1.Pod) bool {
		return hasCondition(p, v1.PodScheduled, v1.ConditionFalse, v1.PodReasonUnschedulable)
	}); err != nil {
		t.Fatal(err)
	}

	// 5. A pod bound straight to the node (bypassing the scheduler) is
	// rejected by the device manager with its own error.
	bound := createPod(ctx, t, e, ns, devicePod("bound-three", res, 3, node.Name))
	bound, err = e.WaitPod(ctx, ns, bound.Name, podTimeout, "Failed", func(p *v1.Pod) bool { return p.Status.Phase == v1.PodFailed })
	if err != nil {
		t.Fatal(err)
	}
	if bound.Status.Reason != "UnexpectedAdmissionError" || !strings.Contains(bound.Status.Message, "requested number of devices unavailable for "+res) {
		t.Fatalf("rejected pod has reason %q message %q, want UnexpectedAdmissionError from the device manager", bound.Status.Reason, bound.Status.Message)
	}

	// 6. Deleting the first pod frees its devices: the waiting pod runs.
	if err := e.Client.CoreV1().Pods(ns).Delete(ctx, first.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	pending = waitRunning(ctx, t, e, pending)
	if got := statusDeviceIDs(pending, res); len(got) != 3 {
		t.Fatalf("pod that waited holds %v, want 3 devices", got)
	}
}

func TestNodeAgentRestartKeepsAllocationsAndThePluginReRegisters(t *testing.T) {
	e := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const res = "e2e.gpumanager.local/restart"

	node, stub := startStubNode(ctx, t, e, "restart-1", res, 4)
	ns := newNamespace(ctx, t, e, "restart")
	a := waitRunning(ctx, t, e, createPod(ctx, t, e, ns, devicePod("before-restart", res, 2, "")))
	aDevices := podResourcesDevices(ctx, t, node, ns, a.Name, "main", res)
	if len(aDevices) != 2 {
		t.Fatalf("pod-resources shows %v for the first pod, want 2 devices", aDevices)
	}
	oldSock := harness.FileIdentity(node.KubeletSocket)

	// A kubelet crash: SIGKILL, then start again on the same directories.
	node.Kill()
	if err := node.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if harness.FileIdentity(node.KubeletSocket) == oldSock {
		t.Fatal("kubelet.sock was not recreated by the restarted device manager")
	}
	if _, err := e.WaitNode(ctx, node.Name, podTimeout, "showing 4 allocatable devices after re-registration", func(n *v1.Node) bool {
		return harness.Allocatable(n, res) == 4
	}); err != nil {
		t.Fatal(err)
	}

	// The running pod keeps its devices; the device manager did not call
	// Allocate for it again.
	if got := podResourcesDevices(ctx, t, node, ns, a.Name, "main", res); !equal(got, aDevices) {
		t.Fatalf("after restart pod-resources shows %v for the first pod, want %v", got, aDevices)
	}
	if n := len(stub.Allocations()); n != 1 {
		t.Fatalf("plugin saw %d Allocate calls, want 1 (no re-allocation of a running container)", n)
	}
	if p, err := e.Client.CoreV1().Pods(ns).Get(ctx, a.Name, metav1.GetOptions{}); err != nil || p.Status.Phase != v1.PodRunning {
		t.Fatalf("first pod after restart: %v %s", err, harness.DescribePod(p))
	}

	// New pods get only the devices the checkpoint says are free.
	b := waitRunning(ctx, t, e, createPod(ctx, t, e, ns, devicePod("after-restart", res, 2, "")))
	bDevices := podResourcesDevices(ctx, t, node, ns, b.Name, "main", res)
	for _, d := range bDevices {
		for _, x := range aDevices {
			if d == x {
				t.Fatalf("device %s given to both pods (first %v, second %v)", d, aDevices, bDevices)
			}
		}
	}
	c := createPod(ctx, t, e, ns, devicePod("no-room", res, 1, ""))
	if _, err := e.WaitPod(ctx, ns, c.Name, podTimeout, "unschedulable", func(p *v1.Pod) bool {
		return hasCondition(p, v1.PodScheduled, v1.ConditionFalse, v1.PodReasonUnschedulable)
	}); err != nil {
		t.Fatal(err)
	}
}

func TestUnhealthyDeviceShowsInThePodStatusAndLeavesAllocatable(t *testing.T) {
	e := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const res = "e2e.gpumanager.local/health"

	node, stub := startStubNode(ctx, t, e, "health-1", res, 4)
	ns := newNamespace(ctx, t, e, "health")
	p := waitRunning(ctx, t, e, createPod(ctx, t, e, ns, devicePod("holder", res, 2, "")))
	held := statusDeviceIDs(p, res)
	if !equal(held, []string{"dev-2", "dev-3"}) {
		t.Fatalf("pod holds %v, want the preferred dev-2, dev-3", held)
	}

	// The plugin reports dev-3 unhealthy through ListAndWatch.
	devs := harness.StubDevices("dev", 4)
	devs[3].Health = "Unhealthy"
	stub.Update(devs)

	if _, err := e.WaitNode(ctx, node.Name, podTimeout, "showing 3 allocatable of 4", func(n *v1.Node) bool {
		c := n.Status.Capacity[v1.ResourceName(res)]
		return harness.Allocatable(n, res) == 3 && c.Value() == 4
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.WaitPod(ctx, ns, p.Name, podTimeout, "reporting dev-3 Unhealthy", func(p *v1.Pod) bool {
		for _, cs := range p.Status.ContainerStatuses {
			for _, rs := range cs.AllocatedResourcesStatus {
				for _, r := range rs.Resources {
					if r.ResourceID == "dev-3" && r.Health == v1.ResourceHealthStatusUnhealthy {
						return true
					}
				}
			}
		}
		return false
	}); err != nil {
		t.Fatal(err)
	}
}
