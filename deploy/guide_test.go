package deploy

import (
	"bytes"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
)

const guide = "../docs/operations.md"

// block is one fenced code block of the guide.
type block struct {
	lang, body, file string // file: the <!-- file: PATH --> marker before it
	line             int
}

func guideBlocks(t *testing.T) []block {
	t.Helper()
	b, err := os.ReadFile(guide)
	if err != nil {
		t.Fatal(err)
	}
	var (
		out    []block
		cur    *block
		marker string
		body   strings.Builder
	)
	fileMarker := regexp.MustCompile(`^<!-- file: (\S+) -->$`)
	for i, l := range strings.Split(string(b), "\n") {
		switch {
		case cur == nil && strings.HasPrefix(l, "```"):
			cur = &block{lang: strings.TrimPrefix(l, "```"), file: marker, line: i + 1}
			body.Reset()
		case cur != nil && l == "```":
			cur.body = body.String()
			out = append(out, *cur)
			cur, marker = nil, ""
		case cur != nil:
			body.WriteString(l + "\n")
		default:
			if m := fileMarker.FindStringSubmatch(l); m != nil {
				marker = m[1]
			} else if strings.TrimSpace(l) != "" {
				marker = ""
			}
		}
	}
	if cur != nil {
		t.Fatalf("%s: unterminated code block at line %d", guide, cur.line)
	}
	return out
}

// commands splits a sh block into commands: continuation lines joined,
// comments dropped, pipelines and && lists split.
func commands(body string) []string {
	body = strings.ReplaceAll(body, "\\\n", " ")
	var out []string
	for _, l := range strings.Split(body, "\n") {
		if i := strings.Index(l, " # "); i >= 0 {
			l = l[:i]
		}
		if l = strings.TrimSpace(l); l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		for _, part := range regexp.MustCompile(` \| | && `).Split(l, -1) {
			out = append(out, strings.TrimSpace(part))
		}
	}
	return out
}

// words splits a command like a shell: quotes group, $(...) stays in one
// word, redirections are dropped with their target.
func words(cmd string) []string {
	var (
		out   []string
		cur   strings.Builder
		quote rune
		depth int
		in    bool
	)
	flush := func() {
		if in {
			out = append(out, cur.String())
		}
		cur.Reset()
		in = false
	}
	for i, r := range cmd {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, in = r, true
		case r == '(' && i > 0 && cmd[i-1] == '$':
			depth++
			cur.WriteRune(r)
		case r == ')' && depth > 0:
			depth--
			cur.WriteRune(r)
		case r == ' ' && depth == 0:
			flush()
		default:
			cur.WriteRune(r)
			in = true
		}
	}
	flush()
	// Drop redirections.
	var w []string
	for i := 0; i < len(out); i++ {
		if out[i] == "<" || out[i] == ">" {
			i++
			continue
		}
		w = append(w, out[i])
	}
	return w
}

// hostTools are commands of the operating system or of other projects that
// the guide uses as they are.
var hostTools = map[string]bool{
	"useradd": true, "install": true, "systemctl": true, "curl": true, "chgrp": true, "chmod": true,
	"base64": true, "openssl": true, "docker": true, "kind": true, "minikube": true, "grep": true,
	"sysctl": true,
}

// TestOperationsGuide checks docs/operations.md against the code and the
// deployment files: the files it shows are the repository's, and every
// command of its sh blocks uses flags, subcommands, Make targets, paths
// and Kubernetes objects that exist.
func TestOperationsGuide(t *testing.T) {
	g := &guideChecker{
		t:           t,
		relayd:      map[string]commandFlags{},
		relayctlBin: bin(t, "relayctl"),
		relayctl:    map[string]relayctlHelp{},
		makefile: func() string {
			b, err := os.ReadFile(filepath.Join(repoRoot, "Makefile"))
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}(),
		k8s: map[string]*rendered{},
	}
	for name := range overlays {
		g.k8s[name] = render(t, filepath.Join("kubernetes", "overlays", name))
	}
	var files, cmds int
	for _, b := range guideBlocks(t) {
		if b.file != "" {
			files++
			want, err := os.ReadFile(filepath.Join(repoRoot, b.file))
			if err != nil {
				t.Errorf("line %d shows %s: %v", b.line, b.file, err)
			} else if b.body != string(want) {
				t.Errorf("line %d: the block differs from %s; copy the file in again", b.line, b.file)
			}
			continue
		}
		if b.lang != "sh" {
			continue
		}
		for _, c := range commands(b.body) {
			cmds++
			g.check(b.line, words(c))
		}
	}
	if files < 2 || cmds < 40 {
		t.Fatalf("found %d files and %d commands in the guide; the parser is off", files, cmds)
	}
}

