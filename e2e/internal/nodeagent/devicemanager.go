package nodeagent

import (
	"fmt"
	"path/filepath"
	_ "unsafe" // for go:linkname

	cadvisorapi "github.com/google/cadvisor/lib/model"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
)

// newManagerImpl is the kubelet device manager's own constructor. The
// exported devicemanager.NewManagerImpl hard-codes the socket to
// /var/lib/kubelet/device-plugins/kubelet.sock (pluginapi.KubeletSocket), which
// would force every simulated node on this machine to share one directory (or
// to run in its own mount namespace, which needs root). The unexported
// constructor takes the socket path and derives everything else from its
// directory — the registration socket, where plugin sockets are dialled, and
// the kubelet_internal_checkpoint file — exactly as the kubelet's own unit
// tests use it. The linker checks only that the symbol exists, not its
// signature; devicemanager_test.go guards the signature after upgrades.
//
//go:linkname newManagerImpl k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.newManagerImpl
func newManagerImpl(logger klog.Logger, socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*devicemanager.ManagerImpl, error)

// NewDeviceManager builds the kubelet's device manager serving its
// registration socket (kubelet.sock) in dir, with its checkpoint in the same
// directory, as the kubelet does in /var/lib/kubelet/device-plugins.
func NewDeviceManager(logger klog.Logger, dir string, store topologymanager.Store) (*devicemanager.ManagerImpl, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("device-plugin dir %q: %w", dir, err)
	}
	sock := filepath.Join(abs, filepath.Base(pluginapi.KubeletSocket))
	return newManagerImpl(logger, sock, nil, store)
}
