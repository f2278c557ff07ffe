package harness

// The GPU stack: our gpu-admission (scheduler extender + admission webhook)
// registered with the real kube-apiserver and kube-scheduler the way the
// chart registers it, and our gpu-manager on simulated nodes.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/yaml"

	"gpumanager.local/e2e/internal/cluster"
)

// Names the GPU stack uses.
const (
	// SystemNamespace is where the chart puts gpu-admission, gpu-manager,
	// their ServiceAccounts and the Lease (the default install namespace).
	SystemNamespace = "kube-system"
	// AdmissionServiceAccount / ManagerServiceAccount are the accounts of
	// deploy/manifests/*-rbac.yaml; our webhook trusts exactly these two
	// with the reserved annotations (its default --privileged-service-accounts).
	AdmissionServiceAccount = "gpu-admission"
	ManagerServiceAccount   = "gpu-manager"
	// WebhookConfigName names the e2e's webhook configurations. It differs
	// from the chart's "gpu-admission", which scenario g creates from the
	// manifests for certgen.
	WebhookConfigName = "gpu-admission-e2e"
	// LeaseName is gpu-admission's default Lease.
	LeaseName = "gpu-admission"
	// Resource names and annotation keys (default domain tencent.com).
	VcudaCore          = "tencent.com/vcuda-core"
	VcudaMemory        = "tencent.com/vcuda-memory"
	AnnotGPUIdxPrefix  = "tencent.com/predicate-gpu-idx-"
	AnnotPredicateNode = "tencent.com/predicate-node"
	AnnotPredicateTime = "tencent.com/predicate-time"
	AnnotGPUAssigned   = "tencent.com/gpu-assigned"
	AnnotInventory     = "tencent.com/gpu-inventory"
)

// GPUStackOptions tunes the stack.
type GPUStackOptions struct {
	// Replicas of gpu-admission (the chart's default is 2, leader-elected).
	Replicas int
	// LeaseDuration / RetryPeriod of the leader election. The defaults
	// (15s / 2s) are shortened so that a takeover fits a test run.
	LeaseDuration, RetryPeriod time.Duration
}

// GPUStack is gpu-admission running behind a Service stand-in, registered
// as admission webhook and scheduler extender, plus the identities and
// configuration our binaries need.
type GPUStack struct {
	Env  *Env
	Opts GPUStackOptions
	// Bins and the repository they were built from.
	ManagerBin, AdmissionBin, RepoRoot string
	// Dir holds the stack's files (certificates, configs, logs).
	Dir string
	// AdmissionKubeconfig and ManagerKubeconfig authenticate as the
	// ServiceAccounts of deploy/manifests (RBAC from the same files).
	AdmissionKubeconfig, ManagerKubeconfig string
	// Service stands in for the gpu-admission Service: ports "extender"
	// and "webhook".
	Service *Service
	// SchedulerConfig is deploy/scheduler/kube-scheduler-config.yaml with
	// urlPrefix pointing at the Service stand-in.
	SchedulerConfig string
	// WebhookCA is the caBundle registered for the webhook.
	WebhookCA []byte

	tlsCert, tlsKey string
	replicas        []*AdmissionReplica
}

// AdmissionReplica is one gpu-admission serve process.
type AdmissionReplica struct {
	Identity     string
	ExtenderAddr string
	WebhookAddr  string
	LogPath      string
	args         []string
	proc         *Process
}

// Process re-exports the cluster's process type for scenarios.
type Process = cluster.Process