type guideChecker struct {
	t           *testing.T
	relayd      map[string]commandFlags
	relayctlBin string
	relayctl    map[string]relayctlHelp
	makefile    string
	k8s         map[string]*rendered
}

func (g *guideChecker) errorf(line int, w []string, format string, args ...any) {
	g.t.Helper()
	g.t.Errorf("docs/operations.md block at line %d, `%s`: "+format, append([]any{line, strings.Join(w, " ")}, args...)...)
}

func (g *guideChecker) check(line int, w []string) {
	g.t.Helper()
	if len(w) == 0 {
		return
	}
	// Paths of the repository a command names must exist.
	for _, a := range w {
		if strings.HasPrefix(a, "deploy/") {
			if _, err := os.Stat(filepath.Join(repoRoot, a)); err != nil {
				g.errorf(line, w, "%s does not exist", a)
			}
		}
	}
	// Leading NAME=value words set the command's environment: for relayd
	// each RELAY_X must stand for a flag --x of its command.
	var env []string
	for len(w) > 1 && regexp.MustCompile(`^[A-Z_][A-Z0-9_]*=`).MatchString(w[0]) {
		env, w = append(env, w[0]), w[1:]
	}
	switch cmd := w[0]; {
	case cmd == "relayd":
		for _, e := range env {
			name, _, _ := strings.Cut(e, "=")
			if flag, ok := strings.CutPrefix(name, "RELAY_"); !ok {
				g.errorf(line, w, "%s is not a relayd variable (RELAY_*)", name)
			} else {
				w = append(w, "--"+strings.ReplaceAll(strings.ToLower(flag), "_", "-"))
			}
		}
		g.checkRelayd(line, w)
	case cmd == "relayctl":
		g.checkRelayctl(line, w)
	case cmd == "kubectl":
		g.checkKubectl(line, w)
	case cmd == "make":
		for _, target := range w[1:] {
			if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(target) + `:`).MatchString(g.makefile) {
				g.errorf(line, w, "the Makefile has no target %s", target)
			}
		}
	case strings.HasPrefix(cmd, "deploy/") && strings.HasSuffix(cmd, ".sh"):
		st, err := os.Stat(filepath.Join(repoRoot, cmd))
		if err != nil || st.Mode()&0o111 == 0 {
			g.errorf(line, w, "%s is not an executable script", cmd)
		}
	case hostTools[cmd]:
	default:
		g.errorf(line, w, "%s is a command this test does not know; check it and add it", cmd)
	}
}

func (g *guideChecker) checkRelayd(line int, w []string) {
	if len(w) < 2 {
		g.errorf(line, w, "no relayd command")
		return
	}
	flags, ok := g.relayd[w[1]]
	if !ok {
		flags = relaydFlags(g.t, w[1])
		g.relayd[w[1]] = flags
	}
	for _, a := range w[2:] {
		if name, ok := strings.CutPrefix(a, "--"); ok {
			name, _, _ = strings.Cut(name, "=")
			if _, ok := flags.byName[name]; !ok {
				g.errorf(line, w, "relayd %s has no flag --%s", w[1], name)
			}
		}
	}
}

// relayctlHelp is what `relayctl <path> --help` says of a command: its
// subcommands, and its flags (local and global) with whether each takes
// a value.
type relayctlHelp struct {
	subs  map[string]bool
	flags map[string]bool // name -> takes a value
	// runnable: the command runs by itself too (its usage has a line
	// other than "... [command]"), as `relayctl backup FILE` does beside
	// `relayctl backup verify`.
	runnable bool
}

var (
	cobraCommand = regexp.MustCompile(`^  ([a-z][a-z-]*)\s+\S`)
	cobraFlag    = regexp.MustCompile(`^\s+(?:-[a-zA-Z], )?--([a-z][a-z-]*)(?: ([a-zA-Z]+))?\s`)
)

// help runs relayctl with --help for a command path, once per path.
func (g *guideChecker) help(path []string) relayctlHelp {
	key := strings.Join(path, " ")
	if h, ok := g.relayctl[key]; ok {
		return h
	}
	var out bytes.Buffer
	cmd := exec.Command(g.relayctlBin, append(append([]string{}, path...), "--help")...)
	cmd.Stdout, cmd.Stderr = &out, &out
	_ = cmd.Run()
	h := relayctlHelp{subs: map[string]bool{}, flags: map[string]bool{}}
	section := ""
	for _, l := range strings.Split(out.String(), "\n") {
		if l != "" && !strings.HasPrefix(l, " ") {
			section = l
			continue
		}
		if section == "Usage:" && strings.HasPrefix(l, "  ") && !strings.HasSuffix(l, "[command]") {
			h.runnable = true
		}
		if m := cobraFlag.FindStringSubmatch(l); m != nil && strings.Contains(section, "Flags:") {
			h.flags[m[1]] = m[2] != ""
		} else if m := cobraCommand.FindStringSubmatch(l); m != nil && strings.HasSuffix(section, ":") && !strings.Contains(section, "Usage") && !strings.Contains(section, "Examples") {
			h.subs[m[1]] = true
		}
	}
	g.relayctl[key] = h
	return h
}

