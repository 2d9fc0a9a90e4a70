package api

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// IdempotencyKeyHeader carries a key a client chooses for a call that
// changes state: a retry of the call with the same key, after an outcome
// the client did not learn (a timeout, a node that went away), returns
// the first call's outcome instead of acting twice. Keys are scoped to
// the caller and the procedure, and remembered for as long as the state
// machine remembers request ids (fsm.Config.RequestRetention: 100 000
// Raft entries by default).
const IdempotencyKeyHeader = "Idempotency-Key"

// maxIdempotencyKey bounds a key's length.
const maxIdempotencyKey = 128

// idempotent lists the procedures that honour IdempotencyKeyHeader: those
// that make exactly one write and answer from its result. (Reads need no
// key; Login and Refresh mint secrets per call; ChangePassword makes two
// writes, the login attempt and the change, and a retry after a change
// that went through must fail on the password it replaced; PutMailbox may
// make several, one per MiB of events, which one request id would fold
// into the first; key rotations, edge and mailbox calls are safe to
// repeat as they are.)
var idempotent = map[string]bool{
	controlv1connect.UserServiceCreateUserProcedure:       true,
	controlv1connect.UserServiceUpdateUserProcedure:       true,
	controlv1connect.UserServiceDeleteUserProcedure:       true,
	controlv1connect.DeviceServiceRegisterDeviceProcedure: true,
	controlv1connect.DeviceServiceRenameDeviceProcedure:   true,
	controlv1connect.DeviceServiceRevokeDeviceProcedure:   true,
	controlv1connect.DeviceServiceDeleteDeviceProcedure:   true,
	controlv1connect.AuthServiceLogoutProcedure:           true,
}

// withIdempotencyKey gives the write of an idempotent call the request id
// its key names: the caller, the procedure and the key, with a digest of
// the request (its secrets left out) so that the key cannot be reused for
// another request.
func withIdempotencyKey(ctx context.Context, procedure string, h http.Header, msg any) (context.Context, error) {
	key := h.Get(IdempotencyKeyHeader)
	if key == "" || !idempotent[procedure] {
		return ctx, nil
	}
	if len(key) > maxIdempotencyKey {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s is %d bytes, at most %d allowed", IdempotencyKeyHeader, len(key), maxIdempotencyKey))
	}
	for _, c := range key {
		if c < 0x21 || c > 0x7e {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s may hold only visible ASCII characters", IdempotencyKeyHeader))
		}
	}
	claims, ok := auth.ClaimsFrom(ctx)
	if !ok {
		return nil, connect.NewError(connect.CodeInternal, errors.New("idempotency key without an authenticated caller"))
	}
	m, ok := msg.(proto.Message)
	if !ok {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("request of %s is not a protobuf message", procedure))
	}
	digest, err := requestDigest(procedure, m)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	return raftnode.WithRequestID(ctx, "key\x00"+claims.Subject+"\x00"+procedure+"\x00"+key, digest), nil
}

// requestDigest hashes a request without its secrets (fields whose name
// has "password" in it): the digest is kept in the replicated state.
func requestDigest(procedure string, m proto.Message) ([]byte, error) {
	c := proto.Clone(m)
	r := c.ProtoReflect()
	r.Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		if strings.Contains(string(fd.Name()), "password") {
			r.Clear(fd)
		}
		return true
	})
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("digest of the request: %w", err)
	}
	h := sha256.New()
	h.Write([]byte(procedure))
	h.Write([]byte{0})
	h.Write(b)
	return h.Sum(nil)[:16], nil
}
