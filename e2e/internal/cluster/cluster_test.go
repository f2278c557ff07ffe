package cluster

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestSchedulerConfigKeepsProfilesAndExtendersButUsesTheClusterKubeconfig(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "in.yaml")
	in := `apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: /etc/kubernetes/scheduler.conf
  qps: 77
extenders:
- urlPrefix: http://127.0.0.1:3456/scheduler
  filterVerb: filter
  managedResources:
  - name: tencent.com/vcuda-core
    ignoredByScheduler: false
`
	if err := os.WriteFile(src, []byte(in), 0o644); err != nil {
		t.Fatal(err)
	}
	c := &Cluster{Options: Options{RunDir: dir}, Kubeconfig: "/run/e2e/kubeconfig"}
	out, err := c.writeSchedulerConfig(src)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]interface{}
	if err := yaml.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	conn := got["clientConnection"].(map[string]interface{})
	if conn["kubeconfig"] != "/run/e2e/kubeconfig" || conn["qps"] != float64(77) {
		t.Fatalf("clientConnection = %v, want the cluster kubeconfig and the original qps", conn)
	}
	ext := got["extenders"].([]interface{})[0].(map[string]interface{})
	if ext["urlPrefix"] != "http://127.0.0.1:3456/scheduler" || ext["filterVerb"] != "filter" {
		t.Fatalf("extender changed: %v", ext)
	}
}

func TestSchedulerConfigWithoutAFileIsAMinimalConfigForTheCluster(t *testing.T) {
	dir := t.TempDir()
	c := &Cluster{Options: Options{RunDir: dir}, Kubeconfig: "/k"}
	out, err := c.writeSchedulerConfig("")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(out)
	for _, want := range []string{"kind: KubeSchedulerConfiguration", "apiVersion: kubescheduler.config.k8s.io/v1", "kubeconfig: /k"} {
		if !strings.Contains(string(data), want) {
			t.Fatalf("generated config lacks %q:\n%s", want, data)
		}
	}
}

func TestSchedulerConfigOfAnotherKindIsRejectedWithTheKindNamed(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(src, []byte("kind: Policy\napiVersion: v1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := &Cluster{Options: Options{RunDir: dir}, Kubeconfig: "/k"}
	_, err := c.writeSchedulerConfig(src)
	if err == nil || !strings.Contains(err.Error(), "has kind Policy, want KubeSchedulerConfiguration") {
		t.Fatalf("err = %v, want a kind mismatch naming Policy", err)
	}
}

func TestIssuedServingCertificateIsSignedByTheCAForLoopback(t *testing.T) {
	ca, err := NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	kp, err := ca.IssueServing("webhook", []string{"localhost"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := parseCert(kp.CertPEM)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignatureFrom(ca.Cert); err != nil {
		t.Fatalf("serving cert not signed by the CA: %v", err)
	}
	if err := cert.VerifyHostname("localhost"); err != nil {
		t.Fatal(err)
	}
}

func parseCert(pemData []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(pemData)
	if block == nil {
		return nil, fmt.Errorf("no PEM block")
	}
	return x509.ParseCertificate(block.Bytes)
}
