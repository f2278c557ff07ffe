package scenarios

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gpumanager.local/e2e/internal/harness"
)

// Scenario a — the TKEStack documentation's example, end to end through
// everything real: the pod of deploy/examples/pods/vcuda-30-20.yaml
// (vcuda-core 30, vcuda-memory 20) is admitted by our webhook (called by
// kube-apiserver), placed by kube-scheduler through our extender, allocated
// by our gpu-manager through the kubelet's device manager, and Running on
// the card its annotation names; gpu-manager's metrics show 5120 MiB
// requested for it.
func TestScenarioA_DocsExamplePodRunsOnTheCardItsAnnotationNames(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	nodes := []*harness.GPUNode{
		startGPUNode(ctx, t, s, "a-h100", "h100-sxm-8.yaml"),
		startGPUNode(ctx, t, s, "a-t4", "t4-pcie-4.yaml"),
	}
	ns := newGPUNamespace(ctx, t, e, "docs")
	leader, err := s.Leader(ctx, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	before := webhookCalls(ctx, t, e)
	bindsBefore := extenderBinds(ctx, t, leader)

	// The example as a user applies it.
	example := filepath.Join(s.RepoRoot, "deploy", "examples", "pods", "vcuda-30-20.yaml")
	if out, stderr, err := e.Kubectl(ctx, "", "apply", "-n", ns, "-f", example); err != nil {
		t.Fatalf("kubectl apply %s: %v\n%s%s", example, err, out, stderr)
	}
	const name = "vcuda-demo"

	// kube-apiserver called both of our webhooks for it and was allowed.
	after := webhookCalls(ctx, t, e)
	for _, hook := range []string{"validate.gpu-admission.gpu-manager.io", "mutate.gpu-admission.gpu-manager.io"} {
		if after[hook] <= before[hook] {
			t.Fatalf("kube-apiserver did not call webhook %s for the pod (admitted calls before %v, after %v)", hook, before[hook], after[hook])
		}
	}

	pod := waitRunning(ctx, t, e, podRef(ns, name))
	cards, err := annotatedCards(pod, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(cards) != 1 {
		t.Fatalf("a 30 vcuda-core share must be on one card, annotation says %v", cards)
	}
	card := cards[0]
	if pod.Annotations[harness.AnnotPredicateNode] != pod.Spec.NodeName || pod.Annotations[harness.AnnotPredicateTime] == "" {
		t.Fatalf("extender annotations missing or naming another node than %s: %v", pod.Spec.NodeName, pod.Annotations)
	}
	if got := extenderBinds(ctx, t, leader); got <= bindsBefore {
		t.Fatalf("the extender's bind verb was not used (bound decisions before %v, after %v)", bindsBefore, got)
	}

	// Every view agrees: annotation card = the device manager's IDs = the
	// container's NVIDIA_VISIBLE_DEVICES = gpu-manager's checkpoint.
	placed := eventuallyConsistent(ctx, t, e, nodes, ns, 20*time.Second)
	pl, ok := placed[name]
	if !ok {
		t.Fatalf("pod %s not among the running GPU pods %v", name, placed)
	}
	if len(pl.CoreIDs) != 30 || len(pl.MemIDs) != 20 {
		t.Fatalf("pod-resources shows %d vcuda-core and %d vcuda-memory IDs, want 30 and 20", len(pl.CoreIDs), len(pl.MemIDs))
	}
	var node *harness.GPUNode
	for _, n := range nodes {
		if n.Name == pod.Spec.NodeName {
			node = n
		}
	}
	c := findContainer(t, node.Node, pod, "cuda")
	uuid := node.Inventory.Cards[card].UUID
	if !hasEnv(c, "NVIDIA_VISIBLE_DEVICES", uuid) {
		t.Fatalf("container env %v, want NVIDIA_VISIBLE_DEVICES=%s (card %d)", c.DeviceOptions.Envs, uuid, card)
	}
	t.Logf("pod %s/%s Running on %s card %d (%s): %d vcuda-core IDs %s…, %d vcuda-memory IDs",
		ns, name, pod.Spec.NodeName, card, uuid, len(pl.CoreIDs), strings.Join(firstN(pl.CoreIDs, 3), ","), len(pl.MemIDs))

	// container_request_gpu_memory on gpu-manager's metrics endpoint.
	labels := map[string]string{"pod_name": name, "namespace": ns, "container_name": "cuda", "node": node.Name, "req_of_gpu_memory": "total"}
	var got float64
	deadline := time.Now().Add(20 * time.Second)
	for {
		fams, err := node.Metrics(ctx)
		if err != nil {
			t.Fatal(err)
		}
		v, ok := harness.MetricValue(fams, "container_request_gpu_memory", labels)
		if ok && v == 5120 {
			got = v
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container_request_gpu_memory%v = %v (found %v) on http://%s/metrics, want 5120", labels, v, ok, node.MetricsAddr)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("container_request_gpu_memory{pod_name=%q,req_of_gpu_memory=\"total\"} = %v on http://%s/metrics", name, got, node.MetricsAddr)
}
