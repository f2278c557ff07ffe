package nodeagent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
)

// RuntimeStateFile is the name of the file, inside the agent's state
// directory, where the stand-in container runtime records the containers it
// "created". Tests read it to see what the device manager handed to the
// runtime (envs, mounts, device nodes, annotations).
const RuntimeStateFile = "containers.json"

// Container is what the stand-in runtime knows about one container: which
// pod it belongs to and the run options the kubelet would have passed to a
// CRI runtime after GetDeviceRunContainerOptions (PreStartContainer included).
type Container struct {
	ID            string    `json:"id"`
	PodUID        types.UID `json:"podUID"`
	PodNamespace  string    `json:"podNamespace"`
	PodName       string    `json:"podName"`
	ContainerName string    `json:"containerName"`
	// Init is true for init containers; a non-restartable init container is
	// recorded as exited (Running=false) right after its start.
	Init      bool      `json:"init"`
	Running   bool      `json:"running"`
	StartedAt time.Time `json:"startedAt"`
	// DeviceOptions is the device manager's DeviceRunContainerOptions,
	// verbatim (envs, mounts, devices, annotations, CDI devices).
	DeviceOptions *devicemanager.DeviceRunContainerOptions `json:"deviceOptions,omitempty"`
}

// Runtime is the node agent's stand-in for a CRI runtime: it never runs a
// process, it only remembers containers across agent restarts so that the
// device manager can be given the same (pod, container) -> container ID map
// and running set a kubelet gets from its runtime after a restart.
type Runtime struct {
	path string

	mu         sync.Mutex
	containers map[string]Container // by container ID
	seq        int64
}

// LoadRuntime reads the runtime state from dir, or starts empty when the
// state file does not exist yet.
func LoadRuntime(dir string) (*Runtime, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("creating state dir %q: %w", dir, err)
	}
	r := &Runtime{path: filepath.Join(dir, RuntimeStateFile), containers: map[string]Container{}}
	list, err := ReadRuntimeState(dir)
	if err != nil {
		return nil, err
	}
	for _, c := range list {
		r.containers[c.ID] = c
	}
	r.seq = time.Now().UnixNano()
	return r, nil
}

// ReadRuntimeState returns the containers recorded in dir's state file
// (empty when there is none), sorted by pod namespace, pod name, container.
func ReadRuntimeState(dir string) ([]Container, error) {
	path := filepath.Join(dir, RuntimeStateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading runtime state: %w", err)
	}
	var list []Container
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("runtime state %q is not valid JSON: %w", path, err)
	}
	sort.Slice(list, func(i, j int) bool {
		a, b := list[i], list[j]
		if a.PodNamespace != b.PodNamespace {
			return a.PodNamespace < b.PodNamespace
		}
		if a.PodName != b.PodName {
			return a.PodName < b.PodName
		}
		return a.ContainerName < b.ContainerName
	})
	return list, nil
}

// NewContainerID returns a fresh, unique container ID.
func (r *Runtime) NewContainerID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	return fmt.Sprintf("%016x", r.seq)
}

// Add records a created container and persists the state.
func (r *Runtime) Add(c Container) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.containers[c.ID] = c
	return r.saveLocked()
}

// Find returns the newest record for (pod, container name).
func (r *Runtime) Find(podUID types.UID, name string) (Container, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var best Container
	found := false
	for _, c := range r.containers {
		if c.PodUID == podUID && c.ContainerName == name && (!found || c.StartedAt.After(best.StartedAt)) {
			best, found = c, true
		}
	}
	return best, found
}

// RemovePod forgets every container of the pod and returns their IDs.
func (r *Runtime) RemovePod(podUID types.UID) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ids []string
	for id, c := range r.containers {
		if c.PodUID == podUID {
			ids = append(ids, id)
			delete(r.containers, id)
		}
	}
	if len(ids) == 0 {
		return nil, nil
	}
	return ids, r.saveLocked()
}

// ContainerMap returns the (pod UID, container name) -> container ID map and
// the set of running container IDs, the two inputs the device manager's
// Start takes from the runtime to recognise containers that survived a
// kubelet restart.
func (r *Runtime) ContainerMap() (containermap.ContainerMap, sets.Set[string]) {
	r.mu.Lock()
	defer r.mu.Unlock()
	cm := containermap.NewContainerMap()
	running := sets.New[string]()
	for id, c := range r.containers {
		cm.Add(string(c.PodUID), c.ContainerName, id)
		if c.Running {
			running.Insert(id)
		}
	}
	return cm, running
}

func (r *Runtime) saveLocked() error {
	list := make([]Container, 0, len(r.containers))
	for _, c := range r.containers {
		list = append(list, c)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].ID < list[j].ID })
	data, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding runtime state: %w", err)
	}
	tmp := r.path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o640); err != nil {
		return fmt.Errorf("writing runtime state: %w", err)
	}
	if err := os.Rename(tmp, r.path); err != nil {
		return fmt.Errorf("replacing runtime state: %w", err)
	}
	return nil
}
