package nodeagent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	goruntime "runtime"
	"runtime/debug"
	"strings"
	"time"

	cadvisorapi "github.com/google/cadvisor/lib/model"
	coordinationv1 "k8s.io/api/coordination/v1"
	v1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/component-helpers/apimachinery/lease"
	nodeutil "k8s.io/component-helpers/node/util"
	"k8s.io/klog/v2"
	v1helper "k8s.io/kubernetes/pkg/apis/core/v1/helper"
	"k8s.io/kubernetes/pkg/kubelet/cm"
	"k8s.io/kubernetes/pkg/kubelet/nodestatus"
	"k8s.io/utils/clock"
)

// nodeIP is the address every simulated node reports: all of them live on
// this machine's loopback.
const nodeIP = "127.0.0.1"

// registerNode creates the Node or, when it already exists (agent restart),
// reconciles it the way the kubelet's tryRegisterWithAPIServer does: labels
// are updated and extended resources are zeroed when the device manager has
// no checkpoint (the node was "recreated").
func (a *Agent) registerNode(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	nodes := a.client.CoreV1().Nodes()
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: a.cfg.NodeName, Labels: a.nodeLabels()}}
	if err := a.setStatus(ctx, node); err != nil {
		return err
	}
	_, err := nodes.Create(ctx, node, metav1.CreateOptions{})
	if err == nil {
		logger.Info("Registered node", "node", a.cfg.NodeName)
		return nil
	}
	if !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("registering node %q: %w", a.cfg.NodeName, err)
	}
	existing, err := nodes.Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading existing node %q: %w", a.cfg.NodeName, err)
	}
	updated := existing.DeepCopy()
	if updated.Labels == nil {
		updated.Labels = map[string]string{}
	}
	for k, v := range a.nodeLabels() {
		updated.Labels[k] = v
	}
	if !apiequality.Semantic.DeepEqual(existing.Labels, updated.Labels) {
		if updated, err = nodes.Update(ctx, updated, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("updating node labels: %w", err)
		}
		existing = updated.DeepCopy()
	}
	if a.dm.ShouldResetExtendedResourceCapacity() {
		for k := range updated.Status.Capacity {
			if v1helper.IsExtendedResourceName(k) {
				logger.Info("Zeroing extended resource of a recreated node", "resource", k)
				updated.Status.Capacity[k] = *resource.NewQuantity(0, resource.DecimalSI)
				updated.Status.Allocatable[k] = *resource.NewQuantity(0, resource.DecimalSI)
			}
		}
	}
	if err := a.setStatus(ctx, updated); err != nil {
		return err
	}
	if _, _, err := nodeutil.PatchNodeStatus(a.client.CoreV1(), types.NodeName(a.cfg.NodeName), existing, updated); err != nil {
		return fmt.Errorf("patching node status: %w", err)
	}
	logger.Info("Re-registered existing node", "node", a.cfg.NodeName)
	return nil
}

func (a *Agent) nodeLabels() map[string]string {
	l := map[string]string{
		v1.LabelHostname:   a.cfg.NodeName,
		v1.LabelOSStable:   goruntime.GOOS,
		v1.LabelArchStable: goruntime.GOARCH,
	}
	for k, v := range a.cfg.NodeLabels {
		l[k] = v
	}
	return l
}

