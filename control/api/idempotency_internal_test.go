package api

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// A request digest is kept in the replicated state: no password of the
// request, whatever its field is called, goes into it; everything else
// does, so a key cannot be reused for another request.
func TestRequestDigestsHoldNoPasswords(t *testing.T) {
	pw, other := "a secret password", "another one"
	for _, tc := range []struct {
		procedure  string
		a, b, diff proto.Message
	}{
		{controlv1connect.UserServiceUpdateUserProcedure,
			&controlv1.UpdateUserRequest{Id: "u_1", Password: &pw}, &controlv1.UpdateUserRequest{Id: "u_1", Password: &other},
			&controlv1.UpdateUserRequest{Id: "u_2", Password: &pw}},
		{controlv1connect.UserServiceCreateUserProcedure,
			&controlv1.CreateUserRequest{Login: "a", Password: pw}, &controlv1.CreateUserRequest{Login: "a", Password: other},
			&controlv1.CreateUserRequest{Login: "b", Password: pw}},
		{controlv1connect.AuthServiceChangePasswordProcedure,
			&controlv1.ChangePasswordRequest{CurrentPassword: pw, NewPassword: other}, &controlv1.ChangePasswordRequest{CurrentPassword: other, NewPassword: pw},
			nil},
	} {
		da, err := requestDigest(tc.procedure, tc.a)
		if err != nil {
			t.Fatal(err)
		}
		db, err := requestDigest(tc.procedure, tc.b)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(da, db) {
			t.Errorf("%s: requests that differ only in passwords have different digests", tc.procedure)
		}
		if tc.diff != nil {
			dd, err := requestDigest(tc.procedure, tc.diff)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(da, dd) {
				t.Errorf("%s: requests that differ in more than passwords have the same digest", tc.procedure)
			}
		}
	}
	if idempotent[controlv1connect.AuthServiceChangePasswordProcedure] {
		t.Error("ChangePassword honours idempotency keys: its two writes would share one request id")
	}
	if idempotent[edgev1connect.MailboxServicePutMailboxProcedure] {
		t.Error("PutMailbox honours idempotency keys: the commands of a call over MaxCommandEventBytes would share one request id")
	}
}
