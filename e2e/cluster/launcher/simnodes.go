// simnodes: nodes without a kubelet, in the manner of kwok. It registers the named Nodes,
// keeps them alive with the heartbeats that the node lifecycle controller checks (the Ready
// condition's lastHeartbeatTime and the Lease in kube-node-lease), makes the pods bound to
// them Running with made-up IPs and container statuses, and finishes deleting those pods
// (grace period 0), since no kubelet ever will.
//
// A test simulates the loss of a node by labelling it fathom.dev/sim-heartbeat=off: its
// heartbeats stop, and its pods are left alone, as they would be on a node that is gone,
// until the label is removed or set to another value. A node that a test deletes is no
// longer simulated; only a restart of simnodes creates it again.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"
	"k8s.io/client-go/util/workqueue"
)

const (
	simulatedLabel     = "fathom.dev/simulated"
	heartbeatLabel     = "fathom.dev/sim-heartbeat"
	leaseNamespace     = corev1.NamespaceNodeLease
	leaseDurationSecs  = 40
	apiWait            = 30 * time.Second
	nodeIndex          = "spec.nodeName"
	simOSImage         = "simulated (fathom simnodes)"
	simRuntimeVersion  = "simulated://1"
	simReadyMessage    = "kubelet is posting ready status (simulated by fathom simnodes)"
	firstPodHostOctet  = 2 // .1 is the node's own address
	lastPodHostOctet   = 254
	maxSimulatedNodes  = 254
	simnodesUserAgent  = "fathom-simnodes"
	simnodesUsageShort = "fathom-k8s simnodes --kubeconfig PATH --nodes NAME[,NAME...] [--kubelet-version v1.34.4] [--heartbeat 10s] [--ip-base 10.244]"
)

type simNode struct {
	name         string
	ip           string         // <ip-base>.<index+1>.1
	subnet       string         // <ip-base>.<index+1>.
	used         map[int]string // host octet -> pod key
	heartbeatOff bool
}

type podAddr struct {
	node  string
	uid   types.UID
	octet int
}

type simNodes struct {
	client    kubernetes.Interface
	version   string
	heartbeat time.Duration
	logger    *log.Logger

	mu    sync.Mutex
	nodes map[string]*simNode // created or adopted at start, and not deleted since
	order []string            // the names in --nodes order
	addrs map[string]podAddr  // pod key -> its address on a simulated node

	nodeInformer cache.SharedIndexInformer
	podInformer  cache.SharedIndexInformer
	queue        workqueue.TypedRateLimitingInterface[string]
}

func runSimNodes(args []string) int {
	fs := flag.NewFlagSet("simnodes", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the cluster (required)")
	nodeList := fs.String("nodes", "", "comma-separated names of the nodes to simulate (required)")
	kubeletVersion := fs.String("kubelet-version", "v1.34.4", "status.nodeInfo.kubeletVersion of the simulated nodes")
	heartbeat := fs.Duration("heartbeat", 10*time.Second, "period of the node status and lease heartbeats (below the 40s lease)")
	ipBase := fs.String("ip-base", "10.244", "first two octets of the made-up addresses: node i is <ip-base>.<i+1>.1, its pods <ip-base>.<i+1>.2-254")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: %s\n", simnodesUsageShort)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	usageError := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "simnodes: "+format+"\n", a...)
		fmt.Fprintf(os.Stderr, "usage: %s\n", simnodesUsageShort)
		return 2
	}
	if fs.NArg() > 0 {
		return usageError("unexpected argument %q", fs.Arg(0))
	}
	if *kubeconfig == "" {
		return usageError("--kubeconfig is required")
	}
	names, err := parseNodeNames(*nodeList)
	if err != nil {
		return usageError("--nodes %q: %v", *nodeList, err)
	}
	if *heartbeat <= 0 || *heartbeat >= leaseDurationSecs*time.Second {
		return usageError("--heartbeat %v: must be above 0 and below the %ds lease duration", *heartbeat, leaseDurationSecs)
	}
	if !regexp.MustCompile(`^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$`).MatchString(*ipBase) {
		return usageError("--ip-base %q: expected two octets, e.g. 10.244", *ipBase)
	}
	if *kubeletVersion == "" {
		return usageError("--kubelet-version must not be empty")
	}

	logger := log.New(os.Stderr, "simnodes: ", log.LstdFlags|log.Lmicroseconds)
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "simnodes: --kubeconfig %s: %v\n", *kubeconfig, err)
		return 1
	}
	config.UserAgent = simnodesUserAgent
	config.QPS, config.Burst = 50, 100
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "simnodes: --kubeconfig %s: %v\n", *kubeconfig, err)
		return 1
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if err := waitForAPI(ctx, client, logger); err != nil {
		if ctx.Err() != nil {
			logger.Print("signal received while waiting for the API server: exiting")
			return 0
		}
		fmt.Fprintf(os.Stderr, "simnodes: API server %s unreachable or not ready for %v: %v\n", config.Host, apiWait, err)
		return 1
	}

	s := &simNodes{
		client:    client,
		version:   *kubeletVersion,
		heartbeat: *heartbeat,
		logger:    logger,
		nodes:     map[string]*simNode{},
		addrs:     map[string]podAddr{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "simnodes"}),
	}
	for i, name := range names {
		subnet := fmt.Sprintf("%s.%d.", *ipBase, i+1)
		s.nodes[name] = &simNode{name: name, ip: subnet + "1", subnet: subnet, used: map[int]string{}}
		s.order = append(s.order, name)
	}
	for _, name := range names {
		if err := s.registerNode(ctx, s.nodes[name]); err != nil {
			if ctx.Err() != nil {
				logger.Print("signal received while registering nodes: exiting")
				return 0
			}
			fmt.Fprintf(os.Stderr, "simnodes: node %s: %v\n", name, err)
			return 1
		}
	}
	if err := s.run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "simnodes: %v\n", err)
		return 1
	}
	logger.Print("signal received: exiting")
	return 0
}

