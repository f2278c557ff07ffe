package scenarios

import (
	"context"
	"fmt"
	"math/rand"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"

	"gpumanager.local/e2e/internal/harness"
)

// Scenario c — 200 pods of mixed shares and whole cards, created in bursts
// of 40 onto one node of each example node file (22 cards of five models).
// Afterwards no card is over-allocated, every running pod's placement is the
// same in its annotations, the device manager (pod-resources), the
// runtime's container options and gpu-manager's checkpoint, no pod failed,
// and every pod left Pending is Unschedulable and really fits nowhere.
func TestScenarioC_TwoHundredMixedPodsOnFourNodesNeverOverAllocateAndAllViewsAgree(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()

	var nodes []*harness.GPUNode
	for _, f := range []string{"h100-sxm-8", "t4-pcie-4", "mixed-a100-v100", "t6"} {
		nodes = append(nodes, startGPUNode(ctx, t, s, "c-"+f, f+".yaml"))
	}
	ns := newGPUNamespace(ctx, t, e, "burst")

	pods := mixedPods("c", 200, 1)
	var cores, blocks int64
	for _, p := range pods {
		c, m := podRequest(p)
		cores, blocks = cores+c, blocks+m
	}
	t.Logf("workload: %d pods asking %d vcuda-core and %d vcuda-memory blocks in all; the 4 nodes have 22 cards (2200 vcuda-core)", len(pods), cores, blocks)

	start := time.Now()
	const burst = 40
	for i := 0; i < len(pods); i += burst {
		createPods(ctx, t, e, ns, pods[i:i+burst])
		time.Sleep(300 * time.Millisecond)
	}
	settled := waitSettled(ctx, t, e, ns, 4*time.Minute)
	t.Logf("settled %s after the first create", time.Since(start).Round(time.Millisecond))

	var pending []v1.Pod
	for _, p := range settled {
		switch {
		case p.Status.Phase == v1.PodFailed:
			t.Errorf("pod %s failed: %s", p.Name, harness.DescribePod(&p))
		case p.Status.Phase == v1.PodPending && p.Spec.NodeName == "":
			pending = append(pending, p)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	placed := eventuallyConsistent(ctx, t, e, nodes, ns, 30*time.Second)
	perNode := map[string]int{}
	for _, pl := range placed {
		perNode[pl.Node]++
	}
	t.Logf("%d running (%v), %d pending", len(placed), perNode, len(pending))
	if len(placed) < 150 {
		t.Fatalf("only %d of %d pods running; the workload was sized for most to fit", len(placed), len(pods))
	}
	checkPendingReallyDoNotFit(ctx, t, nodes, placed, pending)
}

// mixedPods is a fixed (seeded) mix: mostly shares of 2–10 vcuda-core with
// 1–8 memory blocks, some whole cards and a few two-card pods, shuffled.
func mixedPods(prefix string, n int, seed int64) []*v1.Pod {
	r := rand.New(rand.NewSource(seed))
	shareCores := []int64{2, 5, 5, 10, 10}
	shareMem := []int64{1, 2, 4, 4, 8}
	var pods []*v1.Pod
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("%s-%03d", prefix, i)
		switch {
		case i%66 == 5:
			pods = append(pods, gpuPod(name, 200, 0))
		case i%33 == 7:
			pods = append(pods, gpuPod(name, 100, 0))
		default:
			pods = append(pods, gpuPod(name, shareCores[r.Intn(len(shareCores))], shareMem[r.Intn(len(shareMem))]))
		}
	}
	r.Shuffle(len(pods), func(i, j int) { pods[i], pods[j] = pods[j], pods[i] })
	return pods
}

// checkPendingReallyDoNotFit proves that the pods left Pending were refused
// for a reason: from what the device manager holds, no card (share) or no
// set of whole free cards on one node (whole cards) could take them. Their
// PodScheduled condition carries the refusal.
func checkPendingReallyDoNotFit(ctx context.Context, t *testing.T, nodes []*harness.GPUNode, placed map[string]placement, pending []v1.Pod) {
	t.Helper()
	type cardFree struct{ cores, blocks int64 }
	free := map[string][]cardFree{}
	for _, g := range nodes {
		cards := make([]cardFree, len(g.Inventory.Cards))
		for i, c := range g.Inventory.Cards {
			cards[i] = cardFree{100, c.Blocks()}
		}
		held, err := listHeld(ctx, g.Node)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range held {
			for _, id := range h.core {
				c, _ := harness.CardOf(id)
				cards[c].cores--
			}
			for _, id := range h.mem {
				c, _ := harness.CardOf(id)
				cards[c].blocks--
			}
		}
		free[g.Name] = cards
	}
	reasons := map[string]int{}
	for _, p := range pending {
		cores, mem := podRequest(&p)
		for node, cards := range free {
			whole := 0
			for i, c := range cards {
				if cores < 100 && c.cores >= cores && c.blocks >= mem {
					t.Fatalf("pending pod %s (vcuda-core %d, vcuda-memory %d) fits card %d of %s (%d vcuda-core, %d blocks free): %s",
						p.Name, cores, mem, i, node, c.cores, c.blocks, harness.DescribePod(&p))
				}
				if c.cores == 100 {
					whole++
				}
			}
			if cores >= 100 && int64(whole) >= cores/100 {
				t.Fatalf("pending pod %s (%d whole cards) fits %s (%d cards free): %s", p.Name, cores/100, node, whole, harness.DescribePod(&p))
			}
		}
		var msg string
		for _, c := range p.Status.Conditions {
			if c.Type == v1.PodScheduled {
				msg = c.Message
			}
		}
		reasons[msg]++
	}
	keys := make([]string, 0, len(reasons))
	for k := range reasons {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Logf("pending ×%d: %s", reasons[k], strings.TrimSpace(k))
	}
}

// The smallest reproduction of what scenario c exposes: one burst of 40
// shares on one node, all with the same vcuda-memory and two vcuda-core
// sizes, so that several pods waiting for the kubelet have identical
// requests but different cards. The kubelet admits bound pods in the order
// it receives them, which is not the order in which the extender stamped
// predicate-time (kube-scheduler binds in parallel), and it allocates a
// container's two resources in either order. Every pod must still start on
// the card its annotation names.
func TestScenarioC_SameSizedSharesInOneBurstStartOnTheCardsTheirAnnotationsName(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	node := startGPUNode(ctx, t, s, "c-same-size", "h100-sxm-8.yaml")
	ns := newGPUNamespace(ctx, t, e, "same-size")
	var pods []*v1.Pod
	for i := 0; i < 40; i++ {
		pods = append(pods, gpuPod(fmt.Sprintf("s-%02d", i), int64(10+10*(i%2)), 4))
	}
	createPods(ctx, t, e, ns, pods)
	for _, p := range waitSettled(ctx, t, e, ns, 2*time.Minute) {
		if p.Status.Phase != v1.PodRunning && stuckReason(&p) == "" {
			t.Errorf("pod %s: %s", p.Name, harness.DescribePod(&p))
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if placed := eventuallyConsistent(ctx, t, e, []*harness.GPUNode{node}, ns, 30*time.Second); len(placed) != len(pods) {
		t.Fatalf("%d of %d pods running", len(placed), len(pods))
	}
}
