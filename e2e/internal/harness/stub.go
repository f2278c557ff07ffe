package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	plugin "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1"
)

// StubPlugin is the kubelet's own test device plugin (plugin/v1beta1.Stub)
// registered with a node's device manager: the stand-in for gpu-manager
// while proving the harness. It re-registers when the node agent restarts.
type StubPlugin struct {
	*plugin.Stub
	Resource string
	node     *Node
	cancel   context.CancelFunc
	done     chan struct{}

	mu        sync.Mutex
	preferred []*pluginapi.PreferredAllocationRequest
	allocated [][]string
}

// StartStubPlugin serves the stub on <node dir>/device-plugins/<name>.sock
// with the given devices, registers it for resource, and keeps it registered
// across node-agent restarts. GetPreferredAllocation prefers the highest
// device IDs (sorted descending) so tests can tell the preference was used;
// Allocate answers STUB_DEVICES=<ids> and one device node per ID.
func StartStubPlugin(ctx context.Context, n *Node, name, resource string, devs []*pluginapi.Device) (*StubPlugin, error) {
	logger := klog.Background().WithValues("stub", name)
	socket := filepath.Join(n.DevicePluginDir, name+".sock")
	s := &StubPlugin{Resource: resource, node: n, done: make(chan struct{})}
	s.Stub = plugin.NewDevicePluginStub(logger, devs, socket, resource, true, true)
	s.SetGetPreferredAllocFunc(func(r *pluginapi.PreferredAllocationRequest, _ map[string]*pluginapi.Device) (*pluginapi.PreferredAllocationResponse, error) {
		s.mu.Lock()
		s.preferred = append(s.preferred, r)
		s.mu.Unlock()
		resp := &pluginapi.PreferredAllocationResponse{}
		for _, c := range r.ContainerRequests {
			resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerPreferredAllocationResponse{
				DeviceIDs: preferHighest(c.AvailableDeviceIDs, c.MustIncludeDeviceIDs, int(c.AllocationSize)),
			})
		}
		return resp, nil
	})
	s.SetAllocFunc(func(r *pluginapi.AllocateRequest, _ map[string]*pluginapi.Device) (*pluginapi.AllocateResponse, error) {
		resp := &pluginapi.AllocateResponse{}
		for _, c := range r.ContainerRequests {
			s.mu.Lock()
			s.allocated = append(s.allocated, append([]string(nil), c.DevicesIds...))
			s.mu.Unlock()
			cr := &pluginapi.ContainerAllocateResponse{Envs: map[string]string{"STUB_DEVICES": joinSorted(c.DevicesIds)}}
			for _, id := range c.DevicesIds {
				cr.Devices = append(cr.Devices, &pluginapi.DeviceSpec{ContainerPath: "/dev/" + id, HostPath: "/dev/null", Permissions: "rw"})
			}
			resp.ContainerResponses = append(resp.ContainerResponses, cr)
		}
		return resp, nil
	})
	if err := s.Start(ctx); err != nil {
		return nil, fmt.Errorf("starting stub plugin: %w", err)
	}
	if err := s.Register(ctx, n.KubeletSocket, resource, ""); err != nil {
		return nil, fmt.Errorf("registering stub plugin: %w", err)
	}
	wctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	go s.keepRegistered(wctx, logger)
	return s, nil
}

// keepRegistered re-registers whenever kubelet.sock is recreated (new inode
// or change time), which is how a device plugin notices a kubelet restart.
func (s *StubPlugin) keepRegistered(ctx context.Context, logger klog.Logger) {
	defer close(s.done)
	last := FileIdentity(s.node.KubeletSocket)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
		cur := FileIdentity(s.node.KubeletSocket)
		if cur == "" || cur == last {
			continue
		}
		logger.Info("kubelet.sock recreated, re-registering")
		if err := s.Restart(ctx); err != nil {
			logger.Error(err, "Restarting stub server")
			continue
		}
		if err := s.Register(ctx, s.node.KubeletSocket, s.Resource, ""); err != nil {
			logger.Error(err, "Re-registering stub")
			continue
		}
		last = cur
	}
}

// Close stops re-registration and the stub's server.
func (s *StubPlugin) Close() {
	s.cancel()
	<-s.done
	_ = s.Stop(klog.Background())
}

// PreferredRequests returns the GetPreferredAllocation requests received.
func (s *StubPlugin) PreferredRequests() []*pluginapi.PreferredAllocationRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*pluginapi.PreferredAllocationRequest(nil), s.preferred...)
}

// Allocations returns the device ID lists of the Allocate calls received.
func (s *StubPlugin) Allocations() [][]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]string(nil), s.allocated...)
}

// StubDevices returns n healthy devices named <prefix>-0 … <prefix>-(n-1).
func StubDevices(prefix string, n int) []*pluginapi.Device {
	devs := make([]*pluginapi.Device, n)
	for i := range devs {
		devs[i] = &pluginapi.Device{ID: fmt.Sprintf("%s-%d", prefix, i), Health: pluginapi.Healthy}
	}
	return devs
}

// FileIdentity tells apart two files created at the same path: inode plus
// change time ("" when the file does not exist). Inode numbers alone can be
// reused right after a delete.
func FileIdentity(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return ""
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return fmt.Sprintf("%d/%d.%09d", st.Ino, st.Ctim.Sec, st.Ctim.Nsec)
	}
	return fi.ModTime().String()
}

// preferHighest returns mustInclude plus the highest remaining available IDs
// (string order) up to size.
func preferHighest(available, mustInclude []string, size int) []string {
	out := append([]string(nil), mustInclude...)
	taken := map[string]bool{}
	for _, id := range mustInclude {
		taken[id] = true
	}
	rest := append([]string(nil), available...)
	sort.Sort(sort.Reverse(sort.StringSlice(rest)))
	for _, id := range rest {
		if len(out) >= size {
			break
		}
		if !taken[id] {
			out = append(out, id)
			taken[id] = true
		}
	}
	return out
}

func joinSorted(ids []string) string {
	s := append([]string(nil), ids...)
	sort.Strings(s)
	return strings.Join(s, ",")
}
