package nodeagent

import (
	"os"
	"path/filepath"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/config"
)

// Guards the go:linkname to the device manager's unexported constructor: the
// toolchain checks only that the symbol exists, so a changed signature would
// show up here as a crash or a socket in the wrong place.
func TestDeviceManagerServesKubeletSockInTheDirectoryGiven(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "device-plugins")
	logger := klog.Background()
	tm, err := topologymanager.NewManager(logger, nil, topologymanager.PolicyNone, topologymanager.ContainerTopologyScope, nil)
	if err != nil {
		t.Fatal(err)
	}
	dm, err := NewDeviceManager(logger, dir, tm)
	if err != nil {
		t.Fatal(err)
	}
	ready := config.NewSourcesReady(func(sets.Set[string]) bool { return true })
	if err := dm.Start(logger, func() []*v1.Pod { return nil }, ready, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = dm.Stop(logger) }()
	if fi, err := os.Stat(filepath.Join(dir, "kubelet.sock")); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("kubelet.sock not served in %s: %v", dir, err)
	}
	capacity, allocatable, _ := dm.GetCapacity(logger)
	if len(capacity) != 0 || len(allocatable) != 0 {
		t.Fatalf("no plugin registered, yet capacity=%v allocatable=%v", capacity, allocatable)
	}
}