// checkRelayctl walks a relayctl command line the way cobra parses it:
// flags anywhere, the command path made of the words that name
// subcommands, every flag one the command or the root has.
func (g *guideChecker) checkRelayctl(line int, w []string) {
	var path, flags []string
	h := g.help(nil)
	for i := 1; i < len(w); i++ {
		a := w[i]
		if name, ok := strings.CutPrefix(a, "-"); ok {
			name = strings.TrimPrefix(name, "-")
			name, _, hasValue := strings.Cut(name, "=")
			if name == "o" {
				name = "output"
			}
			flags = append(flags, name)
			if takes, known := h.flags[name]; known && takes && !hasValue {
				i++ // its value
			}
			continue
		}
		if h.subs[a] {
			path = append(path, a)
			h = g.help(path)
			continue
		}
		if len(path) == 0 {
			g.errorf(line, w, "relayctl has no command %q", a)
			return
		}
		// An argument: the rest may still hold flags.
	}
	if len(path) == 0 {
		g.errorf(line, w, "no relayctl command")
		return
	}
	if len(h.subs) > 0 && !h.runnable && !slices.Contains([]string{"help", "completion"}, path[len(path)-1]) {
		g.errorf(line, w, "relayctl %s needs one of its commands %v", strings.Join(path, " "), sortedKeys(h.subs))
		return
	}
	for _, f := range flags {
		if _, ok := h.flags[f]; !ok {
			g.errorf(line, w, "relayctl %s has no flag --%s", strings.Join(path, " "), f)
		}
	}
}

func (g *guideChecker) checkKubectl(line int, w []string) {
	var ns string
	for i := 1; i < len(w); i++ {
		switch w[i] {
		case "-n":
			ns = w[i+1]
			if !slices.ContainsFunc(slices.Collect(maps.Values(overlays)), func(o overlay) bool { return o.namespace == ns }) {
				g.errorf(line, w, "no overlay deploys the namespace %s", ns)
			}
		case "-k":
			if _, err := os.Stat(filepath.Join(repoRoot, w[i+1])); err != nil {
				g.errorf(line, w, "%s does not exist", w[i+1])
			}
		case "--":
			g.check(line, w[i+1:])
			w = w[:i]
		}
	}
	r := g.k8s["prod"]
	pods := map[string]bool{}
	for name, s := range r.statefulSets {
		for o := range int(ptrOr(s.Spec.Replicas, 1)) + 2 { // scaled up in the guide
			pods[name+"-"+strconv.Itoa(o)] = true
		}
	}
	kinds := map[string]func(string) bool{
		"statefulset": func(n string) bool { _, ok := r.statefulSets[n]; return ok },
		"deployment":  func(n string) bool { _, ok := r.deployments[n]; return ok },
		"pod":         func(n string) bool { return pods[n] },
	}
	for _, a := range w[1:] {
		kind, name, ok := strings.Cut(a, "/")
		if check, known := kinds[kind]; ok && known && !check(name) {
			g.errorf(line, w, "the prod overlay has no %s %s", kind, name)
		}
	}
	verb := w[1:]
	for len(verb) > 0 && (verb[0] == "-n" || verb[0] == "-i") {
		if verb[0] == "-n" {
			verb = verb[1:]
		}
		verb = verb[1:]
	}
	if len(verb) == 0 {
		return
	}
	switch verb[0] {
	case "exec":
		rest := slices.DeleteFunc(slices.Clone(verb[1:]), func(s string) bool { return strings.HasPrefix(s, "-") })
		if len(rest) == 0 || !pods[rest[0]] {
			g.errorf(line, w, "no control pod %v", rest)
		}
	case "create", "get":
		if len(verb) > 2 && (verb[1] == "secret" || verb[1] == "configmap") {
			name := verb[2]
			if verb[1] == "secret" && len(verb) > 3 && (verb[2] == "generic" || verb[2] == "tls") {
				name = verb[3]
			}
			if !g.referenced(verb[1], name) {
				g.errorf(line, w, "no manifest uses the %s %s", verb[1], name)
			}
		}
	case "delete":
		if len(verb) > 2 && verb[1] == "pod" && !pods[verb[2]] {
			g.errorf(line, w, "no control pod %s", verb[2])
		}
		if len(verb) > 2 && verb[1] == "pvc" {
			claim, pod, _ := strings.Cut(verb[2], "-")
			if !pods[pod] || claim != "data" {
				g.errorf(line, w, "%s is no control pod's volume claim", verb[2])
			}
		}
	case "rollout":
		// kubectl refuses rollout status for a StatefulSet that updates
		// OnDelete, and a rollout restart leaves its pods as they are.
		if len(verb) > 2 && (verb[1] == "status" || verb[1] == "restart") {
			if name, ok := strings.CutPrefix(verb[2], "statefulset/"); ok {
				if s, ok := r.statefulSets[name]; ok && s.Spec.UpdateStrategy.Type == appsv1.OnDeleteStatefulSetStrategyType {
					g.errorf(line, w, "%s updates OnDelete: rollout %s does nothing for it (delete its pods, or wait for them)", name, verb[1])
				}
			}
		}
	case "label":
		// The relay's own labels on a node or namespace are those a
		// manifest selects by: a typo would leave a node without its
		// edge (or with it, at maintenance), a Prometheus shut out.
		if len(verb) > 3 && (verb[1] == "node" || verb[1] == "namespace") {
			for _, l := range verb[3:] {
				key, _, _ := strings.Cut(strings.TrimSuffix(l, "-"), "=")
				if strings.HasPrefix(key, "relay.edge-relay.dev/") && !g.selectsBy(verb[1], key) {
					g.errorf(line, w, "no overlay selects a %s by the label %s", verb[1], key)
				}
			}
		}
	case "set":
		if len(verb) > 3 && verb[1] == "image" {
			c, _, _ := strings.Cut(verb[3], "=")
			if c != "relayd" {
				g.errorf(line, w, "the container is called relayd")
			}
		}
	}
}

