package deploy

import (
	"bufio"
	"bytes"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// repoRoot is the relay's module, one directory up from this one.
const repoRoot = ".."

// The deployment files are checked against the flags of relayd and
// relayctl built from repoRoot (bin, in relay_test.go), not against a list
// kept by hand.

// flagInfo is one flag as a command's --help lists it.
type flagInfo struct {
	Name    string // without dashes
	Env     string // the environment variable that also sets it
	Default string // "" when the flag has none (or false)
}

// commandFlags are the flags of one relayd command, by name and by
// environment variable.
type commandFlags struct {
	byName map[string]flagInfo
	byEnv  map[string]flagInfo
}

// flag returns the flag called name, failing the test when the command
// has none.
func (c commandFlags) flag(t *testing.T, name string) flagInfo {
	t.Helper()
	f, ok := c.byName[name]
	if !ok {
		t.Fatalf("relayd has no flag --%s", name)
	}
	return f
}

var helpLine = regexp.MustCompile(`^  --([a-z0-9-]+)  \[([A-Z0-9_]+)\]$`)
var helpDefault = regexp.MustCompile(`\(default "([^"]*)"\)$`)

// relaydFlags runs `relayd <command> --help` and parses what it prints
// (internal/flagenv's format: "  --name  [ENV]" then an indented usage
// line ending in `(default "x")` when there is a default).
func relaydFlags(t *testing.T, command string) commandFlags {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(bin(t, "relayd"), command, "--help")
	cmd.Stdout, cmd.Stderr = &out, &out
	_ = cmd.Run() // --help exits 2
	c := commandFlags{byName: map[string]flagInfo{}, byEnv: map[string]flagInfo{}}
	var last *flagInfo
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		line := sc.Text()
		if m := helpLine.FindStringSubmatch(line); m != nil {
			if last != nil {
				c.byName[last.Name], c.byEnv[last.Env] = *last, *last
			}
			last = &flagInfo{Name: m[1], Env: m[2]}
			continue
		}
		if last != nil && strings.HasPrefix(line, "      ") {
			if m := helpDefault.FindStringSubmatch(line); m != nil {
				last.Default = m[1]
			}
		}
	}
	if last != nil {
		c.byName[last.Name], c.byEnv[last.Env] = *last, *last
	}
	// A parse of the help that went wrong finds few flags: the serving
	// commands have dozens, export-state its two.
	least := 10
	if command == "export-state" {
		least = 2
	}
	if len(c.byName) < least {
		t.Fatalf("relayd %s --help listed %d flags:\n%s", command, len(c.byName), out.String())
	}
	return c
}

// port returns the port of a host:port default, such as --api-addr's.
func port(t *testing.T, hostport string) string {
	t.Helper()
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 {
		t.Fatalf("%q is not host:port", hostport)
	}
	return hostport[i+1:]
}

// relayctlEnv returns the environment variables relayctl reads: one per
// global flag, as its usage lists them, and the two it reads directly.
func relayctlEnv(t *testing.T) map[string]bool {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(bin(t, "relayctl"), "--help")
	cmd.Stdout, cmd.Stderr = &out, &out
	_ = cmd.Run()
	vars := map[string]bool{"RELAYCTL_CONFIG_DIR": true, "RELAYCTL_TOKEN": true}
	for _, m := range regexp.MustCompile(`\[(RELAYCTL_[A-Z_]+)\]`).FindAllStringSubmatch(out.String(), -1) {
		vars[m[1]] = true
	}
	if !vars["RELAYCTL_SERVER"] {
		t.Fatalf("relayctl --help names no RELAYCTL_SERVER:\n%s", out.String())
	}
	return vars
}
