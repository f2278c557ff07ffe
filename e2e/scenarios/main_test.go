// Package scenarios holds the end-to-end scenarios. They share one control
// plane per test binary (started on first use); each test starts its own
// simulated nodes and works in its own namespace. Run them with e2e/run.sh.
package scenarios

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"k8s.io/klog/v2"

	"gpumanager.local/e2e/internal/harness"
)

var (
	envOnce sync.Once
	env     *harness.Env
	envErr  error
)

// cluster returns the shared control plane, starting it on first use.
func cluster(t *testing.T) *harness.Env {
	t.Helper()
	envOnce.Do(func() {
		env, envErr = harness.Start(context.Background(), os.Getenv(harness.EnvSchedulerConfig))
		if envErr == nil {
			quietKlog(filepath.Join(env.RunDir, "logs", "scenarios.log"))
			tm := env.Cluster.Timings
			fmt.Printf("e2e: control plane ready in %s (kube-apiserver ready after %s, kube-scheduler after %s); run dir %s\n",
				tm.Total.Round(1e6), tm.APIServerReady.Round(1e6), tm.SchedulerReady.Round(1e6), env.RunDir)
		}
	})
	if envErr != nil {
		t.Fatalf("control plane: %v", envErr)
	}
	return env
}

func TestMain(m *testing.M) {
	code := m.Run()
	if env != nil {
		if kept := env.Close(code != 0); kept != "" {
			fmt.Printf("e2e: run dir kept for inspection: %s\n", kept)
		}
	}
	os.Exit(code)
}

// quietKlog sends the in-process klog output (the stub plugins' logs) to a
// file in the run directory instead of the test output.
func quietKlog(path string) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	for k, v := range map[string]string{"logtostderr": "false", "alsologtostderr": "false", "stderrthreshold": "FATAL"} {
		_ = fs.Set(k, v)
	}
	klog.SetOutput(f)
}
