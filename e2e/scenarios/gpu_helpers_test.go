package scenarios

// Helpers of the scenarios that run our binaries (a–f): the shared GPU
// stack, GPU nodes, GPU pods and the cross-check of every view of an
// allocation.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"gpumanager.local/e2e/internal/harness"
)

var (
	stackOnce sync.Once
	stack     *harness.GPUStack
	stackErr  error
)

// gpuStack returns the shared GPU stack (gpu-admission ×2 behind the
// Service stand-in, webhooks registered, kube-scheduler on the extender),
// starting it on first use. It fails the test when our binaries are
// missing. Each call restarts replicas an earlier scenario killed and puts
// the scheduler back on the extender configuration.
func gpuStack(t *testing.T) *harness.GPUStack {
	t.Helper()
	e := cluster(t)
	stackOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		start := time.Now()
		stack, stackErr = harness.StartGPUStack(ctx, e, harness.GPUStackOptions{})
		if stackErr == nil {
			fmt.Printf("e2e: GPU stack ready in %s (gpu-admission ×%d, webhooks, scheduler on the extender)\n",
				time.Since(start).Round(time.Millisecond), len(stack.Replicas()))
		}
	})
	if stackErr != nil {
		t.Fatalf("GPU stack: %v", stackErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := stack.EnsureReady(ctx); err != nil {
		t.Fatalf("GPU stack: %v", err)
	}
	return stack
}

// startGPUNode starts a node agent with gpu-manager for the node file and
// removes both (and the Node) when the test ends.
func startGPUNode(ctx context.Context, t *testing.T, s *harness.GPUStack, name, nodeFile string) *harness.GPUNode {
	t.Helper()
	g, err := s.StartGPUNode(ctx, name, nodeFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Remove(context.Background()); err != nil {
			t.Error(err)
		}
	})
	return g
}

// newGPUNamespace is newNamespace whose pods are deleted (grace 0) when the
// test ends, so that later scenarios do not see them.
func newGPUNamespace(ctx context.Context, t *testing.T, e *harness.Env, prefix string) string {
	t.Helper()
	ns := newNamespace(ctx, t, e, prefix)
	t.Cleanup(func() {
		zero := int64(0)
		_ = e.Client.CoreV1().Pods(ns).DeleteCollection(context.Background(),
			metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
	})
	return ns
}

// gpuPod is a one-container pod asking for cores vcuda-core and, when
// non-zero, mem vcuda-memory blocks (limits only, as users write them).
func gpuPod(name string, cores, mem int64) *v1.Pod {
	limits := v1.ResourceList{harness.VcudaCore: *resource.NewQuantity(cores, resource.DecimalSI)}
	if mem > 0 {
		limits[harness.VcudaMemory] = *resource.NewQuantity(mem, resource.DecimalSI)
	}
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1.PodSpec{
			TerminationGracePeriodSeconds: new(int64),
			Containers: []v1.Container{{
				Name:      "main",
				Image:     "registry.invalid/e2e/cuda:1",
				Resources: v1.ResourceRequirements{Limits: limits},
			}},
		},
	}
}

// podRequest is the pod's first container's vcuda-core and vcuda-memory.
func podRequest(p *v1.Pod) (cores, mem int64) {
	if len(p.Spec.Containers) == 0 {
		return 0, 0
	}
	l := p.Spec.Containers[0].Resources.Limits
	if q, ok := l[harness.VcudaCore]; ok {
		cores = q.Value()
	}
	if q, ok := l[harness.VcudaMemory]; ok {
		mem = q.Value()
	}
	return cores, mem
}

// annotatedCards parses predicate-gpu-idx-<i>.
func annotatedCards(p *v1.Pod, container int) ([]int, error) {
	key := harness.AnnotGPUIdxPrefix + strconv.Itoa(container)
	raw, ok := p.Annotations[key]
	if !ok || raw == "" {
		return nil, fmt.Errorf("pod %s has no %s annotation", p.Name, key)
	}
	var cards []int
	for _, f := range strings.Split(raw, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("pod %s: %s=%q is not a card list", p.Name, key, raw)
		}
		cards = append(cards, c)
	}
	sort.Ints(cards)
	return cards, nil
}

