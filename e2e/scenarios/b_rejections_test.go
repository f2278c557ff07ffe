package scenarios

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// Scenario b — what a user sees at `kubectl apply` (the built kubectl, as a
// ServiceAccount that may manage pods, i.e. not one of the accounts our
// webhook trusts with the placement annotations): a valid pod is admitted
// and runs; 150 cores, memory without cores, memory larger than any card, a
// spoofed tencent.com/predicate-gpu-idx-0 and a pod over its namespace's
// GpuQuota are rejected by kube-apiserver with our webhook's message.
func TestScenarioB_InvalidRequestsAreRejectedAtKubectlApplyWithOurMessages(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	startGPUNode(ctx, t, s, "b-t4", "t4-pcie-4.yaml")
	ns := newGPUNamespace(ctx, t, e, "reject")

	// A normal user: ServiceAccount "mallory" allowed to manage pods in
	// the namespace. (The built-in "edit" role is aggregated by
	// kube-controller-manager, which does not run here, so it is empty.)
	if _, err := e.Client.RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "pod-editor"},
		Rules: []rbacv1.PolicyRule{{
			APIGroups: []string{""}, Resources: []string{"pods"},
			Verbs: []string{"get", "list", "watch", "create", "update", "patch", "delete"},
		}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Client.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "mallory-pod-editor"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "pod-editor"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "mallory", Namespace: ns}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mallory, err := e.ServiceAccountKubeconfig(ctx, ns, "mallory")
	if err != nil {
		t.Fatal(err)
	}
	user := "system:serviceaccount:" + ns + ":mallory"
	apply := func(manifest string) (string, error) {
		out, stderr, err := e.KubectlAs(ctx, mallory, manifest, "apply", "-n", ns, "-f", "-")
		return strings.TrimSpace(out + stderr), err
	}
	const denied = `admission webhook "validate.gpu-admission.gpu-manager.io" denied the request: `

	// Positive control: the same user's valid pod is admitted and runs.
	if out, err := apply(podYAML("ok", "30", "20", "")); err != nil {
		t.Fatalf("a valid pod was refused: %v: %s", err, out)
	}
	waitRunning(ctx, t, e, podRef(ns, "ok"))

	// kubectl shows the status code: 422 (Invalid) for request rules, 403
	// (Forbidden) for reserved annotations and quota.
	const invalid, forbidden = "The request is invalid: ", "Error from server (Forbidden): "
	cases := []struct {
		name, manifest, code, want string
	}{{
		"150 cores",
		podYAML("cores-150", "150", "", ""), invalid,
		`Pod ` + ns + `/cores-150: container "main": tencent.com/vcuda-core=150 is invalid: use 1-99 for a share of one card or a multiple of 100 for whole cards`,
	}, {
		"memory without cores",
		podYAML("memory-only", "", "4", ""), invalid,
		`Pod ` + ns + `/memory-only: container "main": tencent.com/vcuda-memory=4 is invalid without tencent.com/vcuda-core: set tencent.com/vcuda-core to 1-99 for a share of one card (with tencent.com/vcuda-memory in 256 MiB blocks) or to a multiple of 100 for whole cards`,
	}, {
		"memory larger than any card (the only node has Tesla T4s: 60 blocks)",
		podYAML("memory-61", "30", "61", ""), invalid,
		`Pod ` + ns + `/memory-61: container "main": tencent.com/vcuda-memory=61 (15616 MiB) is larger than the largest card in the cluster, Tesla T4 with 15 GiB = 60 blocks of 256 MiB: ask for at most 60`,
	}, {
		"spoofed predicate-gpu-idx-0",
		podYAML("spoofed", "30", "20", "1"), forbidden,
		`Pod ` + ns + `/spoofed: annotation tencent.com/predicate-gpu-idx-0 (card indices of container "main") is reserved for the GPU scheduler extender and device plugin (system:serviceaccount:kube-system:gpu-admission, system:serviceaccount:kube-system:gpu-manager); user "` + user + `" may not set it to "1": remove it from the object (placement is chosen at scheduling time)`,
	}}
	for _, c := range cases {
		out, err := apply(c.manifest)
		if err == nil {
			t.Fatalf("%s: kubectl apply succeeded, want a denial: %s", c.name, out)
		}
		if !strings.HasPrefix(out, c.code) || !strings.Contains(out, denied+c.want) {
			t.Fatalf("%s: kubectl said\n  %s\nwant\n  %s…%s%s", c.name, out, c.code, denied, c.want)
		}
		t.Logf("%s: %s", c.name, out)
	}

	// Quota: at most 150 vcuda-core of T4 cards in this namespace. The
	// admin creates it; the webhook enforces it once gpu-admission has read
	// it (its status is written by the leader).
	dyn, err := dynamic.NewForConfig(e.Cluster.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	gvr := schema.GroupVersionResource{Group: "gpu.tkestack.io", Version: "v1alpha1", Resource: "gpuquotas"}
	quota := &unstructured.Unstructured{Object: map[string]interface{}{
		"apiVersion": "gpu.tkestack.io/v1alpha1",
		"kind":       "GpuQuota",
		"metadata":   map[string]interface{}{"name": "gpu", "namespace": ns},
		"spec": map[string]interface{}{
			"limits": []interface{}{map[string]interface{}{"model": "T4", "vcudaCore": int64(150)}},
		},
	}}
	if _, err := dyn.Resource(gvr).Namespace(ns).Create(ctx, quota, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating GpuQuota: %v", err)
	}
	waitQuotaObserved(ctx, t, dyn, gvr, ns, "gpu")
	// Within quota (30 of the running pod + 100): admitted and running.
	if out, err := apply(podYAML("whole-card", "100", "", "")); err != nil {
		t.Fatalf("a pod within quota was refused: %v: %s", err, out)
	}
	waitRunning(ctx, t, e, podRef(ns, "whole-card"))
	out, err := apply(podYAML("over-quota", "100", "", ""))
	if err == nil {
		t.Fatalf("over-quota pod admitted: %s", out)
	}
	want := `Pod ` + ns + `/over-quota: exceeds GpuQuota ` + ns + `/gpu: limits[0] (model "T4"): tencent.com/vcuda-core used 130 + requested 100 > limit 150`
	if !strings.HasPrefix(out, forbidden) || !strings.Contains(out, denied+want) {
		t.Fatalf("over quota: kubectl said\n  %s\nwant\n  %s…%s%s", out, forbidden, denied, want)
	}
	t.Logf("over quota: %s", out)
}