func parseNodeNames(list string) ([]string, error) {
	var names []string
	seen := map[string]bool{}
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
			return nil, fmt.Errorf("node name %q: %s", name, strings.Join(errs, "; "))
		}
		if seen[name] {
			return nil, fmt.Errorf("node name %q given twice", name)
		}
		seen[name] = true
		names = append(names, name)
	}
	if len(names) == 0 {
		return nil, errors.New("at least one node name is required")
	}
	if len(names) > maxSimulatedNodes {
		return nil, fmt.Errorf("at most %d nodes", maxSimulatedNodes)
	}
	return names, nil
}

// waitForAPI polls /readyz until the API server answers ok, for up to apiWait.
func waitForAPI(ctx context.Context, client kubernetes.Interface, logger *log.Logger) error {
	deadline := time.Now().Add(apiWait)
	var lastErr error
	lastLog := time.Time{}
	for {
		attempt, cancel := context.WithTimeout(ctx, 5*time.Second)
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(attempt)
		cancel()
		if err == nil {
			logger.Print("API server is ready")
			return nil
		}
		if len(body) > 0 && len(body) < 2000 && body[0] != '{' { // /readyz's list of failed checks
			err = fmt.Errorf("%v: %s", err, strings.TrimSpace(string(body)))
		}
		lastErr = err
		if time.Now().After(deadline) {
			return lastErr
		}
		if time.Since(lastLog) >= 5*time.Second {
			logger.Printf("waiting for the API server: %v", err)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// registerNode creates the node if it is absent, or adopts it if it is a simulated one left
// by an earlier run, and writes its whole status.
func (s *simNodes) registerNode(ctx context.Context, n *simNode) error {
	deadline := time.Now().Add(apiWait)
	for {
		err := s.tryRegisterNode(ctx, n)
		if err == nil || ctx.Err() != nil || time.Now().After(deadline) ||
			apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err) || apierrors.IsInvalid(err) || errors.Is(err, errNotSimulated) {
			return err
		}
		s.logger.Printf("node %s: %v (retrying)", n.name, err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

var errNotSimulated = errors.New("exists without the label " + simulatedLabel + "=true: refusing to take over a node that simnodes did not create")

func (s *simNodes) tryRegisterNode(ctx context.Context, n *simNode) error {
	nodes := s.client.CoreV1().Nodes()
	node, err := nodes.Get(ctx, n.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		node = &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{
				Name: n.name,
				Labels: map[string]string{
					corev1.LabelHostname:   n.name,
					corev1.LabelOSStable:   "linux",
					corev1.LabelArchStable: "amd64",
					simulatedLabel:         "true",
				},
			},
			Status: s.nodeStatus(n, nil),
		}
		node, err = nodes.Create(ctx, node, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create: %w", err)
		}
		s.logger.Printf("node %s: created (InternalIP %s)", n.name, n.ip)
	case err != nil:
		return fmt.Errorf("get: %w", err)
	default:
		if node.Labels[simulatedLabel] != "true" {
			return errNotSimulated
		}
		s.logger.Printf("node %s: exists already, simulating it (InternalIP %s)", n.name, n.ip)
	}
	// The status given at creation may not be kept: write it through the status subresource.
	err = retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		current, err := nodes.Get(ctx, n.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		current = current.DeepCopy()
		current.Status = s.nodeStatus(n, current.Status.Conditions)
		_, err = nodes.UpdateStatus(ctx, current, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("update status: %w", err)
	}
	s.logger.Printf("node %s: status written (Ready, cpu 2, memory 8Gi, pods 110, kubelet %s)", n.name, s.version)
	return nil
}

func (s *simNodes) nodeStatus(n *simNode, old []corev1.NodeCondition) corev1.NodeStatus {
	resources := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("2"),
		corev1.ResourceMemory: resource.MustParse("8Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	return corev1.NodeStatus{
		Capacity:    resources,
		Allocatable: resources.DeepCopy(),
		Conditions:  nodeConditions(old, metav1.Now()),
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.ip},
			{Type: corev1.NodeHostName, Address: n.name},
		},
		NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion:          s.version,
			OSImage:                 simOSImage,
			OperatingSystem:         "linux",
			Architecture:            "amd64",
			ContainerRuntimeVersion: simRuntimeVersion,
			KernelVersion:           "simulated",
		},
	}
}

// nodeConditions: Ready and no pressure, heartbeat now; a condition whose status is
// unchanged keeps its lastTransitionTime.
func nodeConditions(old []corev1.NodeCondition, now metav1.Time) []corev1.NodeCondition {
	want := []corev1.NodeCondition{
		{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", Message: simReadyMessage},
		{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory", Message: "kubelet has sufficient memory available"},
		{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure", Message: "kubelet has no disk pressure"},
		{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID", Message: "kubelet has sufficient PID available"},
	}
	for i := range want {
		want[i].LastHeartbeatTime = now
		want[i].LastTransitionTime = now
		for _, c := range old {
			if c.Type == want[i].Type && c.Status == want[i].Status && !c.LastTransitionTime.IsZero() {
				want[i].LastTransitionTime = c.LastTransitionTime
			}
		}
	}
	return want
}

func (s *simNodes) run(ctx context.Context) error {
	s.nodeInformer = coreinformers.NewNodeInformer(s.client, 0, cache.Indexers{})
	s.podInformer = coreinformers.NewFilteredPodInformer(s.client, metav1.NamespaceAll, time.Minute,
		cache.Indexers{nodeIndex: func(obj any) ([]string, error) {
			if pod, ok := obj.(*corev1.Pod); ok && pod.Spec.NodeName != "" {
				return []string{pod.Spec.NodeName}, nil
			}
			return nil, nil
		}},
		func(o *metav1.ListOptions) { o.FieldSelector = "spec.nodeName!=" })
	if _, err := s.nodeInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.nodeSeen(obj) },
		UpdateFunc: func(_, obj any) { s.nodeSeen(obj) },
		DeleteFunc: s.nodeDeleted,
	}); err != nil {
		return err
	}
	if _, err := s.podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.enqueuePod,
		UpdateFunc: func(_, obj any) { s.enqueuePod(obj) },
		DeleteFunc: s.enqueuePod,
	}); err != nil {
		return err
	}
	go s.nodeInformer.Run(ctx.Done())
	go s.podInformer.Run(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), s.nodeInformer.HasSynced, s.podInformer.HasSynced) {
		return nil // only a signal stops the wait
	}
	s.reserveExistingAddresses()

	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for s.processNextPod(ctx) {
		}
	}()
	go func() {
		defer wg.Done()
		s.heartbeatLoop(ctx)
	}()
	<-ctx.Done()
	s.queue.ShutDown()
	wg.Wait()
	return nil
}

