package nodeagent

import (
	"context"
	"fmt"
	"sort"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"
	podutil "k8s.io/kubernetes/pkg/api/v1/pod"
	"k8s.io/kubernetes/pkg/apis/core/v1/helper/qos"
	"k8s.io/kubernetes/pkg/features"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
	kubetypes "k8s.io/kubernetes/pkg/kubelet/types"
	"k8s.io/utils/ptr"
)

// ContainerIDPrefix is the runtime prefix of container IDs in pod status.
const ContainerIDPrefix = "fake://"

func (a *Agent) enqueue(obj interface{}) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return
	}
	a.queue.Add(key)
}

func (a *Agent) processNext(ctx context.Context) bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	if err := a.syncPod(ctx, key); err != nil {
		klog.FromContext(ctx).Info("Pod sync failed, will retry", "pod", key, "err", err)
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

// resyncExistingPods runs every pod already bound to the node through
// syncPod in creation order, as a restarted kubelet's HandlePodAdditions does.
func (a *Agent) resyncExistingPods(ctx context.Context) error {
	pods, err := a.podLister.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("listing pods: %w", err)
	}
	sort.Slice(pods, func(i, j int) bool {
		return pods[i].CreationTimestamp.Before(&pods[j].CreationTimestamp)
	})
	for _, p := range pods {
		key, err := cache.MetaNamespaceKeyFunc(p)
		if err != nil {
			continue
		}
		if err := a.syncPod(ctx, key); err != nil {
			klog.FromContext(ctx).Info("Pod sync failed at start-up, will retry", "pod", key, "err", err)
			a.queue.AddRateLimited(key)
		}
	}
	return nil
}

func (a *Agent) syncPod(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	pod, err := a.podLister.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		a.mu.Lock()
		uid, ok := a.byKey[key]
		delete(a.byKey, key)
		a.mu.Unlock()
		if ok {
			a.dropPod(ctx, uid)
		}
		return nil
	}
	if err != nil {
		return err
	}
	a.mu.Lock()
	oldUID, known := a.byKey[key]
	a.byKey[key] = pod.UID
	a.mu.Unlock()
	if known && oldUID != pod.UID {
		a.dropPod(ctx, oldUID)
	}

	if pod.DeletionTimestamp != nil {
		return a.terminatePod(ctx, pod)
	}
	if isTerminal(pod) {
		return nil
	}
	a.mu.Lock()
	rejectedStatus, rejected := a.rejected[pod.UID]
	terminated := a.terminated.Has(pod.UID)
	_, admitted := a.admitted[pod.UID]
	started := a.started.Has(pod.UID)
	a.mu.Unlock()
	switch {
	case terminated:
		return nil
	case rejected:
		if pod.Status.Phase != v1.PodFailed {
			return a.writeStatus(ctx, pod, rejectedStatus)
		}
		return nil
	case started:
		a.mu.Lock()
		dirty := a.statusDirty.Has(pod.UID)
		a.statusDirty.Delete(pod.UID)
		a.mu.Unlock()
		if pod.Status.Phase != v1.PodRunning || dirty {
			return a.writeStatus(ctx, pod, a.runningStatus(ctx, pod))
		}
		return nil
	}
	if !admitted {
		ok, err := a.admit(ctx, pod)
		if err != nil || !ok {
			return err
		}
	}
	return a.startPod(ctx, pod)
}

