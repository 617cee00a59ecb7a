#!/usr/bin/env bash
# The local Kubernetes cluster the e2e suite runs on: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler built from pinned Go modules
# (e2e/cluster/launcher), one real node (kubelet + Debian's containerd/runc + a bridge CNI),
# and kubelet-less nodes kept Ready by `fathom-k8s simnodes` (as kwok does).
#
#   scripts/cluster.sh up       build (cached) and start; idempotent; cleans a stale cluster first
#   scripts/cluster.sh down     stop everything; leaves no process, mount, cgroup, link or rule
#   scripts/cluster.sh status   one line per component; exit 0 only when all run
#   scripts/cluster.sh env      KUBECONFIG=…, PATH with the cluster's kubectl, and the e2e suite's variables
#   scripts/cluster.sh images   (re)build and import the local images (pause, busybox, fathom)
#
# See docs/local-cluster.md. Run as root.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAUNCHER=$HERE/e2e/cluster/launcher
K8S_VERSION=$(awk 'NF >= 2 && $(NF-1) == "k8s.io/kubernetes" && $NF ~ /^v1\./ { print $NF }' "$LAUNCHER/go.mod")
[ -n "$K8S_VERSION" ] || { echo "[cluster] error: no k8s.io/kubernetes version in $LAUNCHER/go.mod" >&2; exit 1; }
CACHE=${FATHOM_CLUSTER_CACHE:-/var/cache/fathom/k8s/$K8S_VERSION}
STATE=${FATHOM_CLUSTER_STATE:-/var/lib/fathom-cluster}
BIN=$CACHE/fathom-k8s
PAUSE_BIN=$CACHE/pause
KUBECTL=$CACHE/bin/kubectl             # the same binary, called as kubectl: a client of the same version

NODE=fathom-node                       # the real node (kubelet)
SIM_NODES=${FATHOM_SIM_NODES-fathom-sim-1,fathom-sim-2,fathom-sim-3}
BRIDGE=fathom0                         # the pod network's bridge; its address is the node IP
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1                   # the `kubernetes` Service, first address of SERVICE_CIDR
ETCD_PORT=12379
ETCD_PEER_PORT=12380
API_PORT=16443
CM_PORT=10257
SCHED_PORT=10259
KUBELET_PORT=10250
KUBELET_HEALTHZ_PORT=10248
PAUSE_IMAGE=fathom.local/pause:1
# The namespace of the identities the e2e suite runs its operator and runners as (processes:
# ServiceAccounts fathom-e2e-operator and fathom-e2e-node-runner, the chart's RBAC as release
# fathom-e2e grants them; e2e/src/lib.rs OPERATOR_NAMESPACE). Not fathom-system, which stays
# free for `kubectl apply -k deploy/` as it ships.
E2E_NAMESPACE=fathom-e2e
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet simnodes)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (starts a kubelet, containerd and mounts)"; }

# --- build -----------------------------------------------------------------------------------

