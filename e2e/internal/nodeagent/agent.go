// Package nodeagent is a GPU node stand-in for end-to-end tests: it runs the
// kubelet's real device manager (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager)
// and the kubelet's admission handlers, pod-resources server and node-status
// setters around it, with a stand-in container runtime that records containers
// instead of running them.
//
// What is the kubelet's own code: device-plugin registration server and
// endpoints, device allocation (GetPreferredAllocation, Allocate),
// PreStartContainer (GetDeviceRunContainerOptions), the device manager
// checkpoint and its restart handling, GetCapacity, the topology manager
// ("none" policy) that drives allocation at admission, the predicate admit
// handler, the node-status MachineInfo/ReadyCondition setters, the node lease
// controller and the pod-resources v1/v1alpha1 servers.
//
// What the agent does itself: creating the Node, watching pods bound to it,
// calling the admit handlers in the kubelet's order one pod at a time,
// recording containers (runtime.go) and writing pod status.
package nodeagent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
)

// ReadyFile is written into the state dir, holding the agent's pid, once the
// agent has registered the node and re-admitted the pods already bound to it.
const ReadyFile = "ready"

// Config is the agent's configuration; every field is a command-line flag of
// cmd/gpu-node-agent.
type Config struct {
	NodeName string
	// DevicePluginDir is where kubelet.sock is served, plugins put their
	// sockets and the device manager keeps kubelet_internal_checkpoint.
	DevicePluginDir string
	// PodResourcesSocket is the path of the pod-resources API socket.
	PodResourcesSocket string
	// StateDir holds the stand-in runtime's container records.
	StateDir string
	// NodeLabels are added to the Node's labels.
	NodeLabels map[string]string
	// CPU, Memory and MaxPods are the node's non-device capacity.
	CPU     resource.Quantity
	Memory  resource.Quantity
	MaxPods int
	// StatusUpdateFrequency is how often node status is recomputed and, when
	// changed, patched (the kubelet's nodeStatusUpdateFrequency).
	StatusUpdateFrequency time.Duration
	// StatusReportFrequency is how often status is patched even if unchanged.
	StatusReportFrequency time.Duration
}

// Agent is one simulated GPU node.
type Agent struct {
	cfg      Config
	client   kubernetes.Interface
	recorder record.EventRecorder

	dm            *devicemanager.ManagerImpl
	tm            topologymanager.Manager
	admitHandlers []lifecycle.PodAdmitHandler
	runtime       *Runtime

	podLister  corelisters.PodLister
	nodeLister corelisters.NodeLister
	queue      workqueue.TypedRateLimitingInterface[string]

	// sourcesReady becomes true once every pod bound to the node at start-up
	// has been through admission again, as the kubelet's config sources do.
	sourcesReady atomic.Bool

	mu sync.Mutex
	// admitted are the pods that passed admission, by UID.
	admitted map[types.UID]*v1.Pod
	// rejected are pods that failed admission, with the Failed status to
	// report (it may not have reached the informer yet).
	rejected map[types.UID]v1.PodStatus
	// terminated are deleted pods whose containers were stopped.
	terminated sets.Set[types.UID]
	// started are pods whose containers have all been created.
	started sets.Set[types.UID]
	// statusDirty are started pods whose devices changed health.
	statusDirty sets.Set[types.UID]
	// byKey maps namespace/name to the UID the agent knows for it.
	byKey map[string]types.UID
}

// New validates cfg and prepares an agent; Run starts it.
func New(cfg Config, client kubernetes.Interface) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, fmt.Errorf("node name is required")
	}
	if cfg.DevicePluginDir == "" || cfg.PodResourcesSocket == "" || cfg.StateDir == "" {
		return nil, fmt.Errorf("device-plugin dir, pod-resources socket and state dir are all required")
	}
	if cfg.MaxPods <= 0 {
		return nil, fmt.Errorf("max pods must be positive, got %d", cfg.MaxPods)
	}
	if cfg.StatusUpdateFrequency <= 0 || cfg.StatusReportFrequency <= 0 {
		return nil, fmt.Errorf("status update and report frequencies must be positive")
	}
	return &Agent{
		cfg:         cfg,
		client:      client,
		admitted:    map[types.UID]*v1.Pod{},
		rejected:    map[types.UID]v1.PodStatus{},
		terminated:  sets.New[types.UID](),
		started:     sets.New[types.UID](),
		statusDirty: sets.New[types.UID](),
		byKey:       map[string]types.UID{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 10*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "pods"}),
	}, nil
}