// admit runs the kubelet's admit handlers in the kubelet's order. A rejected
// pod is set Failed with the handler's reason and message.
func (a *Agent) admit(ctx context.Context, pod *v1.Pod) (bool, error) {
	attrs := &lifecycle.PodAdmitAttributes{Pod: pod, OtherPods: a.admittedPods(pod.UID), Operation: lifecycle.AddOperation}
	for _, h := range a.admitHandlers {
		r := h.Admit(ctx, attrs)
		if r.Admit {
			continue
		}
		klog.FromContext(ctx).Info("Pod rejected", "pod", klog.KObj(pod), "reason", r.Reason, "message", r.Message)
		status := v1.PodStatus{
			QOSClass: qos.GetPodQOS(pod),
			Phase:    v1.PodFailed,
			Reason:   r.Reason,
			Message:  "Pod was rejected: " + r.Message,
		}
		a.mu.Lock()
		a.rejected[pod.UID] = status
		a.mu.Unlock()
		a.recorder.Eventf(pod, v1.EventTypeWarning, r.Reason, "%s", r.Message)
		return false, a.writeStatus(ctx, pod, status)
	}
	a.mu.Lock()
	a.admitted[pod.UID] = pod
	a.mu.Unlock()
	return true, nil
}

// startPod creates every container (init containers first) through the
// device manager's GetDeviceRunContainerOptions, which calls the plugin's
// PreStartContainer when it asks for it, then reports the pod Running.
func (a *Agent) startPod(ctx context.Context, pod *v1.Pod) error {
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		if err := a.startContainer(ctx, pod, c, true); err != nil {
			return a.containerStartFailed(ctx, pod, c.Name, err)
		}
	}
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		if err := a.startContainer(ctx, pod, c, false); err != nil {
			return a.containerStartFailed(ctx, pod, c.Name, err)
		}
	}
	a.mu.Lock()
	a.started.Insert(pod.UID)
	a.mu.Unlock()
	return a.writeStatus(ctx, pod, a.runningStatus(ctx, pod))
}

func (a *Agent) startContainer(ctx context.Context, pod *v1.Pod, c *v1.Container, init bool) error {
	if _, ok := a.runtime.Find(pod.UID, c.Name); ok {
		return nil
	}
	opts, err := a.dm.GetDeviceRunContainerOptions(ctx, pod, c)
	if err != nil {
		return err
	}
	id := a.runtime.NewContainerID()
	a.tm.AddContainer(klog.FromContext(ctx), pod, c, id)
	return a.runtime.Add(Container{
		ID:            id,
		PodUID:        pod.UID,
		PodNamespace:  pod.Namespace,
		PodName:       pod.Name,
		ContainerName: c.Name,
		Init:          init,
		Running:       !init || podutil.IsRestartableInitContainer(c),
		StartedAt:     time.Now().UTC().Truncate(time.Second),
		DeviceOptions: opts,
	})
}