// setStatus applies the kubelet's own node-status setters (machine info with
// the device manager's capacity, conditions) plus addresses and node info.
func (a *Agent) setStatus(ctx context.Context, node *v1.Node) error {
	bootID, err := a.bootID()
	if err != nil {
		return err
	}
	record := func(eventType, event, message string) {
		a.recorder.Eventf(&v1.ObjectReference{Kind: "Node", Name: a.cfg.NodeName, UID: types.UID(a.cfg.NodeName)}, eventType, event, "%s", message)
	}
	recordLogger := func(_ klog.Logger, eventType, event string) {
		record(eventType, event, "Node "+a.cfg.NodeName+" status is now: "+event)
	}
	machineInfo := func() (*cadvisorapi.MachineInfo, error) {
		return &cadvisorapi.MachineInfo{
			NumCores:       int(a.cfg.CPU.Value()),
			MemoryCapacity: uint64(a.cfg.Memory.Value()),
			MachineID:      a.cfg.NodeName,
			SystemUUID:     a.cfg.NodeName,
			BootID:         bootID,
		}, nil
	}
	capacity := func(klog.Logger, bool) v1.ResourceList {
		return v1.ResourceList{v1.ResourceEphemeralStorage: resource.MustParse("100Gi")}
	}
	noReservation := func() v1.ResourceList { return nil }
	noErr := func() error { return nil }
	never := func() bool { return false }
	now := time.Now
	setters := []nodestatus.Setter{
		nodestatus.MachineInfo(a.cfg.NodeName, a.cfg.MaxPods, 0, machineInfo, capacity, a.dm.GetCapacity, noReservation, record, func() *bool { return nil }, false),
		nodestatus.GoRuntime(),
		nodestatus.MemoryPressureCondition(now, never, recordLogger),
		nodestatus.DiskPressureCondition(now, never, recordLogger),
		nodestatus.PIDPressureCondition(now, never, recordLogger),
		nodestatus.ReadyCondition(now, noErr, noErr, noErr, func() cm.Status { return cm.Status{} }, noErr, recordLogger, false),
	}
	for _, set := range setters {
		if err := set(ctx, node); err != nil {
			return fmt.Errorf("computing node status: %w", err)
		}
	}
	node.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: nodeIP}, {Type: v1.NodeHostName, Address: a.cfg.NodeName}}
	node.Status.NodeInfo.KubeletVersion = kubernetesVersion()
	node.Status.NodeInfo.ContainerRuntimeVersion = ContainerIDPrefix + kubernetesVersion()
	node.Status.NodeInfo.OSImage = "gpu-node-agent"
	if release, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		node.Status.NodeInfo.KernelVersion = strings.TrimSpace(string(release))
	}
	return nil
}

// runNodeStatus recomputes node status every StatusUpdateFrequency and
// patches it when it changed (heartbeat times aside) or when
// StatusReportFrequency passed, like the kubelet's updateNodeStatus.
func (a *Agent) runNodeStatus(ctx context.Context) {
	logger := klog.FromContext(ctx)
	var lastReport time.Time
	ticker := time.NewTicker(a.cfg.StatusUpdateFrequency)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		old, err := a.nodeLister.Get(a.cfg.NodeName)
		if err != nil {
			if old, err = a.client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{}); err != nil {
				logger.Error(err, "Reading node for status update")
				continue
			}
		}
		next := old.DeepCopy()
		if err := a.setStatus(ctx, next); err != nil {
			logger.Error(err, "Computing node status")
			continue
		}
		if !statusChanged(&old.Status, &next.Status) && time.Since(lastReport) < a.cfg.StatusReportFrequency {
			continue
		}
		if _, _, err := nodeutil.PatchNodeStatus(a.client.CoreV1(), types.NodeName(a.cfg.NodeName), old, next); err != nil {
			logger.Error(err, "Patching node status")
			continue
		}
		lastReport = time.Now()
	}
}

// runLease renews the node's Lease in kube-node-lease with the kubelet's
// lease controller (40 s duration, 10 s renew interval).
func (a *Agent) runLease(ctx context.Context) {
	setOwner := func(l *coordinationv1.Lease) error {
		node, err := a.client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		l.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
		return nil
	}
	lease.NewController(clock.RealClock{}, a.client, a.cfg.NodeName, 40, nil, 10*time.Second,
		a.cfg.NodeName, v1.NamespaceNodeLease, setOwner).Run(ctx)
}

func (a *Agent) getNode(ctx context.Context, _ bool) (*v1.Node, error) {
	node, err := a.nodeLister.Get(a.cfg.NodeName)
	if err == nil {
		return node, nil
	}
	return a.client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
}

// bootID is kept in the state dir, so an agent restart is a kubelet restart
// and not a reboot.
func (a *Agent) bootID() (string, error) {
	path := filepath.Join(a.cfg.StateDir, "boot_id")
	data, err := os.ReadFile(path)
	if err == nil {
		return strings.TrimSpace(string(data)), nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("reading boot id: %w", err)
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generating boot id: %w", err)
	}
	id := hex.EncodeToString(b)
	if err := os.WriteFile(path, []byte(id+"\n"), 0o640); err != nil {
		return "", fmt.Errorf("writing boot id: %w", err)
	}
	return id, nil
}

func statusChanged(old, next *v1.NodeStatus) bool {
	strip := func(s *v1.NodeStatus) *v1.NodeStatus {
		c := s.DeepCopy()
		for i := range c.Conditions {
			c.Conditions[i].LastHeartbeatTime = metav1.Time{}
		}
		return c
	}
	return !apiequality.Semantic.DeepEqual(strip(old), strip(next))
}

// kubernetesVersion is the version of the k8s.io/kubernetes module this
// binary was built from.
func kubernetesVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, m := range info.Deps {
			if m.Path == "k8s.io/kubernetes" {
				return m.Version
			}
		}
	}
	return "unknown"
}