// StartGPUStack installs what the chart installs before gpu-admission runs
// (the GpuQuota CRD from `gpu-admission crd`, the RBAC of deploy/manifests),
// starts opts.Replicas gpu-admission replicas with --leader-elect behind the
// Service stand-in, registers the validating and mutating webhooks of
// deploy/manifests/webhooks.yaml (everything kept except clientConfig, which
// becomes the stand-in's URL and the harness CA) and points kube-scheduler at
// the extender with deploy/scheduler/kube-scheduler-config.yaml.
func StartGPUStack(ctx context.Context, e *Env, opts GPUStackOptions) (*GPUStack, error) {
	if opts.Replicas <= 0 {
		opts.Replicas = 2
	}
	if opts.LeaseDuration == 0 {
		opts.LeaseDuration = 8 * time.Second
	}
	if opts.RetryPeriod == 0 {
		opts.RetryPeriod = time.Second
	}
	s := &GPUStack{Env: e, Opts: opts, Dir: filepath.Join(e.RunDir, "gpu-stack")}
	var err error
	if s.ManagerBin, err = Binary(EnvGPUManagerBin); err != nil {
		return nil, err
	}
	if s.AdmissionBin, err = Binary(EnvGPUAdmissionBin); err != nil {
		return nil, err
	}
	if s.RepoRoot, err = RepoRoot(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return nil, err
	}
	e.OnClose(s.Stop)

	// The CRD as the binary prints it (the chart ships the same text).
	crd, err := exec.CommandContext(ctx, s.AdmissionBin, "crd").Output()
	if err != nil {
		return nil, fmt.Errorf("gpu-admission crd: %w", err)
	}
	if _, stderr, err := e.Kubectl(ctx, string(crd), "apply", "-f", "-"); err != nil {
		return nil, fmt.Errorf("applying the GpuQuota CRD: %v: %s", err, stderr)
	}
	if _, stderr, err := e.Kubectl(ctx, "", "wait", "--for=condition=Established", "--timeout=30s", "crd/gpuquotas.gpu.tkestack.io"); err != nil {
		return nil, fmt.Errorf("GpuQuota CRD not established: %v: %s", err, stderr)
	}
	manifests := filepath.Join(s.RepoRoot, "deploy", "manifests")
	if _, stderr, err := e.Kubectl(ctx, "", "apply", "-f", filepath.Join(manifests, "gpu-admission-rbac.yaml"), "-f", filepath.Join(manifests, "gpu-manager-rbac.yaml")); err != nil {
		return nil, fmt.Errorf("applying deploy/manifests RBAC: %v: %s", err, stderr)
	}
	if s.AdmissionKubeconfig, err = e.ServiceAccountKubeconfig(ctx, SystemNamespace, AdmissionServiceAccount); err != nil {
		return nil, err
	}
	if s.ManagerKubeconfig, err = e.ServiceAccountKubeconfig(ctx, SystemNamespace, ManagerServiceAccount); err != nil {
		return nil, err
	}

	// The webhook's serving certificate, signed by the harness CA, for the
	// address the API server dials (the Service stand-in on 127.0.0.1).
	kp, err := e.Cluster.CA.IssueServing("gpu-admission", []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1")})
	if err != nil {
		return nil, err
	}
	if s.tlsCert, s.tlsKey, err = kp.Write(s.Dir, "webhook"); err != nil {
		return nil, err
	}
	s.WebhookCA = e.Cluster.CA.CertPEM

	if s.Service, err = StartService("gpu-admission", "extender", "webhook"); err != nil {
		return nil, err
	}
	for i := 1; i <= opts.Replicas; i++ {
		if _, err := s.AddReplica(ctx, fmt.Sprintf("gpu-admission-%d", i)); err != nil {
			return nil, err
		}
	}
	if _, err := s.Service.WaitEndpoints(ctx, 60*time.Second, "ready (one leader)", func(r []string) bool { return len(r) == 1 }); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, s.replicaTails())
	}
	if err := s.registerWebhooks(ctx); err != nil {
		return nil, err
	}
	if err := s.writeSchedulerConfig(); err != nil {
		return nil, err
	}
	if err := s.EnsureScheduler(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// AddReplica starts another gpu-admission replica and adds it to the
// Service stand-in.
func (s *GPUStack) AddReplica(ctx context.Context, identity string) (*AdmissionReplica, error) {
	ext, err := cluster.FreePort()
	if err != nil {
		return nil, err
	}
	hook, err := cluster.FreePort()
	if err != nil {
		return nil, err
	}
	r := &AdmissionReplica{
		Identity:     identity,
		ExtenderAddr: "127.0.0.1:" + strconv.Itoa(ext),
		WebhookAddr:  "127.0.0.1:" + strconv.Itoa(hook),
		LogPath:      filepath.Join(s.Dir, identity+".log"),
	}
	r.args = []string{
		"serve",
		"--extender-addr=" + r.ExtenderAddr,
		"--webhook-addr=" + r.WebhookAddr,
		"--tls-cert=" + s.tlsCert,
		"--tls-key=" + s.tlsKey,
		"--kubeconfig=" + s.AdmissionKubeconfig,
		"--leader-elect",
		"--lease-namespace=" + SystemNamespace,
		"--identity=" + identity,
		"--lease-duration=" + s.Opts.LeaseDuration.String(),
		"--lease-retry-period=" + s.Opts.RetryPeriod.String(),
		// GpuQuota status is what scenario b waits for before it relies
		// on a new quota (default 15s).
		"--quota-status-interval=1s",
	}
	s.replicas = append(s.replicas, r)
	if err := s.StartReplica(ctx, r); err != nil {
		return nil, err
	}
	return r, nil
}

// StartReplica (re)starts a replica's process and waits for its /healthz.
func (s *GPUStack) StartReplica(ctx context.Context, r *AdmissionReplica) error {
	if r.proc != nil {
		if exited, _ := r.proc.Exited(); !exited {
			return fmt.Errorf("replica %s is already running", r.Identity)
		}
	}
	p, err := cluster.StartProcess(r.Identity, s.AdmissionBin, r.args, r.LogPath)
	if err != nil {
		return err
	}
	r.proc = p
	s.Service.SetBackend(Backend{
		Name:     r.Identity,
		ReadyURL: "http://" + r.ExtenderAddr + "/readyz",
		Targets:  map[string]string{"extender": r.ExtenderAddr, "webhook": r.WebhookAddr},
	})
	return waitHTTP(ctx, p, "http://"+r.ExtenderAddr+"/healthz", 30*time.Second)
}

// Replicas are the gpu-admission replicas, in start order.
func (s *GPUStack) Replicas() []*AdmissionReplica { return s.replicas }

// Replica returns the replica with this identity.
func (s *GPUStack) Replica(identity string) *AdmissionReplica {
	for _, r := range s.replicas {
		if r.Identity == identity {
			return r
		}
	}
	return nil
}

// Running reports whether the replica's process is alive.
func (r *AdmissionReplica) Running() bool {
	if r.proc == nil {
		return false
	}
	exited, _ := r.proc.Exited()
	return !exited
}

// Kill ends the replica with SIGKILL (a crashed pod).
func (r *AdmissionReplica) Kill() {
	if r.proc != nil {
		r.proc.Kill()
	}
}

// Pid is the replica's process id.
func (r *AdmissionReplica) Pid() int {
	if r.proc == nil {
		return 0
	}
	return r.proc.Pid()
}

// Ready asks the replica's /readyz.
func (r *AdmissionReplica) Ready() bool {
	c := &http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + r.ExtenderAddr + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Leader returns the replica the Service stand-in sends traffic to (the
// only ready one), waiting up to timeout for exactly one.
func (s *GPUStack) Leader(ctx context.Context, timeout time.Duration) (*AdmissionReplica, error) {
	ready, err := s.Service.WaitEndpoints(ctx, timeout, "exactly one ready replica", func(r []string) bool { return len(r) == 1 })
	if err != nil {
		return nil, fmt.Errorf("%w\n%s", err, s.replicaTails())
	}
	return s.Replica(ready[0]), nil
}

// EnsureReady restarts replicas that are not running (a Deployment would)
// and puts the scheduler back on the extender configuration; scenarios call
// it first, since earlier scenarios may have killed a replica or switched
// the scheduler's configuration.
func (s *GPUStack) EnsureReady(ctx context.Context) error {
	for _, r := range s.replicas {
		if !r.Running() {
			if err := s.StartReplica(ctx, r); err != nil {
				return err
			}
		}
	}
	if _, err := s.Leader(ctx, 60*time.Second); err != nil {
		return err
	}
	return s.EnsureScheduler(ctx)
}

// EnsureScheduler (re)starts kube-scheduler with SchedulerConfig unless it
// already runs with it.
func (s *GPUStack) EnsureScheduler(ctx context.Context) error {
	if s.Env.Cluster.SchedulerConfig == s.SchedulerConfig {
		if exited, _ := s.Env.Cluster.Scheduler.Exited(); !exited {
			return nil
		}
	}
	return s.Env.Cluster.RestartScheduler(ctx, s.SchedulerConfig)
}

// Stop ends every replica and the Service stand-in.
func (s *GPUStack) Stop() {
	for _, r := range s.replicas {
		if r.proc != nil {
			r.proc.Stop(5 * time.Second)
		}
	}
	if s.Service != nil {
		s.Service.Close()
	}
}

func (s *GPUStack) replicaTails() string {
	var b strings.Builder
	for _, r := range s.replicas {
		if r.proc != nil {
			fmt.Fprintf(&b, "--- %s (%s):\n%s\n", r.Identity, r.LogPath, r.proc.Tail(15))
		}
	}
	return b.String()
}

// registerWebhooks creates the chart's webhook configurations (from
// deploy/manifests/webhooks.yaml) under WebhookConfigName, with clientConfig
// replaced by the stand-in's URL and the harness CA; rules, failure policy,
// side effects, timeouts and namespace selectors stay as shipped. It returns
// once the API server calls the webhook (a dry-run of an invalid pod is
// denied with our message).
func (s *GPUStack) registerWebhooks(ctx context.Context) error {
	data, err := os.ReadFile(filepath.Join(s.RepoRoot, "deploy", "manifests", "webhooks.yaml"))
	if err != nil {
		return err
	}
	base := "https://" + s.Service.Addr("webhook")
	for _, doc := range SplitYAML(data) {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return fmt.Errorf("deploy/manifests/webhooks.yaml: %w", err)
		}
		switch meta.Kind {
		case "ValidatingWebhookConfiguration":
			var cfg admissionregistrationv1.ValidatingWebhookConfiguration
			if err := yaml.UnmarshalStrict(doc, &cfg); err != nil {
				return fmt.Errorf("deploy/manifests/webhooks.yaml: %w", err)
			}
			cfg.Name = WebhookConfigName
			for i := range cfg.Webhooks {
				cfg.Webhooks[i].ClientConfig = clientConfig(base, cfg.Webhooks[i].ClientConfig, s.WebhookCA)
			}
			api := s.Env.Client.AdmissionregistrationV1().ValidatingWebhookConfigurations()
			if err := api.Delete(ctx, cfg.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			if _, err := api.Create(ctx, &cfg, metav1.CreateOptions{}); err != nil {
				return fmt.Errorf("creating ValidatingWebhookConfiguration: %w", err)
			}
		case "MutatingWebhookConfiguration":
			var cfg admissionregistrationv1.MutatingWebhookConfiguration
			if err := yaml.UnmarshalStrict(doc, &cfg); err != nil {
				return fmt.Errorf("deploy/manifests/webhooks.yaml: %w", err)
			}
			cfg.Name = WebhookConfigName
			for i := range cfg.Webhooks {
				cfg.Webhooks[i].ClientConfig = clientConfig(base, cfg.Webhooks[i].ClientConfig, s.WebhookCA)
			}
			api := s.Env.Client.AdmissionregistrationV1().MutatingWebhookConfigurations()
			if err := api.Delete(ctx, cfg.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			if _, err := api.Create(ctx, &cfg, metav1.CreateOptions{}); err != nil {
				return fmt.Errorf("creating MutatingWebhookConfiguration: %w", err)
			}
		case "":
		default:
			return fmt.Errorf("deploy/manifests/webhooks.yaml: unexpected kind %q", meta.Kind)
		}
	}
	// The API server picks configurations up through an informer: wait
	// until an invalid pod is denied by our webhook.
	probe := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "webhook-probe"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "probe", Image: "registry.invalid/e2e/pause:1",
			Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{VcudaCore: resource.MustParse("150")}},
		}}},
	}
	var last error
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, last = s.Env.Client.CoreV1().Pods(metav1.NamespaceDefault).Create(ctx, probe, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return last != nil && strings.Contains(last.Error(), "tencent.com/vcuda-core=150 is invalid"), nil
	})
	if err != nil {
		return fmt.Errorf("the API server does not call our webhook (last answer to a dry-run pod with vcuda-core=150: %v)\n%s", last, s.replicaTails())
	}
	return nil
}