// containerStartFailed reports the container waiting with the error, as the
// kubelet does when generating the container config fails, and returns the
// error so that the pod is retried with back-off.
func (a *Agent) containerStartFailed(ctx context.Context, pod *v1.Pod, container string, err error) error {
	msg := err.Error()
	a.recorder.Eventf(pod, v1.EventTypeWarning, "Failed", "Error: %s", msg)
	status := a.baseStatus(pod, v1.PodPending)
	for _, c := range append(append([]v1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		cs := v1.ContainerStatus{Name: c.Name, Image: c.Image}
		if c.Name == container {
			cs.State.Waiting = &v1.ContainerStateWaiting{Reason: "CreateContainerConfigError", Message: msg}
		} else {
			cs.State.Waiting = &v1.ContainerStateWaiting{Reason: "PodInitializing"}
		}
		if isInit(pod, c.Name) {
			status.InitContainerStatuses = append(status.InitContainerStatuses, cs)
		} else {
			status.ContainerStatuses = append(status.ContainerStatuses, cs)
		}
	}
	if werr := a.writeStatus(ctx, pod, status); werr != nil {
		klog.FromContext(ctx).Error(werr, "Writing pod status", "pod", klog.KObj(pod))
	}
	return fmt.Errorf("starting container %q: %w", container, err)
}

func (a *Agent) baseStatus(pod *v1.Pod, phase v1.PodPhase) v1.PodStatus {
	start := pod.Status.StartTime
	if start == nil {
		start = ptr.To(metav1.Now())
	}
	status := v1.PodStatus{
		Phase:     phase,
		HostIP:    nodeIP,
		HostIPs:   []v1.HostIP{{IP: nodeIP}},
		StartTime: start,
		QOSClass:  qos.GetPodQOS(pod),
	}
	if pod.Spec.HostNetwork {
		status.PodIP = nodeIP
		status.PodIPs = []v1.PodIP{{IP: nodeIP}}
	}
	return status
}

func (a *Agent) runningStatus(ctx context.Context, pod *v1.Pod) v1.PodStatus {
	now := metav1.Now()
	status := a.baseStatus(pod, v1.PodRunning)
	for _, t := range []v1.PodConditionType{v1.PodReadyToStartContainers, v1.PodInitialized, v1.ContainersReady, v1.PodReady} {
		status.Conditions = append(status.Conditions, v1.PodCondition{Type: t, Status: v1.ConditionTrue, LastTransitionTime: now})
	}
	for _, c := range pod.Spec.InitContainers {
		rec, _ := a.runtime.Find(pod.UID, c.Name)
		cs := v1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: ContainerIDPrefix + c.Image, ContainerID: ContainerIDPrefix + rec.ID}
		if rec.Running {
			cs.State.Running = &v1.ContainerStateRunning{StartedAt: metav1.NewTime(rec.StartedAt)}
			cs.Ready, cs.Started = true, ptr.To(true)
		} else {
			cs.State.Terminated = &v1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed", StartedAt: metav1.NewTime(rec.StartedAt), FinishedAt: metav1.NewTime(rec.StartedAt), ContainerID: cs.ContainerID}
			cs.Started = ptr.To(false)
		}
		status.InitContainerStatuses = append(status.InitContainerStatuses, cs)
	}
	for _, c := range pod.Spec.Containers {
		rec, _ := a.runtime.Find(pod.UID, c.Name)
		status.ContainerStatuses = append(status.ContainerStatuses, v1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: ContainerIDPrefix + c.Image, ContainerID: ContainerIDPrefix + rec.ID,
			State:   v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: metav1.NewTime(rec.StartedAt)}},
			Ready:   true,
			Started: ptr.To(true),
		})
	}
	// The kubelet reports the allocated device IDs (and their health) in
	// containerStatuses[].allocatedResourcesStatus through this call.
	if utilfeature.DefaultFeatureGate.Enabled(features.ResourceHealthStatus) {
		a.dm.UpdateAllocatedResourcesStatus(klog.FromContext(ctx), pod, &status)
	}
	return status
}

// writeStatus replaces the kubelet-owned part of the pod's status, keeping
// conditions the kubelet does not own (PodScheduled, ...).
func (a *Agent) writeStatus(ctx context.Context, pod *v1.Pod, status v1.PodStatus) error {
	pods := a.client.CoreV1().Pods(pod.Namespace)
	return retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		cur, err := pods.Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.UID != pod.UID || (isTerminal(cur) && cur.Status.Phase != status.Phase) {
			return nil
		}
		next := cur.DeepCopy()
		conds := status.Conditions
		status.Conditions = nil
		for _, c := range cur.Status.Conditions {
			if !kubetypes.PodConditionByKubelet(c.Type) && !kubetypes.PodConditionSharedByKubelet(c.Type) {
				status.Conditions = append(status.Conditions, c)
			}
		}
		status.Conditions = append(status.Conditions, conds...)
		next.Status = status
		_, err = pods.UpdateStatus(ctx, next, metav1.UpdateOptions{})
		status.Conditions = conds
		return err
	})
}

// terminatePod stops the pod's containers and deletes the pod object, which is
// the kubelet's last step once a deleted pod's containers are gone.
func (a *Agent) terminatePod(ctx context.Context, pod *v1.Pod) error {
	a.forgetPod(ctx, pod.UID)
	a.mu.Lock()
	a.terminated.Insert(pod.UID) // inactive from now on
	a.mu.Unlock()
	err := a.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("deleting terminated pod: %w", err)
	}
	return nil
}

