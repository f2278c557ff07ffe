package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"
)

// Service is the stand-in for a Kubernetes Service in front of several
// replicas, where no kube-proxy and no pod network exist: one loopback TCP
// listener per service port, forwarding each new connection to a backend
// that currently answers its readiness URL with 200 — what a Service does
// with the endpoints of ready pods. Nothing above TCP is touched (TLS passes
// through), so the callers (kube-scheduler, kube-apiserver) and the
// replicas talk to each other exactly as through a Service.
//
// Differences from kube-proxy, on purpose: readiness is probed every 100 ms
// (a readinessProbe's period plus the endpoints controller take seconds), and
// when a backend's process dies its forwarded connections are closed at once
// instead of timing out. A connection that arrives while no backend is ready
// is closed without data (kube-proxy rejects it the same way).
type Service struct {
	Name string

	listeners map[string]net.Listener // service port name -> listener
	mu        sync.Mutex
	backends  map[string]Backend
	ready     []string // names of ready backends, sorted
	changed   chan struct{}
	stop      chan struct{}
	wg        sync.WaitGroup
	conns     map[net.Conn]struct{}
}

// Backend is one replica behind a Service.
type Backend struct {
	Name string
	// ReadyURL is probed with GET; 200 means ready.
	ReadyURL string
	// Targets maps each service port name to the replica's host:port.
	Targets map[string]string
}

// StartService listens on a free loopback port for each port name.
func StartService(name string, ports ...string) (*Service, error) {
	s := &Service{
		Name:      name,
		listeners: map[string]net.Listener{},
		backends:  map[string]Backend{},
		changed:   make(chan struct{}),
		stop:      make(chan struct{}),
		conns:     map[net.Conn]struct{}{},
	}
	for _, p := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("service %s port %s: %w", name, p, err)
		}
		s.listeners[p] = l
		s.wg.Add(1)
		go s.accept(p, l)
	}
	s.wg.Add(1)
	go s.probe()
	return s, nil
}

// Addr is the host:port of a service port.
func (s *Service) Addr(port string) string {
	l, ok := s.listeners[port]
	if !ok {
		return ""
	}
	return l.Addr().String()
}

// Port is the TCP port number of a service port.
func (s *Service) Port(port string) int {
	_, p, err := net.SplitHostPort(s.Addr(port))
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return n
}

// SetBackend adds or replaces a backend.
func (s *Service) SetBackend(b Backend) {
	s.mu.Lock()
	s.backends[b.Name] = b
	s.mu.Unlock()
}

// RemoveBackend removes a backend (its open connections stay).
func (s *Service) RemoveBackend(name string) {
	s.mu.Lock()
	delete(s.backends, name)
	s.setReady(without(s.ready, name))
	s.mu.Unlock()
}

// Endpoints are the names of the backends that are ready now.
func (s *Service) Endpoints() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ready...)
}

// WaitEndpoints waits until cond holds for the ready backends.
func (s *Service) WaitEndpoints(ctx context.Context, timeout time.Duration, what string, cond func([]string) bool) ([]string, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		ready, changed := append([]string(nil), s.ready...), s.changed
		s.mu.Unlock()
		if cond(ready) {
			return ready, nil
		}
		select {
		case <-changed:
		case <-deadline.C:
			return ready, fmt.Errorf("service %s: endpoints not %s within %s (ready: %v)", s.Name, what, timeout, ready)
		case <-ctx.Done():
			return ready, ctx.Err()
		}
	}
}

// Close stops listening and closes every forwarded connection.
func (s *Service) Close() {
	select {
	case <-s.stop:
		return
	default:
		close(s.stop)
	}
	for _, l := range s.listeners {
		_ = l.Close()
	}
	s.mu.Lock()
	for c := range s.conns {
		_ = c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// setReady must be called with mu held.
func (s *Service) setReady(ready []string) {
	sort.Strings(ready)
	if equalStrings(ready, s.ready) {
		return
	}
	s.ready = ready
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Service) probe() {
	defer s.wg.Done()
	client := &http.Client{Timeout: 500 * time.Millisecond}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		backends := make([]Backend, 0, len(s.backends))
		for _, b := range s.backends {
			backends = append(backends, b)
		}
		s.mu.Unlock()
		var ready []string
		for _, b := range backends {
			if resp, err := client.Get(b.ReadyURL); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					ready = append(ready, b.Name)
				}
			}
		}
		s.mu.Lock()
		// Keep only backends that still exist (one may have been removed
		// while it was probed).
		var still []string
		for _, n := range ready {
			if _, ok := s.backends[n]; ok {
				still = append(still, n)
			}
		}
		s.setReady(still)
		s.mu.Unlock()
		select {
		case <-s.stop:
			return
		case <-tick.C:
		}
	}
}

func (s *Service) accept(port string, l net.Listener) {
	defer s.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		s.wg.Add(1)
		go s.forward(port, c)
	}
}

func (s *Service) forward(port string, down net.Conn) {
	defer s.wg.Done()
	s.mu.Lock()
	target := ""
	if len(s.ready) > 0 {
		target = s.backends[s.ready[0]].Targets[port]
	}
	s.mu.Unlock()
	if target == "" {
		_ = down.Close()
		return
	}
	up, err := net.DialTimeout("tcp", target, 2*time.Second)
	if err != nil {
		_ = down.Close()
		return
	}
	s.mu.Lock()
	select {
	case <-s.stop:
		s.mu.Unlock()
		_ = up.Close()
		_ = down.Close()
		return
	default:
	}
	s.conns[down], s.conns[up] = struct{}{}, struct{}{}
	s.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		// The peer closed or failed: close both, so the caller sees the
		// backend go away at once.
		_ = dst.Close()
		_ = src.Close()
		done <- struct{}{}
	}
	go pipe(up, down)
	go pipe(down, up)
	<-done
	<-done
	s.mu.Lock()
	delete(s.conns, down)
	delete(s.conns, up)
	s.mu.Unlock()
}

func without(list []string, name string) []string {
	var out []string
	for _, n := range list {
		if n != name {
			out = append(out, n)
		}
	}
	return out
}

func equalStrings(a, b []string) bool {
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