// Run starts the device manager, the pod-resources server, node registration
// and status, and the pod worker; it returns when ctx ends or start-up fails.
func (a *Agent) Run(ctx context.Context) error {
	logger := klog.FromContext(ctx)

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	a.recorder = broadcaster.NewRecorder(scheme.Scheme, v1.EventSource{Component: "kubelet", Host: a.cfg.NodeName})

	rt, err := LoadRuntime(a.cfg.StateDir)
	if err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(a.cfg.StateDir, ReadyFile)); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("removing stale ready file: %w", err)
	}
	a.runtime = rt

	// The kubelet's default topology manager policy is "none"; its admit
	// handler is what calls the device manager's Allocate for every init and
	// app container of a pod.
	tm, err := topologymanager.NewManager(logger, nil, topologymanager.PolicyNone, topologymanager.ContainerTopologyScope, nil)
	if err != nil {
		return fmt.Errorf("creating topology manager: %w", err)
	}
	dm, err := NewDeviceManager(logger, a.cfg.DevicePluginDir, tm)
	if err != nil {
		return fmt.Errorf("creating device manager: %w", err)
	}
	tm.AddHintProvider(logger, dm)
	a.tm, a.dm = tm, dm
	// Same order as the kubelet: resource allocation first, then the
	// predicates (which also lift allocatable to what is already allocated).
	a.admitHandlers = []lifecycle.PodAdmitHandler{
		tm,
		lifecycle.NewPredicateAdmitHandler(a.getNode, noPreemption{}, dm.UpdatePluginResources),
	}

	factory := informers.NewSharedInformerFactoryWithOptions(a.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.cfg.NodeName).String()
		}))
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(a.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", a.cfg.NodeName).String()
		}))
	podInformer := factory.Core().V1().Pods()
	nodeInformer := nodeFactory.Core().V1().Nodes()
	a.podLister, a.nodeLister = podInformer.Lister(), nodeInformer.Lister()
	if _, err := podInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    a.enqueue,
		UpdateFunc: func(_, obj interface{}) { a.enqueue(obj) },
		DeleteFunc: a.enqueue,
	}); err != nil {
		return fmt.Errorf("watching pods: %w", err)
	}

	cmap, running := rt.ContainerMap()
	sourcesReady := config.NewSourcesReady(func(sets.Set[string]) bool { return a.sourcesReady.Load() })
	if err := dm.Start(logger, a.activePods, sourcesReady, cmap, running); err != nil {
		return fmt.Errorf("starting device manager: %w", err)
	}
	defer func() {
		if err := dm.Stop(logger); err != nil {
			logger.Error(err, "Stopping device manager")
		}
	}()
	go a.watchDeviceHealth(ctx)

	stopPodResources, err := servePodResources(ctx, a.cfg.PodResourcesSocket, podresources.PodResourcesProviders{
		Pods:             podsProvider{a},
		Devices:          devicesProvider{dm},
		Cpus:             noExclusiveResources{},
		Memory:           noExclusiveResources{},
		DynamicResources: noExclusiveResources{},
	})
	if err != nil {
		return err
	}
	defer stopPodResources()

	if err := a.registerNode(ctx); err != nil {
		return err
	}
	go a.runNodeStatus(ctx)
	go a.runLease(ctx)

	factory.Start(ctx.Done())
	nodeFactory.Start(ctx.Done())
	defer factory.Shutdown()
	defer nodeFactory.Shutdown()
	for typ, ok := range factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("pod informer %v did not sync", typ)
		}
	}
	for typ, ok := range nodeFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("node informer %v did not sync", typ)
		}
	}

	// Like a restarted kubelet: every pod already bound to this node goes
	// through admission again before the sources count as ready. Containers
	// the runtime reports running are recognised by the device manager and
	// keep their devices.
	if err := a.resyncExistingPods(ctx); err != nil {
		return err
	}
	a.sourcesReady.Store(true)
	if err := os.WriteFile(filepath.Join(a.cfg.StateDir, ReadyFile), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o640); err != nil {
		return fmt.Errorf("writing ready file: %w", err)
	}
	logger.Info("Node agent ready", "node", a.cfg.NodeName)

	go func() {
		<-ctx.Done()
		a.queue.ShutDown()
	}()
	for a.processNext(ctx) {
	}
	return nil
}

// noPreemption is the admission-failure handler for a node without critical
// pods: it keeps the failure reasons (the kubelet's critical-pod handler only
// acts for critical pods, which these tests never create).
type noPreemption struct{}

func (noPreemption) HandleAdmissionFailure(_ context.Context, _ *v1.Pod, reasons []lifecycle.PredicateFailureReason, _ lifecycle.Operation) ([]lifecycle.PredicateFailureReason, error) {
	return reasons, nil
}
