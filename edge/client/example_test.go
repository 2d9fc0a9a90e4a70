package client_test

import (
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
)

// deployment is what the package example connects to: a real relay (one
// control node and one edge on 127.0.0.1, with its admin port) started
// in this process, and two devices of one user registered the way
// `relayctl device register --generate-key FILE` registers them.
type deployment struct {
	// EdgeAddr is the edge's host:port (UDP and TCP).
	EdgeAddr string
	// AdminURL is the base URL of the edge's admin port.
	AdminURL      string
	Phone, Laptop registration
	env           *relaytest.Standalone
}

// Close stops the relay and removes the key files.
func (d *deployment) Close() { d.env.Close() }

// startDeployment starts a relay and registers a phone and a laptop. The
// devices are only registered, not waited for until the edge knows them:
// a client that names the registration's revision (Config.MinRevision)
// connects all the same.
func startDeployment() (dep *deployment) {
	env := &relaytest.Standalone{}
	defer func() {
		if dep == nil {
			env.Close() // panicking
		}
	}()
	relay := relaytest.Start(env, relaytest.Options{Edge: func(_ int, cfg *server.Config) { cfg.AdminAddr = "127.0.0.1:0" }})
	user := relay.User("alice")
	dir := env.TempDir()
	register := func(name string) registration {
		d := relay.RegisterDevice(user, name)
		// The key file as relayctl writes it (cmd/relayctl, device
		// register --generate-key).
		file := filepath.Join(dir, name+".key")
		if err := os.WriteFile(file, []byte(base64.StdEncoding.EncodeToString(d.Key.Seed())+"\n"), 0o600); err != nil {
			panic(err)
		}
		return registration{UserID: user, DeviceID: d.ID, KeyFile: file, Revision: d.Revision}
	}
	edge := relay.Edges[0]
	return &deployment{
		EdgeAddr: edge.Addr(), AdminURL: edge.AdminURL(),
		Phone: register("phone"), Laptop: register("laptop"),
		env: env,
	}
}

// A refused event comes back as an *Error whose code says whether sending
// it again later may help.
func ExampleError_Retryable() {
	err := error(&client.Error{Code: 14, Message: "a target's queue is full; retry later"})
	var ce *client.Error
	if errors.As(err, &ce) && ce.Retryable() {
		fmt.Println("retry later:", ce.Code)
	}
	// Output:
	// retry later: ERROR_CODE_QUEUE_FULL
}
