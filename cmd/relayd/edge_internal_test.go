package main

import (
	"flag"
	"io"
	"testing"

	edgeserver "github.com/edge-relay/relay/edge/server"
)

// --max-unvalidated-handshakes 0 means a Retry for every connection,
// which the edge's configuration spells negative (its zero is the
// default).
func TestMaxUnvalidatedHandshakesFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		want int
	}{
		{nil, 1024},
		{[]string{"--max-unvalidated-handshakes", "64"}, 64},
		{[]string{"--max-unvalidated-handshakes", "0"}, -1},
		{[]string{"--max-unvalidated-handshakes", "-5"}, -1},
	} {
		fs := flag.NewFlagSet("edge", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		var (
			cfg edgeserver.Config
			f   edgeFlags
		)
		f.register(fs, &cfg)
		if err := fs.Parse(c.args); err != nil {
			t.Fatal(err)
		}
		if err := f.apply(&cfg, func(string) string { return "password" }); err != nil {
			t.Fatal(err)
		}
		if cfg.MaxUnvalidatedHandshakes != c.want {
			t.Errorf("%q: MaxUnvalidatedHandshakes %d, want %d", c.args, cfg.MaxUnvalidatedHandshakes, c.want)
		}
	}
}