func clientConfig(base string, in admissionregistrationv1.WebhookClientConfig, ca []byte) admissionregistrationv1.WebhookClientConfig {
	path := "/validate"
	if in.Service != nil && in.Service.Path != nil {
		path = *in.Service.Path
	}
	url := base + path
	return admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: ca}
}

// writeSchedulerConfig copies deploy/scheduler/kube-scheduler-config.yaml
// with every extender's urlPrefix pointing at the Service stand-in;
// everything else (verbs, weight, nodeCacheCapable, managedResources,
// httpTimeout, ignorable, profiles) is kept.
func (s *GPUStack) writeSchedulerConfig() error {
	src := filepath.Join(s.RepoRoot, "deploy", "scheduler", "kube-scheduler-config.yaml")
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	cfg := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &cfg); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	exts, _ := cfg["extenders"].([]interface{})
	if len(exts) == 0 {
		return fmt.Errorf("%s has no extenders", src)
	}
	for _, x := range exts {
		m, ok := x.(map[string]interface{})
		if !ok {
			return fmt.Errorf("%s: an extender is not a mapping", src)
		}
		prefix, _ := m["urlPrefix"].(string)
		i := strings.Index(prefix, "://")
		j := -1
		if i >= 0 {
			j = strings.Index(prefix[i+3:], "/")
		}
		if j < 0 {
			return fmt.Errorf("%s: urlPrefix %q has no path", src, prefix)
		}
		m["urlPrefix"] = "http://" + s.Service.Addr("extender") + prefix[i+3+j:]
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	s.SchedulerConfig = filepath.Join(s.Dir, "kube-scheduler-config.yaml")
	return os.WriteFile(s.SchedulerConfig, out, 0o644)
}

