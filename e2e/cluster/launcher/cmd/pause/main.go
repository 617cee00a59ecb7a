// pause: the process that holds a pod sandbox's namespaces (PID 1 in the sandbox). It sleeps
// until SIGTERM or SIGINT, then exits 0, and reaps every child that is reparented to it.
// Standard library only, so that it builds static and small:
//
//	CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o pause ./cmd/pause
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		os.Exit(0)
	}
}

// reap collects every exited child without blocking. Signals coalesce, so one SIGCHLD may
// stand for many exits: loop until none is left.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
