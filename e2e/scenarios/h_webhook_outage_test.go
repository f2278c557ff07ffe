package scenarios

import (
	"context"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

const (
	validateHook = "validate.gpu-admission.gpu-manager.io"
	mutateHook   = "mutate.gpu-admission.gpu-manager.io"
)

// Scenario h — blast radius zero. The webhook configurations of
// deploy/manifests/webhooks.yaml carry CEL matchConditions: only objects
// that ask for tencent.com/vcuda-* resources or carry our annotations reach
// gpu-admission. While it is up, a pod with a reserved annotation and no
// GPU resources still reaches it (and is rejected as before) and a plain
// pod does not call it at all. With every gpu-admission replica stopped,
// plain pods, Deployments and Jobs are created normally, while a GPU pod and
// a GPU Deployment are refused by kube-apiserver with an error that names
// our webhook (failurePolicy Fail: GPU work fails closed). gpu-admission is
// then restarted, so later scenarios find the stack as before.
func TestScenarioH_WebhookOutageBlocksGPUWorkOnly(t *testing.T) {
	e := cluster(t)
	s := gpuStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ns := newGPUNamespace(ctx, t, e, "outage")
	pods := e.Client.CoreV1().Pods(ns)

	plainPod := func(name string) *v1.Pod {
		return &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{"example.com/note": "not ours"}},
			Spec: v1.PodSpec{
				TerminationGracePeriodSeconds: new(int64),
				Containers:                    []v1.Container{{Name: "main", Image: "registry.invalid/e2e/pause:1"}},
			},
		}
	}
	template := func(p *v1.Pod) v1.PodTemplateSpec {
		return v1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": p.Name}},
			Spec:       p.Spec,
		}
	}
	deployment := func(p *v1.Pod) *appsv1.Deployment {
		return &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: p.Name},
			Spec: appsv1.DeploymentSpec{
				Replicas: new(int32),
				Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": p.Name}},
				Template: template(p),
			},
		}
	}
	job := func(p *v1.Pod) *batchv1.Job {
		tpl := template(p)
		suspend := true
		tpl.Spec.RestartPolicy = v1.RestartPolicyNever
		return &batchv1.Job{
			ObjectMeta: metav1.ObjectMeta{Name: p.Name},
			Spec:       batchv1.JobSpec{Suspend: &suspend, Template: tpl},
		}
	}

	// While gpu-admission is up: a reserved annotation alone is enough to
	// reach the webhook, which rejects it as before.
	spoofed := plainPod("spoofed-idx")
	spoofed.Annotations["tencent.com/predicate-gpu-idx-0"] = "0"
	_, err := pods.Create(ctx, spoofed, metav1.CreateOptions{})
	if err == nil {
		t.Fatal("a pod with tencent.com/predicate-gpu-idx-0 and no GPU resources was admitted: the webhook was not called")
	}
	if msg := err.Error(); !strings.Contains(msg, validateHook) || !strings.Contains(msg, "denied the request") || !strings.Contains(msg, "reserved") {
		t.Fatalf("reserved annotation without GPU resources: got %q, want our webhook's reserved-annotation denial", msg)
	}
	// A plain pod is admitted without calling either webhook.
	before := webhookCalls(ctx, t, e)
	if _, err := pods.Create(ctx, plainPod("plain-up"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("plain pod while gpu-admission is up: %v", err)
	}
	after := webhookCalls(ctx, t, e)
	for _, hook := range []string{validateHook, mutateHook} {
		if after[hook] != before[hook] {
			t.Fatalf("kube-apiserver called %s for a pod without GPU resources or our annotations (calls %d -> %d)", hook, before[hook], after[hook])
		}
	}

	// Every replica down: the webhook's endpoint is unreachable.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := s.EnsureReady(ctx); err != nil {
			t.Errorf("restarting gpu-admission: %v", err)
		}
	})
	for _, r := range s.Replicas() {
		r.Kill()
	}
	if _, err := s.Service.WaitEndpoints(ctx, 30*time.Second, "no ready replica", func(r []string) bool { return len(r) == 0 }); err != nil {
		t.Fatal(err)
	}
	downAt := time.Now()

	// Non-GPU work goes on.
	if _, err := pods.Create(ctx, plainPod("plain-down"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("a pod without GPU resources was refused while gpu-admission is down: %v", err)
	}
	if _, err := e.Client.AppsV1().Deployments(ns).Create(ctx, deployment(plainPod("plain-deploy")), metav1.CreateOptions{}); err != nil {
		t.Fatalf("a Deployment without GPU resources was refused while gpu-admission is down: %v", err)
	}
	if _, err := e.Client.BatchV1().Jobs(ns).Create(ctx, job(plainPod("plain-job")), metav1.CreateOptions{}); err != nil {
		t.Fatalf("a Job without GPU resources was refused while gpu-admission is down: %v", err)
	}

	// GPU work fails closed, with an error that names our webhook.
	refused := func(what, hook string, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s was admitted while every gpu-admission replica is down", what)
		}
		msg := err.Error()
		if !strings.Contains(msg, "failed calling webhook") || !strings.Contains(msg, hook) {
			t.Fatalf("%s while gpu-admission is down: got %q, want kube-apiserver's failure calling %s", what, msg, hook)
		}
		t.Logf("%s refused: %s", what, msg)
	}
	_, err = pods.Create(ctx, gpuPod("gpu-down", 30, 20), metav1.CreateOptions{})
	refused("a GPU pod (30 vcuda-core, 20 vcuda-memory)", mutateHook, err)
	_, err = e.Client.AppsV1().Deployments(ns).Create(ctx, deployment(gpuPod("gpu-deploy", 30, 20)), metav1.CreateOptions{})
	refused("a GPU Deployment", validateHook, err)
	annotated := plainPod("annotated-down")
	annotated.Annotations["tencent.com/vcuda-limiter"] = "disabled"
	_, err = pods.Create(ctx, annotated, metav1.CreateOptions{})
	refused("a pod with tencent.com/vcuda-limiter", mutateHook, err)

	// Back up: GPU pods are admitted again.
	if err := s.EnsureReady(ctx); err != nil {
		t.Fatal(err)
	}
	var last error
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, last = pods.Create(ctx, gpuPod("gpu-up", 30, 20), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return last == nil, nil
	}); err != nil {
		t.Fatalf("GPU pod after gpu-admission restarted: %v (last error %v)", err, last)
	}
	t.Logf("gpu-admission down for %s; GPU pods admitted again after the restart", time.Since(downAt).Round(time.Millisecond))
}
