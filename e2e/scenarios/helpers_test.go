package scenarios

// Helpers shared by the scenarios.

import (
	"context"
	"sort"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"gpumanager.local/e2e/internal/harness"
	"gpumanager.local/e2e/internal/nodeagent"
)

type nodeagentContainer = nodeagent.Container

func startStubNode(ctx context.Context, t *testing.T, e *harness.Env, name, res string, devices int) (*harness.Node, *harness.StubPlugin) {
	t.Helper()
	node, err := e.StartNode(ctx, name, harness.NodeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Remove(context.Background()); err != nil {
			t.Error(err)
		}
	})
	stub, err := harness.StartStubPlugin(ctx, node, "stub", res, harness.StubDevices("dev", devices))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stub.Close)
	if _, err := e.WaitNode(ctx, name, podTimeout, "advertising the stub devices", func(n *v1.Node) bool {
		return harness.Allocatable(n, res) == int64(devices) && n.Status.Capacity.Name(v1.ResourceName(res), resource.DecimalSI).Value() == int64(devices)
	}); err != nil {
		t.Fatal(err)
	}
	return node, stub
}

func newNamespace(ctx context.Context, t *testing.T, e *harness.Env, prefix string) string {
	t.Helper()
	ns, err := e.NewNamespace(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

func devicePod(name, res string, count int64, nodeName string) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1.PodSpec{
			NodeName:                      nodeName,
			TerminationGracePeriodSeconds: new(int64),
			Containers: []v1.Container{{
				Name:  "main",
				Image: "registry.invalid/e2e/pause:1",
				Resources: v1.ResourceRequirements{Limits: v1.ResourceList{
					v1.ResourceName(res): *resource.NewQuantity(count, resource.DecimalSI),
				}},
			}},
		},
	}
}

func createPod(ctx context.Context, t *testing.T, e *harness.Env, ns string, p *v1.Pod) *v1.Pod {
	t.Helper()
	created, err := e.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s: %v", p.Name, err)
	}
	return created
}

func waitRunning(ctx context.Context, t *testing.T, e *harness.Env, p *v1.Pod) *v1.Pod {
	t.Helper()
	got, err := e.WaitPod(ctx, p.Namespace, p.Name, podTimeout, "Running", func(p *v1.Pod) bool {
		return p.Status.Phase == v1.PodRunning || p.Status.Phase == v1.PodFailed
	})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != v1.PodRunning {
		t.Fatalf("pod %s/%s failed instead of running: %s", p.Namespace, p.Name, harness.DescribePod(got))
	}
	return got
}

// statusDeviceIDs returns the device IDs of res the kubelet reported in the
// pod's containerStatuses[].allocatedResourcesStatus, sorted.
func statusDeviceIDs(p *v1.Pod, res string) []string {
	var ids []string
	for _, cs := range p.Status.ContainerStatuses {
		for _, rs := range cs.AllocatedResourcesStatus {
			if string(rs.Name) != res {
				continue
			}
			for _, r := range rs.Resources {
				ids = append(ids, string(r.ResourceID))
			}
		}
	}
	return sorted(ids)
}

func podResourcesDevices(ctx context.Context, t *testing.T, n *harness.Node, ns, pod, container, res string) []string {
	t.Helper()
	return podResourcesByPod(ctx, t, n, ns, container, res)[pod]
}

// podResourcesByPod lists the node's pod-resources once and returns, per pod
// of namespace ns, the sorted device IDs of res held by the named container.
func podResourcesByPod(ctx context.Context, t *testing.T, n *harness.Node, ns, container, res string) map[string][]string {
	t.Helper()
	client, conn, err := n.PodResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, err := client.List(ctx, &podresourcesv1.ListPodResourcesRequest{})
	if err != nil {
		t.Fatalf("pod-resources List: %v", err)
	}
	out := map[string][]string{}
	for _, pr := range resp.PodResources {
		if pr.Namespace != ns {
			continue
		}
		for _, c := range pr.Containers {
			if c.Name != container {
				continue
			}
			for _, d := range c.Devices {
				if d.ResourceName == res {
					out[pr.Name] = append(out[pr.Name], d.DeviceIds...)
				}
			}
		}
	}
	for k := range out {
		out[k] = sorted(out[k])
	}
	return out
}

func allocatableDevices(ctx context.Context, t *testing.T, n *harness.Node, res string) []string {
	t.Helper()
	client, conn, err := n.PodResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, err := client.GetAllocatableResources(ctx, &podresourcesv1.AllocatableResourcesRequest{})
	if err != nil {
		t.Fatalf("pod-resources GetAllocatableResources: %v", err)
	}
	var ids []string
	for _, d := range resp.Devices {
		if d.ResourceName == res {
			ids = append(ids, d.DeviceIds...)
		}
	}
	return sorted(ids)
}

func findContainer(t *testing.T, n *harness.Node, p *v1.Pod, name string) nodeagentContainer {
	t.Helper()
	list, err := n.Containers()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range list {
		if c.PodUID == p.UID && c.ContainerName == name {
			return c
		}
	}
	t.Fatalf("node %s recorded no container %s for pod %s", n.Name, name, p.Name)
	return nodeagentContainer{}
}

func hasEnv(c nodeagentContainer, name, value string) bool {
	for _, e := range c.DeviceOptions.Envs {
		if e.Name == name && e.Value == value {
			return true
		}
	}
	return false
}

func hasCondition(p *v1.Pod, typ v1.PodConditionType, status v1.ConditionStatus, reason string) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == typ && c.Status == status && c.Reason == reason {
			return true
		}
	}
	return false
}

func sorted(s []string) []string {
	out := append([]string(nil), s...)
	sort.Strings(out)
	return out
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
