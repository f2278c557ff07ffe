// Package cluster starts a real Kubernetes control plane on loopback for the
// end-to-end tests: etcd, kube-apiserver and kube-scheduler, all built from
// their Go modules (see run.sh), with a throw-away PKI and a kubeconfig that
// kubectl, the node agents and our binaries share.
package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/yaml"
)

// Binaries the control plane needs in Options.BinDir.
const (
	EtcdBin          = "etcd"
	APIServerBin     = "kube-apiserver"
	SchedulerBin     = "kube-scheduler"
	KubectlBin       = "kubectl"
	NodeAgentBin     = "gpu-node-agent"
	ServiceClusterIP = "10.0.0.1"
)

// Options configures a control plane.
type Options struct {
	// BinDir holds etcd, kube-apiserver and kube-scheduler.
	BinDir string
	// RunDir is where certificates, data, configs and logs go; it must exist.
	RunDir string
	// SchedulerConfig is a KubeSchedulerConfiguration file (e.g. the one in
	// deploy/scheduler/). Its clientConnection.kubeconfig is replaced with the
	// cluster's kubeconfig; everything else (profiles, extenders, leader
	// election) is used as written. Empty means the scheduler's defaults.
	SchedulerConfig string
	// APIServerArgs are appended to the API server's flags (later flags win).
	APIServerArgs []string
	// SchedulerArgs are appended to the scheduler's flags.
	SchedulerArgs []string
}

// Timings records how long start-up took.
type Timings struct {
	APIServerReady time.Duration `json:"apiServerReady"`
	SchedulerReady time.Duration `json:"schedulerReady"`
	Total          time.Duration `json:"total"`
}

// Cluster is a running control plane.
type Cluster struct {
	Options
	CA            *CA
	Kubeconfig    string
	APIServerURL  string
	RestConfig    *rest.Config
	Client        kubernetes.Interface
	Etcd          *Process
	APIServer     *Process
	Scheduler     *Process
	SchedulerPort int
	Timings       Timings
}

