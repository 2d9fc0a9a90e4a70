package api_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	"connectrpc.com/connect"
	"filippo.io/edwards25519"

	"github.com/edge-relay/relay/control/clustertest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// A device key anyone could sign for is refused at registration: the
// points of small order (for the identity point, crypto/ed25519 takes
// B || 1 as a signature of any message, shown first), and bytes that are
// no point of the curve; a generated key is taken.
func TestADeviceKeyAnyoneCouldSignForIsRefused(t *testing.T) {
	identity := edwards25519.NewIdentityPoint().Bytes()
	one := make([]byte, 32)
	one[0] = 1
	forged := append(edwards25519.NewGeneratorPoint().Bytes(), one...)
	if !ed25519.Verify(identity, []byte("any message at all"), forged) {
		t.Fatal("premise: a signature forged for the identity key verifies")
	}
	// (0, -1), a point of order 2.
	order2 := []byte{0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}
	// Some y for which no x is on the curve.
	var offCurve []byte
	for y := byte(2); offCurve == nil; y++ {
		b := make([]byte, 32)
		b[0] = y
		if _, err := new(edwards25519.Point).SetBytes(b); err != nil {
			offCurve = b
		}
	}
	good, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, 30*time.Second)
	if _, err := c.CreateUser(ctx, 0, "keys"); err != nil {
		t.Fatal(err)
	}
	devices := controlv1connect.NewDeviceServiceClient(httpClient(t), url(c.Nodes[0]), connect.WithInterceptors(bearer(c.AdminToken())))
	for _, tc := range []struct {
		what string
		key  []byte
		want connect.Code
	}{
		{"the identity point", identity, connect.CodeInvalidArgument},
		{"a point of order 2", order2, connect.CodeInvalidArgument},
		{"no point of the curve", offCurve, connect.CodeInvalidArgument},
		{"a generated key", good, 0},
	} {
		_, err := devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{UserId: "keys", Name: "phone", PublicKey: tc.key}))
		if got := connect.CodeOf(err); (tc.want == 0 && err != nil) || (tc.want != 0 && got != tc.want) {
			t.Errorf("%s: %v, want %v", tc.what, err, tc.want)
		}
	}
}
