package scenarios

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"gpumanager.local/e2e/internal/harness"
)

// The harness at scenario (c)'s scale, with the stub plugin: 200 pods in
// bursts onto 4 nodes of 50 devices fill every device exactly once, and the
// scheduler's view (pod status), the device manager's (pod-resources) and
// the runtime's (containers.json) agree.
func TestBurstOf200PodsOn4NodesFillsEveryDeviceExactlyOnce(t *testing.T) {
	e := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const (
		res          = "e2e.gpumanager.local/burst"
		nodes        = 4
		devsPerNode  = 50
		pods         = nodes * devsPerNode
		burst        = 50
		podsDeadline = 2 * time.Minute
	)
	var ns []*harness.Node
	for i := 1; i <= nodes; i++ {
		n, _ := startStubNode(ctx, t, e, fmt.Sprintf("burst-%d", i), res, devsPerNode)
		ns = append(ns, n)
	}
	namespace := newNamespace(ctx, t, e, "burst")

	start := time.Now()
	for b := 0; b < pods/burst; b++ {
		var wg sync.WaitGroup
		errs := make(chan error, burst)
		for i := 0; i < burst; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				_, err := e.Client.CoreV1().Pods(namespace).Create(ctx, devicePod(fmt.Sprintf("p-%03d", b*burst+i), res, 1, ""), metav1.CreateOptions{})
				errs <- err
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	var list *v1.PodList
	deadline := time.Now().Add(podsDeadline)
	for {
		var err error
		list, err = e.Client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		running := 0
		for _, p := range list.Items {
			if p.Status.Phase == v1.PodFailed {
				t.Fatalf("pod %s failed: %s", p.Name, harness.DescribePod(&p))
			}
			if p.Status.Phase == v1.PodRunning {
				running++
			}
		}
		if running == pods {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d pods running after %s", running, pods, podsDeadline)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("%d pods running on %d nodes %s after the first create", pods, nodes, time.Since(start).Round(time.Millisecond))

	// Every device of every node is held by exactly one pod, and the three
	// views agree pod by pod.
	byNode := map[string]map[string]string{} // node -> device -> pod
	for _, p := range list.Items {
		ids := statusDeviceIDs(&p, res)
		if len(ids) != 1 {
			t.Fatalf("pod %s reports devices %v, want exactly 1", p.Name, ids)
		}
		if byNode[p.Spec.NodeName] == nil {
			byNode[p.Spec.NodeName] = map[string]string{}
		}
		if other, dup := byNode[p.Spec.NodeName][ids[0]]; dup {
			t.Fatalf("device %s on %s given to both %s and %s", ids[0], p.Spec.NodeName, other, p.Name)
		}
		byNode[p.Spec.NodeName][ids[0]] = p.Name
	}
	for _, n := range ns {
		if got := len(byNode[n.Name]); got != devsPerNode {
			t.Fatalf("node %s has %d devices in use, want all %d", n.Name, got, devsPerNode)
		}
		containers, err := n.Containers()
		if err != nil {
			t.Fatal(err)
		}
		if len(containers) != devsPerNode {
			t.Fatalf("node %s runtime recorded %d containers, want %d", n.Name, len(containers), devsPerNode)
		}
		// One List per node: the kubelet rate-limits pod-resources to 100 QPS,
		// burst 10 (ResourceExhausted beyond).
		listed := podResourcesByPod(ctx, t, n, namespace, "main", res)
		if len(listed) != devsPerNode {
			t.Fatalf("pod-resources on %s lists %d pods holding %s, want %d", n.Name, len(listed), res, devsPerNode)
		}
		for _, c := range containers {
			got := listed[c.PodName]
			if len(got) != 1 || byNode[n.Name][got[0]] != c.PodName || !hasEnv(c, "STUB_DEVICES", got[0]) {
				t.Fatalf("pod %s on %s: pod-resources %v, status owner %q, runtime env %v disagree",
					c.PodName, n.Name, got, byNode[n.Name][firstOr(got)], c.DeviceOptions.Envs)
			}
		}
	}

	// Full: one more does not fit anywhere.
	extra := createPod(ctx, t, e, namespace, devicePod("one-too-many", res, 1, ""))
	if _, err := e.WaitPod(ctx, namespace, extra.Name, podTimeout, "unschedulable", func(p *v1.Pod) bool {
		return hasCondition(p, v1.PodScheduled, v1.ConditionFalse, v1.PodReasonUnschedulable)
	}); err != nil {
		t.Fatal(err)
	}
}

func firstOr(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}
