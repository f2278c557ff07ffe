package nodeagent

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
	podresourcesv1alpha1 "k8s.io/kubelet/pkg/apis/podresources/v1alpha1"
	apisgrpc "k8s.io/kubernetes/pkg/kubelet/apis/grpc"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
)

// devicesProvider adapts the device manager to the pod-resources server, the
// job the kubelet's container manager does (GetDevices /
// GetAllocatableDevices): one ContainerDevices entry per device and NUMA node.
type devicesProvider struct {
	dm *devicemanager.ManagerImpl
}

func (p devicesProvider) UpdateAllocatedDevices(logger klog.Logger) {
	p.dm.UpdateAllocatedDevices(logger)
}

func (p devicesProvider) GetDevices(podUID, containerName string) []*podresourcesv1.ContainerDevices {
	return toContainerDevices(p.dm.GetDevices(podUID, containerName))
}

func (p devicesProvider) GetAllocatableDevices(logger klog.Logger) []*podresourcesv1.ContainerDevices {
	return toContainerDevices(p.dm.GetAllocatableDevices(logger))
}

func toContainerDevices(devs devicemanager.ResourceDeviceInstances) []*podresourcesv1.ContainerDevices {
	var out []*podresourcesv1.ContainerDevices
	for resource, instances := range devs {
		for id, dev := range instances {
			nodes := dev.GetTopology().GetNodes()
			if len(nodes) == 0 {
				out = append(out, &podresourcesv1.ContainerDevices{ResourceName: resource, DeviceIds: []string{id}})
				continue
			}
			for _, n := range nodes {
				out = append(out, &podresourcesv1.ContainerDevices{
					ResourceName: resource,
					DeviceIds:    []string{id},
					Topology:     &podresourcesv1.TopologyInfo{Nodes: []*podresourcesv1.NUMANode{{ID: n.GetID()}}},
				})
			}
		}
	}
	return out
}

// noExclusiveResources answers for the CPU, memory and DRA managers, which the
// agent does not run (a kubelet with the "none" CPU and memory policies
// reports nothing for them either).
type noExclusiveResources struct{}

func (noExclusiveResources) GetCPUs(*v1.Pod, *v1.Container) []int64 { return nil }
func (noExclusiveResources) GetPodCPUs(string) []int64              { return nil }
func (noExclusiveResources) GetAllocatableCPUs() []int64            { return nil }
func (noExclusiveResources) GetMemory(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesv1.ContainerMemory {
	return nil
}
func (noExclusiveResources) GetPodMemory(klog.Logger, string) []*podresourcesv1.ContainerMemory {
	return nil
}
func (noExclusiveResources) GetAllocatableMemory(klog.Logger) []*podresourcesv1.ContainerMemory {
	return nil
}
func (noExclusiveResources) GetDynamicResources(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesv1.DynamicResource {
	return nil
}

// servePodResources serves the kubelet's own pod-resources servers (v1 and
// v1alpha1) on a unix socket, with the kubelet's rate limit, until ctx ends.
// It mirrors k8s.io/kubernetes/pkg/kubelet/server.ListenAndServePodResources,
// which cannot be used directly because it exits the process on error and
// never stops.
func servePodResources(ctx context.Context, socket string, providers podresources.PodResourcesProviders) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(socket), 0o750); err != nil {
		return nil, fmt.Errorf("creating pod-resources dir: %w", err)
	}
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("removing stale pod-resources socket: %w", err)
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("listening on pod-resources socket %q: %w", socket, err)
	}
	server := grpc.NewServer(apisgrpc.WithRateLimiter(ctx, "podresources", podresources.DefaultQPS, podresources.DefaultBurstTokens))
	podresourcesv1alpha1.RegisterPodResourcesListerServer(server, podresources.NewV1alpha1PodResourcesServer(providers))
	podresourcesv1.RegisterPodResourcesListerServer(server, podresources.NewV1PodResourcesServer(ctx, providers))
	logger := klog.FromContext(ctx)
	go func() {
		logger.Info("Serving the pod-resources API", "socket", socket)
		if err := server.Serve(l); err != nil {
			logger.Error(err, "pod-resources server stopped")
		}
	}()
	return func() {
		server.Stop()
		_ = os.Remove(socket)
	}, nil
}