# A stamp of the launcher's sources: the cached binary is rebuilt when they change.
launcher_stamp() {
  (cd "$LAUNCHER" && find . -name '*.go' -o -name go.mod -o -name go.sum | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -c1-16
}

build() {
  # Go's official tarball installs outside the usual PATH.
  command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || PATH=/usr/local/go/bin:$PATH
  command -v go >/dev/null || die "go is not installed (Go >= 1.24 builds the cluster's binaries)"
  local stamp
  stamp=$(launcher_stamp)
  if [ -x "$BIN" ] && [ -x "$PAUSE_BIN" ] && [ -L "$KUBECTL" ] && [ "$(cat "$CACHE/stamp" 2>/dev/null)" = "$stamp" ]; then
    return
  fi
  mkdir -p "$CACHE"
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  log "building Kubernetes $K8S_VERSION and etcd into $CACHE (cold: ~20 min on 2 cores; cached after)"
  local t0=$SECONDS
  (cd "$LAUNCHER" && go build -trimpath -ldflags "$ldflags" -o "$BIN.new" .) \
    || die "building the cluster's binaries failed (go build in $LAUNCHER)"
  (cd "$LAUNCHER" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$PAUSE_BIN.new" ./cmd/pause) \
    || die "building the pause binary failed (go build ./cmd/pause in $LAUNCHER)"
  mv "$BIN.new" "$BIN"
  mv "$PAUSE_BIN.new" "$PAUSE_BIN"
  mkdir -p "$CACHE/bin"
  ln -sfn ../fathom-k8s "$KUBECTL"
  echo "$stamp" >"$CACHE/stamp"
  log "built in $((SECONDS - t0)) s"
}

# --- certificates and kubeconfigs ------------------------------------------------------------

PKI=$STATE/pki

# cert NAME CN [O] [SAN-list]: a client/server certificate signed by the cluster's CA.
cert() {
  local name=$1 cn=$2 org=${3:-} sans=${4:-}
  local subj="/CN=$cn"
  [ -n "$org" ] && subj="/O=$org$subj"
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=clientAuth,serverAuth"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>"$PKI/openssl.err" \
    || die "signing the $name certificate failed: $(cat "$PKI/openssl.err")"
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

# kubeconfig FILE USER (--cert NAME | --token TOKEN)
kubeconfig() {
  local file=$1 user=$2 kind=$3 value=$4
  {
    cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fathom-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
contexts:
- name: $user@fathom-local
  context: { cluster: fathom-local, user: $user }
current-context: $user@fathom-local
users:
- name: $user
  user:
EOF
    if [ "$kind" = --cert ]; then
      echo "    client-certificate-data: $(base64 -w0 "$PKI/$value.crt")"
      echo "    client-key-data: $(base64 -w0 "$PKI/$value.key")"
    else
      echo "    token: $value"
    fi
  } >"$file"
  chmod 600 "$file"
}

# The collector's own CA and serving certificate (what the chart makes for an install): runners
# trust collector-ca.crt only, so a certificate of the cluster's CA is not the collector.
collector_pki() {
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/collector-ca.key" 2>/dev/null
  openssl req -x509 -new -key "$PKI/collector-ca.key" -subj "/CN=fathom-collector-ca" -days 30 \
    -sha256 -out "$PKI/collector-ca.crt" 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/collector.key" 2>/dev/null
  openssl req -new -key "$PKI/collector.key" -subj "/CN=fathom-collector" \
    -out "$PKI/collector.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:$NODE_IP,DNS:localhost,DNS:fathom-collector.$E2E_NAMESPACE.svc" \
    >"$PKI/collector.ext"
  openssl x509 -req -in "$PKI/collector.csr" -CA "$PKI/collector-ca.crt" \
    -CAkey "$PKI/collector-ca.key" -CAcreateserial -days 30 -sha256 \
    -extfile "$PKI/collector.ext" -out "$PKI/collector.crt" 2>"$PKI/openssl.err" \
    || die "signing the collector certificate failed: $(cat "$PKI/openssl.err")"
  rm -f "$PKI/collector.csr" "$PKI/collector.ext"
}

make_pki() {
  mkdir -p "$PKI"
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=fathom-local-ca" -days 30 -sha256 \
    -out "$PKI/ca.crt" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "IP:127.0.0.1,IP:$SERVICE_IP,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin fathom-admin system:masters
  cert controller-manager system:kube-controller-manager
  cert scheduler system:kube-scheduler
  cert kubelet "system:node:$NODE" system:nodes
  cert kubelet-serving "$NODE" "" "IP:$NODE_IP,DNS:$NODE"
  cert simnodes fathom-simnodes system:masters
  collector_pki
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  kubeconfig "$STATE/admin.kubeconfig" fathom-admin --cert admin
  kubeconfig "$STATE/controller-manager.kubeconfig" system:kube-controller-manager --cert controller-manager
  kubeconfig "$STATE/scheduler.kubeconfig" system:kube-scheduler --cert scheduler
  kubeconfig "$STATE/kubelet.kubeconfig" "system:node:$NODE" --cert kubelet
  kubeconfig "$STATE/simnodes.kubeconfig" fathom-simnodes --cert simnodes
}

# --- processes -------------------------------------------------------------------------------

pidfile() { echo "$STATE/run/$1.pid"; }

running() {
  local pid
  pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# start NAME CMD...: runs CMD in its own session, output to logs/NAME.log.
start() {
  local name=$1
  shift
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
}

# wait_for WHAT SECONDS CMD...: polls CMD until it succeeds; on timeout names the log to read.
wait_for() {
  local what=$1 secs=$2 log=$3
  shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$STATE/logs/$log.log" >&2 2>/dev/null || true
      die "$what did not become ready within ${secs}s (log: $STATE/logs/$log.log)"
    fi
    if ! running "$log"; then
      tail -n 20 "$STATE/logs/$log.log" >&2 2>/dev/null || true
      die "$log exited while starting (log: $STATE/logs/$log.log)"
    fi
    sleep 0.5
  done
}

api_get() {
  curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$API_PORT$1"
}

kctl() { "$KUBECTL" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

port_taken() { ss -Htln "sport = :$1" | grep -q .; }

check_ports() {
  local p
  for p in $ETCD_PORT $ETCD_PEER_PORT $API_PORT $CM_PORT $SCHED_PORT $KUBELET_PORT $KUBELET_HEALTHZ_PORT; do
    if port_taken "$p"; then
      die "port $p is taken by $(ss -Htlnp "sport = :$p" | grep -o 'users:(("[^"]*"' | cut -d'"' -f2 | head -n1): stop it, or run scripts/cluster.sh down"
    fi
  done
}

start_etcd() {
  mkdir -p "$STATE/etcd"
  start etcd "$BIN" etcd --name fathom --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "fathom=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
  wait_for etcd 60 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"
}

start_apiserver() {
  cat >"$STATE/audit-policy.yaml" <<'EOF'
# Metadata for every request but the noise of reads by the cluster's own components.
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  nonResourceURLs: ["/healthz*", "/readyz*", "/livez*", "/version", "/openapi*", "/api*"]
- level: None
  verbs: [get, list, watch]
  userGroups: ["system:nodes"]
- level: None
  verbs: [get, list, watch]
  users: ["system:kube-scheduler", "system:kube-controller-manager", "system:apiserver", "fathom-simnodes"]
- level: None
  verbs: [get, list, watch]
  userGroups: ["system:serviceaccounts:kube-system"]
- level: Metadata
EOF
  start kube-apiserver "$BIN" kube-apiserver \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 0.0.0.0 --secure-port "$API_PORT" --advertise-address "$NODE_IP" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --api-audiences https://kubernetes.default.svc.cluster.local,fathom-collector \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction,ValidatingAdmissionPolicy \
    --allow-privileged=true \
    --audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/audit.log" \
    --audit-log-maxsize 1024 --audit-log-maxbackup 1 \
    --endpoint-reconciler-type none \
    --profiling=false
  wait_for kube-apiserver 120 kube-apiserver api_get /readyz
}

start_controllers() {
  start kube-controller-manager "$BIN" kube-controller-manager \
    --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$CM_PORT" --leader-elect=false \
    --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --controllers '*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle-controller' \
    --node-monitor-grace-period 40s
  start kube-scheduler "$BIN" kube-scheduler \
    --kubeconfig "$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false
  wait_for kube-controller-manager 60 kube-controller-manager \
    curl -skf "https://127.0.0.1:$CM_PORT/healthz"
  wait_for kube-scheduler 60 kube-scheduler curl -skf "https://127.0.0.1:$SCHED_PORT/healthz"
}

# The pod network: a bridge whose address is the node's IP, and the bridge CNI plugin on it.
# The `kubernetes` Service without kube-proxy: one DNAT rule from its ClusterIP (what the
# kubelet puts in every pod's KUBERNETES_SERVICE_HOST/PORT) to the API server on the node's
# bridge address, so that pods with the default in-cluster config (the chart's and deploy/'s
# defaults) reach the API server. The chain's KUBE- prefix puts it in remove_iptables' sweep.
kubernetes_service() {
  local chain=KUBE-FATHOM-SERVICES
  iptables -t nat -N "$chain" 2>/dev/null || iptables -t nat -F "$chain"
  iptables -t nat -A "$chain" -d "$SERVICE_IP/32" -p tcp --dport 443 \
    -j DNAT --to-destination "$NODE_IP:$API_PORT"
  iptables -t nat -C PREROUTING -j "$chain" 2>/dev/null || iptables -t nat -A PREROUTING -j "$chain"
  iptables -t nat -C OUTPUT -j "$chain" 2>/dev/null || iptables -t nat -A OUTPUT -j "$chain"
}

make_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  kubernetes_service
  mkdir -p "$STATE/cni/net.d" "$STATE/cni/ipam"
  cat >"$STATE/cni/net.d/10-fathom.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "fathom",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$POD_CIDR", "gateway": "$NODE_IP" }]],
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dataDir": "$STATE/cni/ipam"
      }
    }
  ]
}
EOF
}

