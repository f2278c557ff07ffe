package scenarios

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"gpumanager.local/e2e/internal/harness"
)

// Scenario g — what we ship installs on a real API server: deploy/manifests
// and the Helm chart rendered with its default values and with
// deploy/helm/values-alternative.yaml pass `kubectl apply --dry-run=server`
// (schema, strict field validation, admission), and the chart's
// self-signed certificate Job command, `gpu-admission certgen`, run as its
// own ServiceAccount with the chart's RBAC against the webhook
// configurations of deploy/manifests, creates the Secret and sets both
// caBundles; run again, it reuses the Secret.
//
// The alternative values use cert-manager (Certificate, Issuer). Without
// cert-manager installed the API server does not know those kinds, so the
// test installs minimal CustomResourceDefinitions for
// certificates/issuers.cert-manager.io v1 (schema: any object): the dry run
// then proves the objects are well-formed Kubernetes objects of those kinds
// in the right namespace, not that cert-manager's own schema accepts them.
func TestScenarioG_DeployManifestsAndHelmChartPassServerSideDryRunAndCertgenWorks(t *testing.T) {
	e := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	helm, err := harness.Binary(harness.EnvHelmBin)
	if err != nil {
		t.Fatal(err)
	}
	admission, err := harness.Binary(harness.EnvGPUAdmissionBin)
	if err != nil {
		t.Fatal(err)
	}
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	chart := filepath.Join(root, "deploy", "helm", "gpu-manager")

	// The alternative's release namespace, and cert-manager's kinds.
	if _, err := e.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "gpu-system"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	if out, stderr, err := e.Kubectl(ctx, certManagerCRDs, "apply", "-f", "-"); err != nil {
		t.Fatalf("installing minimal cert-manager CRDs: %v\n%s%s", err, out, stderr)
	}
	t.Cleanup(func() {
		_, _, _ = e.Kubectl(context.Background(), "", "delete", "--ignore-not-found", "crd", "certificates.cert-manager.io", "issuers.cert-manager.io")
	})
	if _, stderr, err := e.Kubectl(ctx, "", "wait", "--for=condition=Established", "--timeout=30s", "crd/certificates.cert-manager.io", "crd/issuers.cert-manager.io"); err != nil {
		t.Fatalf("cert-manager CRDs not established: %v: %s", err, stderr)
	}

	manifests, err := filepath.Glob(filepath.Join(root, "deploy", "manifests", "*.yaml"))
	if err != nil || len(manifests) == 0 {
		t.Fatalf("no deploy/manifests/*.yaml (%v)", err)
	}
	var all bytes.Buffer
	for _, m := range manifests {
		data, err := os.ReadFile(m)
		if err != nil {
			t.Fatal(err)
		}
		all.Write(data)
		all.WriteString("\n---\n")
	}
	renders := []struct{ name, yaml string }{{"deploy/manifests/*.yaml", all.String()}}
	for _, r := range []struct {
		name string
		args []string
	}{
		{"helm chart, default values", []string{"--namespace", "kube-system"}},
		{"helm chart, values-alternative.yaml", []string{"--namespace", "gpu-system", "-f", filepath.Join(root, "deploy", "helm", "values-alternative.yaml")}},
	} {
		args := append([]string{"template", "gpu-manager", chart, "--include-crds"}, r.args...)
		out, err := exec.CommandContext(ctx, helm, args...).Output()
		if err != nil {
			t.Fatalf("helm %s: %v %s", strings.Join(args, " "), err, stderrOf(err))
		}
		renders = append(renders, struct{ name, yaml string }{r.name, string(out)})
	}
	for _, r := range renders {
		objects := countObjects(t, r.yaml)
		out, stderr, err := e.Kubectl(ctx, r.yaml, "apply", "--dry-run=server", "--validate=strict", "-f", "-")
		if err != nil {
			t.Fatalf("%s: kubectl apply --dry-run=server failed: %v\n%s%s", r.name, err, out, stderr)
		}
		accepted := strings.Count(out, "(server dry run)")
		if accepted != objects {
			t.Fatalf("%s: the API server accepted %d objects in the dry run, the YAML has %d:\n%s", r.name, accepted, objects, out)
		}
		if w := warnings(stderr); len(w) > 0 {
			t.Errorf("%s: the API server warned:\n  %s", r.name, strings.Join(w, "\n  "))
		}
		t.Logf("%s: %d objects pass the server-side dry run", r.name, objects)
	}

	// certgen, exactly as the chart's Job runs it, against the webhook
	// configurations of deploy/manifests. Those point at a Service without
	// endpoints with failurePolicy Fail, so they are removed at the end.
	t.Cleanup(func() {
		bg := context.Background()
		_ = e.Client.AdmissionregistrationV1().ValidatingWebhookConfigurations().Delete(bg, "gpu-admission", metav1.DeleteOptions{})
		_ = e.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Delete(bg, "gpu-admission", metav1.DeleteOptions{})
		_ = e.Client.CoreV1().Secrets(harness.SystemNamespace).Delete(bg, "gpu-admission-tls", metav1.DeleteOptions{})
		_, _, _ = e.Kubectl(bg, "", "delete", "--ignore-not-found", "-f", filepath.Join(root, "deploy", "manifests", "certs.yaml"))
	})
	certs := filepath.Join(root, "deploy", "manifests", "certs.yaml")
	if out, stderr, err := e.Kubectl(ctx, "", "apply", "-f", filepath.Join(root, "deploy", "manifests", "webhooks.yaml"), "-f", certs); err != nil {
		t.Fatalf("applying webhooks.yaml and certs.yaml: %v\n%s%s", err, out, stderr)
	}
	jobArgs := certgenJobArgs(t, certs)
	kc, err := e.ServiceAccountKubeconfig(ctx, harness.SystemNamespace, "gpu-admission-certgen")
	if err != nil {
		t.Fatal(err)
	}
	run := func() {
		t.Helper()
		cmd := exec.CommandContext(ctx, admission, append(jobArgs, "--kubeconfig="+kc, "--wait=30s")...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("gpu-admission %s: %v\n%s", strings.Join(jobArgs, " "), err, out)
		}
		t.Logf("gpu-admission %s:\n%s", strings.Join(jobArgs, " "), strings.TrimSpace(string(ansi.ReplaceAllString(string(out), ""))))
	}
	run()
	secret, err := e.Client.CoreV1().Secrets(harness.SystemNamespace).Get(ctx, "gpu-admission-tls", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("certgen did not create the Secret: %v", err)
	}
	for _, k := range []string{"tls.crt", "tls.key", "ca.crt"} {
		if len(secret.Data[k]) == 0 {
			t.Fatalf("Secret gpu-admission-tls has no %s (keys: %v)", k, keys(secret.Data))
		}
	}
	if _, err := tls.X509KeyPair(secret.Data["tls.crt"], secret.Data["tls.key"]); err != nil {
		t.Fatalf("tls.key does not belong to tls.crt: %v", err)
	}
	verifyServing(t, secret.Data["tls.crt"], secret.Data["ca.crt"], "gpu-admission.kube-system.svc")
	checkCABundles(ctx, t, e, secret.Data["ca.crt"])

	// Again (a Helm upgrade runs the Job again): the Secret is reused.
	run()
	again, err := e.Client.CoreV1().Secrets(harness.SystemNamespace).Get(ctx, "gpu-admission-tls", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if again.ResourceVersion != secret.ResourceVersion || !bytes.Equal(again.Data["ca.crt"], secret.Data["ca.crt"]) || !bytes.Equal(again.Data["tls.crt"], secret.Data["tls.crt"]) {
		t.Fatalf("the second certgen replaced the Secret (resourceVersion %s → %s)", secret.ResourceVersion, again.ResourceVersion)
	}
	checkCABundles(ctx, t, e, secret.Data["ca.crt"])
}

// certManagerCRDs are minimal definitions of cert-manager's Certificate and
// Issuer (v1, namespaced, any content).
const certManagerCRDs = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: certificates.cert-manager.io
spec:
  group: cert-manager.io
  scope: Namespaced
  names: {kind: Certificate, listKind: CertificateList, plural: certificates, singular: certificate}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: issuers.cert-manager.io
spec:
  group: cert-manager.io
  scope: Namespaced
  names: {kind: Issuer, listKind: IssuerList, plural: issuers, singular: issuer}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

// countObjects counts the non-empty YAML documents that have a kind.
func countObjects(t *testing.T, data string) int {
	t.Helper()
	n := 0
	for _, doc := range harness.SplitYAML([]byte(data)) {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatalf("a rendered document is not YAML: %v\n%s", err, doc)
		}
		if meta.Kind != "" {
			n++
		}
	}
	return n
}

