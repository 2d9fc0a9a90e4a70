package client_test

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/edge-relay/relay/edge/client"
)

// registration is what registering a device gives it, as
// `relayctl device register --name NAME --generate-key FILE` does.
type registration struct {
	UserID, DeviceID string
	// KeyFile holds the device's Ed25519 private key as --generate-key
	// writes it: the standard base64 of the key's 32-byte seed, on a line
	// of its own.
	KeyFile string
	// Revision is the control-plane revision the registration returned
	// (relayctl prints it; RegisterDeviceResponse.revision in the API).
	Revision uint64
}

// readDeviceKey reads a key file written by `relayctl device register
// --generate-key`.
func readDeviceKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read the device key: %w", err)
	}
	seed, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("device key %s: %w", path, err)
	}
	if len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("device key %s: %d bytes, want an Ed25519 seed of %d", path, len(seed), ed25519.SeedSize)
	}
	return ed25519.NewKeyFromSeed(seed), nil
}

// edgeCertHashes fetches the hashes of the certificates an edge with a
// self-signed certificate presents, for Config.CertHashes. base is the
// edge's admin port (http://HOST:PORT, on a network of the deployment's)
// or its HTTPS port (https://HOST:PORT, the same port number as the
// devices'); the HTTPS port presents the very certificate these hashes
// vouch for, so fetch them from there only over a connection you trust
// for another reason (a certificate signed by a CA, your own backend).
func edgeCertHashes(ctx context.Context, hc *http.Client, base string) ([][]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/.well-known/relay/certificate-hashes", nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch the edge's certificate hashes: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch the edge's certificate hashes: %s", resp.Status)
	}
	var doc struct {
		Hashes []struct {
			Algorithm string    `json:"algorithm"` // "sha-256"
			Value     string    `json:"value"`     // standard base64
			NotAfter  time.Time `json:"notAfter"`
		} `json:"hashes"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&doc); err != nil {
		return nil, fmt.Errorf("the edge's certificate hashes: %w", err)
	}
	var pins [][]byte
	for _, h := range doc.Hashes {
		if h.Algorithm != "sha-256" {
			continue
		}
		sum, err := base64.StdEncoding.DecodeString(h.Value)
		if err != nil || len(sum) != sha256.Size {
			return nil, fmt.Errorf("the edge's certificate hash %q is not the base64 of a SHA-256", h.Value)
		}
		pins = append(pins, sum)
	}
	if len(pins) == 0 {
		return nil, fmt.Errorf("the edge at %s publishes no SHA-256 certificate hash", base)
	}
	return pins, nil
}

// dialDevice connects a registered device to the edge at addr.
func dialDevice(ctx context.Context, addr string, pins [][]byte, reg registration, tr client.Transport) (*client.Client, error) {
	key, err := readDeviceKey(reg.KeyFile)
	if err != nil {
		return nil, err
	}
	return client.Dial(ctx, client.Config{
		// host:port; UDP for QUIC and WebTransport, TCP for WebSocket:
		// an edge listens on both with the same port number.
		Addr:      addr,
		Transport: tr,
		UserID:    reg.UserID,
		DeviceID:  reg.DeviceID,
		Key:       key,
		// The edge's certificate is self-signed: pin it. (An edge with a
		// certificate signed by a CA needs none; set TLS.RootCAs if the CA
		// is not the system's.)
		CertHashes: pins,
		// The edge may not have heard of a device registered a moment
		// ago: it waits until it knows this revision before it looks the
		// device up, instead of refusing it as unknown.
		MinRevision: reg.Revision,
	})
}

// A phone and a laptop of one user, registered with relayctl, connect to
// an edge: the phone over QUIC, the laptop over a WebSocket (for networks
// that block UDP). The phone sends an event to the laptop; its Send
// returns once the laptop has it.
//
// Each device's Config is built from what the deployment gave it: the
// edge's address, the device's ids, key file and registration revision,
// and the edge's certificate hashes, fetched from its admin port. Here a
// relay started in this process (startDeployment, a test helper beside
// this example) stands in for the deployment; everything else is what an
// application does.
func Example() {
	dep := startDeployment()
	defer dep.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pins, err := edgeCertHashes(ctx, http.DefaultClient, dep.AdminURL)
	if err != nil {
		panic(err)
	}
	phone, err := dialDevice(ctx, dep.EdgeAddr, pins, dep.Phone, client.QUIC)
	if err != nil {
		panic(err)
	}
	defer phone.Close()
	laptop, err := dialDevice(ctx, dep.EdgeAddr, pins, dep.Laptop, client.WebSocket)
	if err != nil {
		panic(err)
	}
	defer laptop.Close()
	for !slices.Contains(phone.Online(), dep.Laptop.DeviceID) {
		select {
		case <-phone.Presence():
		case <-ctx.Done():
			panic(ctx.Err())
		}
	}

	err = phone.Send(ctx, client.Message{Targets: []string{dep.Laptop.DeviceID}, Type: "clipboard", Payload: []byte("hello from the phone")})
	fmt.Println("delivered:", err == nil)
	ev, err := laptop.Receive(ctx)
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s from the phone: %s\n", ev.Type, ev.Payload)
	// Output:
	// delivered: true
	// clipboard from the phone: hello from the phone
}
