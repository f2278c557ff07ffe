package harness

// Our binaries, the repository they come from, and the identities they run
// as.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Binary returns the executable named by the environment variable env
// (GPU_MANAGER_BIN, GPU_ADMISSION_BIN, HELM_BIN). A missing variable or file
// is an error that says how to get it: scenarios fail on it, they never skip.
func Binary(env string) (string, error) {
	path := os.Getenv(env)
	if path == "" {
		return "", fmt.Errorf("%s is not set: run the scenarios with e2e/run.sh, which builds gpu-manager and gpu-admission with cargo (and helm with scripts/tools.sh) and sets %s", env, env)
	}
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("%s=%s: %w (build it, or let e2e/run.sh build it)", env, path, err)
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("%s=%s is not an executable file", env, path)
	}
	return path, nil
}

// RepoRoot is the repository root (the directory holding deploy/ and
// Cargo.toml), found by walking up from the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if fileExists(filepath.Join(d, "Cargo.toml")) && fileExists(filepath.Join(d, "deploy", "scheduler", "kube-scheduler-config.yaml")) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no repository root (Cargo.toml + deploy/) above %s", dir)
		}
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// ServiceAccountKubeconfig writes a kubeconfig that authenticates as the
// ServiceAccount ns/name with a token from the TokenRequest API (valid for a
// day), as a pod running under that account would. The account is created
// when missing. Unlike the admin kubeconfig (system:masters) it is subject
// to RBAC and is who our webhook sees in userInfo.
func (e *Env) ServiceAccountKubeconfig(ctx context.Context, ns, name string) (string, error) {
	sa := e.Client.CoreV1().ServiceAccounts(ns)
	if _, err := sa.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("creating service account %s/%s: %w", ns, name, err)
	}
	expiry := int64(24 * 3600)
	tr, err := sa.CreateToken(ctx, name, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("requesting a token for %s/%s: %w", ns, name, err)
	}
	if tr.Status.Token == "" {
		return "", errors.New("the TokenRequest API returned an empty token")
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: e.Cluster.APIServerURL, CertificateAuthorityData: e.Cluster.CA.CertPEM}
	cfg.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: name, Namespace: ns}
	cfg.CurrentContext = "e2e"
	dir := filepath.Join(e.RunDir, "kubeconfigs")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	path := filepath.Join(dir, ns+"."+name)
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", fmt.Errorf("writing kubeconfig for %s/%s: %w", ns, name, err)
	}
	return path, nil
}

// KubectlAs runs kubectl with another kubeconfig (e.g. a ServiceAccount's).
func (e *Env) KubectlAs(ctx context.Context, kubeconfig, stdin string, args ...string) (stdout, stderr string, err error) {
	return e.kubectl(ctx, kubeconfig, stdin, args...)
}
