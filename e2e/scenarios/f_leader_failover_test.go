package scenarios

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"gpumanager.local/e2e/internal/harness"
)

// Scenario f — two gpu-admission replicas with --leader-elect share one
// Lease; kube-scheduler and kube-apiserver reach them through the Service
// stand-in, which sends traffic only to the ready replica (the leader).
// The leader is SIGKILLed while pods are being scheduled: the other replica
// takes the Lease within the lease duration (plus its retry period) and
// becomes the only ready endpoint, the pods that were in flight are placed,
// new pods are placed by the new leader, no card is over-allocated, and the
// old leader, started again, stays a follower.
func TestScenarioF_ExtenderLeaderKilledTheOtherReplicaTakesOverAndSchedulingContinues(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	node := startGPUNode(ctx, t, s, "f-h100", "h100-sxm-8.yaml")
	nodes := []*harness.GPUNode{node}
	ns := newGPUNamespace(ctx, t, e, "failover")

	leader, err := s.Leader(ctx, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Replicas()) != 2 {
		t.Fatalf("want 2 gpu-admission replicas, have %d", len(s.Replicas()))
	}
	var follower *harness.AdmissionReplica
	for _, r := range s.Replicas() {
		if r != leader {
			follower = r
		}
	}
	if follower.Ready() {
		t.Fatalf("follower %s reports ready next to leader %s", follower.Identity, leader.Identity)
	}
	if holder := leaseHolder(ctx, t, e); holder != leader.Identity {
		t.Fatalf("Lease held by %q, but the ready replica is %s", holder, leader.Identity)
	}

	// Different sizes per pod (see scenario e): this scenario is about the
	// failover, not about telling same-sized pods apart.
	size := 0
	next := func(prefix string, n int) []*v1.Pod {
		var out []*v1.Pod
		for i := 0; i < n; i++ {
			size++
			out = append(out, gpuPod(fmt.Sprintf("%s-%02d", prefix, size), int64(size), int64(size)))
		}
		return out
	}
	// Placed by the first leader.
	first := next("f", 4)
	createPods(ctx, t, e, ns, first)
	for _, p := range first {
		waitRunning(ctx, t, e, podRef(ns, p.Name))
	}
	// In flight when the leader dies.
	inflight := next("f", 8)
	createPods(ctx, t, e, ns, inflight)
	killedAt := time.Now()
	leader.Kill()

	// While nobody leads, the API server cannot reach the webhook (the
	// configuration's failurePolicy is Fail): creations are refused.
	probe := gpuPod("during-failover", 1, 1)
	if _, err := e.Client.CoreV1().Pods(ns).Create(ctx, probe, metav1.CreateOptions{}); err == nil {
		if len(s.Service.Endpoints()) == 0 || s.Service.Endpoints()[0] == leader.Identity {
			t.Fatal("a pod was admitted while no gpu-admission replica was ready")
		}
		// The takeover was already complete: fine, but then it must run.
		inflight = append(inflight, probe)
	} else if !strings.Contains(err.Error(), "failed calling webhook") {
		t.Fatalf("pod creation during the failover failed with %v, want the API server's webhook call failure", err)
	}

	if _, err := s.Service.WaitEndpoints(ctx, s.Opts.LeaseDuration+2*s.Opts.RetryPeriod+5*time.Second, "the follower", func(r []string) bool {
		return len(r) == 1 && r[0] == follower.Identity
	}); err != nil {
		t.Fatal(err)
	}
	takeover := time.Since(killedAt)
	bound := s.Opts.LeaseDuration + 2*s.Opts.RetryPeriod
	t.Logf("%s took over %s after %s was killed (lease duration %s, retry period %s)", follower.Identity, takeover.Round(time.Millisecond), leader.Identity, s.Opts.LeaseDuration, s.Opts.RetryPeriod)
	if takeover > bound {
		t.Fatalf("takeover took %s, more than lease duration + 2 × retry period = %s", takeover, bound)
	}
	if holder := leaseHolder(ctx, t, e); holder != follower.Identity {
		t.Fatalf("Lease held by %q after the takeover, want %s", holder, follower.Identity)
	}

	// Scheduling continues: the in-flight pods and new ones are placed by
	// the new leader.
	binds := extenderBinds(ctx, t, follower)
	after := next("f", 6)
	createPods(ctx, t, e, ns, after)
	for _, p := range append(append([]*v1.Pod(nil), inflight...), after...) {
		waitRunning(ctx, t, e, podRef(ns, p.Name))
	}
	if got := extenderBinds(ctx, t, follower); got < binds+float64(len(after)) {
		t.Fatalf("the new leader bound %v pods, want at least the %d created after the takeover", got-binds, len(after))
	}
	placed := eventuallyConsistent(ctx, t, e, nodes, ns, 30*time.Second)
	if want := len(first) + len(inflight) + len(after); len(placed) != want {
		t.Fatalf("%d pods running, want %d", len(placed), want)
	}

	// The old leader comes back (its Deployment would restart it) as a
	// follower: the Service keeps sending to the new leader only.
	if err := s.StartReplica(ctx, leader); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * s.Opts.RetryPeriod)
	if eps := s.Service.Endpoints(); len(eps) != 1 || eps[0] != follower.Identity {
		t.Fatalf("after the old leader restarted, ready replicas are %v, want only %s", eps, follower.Identity)
	}
}

func leaseHolder(ctx context.Context, t *testing.T, e *harness.Env) string {
	t.Helper()
	l, err := e.Client.CoordinationV1().Leases(harness.SystemNamespace).Get(ctx, harness.LeaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}