start_containerd() {
  local d=$STATE/containerd
  mkdir -p "$d"
  # containerd 1.6 keeps shim sockets and fifos under /run/containerd whatever its config says:
  # remember whether that directory is ours to remove.
  [ -e /run/containerd ] || touch "$STATE/run-containerd-is-ours"
  cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$d/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
  start containerd containerd --config "$d/config.toml"
  wait_for containerd 30 containerd ctr --address "$d/containerd.sock" version
}

ctr_() { ctr --address "$STATE/containerd/containerd.sock" --namespace k8s.io "$@"; }

# The local images: no registry is reachable, so every image a pod uses is assembled here from
# static binaries and imported (pods use imagePullPolicy: Never or IfNotPresent).
images() {
  local out=$STATE/images
  mkdir -p "$out"
  python3 "$HERE/e2e/cluster/oci-image.py" --name "$PAUSE_IMAGE" --out "$out/pause.tar" \
    --entrypoint /pause "$PAUSE_BIN:/pause:0755"
  local bb=/bin/busybox
  [ -x "$bb" ] || die "/bin/busybox is missing (apt-get install busybox-static; scripts/setup.sh does)"
  # Every applet as a symlink in /bin; no entrypoint, so a pod's `args` are the command.
  local applets=()
  while read -r a; do applets+=("@busybox:/bin/$a"); done < <("$bb" --list | grep -vx busybox)
  python3 "$HERE/e2e/cluster/oci-image.py" --name fathom.local/busybox:1 --out "$out/busybox.tar" \
    --cmd /bin/sh --dir /tmp:1777 "$bb:/bin/busybox:0755" "${applets[@]}"
  # The e2e workload (node-runner/tests/workload/workload.c, static) with busybox: a binary
  # whose function a uprobe inside the container counts, and a shell to drive it.
  gcc -static -O1 -g -o "$out/workload" "$HERE/node-runner/tests/workload/workload.c" \
    2>"$out/gcc.err" || die "building the workload image's binary failed: $(cat "$out/gcc.err")"
  python3 "$HERE/e2e/cluster/oci-image.py" --name fathom.local/workload:1 --out "$out/workload.tar" \
    --cmd /bin/sh --dir /tmp:1777 "$bb:/bin/busybox:0755" "${applets[@]}" \
    "$out/workload:/workload:0755"
  local f
  for f in "$out"/*.tar; do
    ctr_ images import --all-platforms "$f" >/dev/null || die "importing $f into containerd failed"
  done
  # Pinned: the kubelet's image garbage collection (a full disk reclaims images) must never
  # remove images no registry could give back.
  local ref
  for ref in $(ctr_ images ls -q | grep '^fathom\.local/'); do
    ctr_ images label "$ref" io.cri-containerd.pinned=pinned >/dev/null \
      || die "pinning image $ref failed"
  done
}

save_sysctls() {
  [ -f "$STATE/sysctls.saved" ] && return
  local k
  for k in "${SYSCTLS[@]}"; do
    echo "$k=$(sysctl -n "$k")"
  done >"$STATE/sysctls.saved"
}

# The kubelet's cgroup root (cgroupRoot: /fathom) in every v1 hierarchy, made here because the
# kubelet only checks it; `down` removes it. Nothing else of the host's cgroups is touched.
make_cgroup_root() {
  local h
  for h in /sys/fs/cgroup/*/; do
    mountpoint -q "$h" || continue
    mkdir -p "$h/fathom"
  done
  if [ -f /sys/fs/cgroup/cpuset/fathom/cpuset.cpus ]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >/sys/fs/cgroup/cpuset/fathom/cpuset.cpus
    cat /sys/fs/cgroup/cpuset/cpuset.mems >/sys/fs/cgroup/cpuset/fathom/cpuset.mems
  fi
}