// Start brings up etcd, kube-apiserver and kube-scheduler and waits until the
// API server's /readyz and the scheduler's /readyz answer ok.
func Start(ctx context.Context, opts Options) (c *Cluster, err error) {
	begin := time.Now()
	for _, b := range []string{EtcdBin, APIServerBin, SchedulerBin} {
		if _, err := os.Stat(filepath.Join(opts.BinDir, b)); err != nil {
			return nil, fmt.Errorf("control-plane binary %s missing in %s (build it with e2e/run.sh build): %w", b, opts.BinDir, err)
		}
	}
	c = &Cluster{Options: opts}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	pki := filepath.Join(opts.RunDir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, err
	}
	if c.CA, err = NewCA("gpu-manager-e2e-ca"); err != nil {
		return nil, err
	}
	caPath := filepath.Join(pki, "ca.crt")
	if err := os.WriteFile(caPath, c.CA.CertPEM, 0o644); err != nil {
		return nil, err
	}
	serving, err := c.CA.IssueServing("kube-apiserver",
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(ServiceClusterIP)})
	if err != nil {
		return nil, err
	}
	servingCrt, servingKey, err := serving.Write(pki, "apiserver")
	if err != nil {
		return nil, err
	}
	admin, err := c.CA.IssueClient("e2e-admin", "system:masters")
	if err != nil {
		return nil, err
	}
	saPub, saKey, err := writeServiceAccountKeys(pki)
	if err != nil {
		return nil, err
	}

	etcdClient, err := FreePort()
	if err != nil {
		return nil, err
	}
	etcdPeer, err := FreePort()
	if err != nil {
		return nil, err
	}
	apiPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	logs := filepath.Join(opts.RunDir, "logs")
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClient)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeer)
	c.Etcd, err = StartProcess("etcd", filepath.Join(opts.BinDir, EtcdBin), []string{
		"--name=e2e",
		"--data-dir=" + filepath.Join(opts.RunDir, "etcd"),
		"--listen-client-urls=" + etcdURL,
		"--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=e2e=" + peerURL,
		"--unsafe-no-fsync",
		"--log-level=warn",
	}, filepath.Join(logs, "etcd.log"))
	if err != nil {
		return nil, err
	}

	// The API server retries etcd until it answers, so both start together.
	c.APIServerURL = "https://127.0.0.1:" + strconv.Itoa(apiPort)
	apiArgs := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(apiPort),
		"--tls-cert-file=" + servingCrt,
		"--tls-private-key-file=" + servingKey,
		"--client-ca-file=" + caPath,
		"--service-account-key-file=" + saPub,
		"--service-account-signing-key-file=" + saKey,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=10.0.0.0/24",
		// Everyone the harness runs uses the system:masters admin
		// certificate; RBAC is on so that deploy/'s RBAC objects are real.
		"--authorization-mode=RBAC",
		// Webhooks are on by default; named here because the tests rely on them.
		"--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
		// No kube-controller-manager runs, so nothing would lift the
		// node.kubernetes.io/not-ready taint this plugin puts on new nodes.
		"--disable-admission-plugins=TaintNodesByCondition",
		"--allow-privileged=true",
		"--profiling=false",
		"--endpoint-reconciler-type=none",
		"--v=1",
	}
	c.APIServer, err = StartProcess("kube-apiserver", filepath.Join(opts.BinDir, APIServerBin),
		append(apiArgs, opts.APIServerArgs...), filepath.Join(logs, "kube-apiserver.log"))
	if err != nil {
		return nil, err
	}

	c.Kubeconfig = filepath.Join(opts.RunDir, "kubeconfig")
	if err := writeKubeconfig(c.Kubeconfig, c.APIServerURL, c.CA.CertPEM, admin); err != nil {
		return nil, err
	}
	if c.RestConfig, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return nil, err
	}
	c.RestConfig.QPS, c.RestConfig.Burst = 200, 400
	if c.Client, err = kubernetes.NewForConfig(c.RestConfig); err != nil {
		return nil, err
	}
	if err := c.waitAPIServerReady(ctx, 60*time.Second); err != nil {
		return nil, err
	}
	c.Timings.APIServerReady = time.Since(begin)

	// Nothing runs the service-account controller; pods in "default" need
	// its ServiceAccount to pass the ServiceAccount admission plugin.
	if err := EnsureServiceAccount(ctx, c.Client, metav1.NamespaceDefault); err != nil {
		return nil, err
	}

	if err := c.StartScheduler(ctx); err != nil {
		return nil, err
	}
	c.Timings.SchedulerReady = time.Since(begin)
	c.Timings.Total = time.Since(begin)
	if data, err := json.MarshalIndent(c.Timings, "", "  "); err == nil {
		_ = os.WriteFile(filepath.Join(opts.RunDir, "timings.json"), data, 0o644)
	}
	return c, nil
}

// RestartScheduler restarts kube-scheduler with another
// KubeSchedulerConfiguration file ("" for the defaults).
func (c *Cluster) RestartScheduler(ctx context.Context, schedulerConfig string) error {
	c.SchedulerConfig = schedulerConfig
	return c.StartScheduler(ctx)
}

// StartScheduler (re)starts kube-scheduler with Options.SchedulerConfig and
// waits for its /readyz.
func (c *Cluster) StartScheduler(ctx context.Context) error {
	if c.Scheduler != nil {
		c.Scheduler.Stop(10 * time.Second)
	}
	cfgPath, err := c.writeSchedulerConfig(c.SchedulerConfig)
	if err != nil {
		return err
	}
	port, err := FreePort()
	if err != nil {
		return err
	}
	args := append([]string{
		"--config=" + cfgPath,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + filepath.Join(c.RunDir, "scheduler-certs"),
		"--authentication-kubeconfig=" + c.Kubeconfig,
		"--authorization-kubeconfig=" + c.Kubeconfig,
		// One scheduler: no need to wait for a Lease after a restart. This
		// flag overrides the file (SchedulerArgs can set it back).
		"--leader-elect=false",
		"--v=2",
	}, c.SchedulerArgs...)
	c.Scheduler, err = StartProcess("kube-scheduler", filepath.Join(c.BinDir, SchedulerBin), args,
		filepath.Join(c.RunDir, "logs", "kube-scheduler.log"))
	if err != nil {
		return err
	}
	c.SchedulerPort = port
	return waitHTTPS(ctx, c.Scheduler, fmt.Sprintf("https://127.0.0.1:%d/readyz", port), nil, 60*time.Second)
}