// SplitYAML splits a multi-document YAML file; empty documents are dropped.
func SplitYAML(data []byte) [][]byte {
	var out [][]byte
	for _, doc := range bytes.Split(data, []byte("\n---")) {
		trimmed := bytes.TrimSpace(stripComments(doc))
		if len(trimmed) == 0 || bytes.Equal(trimmed, []byte("---")) {
			continue
		}
		out = append(out, doc)
	}
	return out
}

func stripComments(doc []byte) []byte {
	var b bytes.Buffer
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) == 0 || t[0] == '#' {
			continue
		}
		b.Write(line)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// Get fetches url (plain HTTP on loopback) and returns the body of a 200.
func Get(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(resp.Body); err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return b.Bytes(), fmt.Errorf("GET %s: HTTP %d: %s", url, resp.StatusCode, strings.TrimSpace(b.String()))
	}
	return b.Bytes(), nil
}

// waitHTTP polls url until it answers 200, the process dies or timeout.
func waitHTTP(ctx context.Context, p *Process, url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if exited, werr := p.Exited(); exited {
			return fmt.Errorf("%s exited during start-up (%v); log %s:\n%s", p.Name, werr, p.LogPath, p.Tail(30))
		}
		if _, last = Get(ctx, url); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %s not 200 within %s (last: %v); log %s:\n%s", p.Name, url, timeout, last, p.LogPath, p.Tail(30))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// jsonUnmarshal decodes with a message that names what was decoded.
func jsonUnmarshal(what string, data []byte, v interface{}) error {
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}