// --- nodes ---

func (s *simNodes) nodeSeen(obj any) {
	node, ok := obj.(*corev1.Node)
	if !ok {
		return
	}
	off := node.Labels[heartbeatLabel] == "off"
	s.mu.Lock()
	n, managed := s.nodes[node.Name]
	changed := managed && n.heartbeatOff != off
	if changed {
		n.heartbeatOff = off
	}
	s.mu.Unlock()
	if !changed {
		return
	}
	if off {
		s.logger.Printf("node %s: %s=off: heartbeats stopped, its pods left alone", node.Name, heartbeatLabel)
		return
	}
	s.logger.Printf("node %s: %s is no longer off: heartbeats resumed", node.Name, heartbeatLabel)
	s.enqueueNodePods(node.Name)
}

func (s *simNodes) nodeDeleted(obj any) {
	if tombstone, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tombstone.Obj
	}
	if node, ok := obj.(*corev1.Node); ok {
		s.forgetNode(node.Name)
	}
}

func (s *simNodes) forgetNode(name string) {
	s.mu.Lock()
	_, managed := s.nodes[name]
	delete(s.nodes, name)
	left := len(s.nodes)
	s.mu.Unlock()
	if managed {
		s.logger.Printf("node %s: deleted: no longer simulated (a restart of simnodes creates it again); %d left", name, left)
	}
}