// writeSchedulerConfig copies the given KubeSchedulerConfiguration (or a
// minimal one) with clientConnection.kubeconfig pointing at this cluster; the
// scheduler ignores --kubeconfig when --config is given.
func (c *Cluster) writeSchedulerConfig(src string) (string, error) {
	cfg := map[string]interface{}{
		"apiVersion": "kubescheduler.config.k8s.io/v1",
		"kind":       "KubeSchedulerConfiguration",
	}
	if src != "" {
		data, err := os.ReadFile(src)
		if err != nil {
			return "", fmt.Errorf("reading scheduler config: %w", err)
		}
		cfg = map[string]interface{}{}
		if err := yaml.Unmarshal(data, &cfg); err != nil {
			return "", fmt.Errorf("scheduler config %s is not YAML: %w", src, err)
		}
		if cfg["kind"] != "KubeSchedulerConfiguration" {
			return "", fmt.Errorf("scheduler config %s has kind %v, want KubeSchedulerConfiguration", src, cfg["kind"])
		}
	}
	conn, _ := cfg["clientConnection"].(map[string]interface{})
	if conn == nil {
		conn = map[string]interface{}{}
	}
	conn["kubeconfig"] = c.Kubeconfig
	cfg["clientConnection"] = conn
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return "", err
	}
	path := filepath.Join(c.RunDir, "kube-scheduler-config.yaml")
	return path, os.WriteFile(path, out, 0o644)
}

func (c *Cluster) waitAPIServerReady(ctx context.Context, timeout time.Duration) error {
	tr, err := rest.TransportFor(c.RestConfig)
	if err != nil {
		return err
	}
	return waitHTTPS(ctx, c.APIServer, c.APIServerURL+"/readyz", tr, timeout)
}

// waitHTTPS polls url until it answers 200, the process dies or timeout.
func waitHTTPS(ctx context.Context, p *Process, url string, tr http.RoundTripper, timeout time.Duration) error {
	if tr == nil {
		tr = &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // loopback readiness probe
	}
	client := &http.Client{Transport: tr, Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	var last string
	for {
		if exited, werr := p.Exited(); exited {
			return fmt.Errorf("%s exited during start-up (%v); last log lines:\n%s", p.Name, werr, p.Tail(30))
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err == nil {
			body := make([]byte, 2048)
			n, _ := resp.Body.Read(body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body[:n])))
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready at %s after %s (last: %s); last log lines:\n%s", p.Name, url, timeout, last, p.Tail(30))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Stop stops the scheduler, the API server and etcd, in that order.
func (c *Cluster) Stop() {
	for _, p := range []*Process{c.Scheduler, c.APIServer, c.Etcd} {
		if p != nil {
			p.Stop(10 * time.Second)
		}
	}
}

// EnsureServiceAccount creates the namespace (if missing) and its "default"
// ServiceAccount, the job of the controllers this harness does not run.
func EnsureServiceAccount(ctx context.Context, client kubernetes.Interface, namespace string) error {
	_, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", namespace, err)
	}
	_, err = client.CoreV1().ServiceAccounts(namespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating default service account in %s: %w", namespace, err)
	}
	return nil
}

func writeKubeconfig(path, server string, caPEM []byte, user *KeyPair) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos["e2e-admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: user.CertPEM, ClientKeyData: user.KeyPEM}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "e2e-admin"}
	cfg.CurrentContext = "e2e"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("writing kubeconfig: %w", err)
	}
	return nil
}
