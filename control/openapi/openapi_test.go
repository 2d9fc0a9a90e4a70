package openapi_test

import (
	"bytes"
	"context"
	"flag"
	"os"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/edge-relay/relay/control/openapi"
	_ "github.com/edge-relay/relay/proto/control/v1"
	_ "github.com/edge-relay/relay/proto/edge/v1"
)

var update = flag.Bool("update", false, "rewrite docs/openapi.json")

const golden = "../../docs/openapi.json"

func generate(t *testing.T) []byte {
	t.Helper()
	svcs := openapi.Services(protoregistry.GlobalFiles, "control.v1", "edge.v1")
	b, err := openapi.Generate(openapi.Info{Title: "relay control API", Version: "v1"}, svcs,
		map[string]bool{"/control.v1.AuthService/Login": true, "/control.v1.AuthService/Refresh": true})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The generated document is valid OpenAPI 3 and describes every RPC.
func TestDocumentValidates(t *testing.T) {
	b := generate(t)
	doc, err := openapi3.NewLoader().LoadFromData(b)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("invalid OpenAPI document: %v", err)
	}
	for _, p := range []string{"/control.v1.UserService/CreateUser", "/control.v1.ClusterService/Backup", "/edge.v1.WatchService/Watch", "/control.v1.AuthService/Login"} {
		if doc.Paths.Find(p) == nil {
			t.Errorf("path %s missing", p)
		}
	}
	login := doc.Paths.Find("/control.v1.AuthService/Login").Post
	if login.Security == nil || len(*login.Security) != 0 {
		t.Error("Login should need no bearer token")
	}
	user := doc.Components.Schemas["control.v1.User"].Value
	if user.Properties["createdAt"].Value.Format != "date-time" || user.Properties["role"].Value.Enum == nil {
		t.Errorf("User schema: %+v", user.Properties)
	}
}

// docs/openapi.json is what the code generates (go test ./control/openapi -update rewrites it).
func TestCommittedDocumentIsCurrent(t *testing.T) {
	b := generate(t)
	if *update {
		if err := os.WriteFile(golden, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	have, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run: go test ./control/openapi -update)", err)
	}
	if !bytes.Equal(have, b) {
		t.Fatal("docs/openapi.json is stale: run go test ./control/openapi -update")
	}
	// Generation is deterministic.
	if !bytes.Equal(b, generate(t)) {
		t.Fatal("two generations differ")
	}
}