// podYAML is a pod manifest as a user writes it; empty values are left out.
func podYAML(name, cores, mem, spoofedIdx string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: %s\n", name)
	if spoofedIdx != "" {
		fmt.Fprintf(&b, "  annotations:\n    tencent.com/predicate-gpu-idx-0: %q\n", spoofedIdx)
	}
	b.WriteString("spec:\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    image: registry.invalid/e2e/cuda:1\n    resources:\n      limits:\n")
	if cores != "" {
		fmt.Fprintf(&b, "        tencent.com/vcuda-core: %q\n", cores)
	}
	if mem != "" {
		fmt.Fprintf(&b, "        tencent.com/vcuda-memory: %q\n", mem)
	}
	return b.String()
}

// waitQuotaObserved waits until gpu-admission wrote the GpuQuota's status
// for its current generation: from then on the webhook enforces it.
func waitQuotaObserved(ctx context.Context, t *testing.T, dyn dynamic.Interface, gvr schema.GroupVersionResource, ns, name string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		u, err := dyn.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		observed, _, _ := unstructured.NestedInt64(u.Object, "status", "observedGeneration")
		if observed == u.GetGeneration() {
			status, _ := json.Marshal(u.Object["status"])
			t.Logf("GpuQuota %s/%s status: %s", ns, name, status)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("gpu-admission never wrote the status of GpuQuota %s/%s generation %d (status: %v)", ns, name, u.GetGeneration(), u.Object["status"])
		}
		time.Sleep(200 * time.Millisecond)
	}
}
