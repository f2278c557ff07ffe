package scenarios

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"gpumanager.local/e2e/internal/harness"
)

// Scenario e — gpu-manager is SIGKILLed in the middle of a burst and
// started again on the same checkpoint directory. Afterwards no allocation
// is lost or doubled: the checkpoint, the device manager (pod-resources)
// and the annotations agree container by container, no device is held
// twice, every pod that was Running before the kill still runs on the same
// devices, and pods the kubelet rejected while the plugin was gone (its
// own UnexpectedAdmissionError) can be created again and run, so no
// capacity leaked.
//
// Every pod asks for a different vcuda-core and vcuda-memory size, so that
// this scenario isolates crash recovery from the matching of same-sized
// pods, which scenario c covers.
func TestScenarioE_GPUManagerSIGKILLMidBurstLosesAndDoublesNoAllocation(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	node := startGPUNode(ctx, t, s, "e-h100", "h100-sxm-8.yaml")
	nodes := []*harness.GPUNode{node}
	ns := newGPUNamespace(ctx, t, e, "crash")

	// 33 shares of 1..33 vcuda-core (561 of the node's 800) and 11..43
	// memory blocks, in three bursts of 11.
	var pods []*v1.Pod
	for i := 1; i <= 33; i++ {
		pods = append(pods, gpuPod(fmt.Sprintf("e-%02d", i), int64(i), int64(10+i)))
	}
	createPods(ctx, t, e, ns, pods[:11])
	running := waitRunningCount(ctx, t, e, ns, 6, 60*time.Second)
	t.Logf("%d pods running before the kill", len(running))

	// The second burst is being created while gpu-manager dies.
	var wg sync.WaitGroup
	var burstErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		burstErr = createPodsErr(ctx, e, ns, pods[11:22])
	}()
	time.Sleep(150 * time.Millisecond)
	killedAt := time.Now()
	node.KillManager()
	beforeKill := snapshotRunning(ctx, t, e, node, ns)
	wg.Wait()
	if burstErr != nil {
		t.Fatal(burstErr)
	}
	time.Sleep(time.Second)
	if err := node.StartManager(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("gpu-manager down for %s; %d pods were running with devices at the kill", time.Since(killedAt).Round(time.Millisecond), len(beforeKill))
	createPods(ctx, t, e, ns, pods[22:])

	settled := waitSettled(ctx, t, e, ns, 2*time.Minute)
	if t.Failed() {
		t.FailNow()
	}
	// Pods the kubelet rejected while the plugin was away are the
	// kubelet's decision; anything else is a failure.
	var rejected []string
	for _, p := range settled {
		switch {
		case p.Status.Phase == v1.PodFailed && p.Status.Reason == "UnexpectedAdmissionError" && outageMessage(p.Status.Message):
			rejected = append(rejected, p.Name)
		case p.Status.Phase != v1.PodRunning:
			t.Errorf("pod %s: %s", p.Name, harness.DescribePod(&p))
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	after := eventuallyConsistent(ctx, t, e, nodes, ns, 30*time.Second)
	for name, ids := range beforeKill {
		pl, ok := after[name]
		if !ok {
			t.Fatalf("pod %s was running with devices before the kill and is not running now", name)
		}
		if !equal(pl.CoreIDs, ids.core) || !equal(pl.MemIDs, ids.mem) {
			t.Fatalf("pod %s changed devices across the gpu-manager crash", name)
		}
	}
	t.Logf("%d running, %d rejected by the kubelet while gpu-manager was down: %v", len(after), len(rejected), rejected)

	// Capacity did not leak: the rejected pods, created again, run.
	zero := int64(0)
	var again []*v1.Pod
	for _, name := range rejected {
		if err := e.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		for _, p := range pods {
			if p.Name == name {
				cores, mem := podRequest(p)
				again = append(again, gpuPod(name+"-again", cores, mem))
			}
		}
	}
	createPods(ctx, t, e, ns, again)
	for _, p := range again {
		waitRunning(ctx, t, e, podRef(ns, p.Name))
	}
	final := eventuallyConsistent(ctx, t, e, nodes, ns, 30*time.Second)
	if len(final) != len(pods) {
		t.Fatalf("%d pods running at the end, want all %d", len(final), len(pods))
	}
}

// outageMessage tells the device manager's rejections for a plugin that is
// not there (endpoint gone, or its devices unhealthy/unavailable).
func outageMessage(msg string) bool {
	// "client connection is closing" / Canceled: the kubelet's call (e.g. GetPreferredAllocation)
	// was in flight when gpu-manager was killed.
	for _, s := range []string{"no healthy devices present", "unknown Device Plugin", "devices unavailable", "endpoint", "Unavailable", "client connection is closing", "code = Canceled"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// waitRunningCount waits until at least n pods of ns run and returns them.
func waitRunningCount(ctx context.Context, t *testing.T, e *harness.Env, ns string, n int, timeout time.Duration) []v1.Pod {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		list, err := e.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var running []v1.Pod
		for _, p := range list.Items {
			if p.Status.Phase == v1.PodRunning {
				running = append(running, p)
			}
		}
		if len(running) >= n {
			return running
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d pods running after %s", len(running), n, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// snapshotRunning lists, for the Running pods of ns, the GPU devices the
// device manager holds for them.
func snapshotRunning(ctx context.Context, t *testing.T, e *harness.Env, n *harness.GPUNode, ns string) map[string]*heldDevices {
	t.Helper()
	held, err := listHeld(ctx, n.Node)
	if err != nil {
		t.Fatal(err)
	}
	list, err := e.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*heldDevices{}
	for _, p := range list.Items {
		if h, ok := held[ns+"/"+p.Name+"/main"]; ok && p.Status.Phase == v1.PodRunning {
			out[p.Name] = h
		}
	}
	return out
}
