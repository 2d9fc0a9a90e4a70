package deploy

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// headings returns the headings of a Markdown file (outside code
// blocks), and the bold run-in ones that open a paragraph ("**Memory.**
// relayd reads..."), with the line each is on.
func headings(t *testing.T, path string) map[string]int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	fenced := false
	for i, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
			continue
		}
		if fenced {
			continue
		}
		h := ""
		if strings.HasPrefix(line, "#") {
			h = strings.TrimSpace(strings.TrimLeft(line, "#"))
		} else if m := runIn.FindStringSubmatch(line); m != nil {
			h = m[1]
		}
		if _, ok := out[h]; !ok && h != "" {
			out[h] = i + 1
		}
	}
	return out
}

var runIn = regexp.MustCompile(`^\*\*([^*]+)\.\*\*`)

// section finds the heading a citation names: the heading itself, or a
// phrase of it ("Compose" for "Compose (one machine)", "Limits" for
// "Limits: bounded work before authentication").
func section(hs map[string]int, cited string) (line int, ok bool) {
	if at, ok := hs[cited]; ok {
		return at, true
	}
	phrase := regexp.MustCompile(`(^|[\s:,(])` + regexp.QuoteMeta(cited) + `($|[\s:,)])`)
	for h, at := range hs {
		if phrase.MatchString(h) {
			return at, true
		}
	}
	return 0, false
}

// The sections the deployment files and the guides cite (`docs/X.md,
// "Heading"`, in comments too, across a line break) exist, and a
// guide's `"Heading" below` or `above` points the right way.
func TestSectionReferences(t *testing.T) {
	var files []string
	for _, root := range []string{".", "../loadtest"} {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && (d.Name() == "node_modules" || d.Name() == "dist" || d.Name() == "gen") {
				return filepath.SkipDir
			}
			if !d.IsDir() && regexp.MustCompile(`\.(ya?ml|sh|md|env|service|go|ts)$|Dockerfile$`).MatchString(p) {
				files = append(files, p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	files = append(files, "../docs/operations.md", "../docs/runbooks.md", "../README.md")
	cite := regexp.MustCompile(`docs/([a-z-]+)\.md,\s+"([^"]+)"`)
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		// A citation may wrap onto the next comment line.
		text := regexp.MustCompile(`\n\s*(#|//)?\s*`).ReplaceAllString(string(b), " ")
		for _, m := range cite.FindAllStringSubmatch(text, -1) {
			n++
			doc := filepath.Join("..", "docs", m[1]+".md")
			if _, ok := section(headings(t, doc), m[2]); !ok {
				t.Errorf("%s cites %s, section %q, which it has not", f, doc, m[2])
			}
		}
	}
	if n < 5 {
		t.Fatalf("found only %d citations", n)
	}
	where := regexp.MustCompile(`"([^"\n]+)" (below|above)`)
	for _, doc := range []string{"../docs/operations.md", "../docs/runbooks.md"} {
		hs := headings(t, doc)
		b, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(b), "\n") {
			for _, m := range where.FindAllStringSubmatch(line, -1) {
				at, ok := section(hs, m[1])
				switch {
				case !ok:
					t.Errorf("%s:%d: %q %s: no such section", doc, i+1, m[1], m[2])
				case m[2] == "below" && at < i+1, m[2] == "above" && at > i+1:
					t.Errorf("%s:%d: %q is not %s (it is at line %d)", doc, i+1, m[1], m[2], at)
				}
			}
		}
	}
}