func (s *simNodes) heartbeatLoop(ctx context.Context) {
	ticker := time.NewTicker(s.heartbeat)
	defer ticker.Stop()
	for {
		s.heartbeatRound(ctx)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// heartbeatRound renews every simulated node's Ready condition and Lease, and logs one line.
func (s *simNodes) heartbeatRound(ctx context.Context) {
	s.mu.Lock()
	var names []string
	for _, name := range s.order {
		if _, ok := s.nodes[name]; ok {
			names = append(names, name)
		}
	}
	s.mu.Unlock()
	if len(names) == 0 {
		return
	}
	var renewed, skipped, failed []string
	for _, name := range names {
		if ctx.Err() != nil {
			return
		}
		node, err := s.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			s.forgetNode(name)
			continue
		}
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s (get: %v)", name, err))
			continue
		}
		if node.Labels[heartbeatLabel] == "off" {
			skipped = append(skipped, name)
			continue
		}
		if err := s.patchConditions(ctx, node); err != nil {
			if apierrors.IsNotFound(err) {
				s.forgetNode(name)
			} else {
				failed = append(failed, fmt.Sprintf("%s (status: %v)", name, err))
			}
			continue
		}
		created, err := s.renewLease(ctx, node)
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s (lease: %v)", name, err))
			continue
		}
		if created {
			name += " (lease created)"
		}
		renewed = append(renewed, name)
	}
	if ctx.Err() != nil {
		return
	}
	line := "heartbeat: renewed " + listOrNone(renewed)
	if len(skipped) > 0 {
		line += "; skipped (" + heartbeatLabel + "=off): " + strings.Join(skipped, ", ")
	}
	if len(failed) > 0 {
		line += "; failed: " + strings.Join(failed, ", ")
	}
	s.logger.Print(line)
}

func listOrNone(items []string) string {
	if len(items) == 0 {
		return "none"
	}
	return strings.Join(items, ", ")
}

func (s *simNodes) patchConditions(ctx context.Context, node *corev1.Node) error {
	patch, err := json.Marshal(map[string]any{
		"status": map[string]any{"conditions": nodeConditions(node.Status.Conditions, metav1.Now())},
	})
	if err != nil {
		return err
	}
	_, err = s.client.CoreV1().Nodes().Patch(ctx, node.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status")
	return err
}

// renewLease creates or renews the node's Lease as a kubelet does: held by the node, for 40
// seconds, owned by the Node so that it goes when the Node goes.
func (s *simNodes) renewLease(ctx context.Context, node *corev1.Node) (created bool, err error) {
	leases := s.client.CoordinationV1().Leases(leaseNamespace)
	now := metav1.NewMicroTime(time.Now())
	holder := node.Name
	duration := int32(leaseDurationSecs)
	lease, err := leases.Get(ctx, node.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:      node.Name,
				Namespace: leaseNamespace,
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
				}},
			},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       &holder,
				LeaseDurationSeconds: &duration,
				AcquireTime:          &now,
				RenewTime:            &now,
			},
		}
		_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
		return err == nil, err
	}
	if err != nil {
		return false, err
	}
	lease = lease.DeepCopy()
	lease.Spec.HolderIdentity = &holder
	lease.Spec.LeaseDurationSeconds = &duration
	lease.Spec.RenewTime = &now
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return false, err
}