// selectsBy reports whether an overlay selects nodes (a pod's
// nodeSelector) or namespaces (a NetworkPolicy's peer) by a label key.
func (g *guideChecker) selectsBy(kind, key string) bool {
	for _, r := range g.k8s {
		for _, w := range r.pods() {
			if _, ok := w.spec.NodeSelector[key]; ok && kind == "node" {
				return true
			}
		}
		for _, np := range r.netpols {
			for _, rule := range np.Spec.Ingress {
				for _, peer := range rule.From {
					if peer.NamespaceSelector == nil || kind != "namespace" {
						continue
					}
					if _, ok := peer.NamespaceSelector.MatchLabels[key]; ok {
						return true
					}
				}
			}
		}
	}
	return false
}

// referenced reports whether a Secret or ConfigMap is used by the prod
// overlay's pods.
func (g *guideChecker) referenced(kind, name string) bool {
	for _, w := range g.k8s["prod"].pods() {
		for _, v := range w.spec.Volumes {
			if kind == "secret" && v.Secret != nil && v.Secret.SecretName == name {
				return true
			}
		}
		for _, e := range w.spec.Containers[0].Env {
			if e.ValueFrom == nil {
				continue
			}
			if s := e.ValueFrom.SecretKeyRef; kind == "secret" && s != nil && s.Name == name {
				return true
			}
			if c := e.ValueFrom.ConfigMapKeyRef; kind == "configmap" && c != nil && c.Name == name {
				return true
			}
		}
	}
	return false
}

// Every flag of relayd control, edge and dev is in its section of
// docs/operations.md (its flag table, or the text around it), so an
// operator finds each there.
func TestEveryRelaydFlagIsDocumented(t *testing.T) {
	b, err := os.ReadFile(guide)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	section := func(from, to string) string {
		i := strings.Index(doc, from)
		j := strings.Index(doc[i+1:], to)
		if i < 0 || j < 0 {
			t.Fatalf("docs/operations.md has no section from %q to %q", from, to)
		}
		return doc[i : i+1+j]
	}
	for command, text := range map[string]string{
		"control": section("### `relayd control` flags", "### `relayd edge` flags"),
		"edge":    section("### `relayd edge` flags", "## Kubernetes"),
		"dev":     section("## Single machine", "## TLS and certificates"),
	} {
		for name := range relaydFlags(t, command).byName {
			if name == "help" {
				continue
			}
			if !strings.Contains(text, "`--"+name+"`") {
				t.Errorf("relayd %s --%s is not in its section of docs/operations.md", command, name)
			}
		}
	}
}