func warnings(stderr string) []string {
	var out []string
	for _, line := range strings.Split(stderr, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "Warning:") {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return out
}

// certgenJobArgs returns the args of the certgen Job's container in
// deploy/manifests/certs.yaml.
func certgenJobArgs(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range harness.SplitYAML(data) {
		var job batchv1.Job
		if err := yaml.Unmarshal(doc, &job); err != nil || job.Kind != "Job" {
			continue
		}
		for _, c := range job.Spec.Template.Spec.Containers {
			if len(c.Args) > 0 && c.Args[0] == "certgen" {
				return c.Args
			}
		}
	}
	t.Fatalf("%s has no Job running `gpu-admission certgen`", path)
	return nil
}

func verifyServing(t *testing.T, certPEM, caPEM []byte, dnsName string) {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.crt holds no PEM certificate")
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatal("tls.crt holds no PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: dnsName, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatalf("tls.crt does not verify against ca.crt for %s: %v", dnsName, err)
	}
}

// checkCABundles asserts that every webhook of both chart configurations
// carries ca.
func checkCABundles(ctx context.Context, t *testing.T, e *harness.Env, ca []byte) {
	t.Helper()
	v, err := e.Client.AdmissionregistrationV1().ValidatingWebhookConfigurations().Get(ctx, "gpu-admission", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := e.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, "gpu-admission", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var bundles []string
	for _, w := range v.Webhooks {
		bundles = append(bundles, "validating "+w.Name+": "+same(w.ClientConfig.CABundle, ca))
	}
	for _, w := range m.Webhooks {
		bundles = append(bundles, "mutating "+w.Name+": "+same(w.ClientConfig.CABundle, ca))
	}
	if len(bundles) < 2 {
		t.Fatalf("expected webhooks in both configurations, got %v", bundles)
	}
	for _, b := range bundles {
		if !strings.HasSuffix(b, "ok") {
			t.Fatalf("caBundle not set to the Secret's ca.crt: %v", bundles)
		}
	}
}

func same(got, want []byte) string {
	if bytes.Equal(bytes.TrimSpace(got), bytes.TrimSpace(want)) {
		return "ok"
	}
	return fmt.Sprintf("%d bytes, not the Secret's ca.crt", len(got))
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}