start_kubelet() {
  local d=$STATE/kubelet
  make_cgroup_root
  mkdir -p "$d"
  cat >"$STATE/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $PKI/ca.crt }
authorization: { mode: Webhook }
containerRuntimeEndpoint: unix://$STATE/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /fathom
failCgroupV1: false
failSwapOn: false
podCIDR: $POD_CIDR
resolvConf: /etc/resolv.conf
hairpinMode: hairpin-veth
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: { memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%" }
rotateCertificates: false
registerNode: true
staticPodPath: ""
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 10s
EOF
  save_sysctls
  start kubelet "$BIN" kubelet --config "$STATE/kubelet-config.yaml" \
    --kubeconfig "$STATE/kubelet.kubeconfig" --root-dir "$d" --cert-dir "$d/pki" \
    --hostname-override "$NODE" --node-ip "$NODE_IP" \
    --node-labels "fathom.dev/real-node=true"
  wait_for kubelet 90 kubelet curl -sf "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz"
}

start_simnodes() {
  [ -n "$SIM_NODES" ] || return 0
  start simnodes "$BIN" simnodes --kubeconfig "$STATE/simnodes.kubeconfig" --nodes "$SIM_NODES" \
    --kubelet-version "$K8S_VERSION"
}

node_ready() {
  [ "$(kctl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# Namespaced identities the components run as, and kubeconfigs carrying their tokens, so tests
# exercise RBAC as the operator and runner really meet it.
make_identities() {
  kctl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: { name: $E2E_NAMESPACE }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: fathom-e2e-operator, namespace: $E2E_NAMESPACE }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: fathom-e2e-node-runner, namespace: $E2E_NAMESPACE }
EOF
  local component sa token
  for component in operator node-runner; do
    sa=fathom-e2e-$component
    token=$(kctl -n "$E2E_NAMESPACE" create token "$sa" --duration 48h)
    kubeconfig "$STATE/fathom-$component.kubeconfig" "system:serviceaccount:$E2E_NAMESPACE:$sa" --token "$token"
  done
}

# --- commands --------------------------------------------------------------------------------

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do
    [ "$c" = simnodes ] && [ -z "$SIM_NODES" ] && continue
    running "$c" || return 1
  done
  api_get /readyz >/dev/null 2>&1
}