// --- pods ---

func (s *simNodes) enqueuePod(obj any) {
	if tombstone, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		s.queue.Add(tombstone.Key)
		return
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	s.mu.Lock()
	_, managed := s.nodes[pod.Spec.NodeName]
	_, addressed := s.addrs[podKey(pod)]
	s.mu.Unlock()
	if managed || addressed {
		s.queue.Add(podKey(pod))
	}
}

func (s *simNodes) enqueueNodePods(node string) {
	objs, err := s.podInformer.GetIndexer().ByIndex(nodeIndex, node)
	if err != nil {
		return
	}
	for _, obj := range objs {
		if pod, ok := obj.(*corev1.Pod); ok {
			s.queue.Add(podKey(pod))
		}
	}
}

func podKey(pod *corev1.Pod) string { return pod.Namespace + "/" + pod.Name }

// reserveExistingAddresses keeps the addresses of the pods that an earlier run made Running,
// so that a restart hands out no address twice.
func (s *simNodes) reserveExistingAddresses() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, obj := range s.podInformer.GetIndexer().List() {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			continue
		}
		n, managed := s.nodes[pod.Spec.NodeName]
		if !managed || pod.Spec.HostNetwork || !strings.HasPrefix(pod.Status.PodIP, n.subnet) {
			continue
		}
		octet, err := strconv.Atoi(strings.TrimPrefix(pod.Status.PodIP, n.subnet))
		if err != nil || octet < firstPodHostOctet || octet > lastPodHostOctet {
			continue
		}
		if _, taken := n.used[octet]; taken {
			continue
		}
		n.used[octet] = podKey(pod)
		s.addrs[podKey(pod)] = podAddr{node: n.name, uid: pod.UID, octet: octet}
	}
}

// address returns the pod's IP on node n, allocating the lowest free one on first use.
// The caller holds s.mu.
func (s *simNodes) address(pod *corev1.Pod, n *simNode) (string, error) {
	if pod.Spec.HostNetwork {
		return n.ip, nil
	}
	key := podKey(pod)
	if a, ok := s.addrs[key]; ok {
		if a.uid == pod.UID && a.node == n.name {
			return n.subnet + strconv.Itoa(a.octet), nil
		}
		s.releaseLocked(key)
	}
	for octet := firstPodHostOctet; octet <= lastPodHostOctet; octet++ {
		if _, taken := n.used[octet]; !taken {
			n.used[octet] = key
			s.addrs[key] = podAddr{node: n.name, uid: pod.UID, octet: octet}
			return n.subnet + strconv.Itoa(octet), nil
		}
	}
	return "", fmt.Errorf("no free address left in %s0/24", n.subnet)
}

func (s *simNodes) releaseLocked(key string) {
	a, ok := s.addrs[key]
	if !ok {
		return
	}
	delete(s.addrs, key)
	if n, managed := s.nodes[a.node]; managed && n.used[a.octet] == key {
		delete(n.used, a.octet)
	}
}

func (s *simNodes) processNextPod(ctx context.Context) bool {
	key, shutdown := s.queue.Get()
	if shutdown {
		return false
	}
	defer s.queue.Done(key)
	if err := s.syncPod(ctx, key); err != nil {
		if ctx.Err() != nil {
			return true
		}
		s.logger.Printf("pod %s: %v (will retry)", key, err)
		s.queue.AddRateLimited(key)
		return true
	}
	s.queue.Forget(key)
	return true
}

