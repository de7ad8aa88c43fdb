// Command cm-ferretdb runs FerretDB (a MongoDB-wire server on SQLite) for cm's
// local clusters, tests and the offline container image.
//
// FerretDB v1's own command panics at start when installed with `go install`
// (its version file is generated, not shipped), so cm embeds it as a library:
// this main module is ours, and FerretDB's version check is skipped.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to serve the MongoDB wire protocol on (empty: none)")
	unix := flag.String("unix", "", "Unix socket to serve it on as well, usable by this process's user alone (empty: none)")
	dir := flag.String("dir", "data", "directory for the SQLite files (one per database); created if missing")
	sync := flag.String("sync", "full", "SQLite synchronous mode: full (fsync every commit), normal (fsync at WAL checkpoints; survives a crash of this process, not of the machine) or off")
	verbose := flag.Bool("verbose", false, "log every connection and command (FerretDB's debug level)")
	flag.Parse()

	if err := run(*listen, *unix, *dir, *sync, *verbose); err != nil {
		fmt.Fprintf(os.Stderr, "cm-ferretdb: error: %v\n", err)
		os.Exit(1)
	}
}

func run(listen, unix, dir, sync string, verbose bool) error {
	switch sync {
	case "full", "normal", "off":
	default:
		return fmt.Errorf("-sync %q: want full, normal or off", sync)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("data directory %q: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o750); err != nil {
		return fmt.Errorf("data directory %q: %w", abs, err)
	}

	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	if listen == "" && unix == "" {
		return fmt.Errorf("-listen and -unix are both empty: nothing to serve on")
	}
	if unix != "" {
		// The socket is made with this umask: its user alone may connect, so that
		// the kernel, not a password, says who reaches the cluster's state.
		syscall.Umask(0o077)
		if err := os.MkdirAll(filepath.Dir(unix), 0o700); err != nil {
			return fmt.Errorf("socket directory: %w", err)
		}
		if err := os.Remove(unix); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("stale socket %q: %w", unix, err)
		}
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: listen, Unix: unix},
		Logger:   logger,
		Handler:  "sqlite",
		// The SQLite backend wants a file: URL naming a directory with a trailing slash.
		SQLiteURL: "file:" + abs + "/?_pragma=synchronous(" + sync + ")",
	})
	if err != nil {
		return err
	}

	// SIGTERM (docker stop, cmcluster down) and SIGINT end Run, which closes the
	// listener and the SQLite files cleanly.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	fmt.Fprintf(os.Stderr, "cm-ferretdb: serving %s from %s\n", strings.Trim(listen+" "+unix, " "), abs)
	return f.Run(ctx)
}
