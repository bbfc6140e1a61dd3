// Package suite runs containerd's snapshotter conformance suite against snapdriver's containerd
// front, one front process per subtest, through containerd's own proxy client.
//
// Built offline in GOPATH mode from Debian's golang-github-containerd-containerd-dev (see
// snapdriver/testing/gosuite.py, which builds and runs it). The front is started as
//
//	COMMAND... --root ROOT --listen unix://SOCKET
//
// where COMMAND comes from -snapdriver.command or $SNAPDRIVER_SUITE_COMMAND (split on spaces, each
// "{n}" in it replaced by the front's number, so a ZFS front gets a dataset of its own), ROOT
// is the subtest's fresh directory under $TMPDIR (which must be on btrfs for the btrfs backend) and
// SOCKET is a short path in -snapdriver.sockets. Each front's output goes to SOCKET's name + ".log".
package suite

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// maxSocketPath is the longest path a unix socket address can hold on Linux (sun_path less NUL).
const maxSocketPath = 107

var (
	command = flag.String("snapdriver.command", os.Getenv("SNAPDRIVER_SUITE_COMMAND"),
		"the front's start command, split on spaces, {n} replaced by the front's number; "+
			"--root and --listen are appended")
	name = flag.String("snapdriver.name", "snapdriver",
		"the snapshotter name sent in every request")
	socketDir = flag.String("snapdriver.sockets", "",
		"directory for the fronts' sockets and logs (default: a new one under /tmp)")
	startTimeout = flag.Duration("snapdriver.start-timeout", 120*time.Second,
		"how long a front may take to serve")
	stopTimeout = flag.Duration("snapdriver.stop-timeout", 30*time.Second,
		"how long a front may take to exit after SIGTERM before it is killed")
)

// started numbers the fronts, so each subtest's socket and log get a short name of their own.
var started int64

func TestSnapdriver(t *testing.T) {
	// The suite mounts what the snapshotter returns: without -test.root this skips, which the
	// runner counts as a failure (the binary alone would still print PASS).
	testutil.RequiresRoot(t)
	if strings.TrimSpace(*command) == "" {
		t.Fatal("no front command: pass -snapdriver.command or set SNAPDRIVER_SUITE_COMMAND")
	}
	if *socketDir == "" {
		dir, err := os.MkdirTemp("/tmp", "sdsuite-")
		if err != nil {
			t.Fatal(err)
		}
		*socketDir = dir
	}
	testsuite.SnapshotterSuite(t, *name, newFront)
}

// front is one running front process and the connection to it.
type front struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd.Wait returned
	number int64
	socket string
	logs   string
	root   string
	conn   *grpc.ClientConn
}

// newFront is the suite's factory: a fresh front serving root, and a closer that stops it.
func newFront(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	n := atomic.AddInt64(&started, 1)
	socket := filepath.Join(*socketDir, fmt.Sprintf("%d.sock", n))
	if len(socket) > maxSocketPath {
		return nil, nil, fmt.Errorf("socket path %q is longer than %d bytes", socket, maxSocketPath)
	}
	f := &front{number: n, socket: socket, logs: socket + ".log", root: root, exited: make(chan struct{})}
	if err := f.start(); err != nil {
		return nil, nil, err
	}
	log.G(ctx).Infof("front %d: pid %d, root %s, log %s", n, f.cmd.Process.Pid, root, f.logs)
	if err := f.dial(ctx); err != nil {
		_ = f.stop()
		return nil, nil, err
	}
	client := snapshotsapi.NewSnapshotsClient(f.conn)
	return proxy.NewSnapshotter(client, *name), f.stop, nil
}

func (f *front) start() error {
	args := strings.Fields(strings.ReplaceAll(*command, "{n}", fmt.Sprint(f.number)))
	args = append(args, "--root", f.root, "--listen", "unix://"+f.socket)
	out, err := os.Create(f.logs)
	if err != nil {
		return err
	}
	defer out.Close() // the child has its own copy
	f.cmd = exec.Command(args[0], args[1:]...)
	f.cmd.Stdout, f.cmd.Stderr = out, out
	f.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := f.cmd.Start(); err != nil {
		return fmt.Errorf("starting %v: %w", args, err)
	}
	go func() {
		_ = f.cmd.Wait()
		close(f.exited)
	}()
	return f.waitForSocket()
}

// waitForSocket returns once the front's socket exists; the front promises to serve from then on.
func (f *front) waitForSocket() error {
	deadline := time.Now().Add(*startTimeout)
	for time.Now().Before(deadline) {
		select {
		case <-f.exited:
			return fmt.Errorf("front exited (%s) before serving:\n%s", f.cmd.ProcessState, f.tail())
		default:
		}
		if _, err := os.Stat(f.socket); err == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = f.stop()
	return fmt.Errorf("front did not serve on %s within %s:\n%s", f.socket, *startTimeout, f.tail())
}

func (f *front) dial(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	dialer := func(ctx context.Context, addr string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", addr)
	}
	conn, err := grpc.DialContext(ctx, f.socket, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(dialer))
	if err != nil {
		return fmt.Errorf("dialling %s: %w\n%s", f.socket, err, f.tail())
	}
	f.conn = conn
	return nil
}

// stop ends the front (SIGTERM, then SIGKILL to its process group) and fails if anything is
// still mounted under its root afterwards; such mounts are detached so the suite can go on.
func (f *front) stop() error {
	if f.conn != nil {
		_ = f.conn.Close()
		f.conn = nil
	}
	var problems []string
	if f.cmd != nil && f.cmd.Process != nil {
		select {
		case <-f.exited:
		default:
			_ = f.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-f.exited:
			case <-time.After(*stopTimeout):
				problems = append(problems, fmt.Sprintf("front ignored SIGTERM for %s", *stopTimeout))
				_ = syscall.Kill(-f.cmd.Process.Pid, syscall.SIGKILL)
				<-f.exited
			}
		}
		if state := f.cmd.ProcessState; state != nil && !state.Success() {
			problems = append(problems, fmt.Sprintf("front exited with %s", state))
		}
	}
	_ = os.Remove(f.socket)
	left, err := mountsUnder(f.root)
	if err != nil {
		problems = append(problems, err.Error())
	}
	for _, target := range left {
		_ = syscall.Unmount(target, syscall.MNT_DETACH)
	}
	if len(left) > 0 {
		problems = append(problems, fmt.Sprintf("left mounted under its root: %v", left))
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s\n%s", strings.Join(problems, "; "), f.tail())
	}
	return nil
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	file, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer file.Close()
	var found []string
	scanner := bufio.NewScanner(file)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) < 5 {
			continue
		}
		target := unescapeMountinfo(fields[4])
		if target == dir || strings.HasPrefix(target, dir+"/") {
			found = append(found, target)
		}
	}
	sort.Slice(found, func(i, j int) bool { return len(found[i]) > len(found[j]) })
	return found, scanner.Err()
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space, ...) in a mount path.
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// tail is the end of the front's log, for error messages.
func (f *front) tail() string {
	data, err := os.ReadFile(f.logs)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return "front log " + f.logs + ":\n  " + strings.Join(lines, "\n  ")
}
