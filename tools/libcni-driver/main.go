// Command libcni-driver runs a CNI conflist against a network namespace through the reference
// runtime library (libcni), as containerd and CRI-O do: K8S_POD_* args and the
// io.kubernetes.cri.pod-annotations capability. Test and benchmark tool of mesh-injector.
//
//	libcni-driver add|check|del -confdir D -name N -netns P -id ID [-ifname eth0]
//	    [-path DIR:DIR] [-cachedir D] [-args K=V;K=V] [-annotations JSON]
//
// add prints the chain's result JSON on stdout; every command prints "elapsed_ns=N" on stderr
// and exits 1 with the error text on stderr when the chain fails.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: libcni-driver add|check|del [flags]")
		os.Exit(2)
	}
	command := os.Args[1]
	flags := flag.NewFlagSet(command, flag.ExitOnError)
	confDir := flags.String("confdir", "", "directory holding the .conflist")
	name := flags.String("name", "", "network name in the conflist")
	netns := flags.String("netns", "", "network namespace path")
	id := flags.String("id", "", "container id")
	ifName := flags.String("ifname", "eth0", "interface name")
	path := flags.String("path", "/usr/lib/cni", "plugin directories, ':'-separated")
	cacheDir := flags.String("cachedir", "", "libcni result cache directory")
	args := flags.String("args", "", "CNI_ARGS as K=V;K=V")
	annotations := flags.String("annotations", "", "pod annotations as a JSON object")
	_ = flags.Parse(os.Args[2:])

	list, err := libcni.LoadConfList(*confDir, *name)
	if err != nil {
		fail(err)
	}
	rt := &libcni.RuntimeConf{ContainerID: *id, NetNS: *netns, IfName: *ifName, CapabilityArgs: map[string]interface{}{}}
	for _, pair := range strings.Split(*args, ";") {
		if k, v, ok := strings.Cut(pair, "="); ok {
			rt.Args = append(rt.Args, [2]string{k, v})
		}
	}
	if *annotations != "" {
		podAnnotations := map[string]string{}
		if err := json.Unmarshal([]byte(*annotations), &podAnnotations); err != nil {
			fail(err)
		}
		rt.CapabilityArgs["io.kubernetes.cri.pod-annotations"] = podAnnotations
	}
	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(*path, ":"), *cacheDir, nil)
	ctx := context.Background()
	start := time.Now()
	switch command {
	case "add":
		result, addErr := cni.AddNetworkList(ctx, list, rt)
		report(start)
		if addErr != nil {
			fail(addErr)
		}
		if err := result.Print(); err != nil {
			fail(err)
		}
	case "check":
		err = cni.CheckNetworkList(ctx, list, rt)
		report(start)
	case "del":
		err = cni.DelNetworkList(ctx, list, rt)
		report(start)
	default:
		err = fmt.Errorf("unknown command %q", command)
	}
	if err != nil {
		fail(err)
	}
}

func report(start time.Time) {
	fmt.Fprintf(os.Stderr, "elapsed_ns=%d\n", time.Since(start).Nanoseconds())
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
