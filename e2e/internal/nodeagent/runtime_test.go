package nodeagent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	kubecontainer "k8s.io/kubernetes/pkg/kubelet/container"
)

func TestRuntimeStateSurvivesARestartAndFeedsTheDeviceManagersRunningSet(t *testing.T) {
	dir := t.TempDir()
	rt, err := LoadRuntime(dir)
	if err != nil {
		t.Fatal(err)
	}
	app := Container{ID: rt.NewContainerID(), PodUID: "pod-1", PodNamespace: "ns", PodName: "p", ContainerName: "main", Running: true,
		StartedAt:     time.Unix(100, 0).UTC(),
		DeviceOptions: &devicemanager.DeviceRunContainerOptions{Envs: []kubecontainer.EnvVar{{Name: "NVIDIA_VISIBLE_DEVICES", Value: "GPU-1"}}}}
	init := Container{ID: rt.NewContainerID(), PodUID: "pod-1", PodNamespace: "ns", PodName: "p", ContainerName: "init", Init: true}
	for _, c := range []Container{app, init} {
		if err := rt.Add(c); err != nil {
			t.Fatal(err)
		}
	}

	again, err := LoadRuntime(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, ok := again.Find("pod-1", "main")
	if !ok || got.ID != app.ID || got.DeviceOptions == nil || got.DeviceOptions.Envs[0].Value != "GPU-1" {
		t.Fatalf("after reload Find(main) = %+v, %v; want the recorded container with its run options", got, ok)
	}
	cm, running := again.ContainerMap()
	if id, err := cm.GetContainerID("pod-1", "init"); err != nil || id != init.ID {
		t.Fatalf("container map has init as %q (%v), want %q", id, err, init.ID)
	}
	if !running.Has(app.ID) || running.Has(init.ID) {
		t.Fatalf("running set = %v, want only the app container %s", running, app.ID)
	}

	ids, err := again.RemovePod("pod-1")
	if err != nil || len(ids) != 2 {
		t.Fatalf("RemovePod = %v, %v; want both containers", ids, err)
	}
	list, err := ReadRuntimeState(dir)
	if err != nil || len(list) != 0 {
		t.Fatalf("state after RemovePod = %v, %v; want empty", list, err)
	}
}

func TestCorruptRuntimeStateIsReportedWithItsPath(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, RuntimeStateFile), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadRuntime(dir)
	if err == nil || !strings.Contains(err.Error(), RuntimeStateFile) || !strings.Contains(err.Error(), "not valid JSON") {
		t.Fatalf("err = %v, want an error naming %s as invalid JSON", err, RuntimeStateFile)
	}
}
