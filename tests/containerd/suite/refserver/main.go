// Command refserver serves containerd's own native snapshotter over snapshots.v1 gRPC, with the
// same command line as snapdriver's containerd front. It is the suite harness's control: if it
// fails the suite, the harness is at fault, not the front.
//
//	refserver --root DIR --listen unix://SOCKET
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/native"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "snapshotter root directory")
	listen := flag.String("listen", "", "unix://SOCKET to serve on")
	flag.Parse()
	if err := serve(*root, *listen); err != nil {
		fmt.Fprintln(os.Stderr, "refserver:", err)
		os.Exit(2)
	}
}

func serve(root, listen string) error {
	path := strings.TrimPrefix(listen, "unix://")
	if root == "" || path == listen {
		return fmt.Errorf("need --root DIR and --listen unix://SOCKET")
	}
	sn, err := native.NewSnapshotter(root)
	if err != nil {
		return err
	}
	defer sn.Close()
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
	listener, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		server.GracefulStop()
	}()
	return server.Serve(listener)
}
