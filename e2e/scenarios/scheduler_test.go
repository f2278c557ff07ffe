package scenarios

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The scheduler really runs with the configuration file it is given (as it
// will with deploy/scheduler/kube-scheduler-config.yaml): a profile that
// exists only in the file places a pod that names it.
func TestSchedulerRestartsWithAConfigFileAndUsesItsProfiles(t *testing.T) {
	e := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const res = "e2e.gpumanager.local/sched"

	cfg := filepath.Join(t.TempDir(), "kube-scheduler-config.yaml")
	if err := os.WriteFile(cfg, []byte(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
profiles:
- schedulerName: default-scheduler
- schedulerName: e2e-binpack
  pluginConfig:
  - name: NodeResourcesFit
    args:
      scoringStrategy:
        type: MostAllocated
        resources:
        - name: `+res+`
          weight: 1
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.Cluster.RestartScheduler(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Cluster.RestartScheduler(context.Background(), os.Getenv("E2E_SCHEDULER_CONFIG")); err != nil {
			t.Errorf("restoring the scheduler: %v", err)
		}
	})

	node, _ := startStubNode(ctx, t, e, "sched-1", res, 2)
	ns := newNamespace(ctx, t, e, "sched")
	p := devicePod("binpacked", res, 1, "")
	p.Spec.SchedulerName = "e2e-binpack"
	got := waitRunning(ctx, t, e, createPod(ctx, t, e, ns, p))
	if got.Spec.NodeName != node.Name {
		t.Fatalf("pod placed on %q, want %q", got.Spec.NodeName, node.Name)
	}
}