func (s *simNodes) syncPod(ctx context.Context, key string) error {
	obj, exists, err := s.podInformer.GetIndexer().GetByKey(key)
	if err != nil {
		return err
	}
	if !exists {
		s.mu.Lock()
		s.releaseLocked(key)
		s.mu.Unlock()
		return nil
	}
	pod := obj.(*corev1.Pod)
	s.mu.Lock()
	n, managed := s.nodes[pod.Spec.NodeName]
	if !managed || n.heartbeatOff {
		s.mu.Unlock()
		return nil // not ours, or a lost node: nothing happens to its pods
	}
	nodeName, hostIP := n.name, n.ip
	s.mu.Unlock()

	if pod.DeletionTimestamp != nil {
		zero := int64(0)
		uid := pod.UID
		err := s.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
			GracePeriodSeconds: &zero,
			Preconditions:      &metav1.Preconditions{UID: &uid},
		})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil // gone already, or replaced by a new pod of the same name
		}
		if err != nil {
			return fmt.Errorf("delete: %w", err)
		}
		s.logger.Printf("pod %s on node %s: deleted with grace period 0 (it was terminating)", key, nodeName)
		return nil
	}
	switch pod.Status.Phase {
	case corev1.PodSucceeded, corev1.PodFailed:
		return nil
	case corev1.PodRunning:
		// The node lifecycle controller marks the pods of a lost node not Ready; a kubelet
		// that comes back reports them Ready again.
		updated := pod.DeepCopy()
		if !setPodConditions(&updated.Status, metav1.Now()) {
			return nil
		}
		if _, err := s.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil {
			if apierrors.IsNotFound(err) {
				return nil
			}
			return fmt.Errorf("update status: %w", err)
		}
		s.logger.Printf("pod %s on node %s: Ready again", key, nodeName)
		return nil
	}

	s.mu.Lock()
	podIP, err := s.address(pod, n)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	updated := pod.DeepCopy()
	runningStatus(updated, hostIP, podIP, metav1.Now())
	if _, err := s.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("update status: %w", err)
	}
	s.logger.Printf("pod %s on node %s: Running, IP %s, %d container(s)", key, nodeName, podIP, len(pod.Spec.Containers))
	return nil
}

// runningStatus makes pod's status that of a pod whose containers all started at now.
func runningStatus(pod *corev1.Pod, hostIP, podIP string, now metav1.Time) {
	st := &pod.Status
	st.Phase = corev1.PodRunning
	st.Reason, st.Message = "", ""
	st.HostIP = hostIP
	st.HostIPs = []corev1.HostIP{{IP: hostIP}}
	st.PodIP = podIP
	st.PodIPs = []corev1.PodIP{{IP: podIP}}
	if st.StartTime == nil {
		st.StartTime = &now
	}
	setPodConditions(st, now)

	st.InitContainerStatuses = nil
	for _, c := range pod.Spec.InitContainers {
		cs := corev1.ContainerStatus{
			Name:        c.Name,
			Image:       c.Image,
			ImageID:     "sim://" + c.Image,
			ContainerID: simContainerID(pod.UID, c.Name),
		}
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			started := true
			cs.Ready, cs.Started = true, &started
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: now}
		} else {
			started := false
			cs.Ready, cs.Started = true, &started
			cs.State.Terminated = &corev1.ContainerStateTerminated{
				ExitCode: 0, Reason: "Completed", StartedAt: now, FinishedAt: now,
				ContainerID: cs.ContainerID,
			}
		}
		st.InitContainerStatuses = append(st.InitContainerStatuses, cs)
	}
	st.ContainerStatuses = nil
	for _, c := range pod.Spec.Containers {
		started := true
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{
			Name:        c.Name,
			Ready:       true,
			Started:     &started,
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
			Image:       c.Image,
			ImageID:     "sim://" + c.Image,
			ContainerID: simContainerID(pod.UID, c.Name),
		})
	}
}

// setPodConditions makes the conditions of a running pod True, and tells whether any changed.
func setPodConditions(st *corev1.PodStatus, now metav1.Time) (changed bool) {
	for _, t := range []corev1.PodConditionType{
		corev1.PodReadyToStartContainers, corev1.PodInitialized, corev1.PodReady,
		corev1.ContainersReady, corev1.PodScheduled,
	} {
		if setPodCondition(st, t, now) {
			changed = true
		}
	}
	return changed
}

func setPodCondition(st *corev1.PodStatus, t corev1.PodConditionType, now metav1.Time) (changed bool) {
	for i := range st.Conditions {
		if st.Conditions[i].Type == t {
			if st.Conditions[i].Status == corev1.ConditionTrue {
				return false
			}
			st.Conditions[i].Status = corev1.ConditionTrue
			st.Conditions[i].LastTransitionTime = now
			st.Conditions[i].Reason, st.Conditions[i].Message = "", ""
			return true
		}
	}
	st.Conditions = append(st.Conditions, corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now})
	return true
}

// simContainerID: "containerd://" and the hex sha256 of the pod's UID and the container's
// name, so that the same container always has the same ID.
func simContainerID(uid types.UID, name string) string {
	sum := sha256.Sum256([]byte(string(uid) + name))
	return "containerd://" + hex.EncodeToString(sum[:])
}