cmd_up() {
  need_root
  if [ -f "$STATE/up" ] && all_running; then
    log "already up ($(cat "$STATE/up")); scripts/cluster.sh down to stop it"
    return
  fi
  if [ -d "$STATE" ]; then
    log "cleaning a stale cluster left in $STATE"
    cmd_down
  fi
  command -v containerd >/dev/null || die "containerd is not installed (scripts/setup.sh installs it)"
  [ -x /usr/lib/cni/bridge ] || die "the CNI plugins are missing (apt-get install containernetworking-plugins)"
  build
  check_ports
  local t0=$SECONDS
  mkdir -p "$STATE"/{logs,run}
  make_pki
  start_etcd
  start_apiserver
  start_controllers
  make_network
  start_containerd
  images
  start_kubelet
  start_simnodes
  local n
  wait_for "node $NODE Ready" 90 kubelet node_ready "$NODE"
  for n in ${SIM_NODES//,/ }; do
    wait_for "simulated node $n Ready" 60 simnodes node_ready "$n"
  done
  make_identities
  echo "Kubernetes $K8S_VERSION, up in $((SECONDS - t0)) s, $(date -u +%FT%TZ)" >"$STATE/up"
  log "up: $(cat "$STATE/up")"
  log 'use it: eval "$(scripts/cluster.sh env)"; kubectl get nodes'
}

# Kills every process of the cluster, including containers and their shims.
stop_processes() {
  local c pid
  for c in simnodes kubelet kube-scheduler kube-controller-manager; do
    stop_one "$c"
  done
  if running containerd; then
    # Containers first: their processes are children of shims, not of containerd.
    local tasks
    tasks=$(ctr_ tasks list -q 2>/dev/null || true)
    for t in $tasks; do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
  fi
  stop_one containerd
  # Shims and container processes outlive containerd: find them by our state directory.
  for pid in $(pgrep -f "containerd-shim.*$STATE" || true); do
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Anything still inside the cluster's pod cgroups.
  local procs
  for procs in $(find /sys/fs/cgroup/*/fathom -name cgroup.procs 2>/dev/null); do
    xargs -r kill -KILL <"$procs" 2>/dev/null || true
  done
  for c in kube-apiserver etcd; do
    stop_one "$c"
  done
}

stop_one() {
  local pid
  pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  rm -f "$(pidfile "$1")"
}

remove_cgroups() {
  local root dir
  for root in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
    [ -d "$root/fathom" ] || continue
    # Deepest first: a cgroup goes only once it has no children and no processes.
    find "$root/fathom" -depth -type d 2>/dev/null | while read -r dir; do
      rmdir "$dir" 2>/dev/null || true
    done
    if [ -d "$root/fathom" ]; then
      sleep 1
      find "$root/fathom" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    fi
  done
}

remove_iptables() {
  local tool table chain
  for tool in iptables ip6tables iptables-legacy ip6tables-legacy; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle; do
      { "$tool" -t "$table" -S 2>/dev/null || true; } | { grep -E '^-A .* -j (KUBE|CNI)-' || true; } |
        while read -r rule; do
          # shellcheck disable=SC2086
          "$tool" -t "$table" ${rule/#-A/-D} 2>/dev/null || true
        done
      for chain in $("$tool" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ { print $2 }'); do
        "$tool" -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$tool" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ { print $2 }'); do
        "$tool" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

cmd_down() {
  need_root
  [ -d "$STATE" ] || { log "down: nothing to stop"; return; }
  stop_processes
  # Mounts under the state directory (overlay rootfs, shm, volumes), deepest first.
  local m
  for m in $(awk -v s="$STATE" '$2 ~ "^"s { print $2 }' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  # Network namespaces containerd made for pod sandboxes, the pods' veths and the bridge.
  for m in $(awk '$2 ~ "^/(var/)?run/netns/cni-" { print $2 }' /proc/self/mounts); do
    umount -l "$m" 2>/dev/null || true
    rm -f "$m"
  done
  for m in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
    ip link del "$m" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  remove_cgroups
  remove_iptables
  local run_containerd_ours=0
  if [ -f "$STATE/run-containerd-is-ours" ]; then
    run_containerd_ours=1
    rm -rf /run/containerd
  fi
  if [ -f "$STATE/sysctls.saved" ]; then
    while IFS= read -r kv; do sysctl -qw "$kv" >/dev/null 2>&1 || true; done <"$STATE/sysctls.saved"
  fi
  rm -rf "$STATE"
  log "down: stopped and removed $STATE"
  leftovers "$run_containerd_ours"
}

# What down must leave behind: nothing. Prints each leftover and fails if there is one.
# $1: 1 when /run/containerd was made by this cluster.
leftovers() {
  local found=0
  if pgrep -f "$BIN|containerd-shim.*$STATE|containerd --config $STATE" >/dev/null; then
    log "leftover processes: $(pgrep -af "$BIN|containerd-shim.*$STATE|containerd --config $STATE" | cut -c1-120 | tr '\n' ';')"
    found=1
  fi
  if grep -q -e "$STATE" -e ' /run/netns/cni-' /proc/self/mounts; then
    log "leftover mounts: $(grep -e "$STATE" -e ' /run/netns/cni-' /proc/self/mounts | awk '{print $2}' | tr '\n' ' ')"
    found=1
  fi
  if [ "${1:-0}" = 1 ] && [ -e /run/containerd ]; then
    log "leftover /run/containerd"
    found=1
  fi
  if ls -d /sys/fs/cgroup/*/fathom >/dev/null 2>&1; then
    log "leftover cgroups: $(ls -d /sys/fs/cgroup/*/fathom | tr '\n' ' ')"
    found=1
  fi
  if ip link show "$BRIDGE" >/dev/null 2>&1 || ip -o link | grep -q 'veth.*master fathom0'; then
    log "leftover network device: $BRIDGE"
    found=1
  fi
  if iptables-save 2>/dev/null | grep -qE '(KUBE|CNI)-'; then
    log "leftover iptables rules: $(iptables-save | grep -cE '(KUBE|CNI)-')"
    found=1
  fi
  [ "$found" = 0 ] || die "down left the above behind"
}

cmd_status() {
  local c ok=0
  for c in "${COMPONENTS[@]}"; do
    if running "$c"; then
      printf '%-24s running (pid %s)\n' "$c" "$(cat "$(pidfile "$c")")"
    else
      printf '%-24s stopped\n' "$c"
      ok=1
    fi
  done
  if [ "$ok" = 0 ]; then
    printf '%-24s %s\n' "api" "$(api_get /version | grep -o '"gitVersion": *"[^"]*"' | cut -d'"' -f4)"
    kctl get nodes -o wide 2>/dev/null || true
  fi
  return "$ok"
}

cmd_env() {
  [ -f "$STATE/admin.kubeconfig" ] || die "no cluster: run scripts/cluster.sh up"
  cat <<EOF
export PATH=$CACHE/bin:\$PATH
export KUBECONFIG=$STATE/admin.kubeconfig
export FATHOM_CLUSTER_STATE=$STATE
export FATHOM_E2E_AUDIT_LOG=$STATE/audit.log
export FATHOM_E2E_OPERATOR_KUBECONFIG=$STATE/fathom-operator.kubeconfig
export FATHOM_E2E_RUNNER_KUBECONFIG=$STATE/fathom-node-runner.kubeconfig
export FATHOM_E2E_REAL_NODE=$NODE
export FATHOM_E2E_SIM_NODES=$SIM_NODES
export FATHOM_E2E_CONTAINERD=$STATE/containerd/containerd.sock
export FATHOM_E2E_COLLECTOR_CA=$PKI/collector-ca.crt
export FATHOM_E2E_COLLECTOR_CERT=$PKI/collector.crt
export FATHOM_E2E_COLLECTOR_KEY=$PKI/collector.key
EOF
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  images) need_root; images ;;
  build) build ;;
  *) echo "usage: scripts/cluster.sh up|down|status|env|images|build" >&2; exit 2 ;;
esac