func (a *Agent) forgetPod(ctx context.Context, uid types.UID) {
	logger := klog.FromContext(ctx)
	ids, err := a.runtime.RemovePod(uid)
	if err != nil {
		logger.Error(err, "Removing containers", "podUID", uid)
	}
	for _, id := range ids {
		if err := a.tm.RemoveContainer(logger, id); err != nil {
			logger.Error(err, "Removing container from topology manager", "containerID", id)
		}
	}
	a.mu.Lock()
	delete(a.admitted, uid)
	a.started.Delete(uid)
	a.mu.Unlock()
}

// dropPod forgets everything about a pod that no longer exists.
func (a *Agent) dropPod(ctx context.Context, uid types.UID) {
	a.forgetPod(ctx, uid)
	a.mu.Lock()
	delete(a.rejected, uid)
	a.terminated.Delete(uid)
	a.mu.Unlock()
}

// watchDeviceHealth re-reports the status of pods whose devices changed
// health, as the kubelet's sync loop does on the device manager's Updates().
func (a *Agent) watchDeviceHealth(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-a.dm.Updates():
			var keys []string
			a.mu.Lock()
			for _, uid := range u.PodUIDs {
				a.statusDirty.Insert(types.UID(uid))
				for key, known := range a.byKey {
					if string(known) == uid {
						keys = append(keys, key)
					}
				}
			}
			a.mu.Unlock()
			for _, key := range keys {
				a.queue.Add(key)
			}
		}
	}
}

// activePods is the kubelet's GetActivePods: the pods of its pod manager
// that are not terminal. The device manager uses it to release devices of
// pods that are gone.
func (a *Agent) activePods() []*v1.Pod {
	pods := a.knownPods()
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*v1.Pod, 0, len(pods))
	for _, p := range pods {
		_, rejected := a.rejected[p.UID]
		if isTerminal(p) || rejected || a.terminated.Has(p.UID) {
			continue
		}
		out = append(out, p)
	}
	return out
}

// knownPods is the kubelet's pod manager: the pods bound to the node that
// the agent has started to handle. Like the kubelet's HandlePodAdditions,
// which adds each pod to the pod manager right before admitting it, a pod
// enters this set in syncPod before its admission, so while pod X is being
// admitted, pods bound later are not in it (and pod-resources does not list
// them).
func (a *Agent) knownPods() []*v1.Pod {
	pods, err := a.podLister.List(labels.Everything())
	if err != nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*v1.Pod, 0, len(pods))
	for _, p := range pods {
		key := p.Namespace + "/" + p.Name
		if uid, ok := a.byKey[key]; ok && uid == p.UID {
			out = append(out, p)
		}
	}
	return out
}

// admittedPods returns the admitted pods except the one given.
func (a *Agent) admittedPods(except types.UID) []*v1.Pod {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*v1.Pod, 0, len(a.admitted))
	for uid, p := range a.admitted {
		if uid != except {
			out = append(out, p)
		}
	}
	return out
}

func isTerminal(p *v1.Pod) bool {
	return p.Status.Phase == v1.PodFailed || p.Status.Phase == v1.PodSucceeded
}

func isInit(pod *v1.Pod, name string) bool {
	for _, c := range pod.Spec.InitContainers {
		if c.Name == name {
			return true
		}
	}
	return false
}

// podsProvider answers the pod-resources server's pod queries.
type podsProvider struct{ a *Agent }

func (p podsProvider) GetActivePods() []*v1.Pod { return p.a.activePods() }

func (p podsProvider) GetPods() []*v1.Pod { return p.a.knownPods() }

func (p podsProvider) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	pod, err := p.a.podLister.Pods(namespace).Get(name)
	if err != nil || isTerminal(pod) {
		return nil, false
	}
	p.a.mu.Lock()
	uid, known := p.a.byKey[namespace+"/"+name]
	p.a.mu.Unlock()
	if !known || uid != pod.UID {
		return nil, false
	}
	return pod, true
}
