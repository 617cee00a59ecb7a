// fathom-k8s: one binary for the local test cluster's Kubernetes and etcd processes, picked
// by its first argument (as k3s does), so that the many packages they share compile once.
//
//	fathom-k8s etcd ...                    go.etcd.io/etcd/server/v3/etcdmain
//	fathom-k8s kube-apiserver ...          k8s.io/kubernetes/cmd/kube-apiserver
//	fathom-k8s kube-controller-manager ... k8s.io/kubernetes/cmd/kube-controller-manager
//	fathom-k8s kube-scheduler ...          k8s.io/kubernetes/cmd/kube-scheduler
//	fathom-k8s kubelet ...                 k8s.io/kubernetes/cmd/kubelet
//	fathom-k8s simnodes ...                simulated nodes without a kubelet (simnodes.go)
//	kubectl ...                            k8s.io/kubectl, when the binary is called as kubectl
//	                                       (a symlink): the client of the same version
//
// Every component is the upstream one, unchanged; only the entry point is shared. simnodes is
// this project's own: it registers nodes and keeps them and their pods alive, as kwok does.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // CronJob time zones, as the upstream binaries have

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		// kubectl reads os.Args itself (plugins, verbosity), as cmd/kubectl does.
		logs.GlogSetter(kubectl.GetLogVerbosity(os.Args)) //nolint:errcheck
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
		return
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: fathom-k8s etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet [flags]")
		fmt.Fprintln(os.Stderr, "       "+simnodesUsageShort)
		os.Exit(2)
	}
	name, args := os.Args[1], os.Args[2:]
	var command *cobra.Command
	switch name {
	case "etcd":
		// etcdmain reads os.Args itself: make them look like the etcd binary's.
		etcdmain.Main(append([]string{"etcd"}, args...))
		return
	case "kube-apiserver":
		command = apiserver.NewAPIServerCommand()
	case "kube-controller-manager":
		command = controllermanager.NewControllerManagerCommand()
	case "kube-scheduler":
		command = scheduler.NewSchedulerCommand()
	case "kubelet":
		command = kubelet.NewKubeletCommand(context.Background())
	case "simnodes":
		os.Exit(runSimNodes(args))
	default:
		fmt.Fprintf(os.Stderr, "fathom-k8s: unknown component %q (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, simnodes)\n", name)
		os.Exit(2)
	}
	command.SetArgs(args)
	os.Exit(cli.Run(command))
}