// cardsOf returns the distinct cards of device IDs, sorted.
func cardsOf(ids []string) ([]int, error) {
	seen := map[int]bool{}
	var out []int
	for _, id := range ids {
		c, err := harness.CardOf(id)
		if err != nil {
			return nil, err
		}
		if !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	sort.Ints(out)
	return out, nil
}

func equalInts(a, b []int) bool {
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

// placement is one running GPU pod as every view sees it.
type placement struct {
	Pod     *v1.Pod
	Node    string
	Cards   []int    // predicate-gpu-idx-0
	CoreIDs []string // pod-resources
	MemIDs  []string // pod-resources
}

// heldDevices is what pod-resources lists for one container.
type heldDevices struct{ core, mem []string }

func listHeld(ctx context.Context, n *harness.Node) (map[string]*heldDevices, error) {
	client, conn, err := n.PodResources(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	resp, err := client.List(ctx, &podresourcesv1.ListPodResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("pod-resources List on %s: %w", n.Name, err)
	}
	out := map[string]*heldDevices{}
	for _, pr := range resp.PodResources {
		for _, c := range pr.Containers {
			h := &heldDevices{}
			for _, d := range c.Devices {
				switch d.ResourceName {
				case harness.VcudaCore:
					h.core = append(h.core, d.DeviceIds...)
				case harness.VcudaMemory:
					h.mem = append(h.mem, d.DeviceIds...)
				}
			}
			if len(h.core)+len(h.mem) > 0 {
				h.core, h.mem = sorted(h.core), sorted(h.mem)
				out[pr.Namespace+"/"+pr.Name+"/"+c.Name] = h
			}
		}
	}
	return out, nil
}

// verifyGPUState cross-checks, node by node, the four records of every GPU
// allocation — the pod's annotations (extender + gpu-manager), the device
// manager's state (pod-resources List), the stand-in runtime's container
// options (containers.json) and gpu-manager's checkpoint — and that no card
// is over-allocated and no device is held twice. It returns the running GPU
// pods of ns by name. The first disagreement is returned as an error.
func verifyGPUState(ctx context.Context, e *harness.Env, nodes []*harness.GPUNode, ns string) (map[string]placement, error) {
	list, err := e.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := map[string]placement{}
	for _, g := range nodes {
		held, err := listHeld(ctx, g.Node)
		if err != nil {
			return nil, err
		}
		ckpt, err := g.ReadCheckpoint()
		if err != nil {
			return nil, err
		}
		containers, err := g.Containers()
		if err != nil {
			return nil, err
		}
		byCard := map[int]*InventoryUse{}
		for _, c := range g.Inventory.Cards {
			byCard[c.Index] = &InventoryUse{card: c}
		}
		// 1. The device manager: every device held once, no card over-allocated.
		owner := map[string]string{}
		for who, h := range held {
			for _, id := range append(append([]string(nil), h.core...), h.mem...) {
				if other, dup := owner[id]; dup {
					return nil, fmt.Errorf("node %s: device %s held by both %s and %s", g.Name, id, other, who)
				}
				owner[id] = who
				card, err := harness.CardOf(id)
				if err != nil {
					return nil, err
				}
				u, ok := byCard[card]
				if !ok {
					return nil, fmt.Errorf("node %s: %s holds %s of card %d, which the node does not have", g.Name, who, id, card)
				}
				if strings.HasPrefix(id, "vcore-") {
					u.cores++
				} else {
					u.blocks++
				}
			}
		}
		for idx, u := range byCard {
			if u.cores > 100 || u.blocks > u.card.Blocks() {
				return nil, fmt.Errorf("node %s card %d over-allocated: %d vcuda-core of 100, %d vcuda-memory of %d", g.Name, idx, u.cores, u.blocks, u.card.Blocks())
			}
		}
		// 2. The checkpoint holds exactly the allocations the device manager holds.
		recs := map[string]harness.CheckpointRecord{}
		for _, r := range ckpt.Data.Records {
			p := r.Pod()
			if p == nil {
				return nil, fmt.Errorf("node %s: checkpoint record %s (core %q) names no pod", g.Name, r.ID, r.Core)
			}
			key := p.Namespace + "/" + p.Name + "/" + p.Container
			if _, dup := recs[key]; dup {
				return nil, fmt.Errorf("node %s: checkpoint has two records for %s", g.Name, key)
			}
			recs[key] = r
			h, ok := held[key]
			if !ok {
				return nil, fmt.Errorf("node %s: checkpoint record %s for %s (core %q memory %q), which the device manager does not list", g.Name, r.ID, key, r.Core, r.Memory)
			}
			core, err := r.CoreIDs()
			if err != nil {
				return nil, err
			}
			mem, err := r.MemoryIDs()
			if err != nil {
				return nil, err
			}
			if !equal(core, h.core) || !equal(mem, h.mem) {
				return nil, fmt.Errorf("node %s %s: checkpoint has core %s memory %s, pod-resources has %d core IDs %v and %d memory IDs",
					g.Name, key, r.Core, r.Memory, len(h.core), firstN(h.core, 4), len(h.mem))
			}
		}
		for key := range held {
			if _, ok := recs[key]; !ok {
				return nil, fmt.Errorf("node %s: the device manager lists %s with GPU devices, gpu-manager's checkpoint has no record of it", g.Name, key)
			}
		}
		// 3. Every running GPU pod: annotations = devices = runtime = request.
		for i := range list.Items {
			p := &list.Items[i]
			cores, mem := podRequest(p)
			if p.Spec.NodeName != g.Name || cores == 0 || p.Status.Phase != v1.PodRunning {
				continue
			}
			key := p.Namespace + "/" + p.Name + "/" + p.Spec.Containers[0].Name
			if p.Annotations[harness.AnnotGPUAssigned] != "true" {
				return nil, fmt.Errorf("running pod %s: %s=%q, want \"true\"", p.Name, harness.AnnotGPUAssigned, p.Annotations[harness.AnnotGPUAssigned])
			}
			if got := p.Annotations[harness.AnnotPredicateNode]; got != g.Name {
				return nil, fmt.Errorf("running pod %s on %s: %s=%q", p.Name, g.Name, harness.AnnotPredicateNode, got)
			}
			cards, err := annotatedCards(p, 0)
			if err != nil {
				return nil, err
			}
			h, ok := held[key]
			if !ok {
				return nil, fmt.Errorf("running pod %s on %s: the device manager lists no GPU devices for it", p.Name, g.Name)
			}
			coreCards, err := cardsOf(h.core)
			if err != nil {
				return nil, err
			}
			if int64(len(h.core)) != cores || !equalInts(coreCards, cards) {
				return nil, fmt.Errorf("pod %s (vcuda-core %d, annotation cards %v): the device manager gave %d vcuda-core IDs on cards %v", p.Name, cores, cards, len(h.core), coreCards)
			}
			if cores < 100 {
				memCards, err := cardsOf(h.mem)
				if err != nil {
					return nil, err
				}
				if int64(len(h.mem)) != mem || !equalInts(memCards, cards) {
					return nil, fmt.Errorf("pod %s (vcuda-memory %d, cards %v): the device manager gave %d vcuda-memory IDs on cards %v", p.Name, mem, cards, len(h.mem), memCards)
				}
			}
			var uuids []string
			for _, c := range cards {
				uuids = append(uuids, byCard[c].card.UUID)
			}
			var rec *nodeagentContainer
			for j := range containers {
				if containers[j].PodUID == p.UID && containers[j].ContainerName == p.Spec.Containers[0].Name {
					rec = &containers[j]
				}
			}
			if rec == nil || rec.DeviceOptions == nil {
				return nil, fmt.Errorf("pod %s: the runtime recorded no container options", p.Name)
			}
			if want := strings.Join(uuids, ","); !hasEnv(*rec, "NVIDIA_VISIBLE_DEVICES", want) {
				return nil, fmt.Errorf("pod %s on cards %v: container env %v, want NVIDIA_VISIBLE_DEVICES=%s", p.Name, cards, rec.DeviceOptions.Envs, want)
			}
			if err := checkLimiter(p, rec, cores, mem, cards); err != nil {
				return nil, err
			}
			out[p.Name] = placement{Pod: p, Node: g.Name, Cards: cards, CoreIDs: h.core, MemIDs: h.mem}
		}
	}
	return out, nil
}

// InventoryUse counts what the device manager hands out of one card.
type InventoryUse struct {
	card          harness.InventoryCard
	cores, blocks int64
}

// eventuallyConsistent retries verifyGPUState until it passes (annotations
// and the checkpoint are written asynchronously) or timeout.
func eventuallyConsistent(ctx context.Context, t *testing.T, e *harness.Env, nodes []*harness.GPUNode, ns string, timeout time.Duration) map[string]placement {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got, err := verifyGPUState(ctx, e, nodes, ns)
		if err == nil {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("views of the GPU allocations disagree after %s: %v", timeout, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// waitSettled waits until every pod of ns has come to rest: Running,
// Failed, Pending and Unschedulable, or bound but stuck — a container
// Waiting with CreateContainerConfigError (a PreStartContainer refusal the
// kubelet retries forever). Stuck pods fail the test with their message.
// It returns the pods.
func waitSettled(ctx context.Context, t *testing.T, e *harness.Env, ns string, timeout time.Duration) []v1.Pod {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		list, err := e.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var waiting, stuck []string
		for i := range list.Items {
			p := &list.Items[i]
			switch {
			case p.Status.Phase == v1.PodRunning || p.Status.Phase == v1.PodFailed:
			case p.Spec.NodeName == "" && hasCondition(p, v1.PodScheduled, v1.ConditionFalse, v1.PodReasonUnschedulable):
			case stuckReason(p) != "":
				stuck = append(stuck, fmt.Sprintf("%s on %s: %s", p.Name, p.Spec.NodeName, stuckReason(p)))
			default:
				waiting = append(waiting, p.Name+" ("+harness.DescribePod(p)+")")
			}
		}
		if len(waiting) == 0 {
			if len(stuck) > 0 {
				sort.Strings(stuck)
				t.Errorf("%d pods bound but never started:\n  %s", len(stuck), strings.Join(stuck, "\n  "))
			}
			return list.Items
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pods neither running, failed, unschedulable nor stuck after %s, e.g. %s", len(waiting), timeout, waiting[0])
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// stuckReason is the message of a container Waiting with
// CreateContainerConfigError, the state of a pod whose start the device
// plugin refuses. A PreStartContainer call that never reached a plugin (its
// endpoint stopped, or the socket unavailable, while gpu-manager restarts)
// is not a refusal: the kubelet retries it with back-off and the pod starts
// once the plugin is registered again, so such a pod is still waiting.
func stuckReason(p *v1.Pod) string {
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil && w.Reason == "CreateContainerConfigError" && !pluginAway(w.Message) {
			return w.Message
		}
	}
	return ""
}

// pluginAway: the device manager could not reach the plugin at all.
func pluginAway(msg string) bool {
	return strings.Contains(msg, "has been stopped") || strings.Contains(msg, "code = Unavailable")
}

// createPods creates pods concurrently (one burst) and fails on any error.
func createPods(ctx context.Context, t *testing.T, e *harness.Env, ns string, pods []*v1.Pod) {
	t.Helper()
	if err := createPodsErr(ctx, e, ns, pods); err != nil {
		t.Fatal(err)
	}
}

// createPodsErr is createPods for any goroutine.
func createPodsErr(ctx context.Context, e *harness.Env, ns string, pods []*v1.Pod) error {
	var wg sync.WaitGroup
	errs := make(chan error, len(pods))
	sem := make(chan struct{}, 16)
	for _, p := range pods {
		wg.Add(1)
		go func(p *v1.Pod) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if _, err := e.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
				errs <- fmt.Errorf("creating %s: %w", p.Name, err)
			}
		}(p)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	return nil
}

func podRef(ns, name string) *v1.Pod {
	return &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
}

// webhookCalls reads kube-apiserver's own metrics: admitted (not rejected)
// webhook calls per webhook name.
func webhookCalls(ctx context.Context, t *testing.T, e *harness.Env) map[string]uint64 {
	t.Helper()
	raw, err := e.Client.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		t.Fatalf("kube-apiserver /metrics: %v", err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("parsing kube-apiserver /metrics: %v", err)
	}
	out := map[string]uint64{}
	f := fams["apiserver_admission_webhook_admission_duration_seconds"]
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["rejected"] == "false" {
			out[labels["name"]] += m.GetHistogram().GetSampleCount()
		}
	}
	return out
}

// extenderBinds is the replica's count of successful bind decisions.
func extenderBinds(ctx context.Context, t *testing.T, r *harness.AdmissionReplica) float64 {
	t.Helper()
	fams, err := harness.ScrapeMetrics(ctx, "http://"+r.ExtenderAddr+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	v, _ := harness.MetricValue(fams, "gpu_admission_extender_decisions_total", map[string]string{"verb": "bind", "outcome": "bound"})
	return v
}

// The limiter mounts a share container gets besides /etc/vcuda, with
// whether each is read-only.
var limiterMounts = []struct {
	path     string
	readOnly bool
}{
	{"/usr/local/vcuda/libvcuda.so", true},
	{"/etc/ld.so.preload", true},
	{"/run/vcuda", false},
}

// checkLimiter checks a running GPU container's limiter mounts in the
// runtime options: every GPU container gets its config directory read-only
// at /etc/vcuda; a share (1-99 vcuda-core) also gets libvcuda.so and
// /etc/ld.so.preload read-only and /run/vcuda read-write, a whole-card
// container none of those. A share's vcuda.cfg (device-plugin/docs/
// limiter-config.md, "Binary form") must hold its card, cores and memory,
// and not be marked incomplete.
func checkLimiter(p *v1.Pod, rec *nodeagentContainer, cores, mem int64, cards []int) error {
	type mount struct {
		host     string
		readOnly bool
	}
	mounts := map[string]mount{}
	for _, m := range rec.DeviceOptions.Mounts {
		mounts[m.ContainerPath] = mount{m.HostPath, m.ReadOnly}
	}
	cfg, ok := mounts["/etc/vcuda"]
	if !ok || !cfg.readOnly {
		return fmt.Errorf("pod %s: runtime mounts %+v, want /etc/vcuda read-only", p.Name, rec.DeviceOptions.Mounts)
	}
	share := cores < 100
	for _, want := range limiterMounts {
		m, has := mounts[want.path]
		switch {
		case share && !has:
			return fmt.Errorf("share pod %s (vcuda-core %d): no %s among the runtime mounts %+v", p.Name, cores, want.path, rec.DeviceOptions.Mounts)
		case share && m.readOnly != want.readOnly:
			return fmt.Errorf("share pod %s: %s from %s has read-only=%v, want %v", p.Name, want.path, m.host, m.readOnly, want.readOnly)
		case !share && has:
			return fmt.Errorf("whole-card pod %s (vcuda-core %d) got the limiter mount %s from %s", p.Name, cores, want.path, m.host)
		}
	}
	if !share {
		return nil
	}
	preload, err := os.ReadFile(mounts["/etc/ld.so.preload"].host)
	if err != nil {
		return fmt.Errorf("share pod %s: %w", p.Name, err)
	}
	if string(preload) != "/usr/local/vcuda/libvcuda.so\n" {
		return fmt.Errorf("share pod %s: ld.so.preload holds %q, want the one line /usr/local/vcuda/libvcuda.so", p.Name, preload)
	}
	path := filepath.Join(cfg.host, "vcuda.cfg")
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("share pod %s: %w", p.Name, err)
	}
	u32 := func(off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }
	switch {
	case len(b) != 4096:
		return fmt.Errorf("%s is %d bytes, want 4096", path, len(b))
	case string(b[0:4]) != "GMVC" || u32(4) != 1 || u32(8) != 4096:
		return fmt.Errorf("%s: magic %q, version %d, size field %d; want GMVC, 1, 4096", path, b[0:4], u32(4), u32(8))
	case u32(12)&2 != 0:
		return fmt.Errorf("%s of running pod %s is marked incomplete (flags %#x)", path, p.Name, u32(12))
	case u32(16) != 1:
		return fmt.Errorf("%s lists %d cards, a share has 1", path, u32(16))
	case len(cards) != 1 || int(u32(256)) != cards[0]:
		return fmt.Errorf("%s names card %d, the pod's annotation %v", path, u32(256), cards)
	case int64(u32(264)) != cores:
		return fmt.Errorf("%s gives %d cores, the pod asks for %d", path, u32(264), cores)
	case binary.LittleEndian.Uint64(b[272:]) != uint64(mem)*256<<20:
		return fmt.Errorf("%s gives %d bytes of memory, the pod asks for %d blocks of 256 MiB", path, binary.LittleEndian.Uint64(b[272:]), mem)
	case string(bytes.TrimRight(b[96:160], "\x00")) != p.Namespace:
		return fmt.Errorf("%s names namespace %q, the pod is in %s", path, bytes.TrimRight(b[96:160], "\x00"), p.Namespace)
	}
	// The UID is known when gpu-manager's pod watch had the pod at PreStartContainer.
	if uid := string(bytes.TrimRight(b[32:96], "\x00")); uid != "" && uid != string(p.UID) {
		return fmt.Errorf("%s names pod UID %s, pod %s/%s has %s", path, uid, p.Namespace, p.Name, p.UID)
	}
	return nil
}
