// Package flagenv lets every command-line flag also be set from an
// environment variable: flag "raft-addr" of a command with prefix "RELAY_"
// reads RELAY_RAFT_ADDR. A flag given on the command line wins over the
// environment, which wins over the default.
package flagenv

import (
	"flag"
	"fmt"
	"strings"
)

// EnvName returns the environment variable for a flag name.
func EnvName(prefix, flagName string) string {
	return prefix + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Parse parses args into fs, then fills every flag not given on the
// command line from its environment variable (looked up with getenv).
func Parse(fs *flag.FlagSet, prefix string, args []string, getenv func(string) string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || set[f.Name] {
			return
		}
		name := EnvName(prefix, f.Name)
		if v := getenv(name); v != "" {
			if e := f.Value.Set(v); e != nil {
				err = fmt.Errorf("environment variable %s=%q: %w", name, v, e)
			}
		}
	})
	return err
}

// Usage returns a usage function for fs that lists, for every flag, its
// environment variable.
func Usage(fs *flag.FlagSet, prefix, synopsis string) func() {
	return func() {
		out := fs.Output()
		fmt.Fprintf(out, "Usage: %s\n\nFlags (each also read from the environment variable shown):\n", synopsis)
		fs.VisitAll(func(f *flag.Flag) {
			def := ""
			if f.DefValue != "" && f.DefValue != "false" {
				def = fmt.Sprintf(" (default %q)", f.DefValue)
			}
			fmt.Fprintf(out, "  --%s  [%s]\n      %s%s\n", f.Name, EnvName(prefix, f.Name), f.Usage, def)
		})
	}
}

// List is a flag.Value for a comma-separated list that may be repeated.
type List []string

func (l *List) String() string { return strings.Join(*l, ",") }

// Set adds the comma-separated values in v.
func (l *List) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}
