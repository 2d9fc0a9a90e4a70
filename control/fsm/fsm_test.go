package fsm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/auth"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"))
}

func openStore(t testing.TB, dir string) *state.Store {
	t.Helper()
	s, err := state.Open(state.Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newFSM(t testing.TB, cfg Config) *FSM {
	t.Helper()
	if cfg.Store == nil {
		cfg.Store = openStore(t, t.TempDir())
		t.Cleanup(func() { _ = cfg.Store.Close() })
	}
	f, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func entry(t testing.TB, index uint64, cmd *statev1.Command) *raft.Log {
	b, err := proto.Marshal(cmd)
	if err != nil {
		t.Fatal(err)
	}
	return &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: b}
}

// applier feeds numbered commands to an FSM.
type applier struct {
	t   *testing.T
	f   *FSM
	idx uint64
}

func (a *applier) apply(op isCommandOp) *statev1.Result {
	a.t.Helper()
	a.idx++
	cmd := &statev1.Command{ProposedAtMs: 1_000_000 + int64(a.idx)}
	if op != nil {
		// Command.Op's interface type is unexported; set it by reflection.
		reflect.ValueOf(cmd).Elem().FieldByName("Op").Set(reflect.ValueOf(op))
	}
	res, _ := a.f.Apply(entry(a.t, a.idx, cmd)).(*statev1.Result)
	return res
}

// advanceTo applies no-ops until the last command's time is at least ms
// (command i runs at 1_000_000 + i).
func (a *applier) advanceTo(ms int64) {
	a.t.Helper()
	for 1_000_000+int64(a.idx) < ms {
		a.apply(&statev1.Command_Noop{Noop: &statev1.Noop{}})
	}
}

// isCommandOp is any of the statev1.Command_* oneof wrappers.
type isCommandOp = any

func exportBytes(t *testing.T, f *FSM) []byte {
	t.Helper()
	snap := f.store.Snapshot()
	defer snap.Close()
	var b bytes.Buffer
	if _, err := state.Export(&b, snap); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func key32(seed byte) []byte { return bytes.Repeat([]byte{seed}, 32) }

// randomLog builds a reproducible mix of valid, invalid, duplicate and
// undecodable entries, plus configuration entries.
func randomLog(t *testing.T, n int, seed uint64) []*raft.Log {
	r := rand.New(rand.NewPCG(seed, seed))
	var logs []*raft.Log
	users, devices := []string{}, map[string]string{}
	var devList []string
	var reqIDs []string
	var refresh []*statev1.RefreshToken // issued and rotated-in tokens, for rotations
	// Two password hashes, for password changes and rehashes between them.
	var hashes [2]string
	for i := range hashes {
		h, err := auth.HashPassword(fmt.Sprint("password number ", i), auth.TestParams)
		if err != nil {
			t.Fatal(err)
		}
		hashes[i] = h
	}
	for i := 1; i <= n; i++ {
		idx := uint64(i)
		// Mailbox owners no other random command touches (users mu0..mu2
		// with devices md0..md5), and the cluster CA.
		if i <= 10 {
			cmd := &statev1.Command{ProposedAtMs: int64(1_000_000 + i*10)}
			if i == 10 {
				cmd.Op = &statev1.Command_SetClusterCa{SetClusterCa: &statev1.SetClusterCA{Ca: testCA(t, 7, 7)}}
			} else if i <= 3 {
				id := fmt.Sprint("mu", i-1)
				cmd.Op = &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: id, Login: id}}}
			} else {
				did, uid := fmt.Sprint("md", i-4), fmt.Sprint("mu", (i-4)%3)
				devices[did] = uid
				devList = append(devList, did)
				cmd.Op = &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: did, UserId: uid, Name: "m", PublicKey: key32(byte(i))}}}
			}
			logs = append(logs, entry(t, idx, cmd))
			continue
		}
		if r.IntN(50) == 0 {
			logs = append(logs, &raft.Log{Index: idx, Term: 1, Type: raft.LogConfiguration, Data: []byte("conf")})
			continue
		}
		if r.IntN(60) == 0 {
			logs = append(logs, &raft.Log{Index: idx, Term: 1, Type: raft.LogCommand, Data: []byte{0xff, 0x01, 0x02}})
			continue
		}
		cmd := &statev1.Command{ProposedAtMs: int64(1_000_000 + i*10)}
		if r.IntN(4) == 0 {
			if len(reqIDs) > 0 && r.IntN(3) == 0 {
				cmd.RequestId = reqIDs[r.IntN(len(reqIDs))]
			} else {
				cmd.RequestId = fmt.Sprintf("req-%d", i)
				reqIDs = append(reqIDs, cmd.RequestId)
			}
		}
		pickUser := func() string {
			if len(users) == 0 || r.IntN(10) == 0 {
				return fmt.Sprintf("u%d", r.IntN(1000))
			}
			return users[r.IntN(len(users))]
		}
		pickDevice := func() (string, string) {
			// Mostly a few devices registered early, so mailboxes fill up.
			did := fmt.Sprintf("d%d", r.IntN(800))
			if r.IntN(8) != 0 {
				did = devList[r.IntN(min(len(devList), 8))]
			}
			uid := devices[did]
			if uid == "" || r.IntN(20) == 0 {
				uid = pickUser()
			}
			return uid, did
		}
		// pickEvent draws a target and an event among few senders and ids
		// (so retries and claims meet), expiring from early ms before the
		// command's time on; one in 40 has no expiry (invalid: rejects the
		// whole command).
		pickEvent := func(now, early int64) (uid, did, sender, id string, exp int64) {
			uid, did = pickDevice()
			exp = now + int64(r.IntN(2000)) - early
			if r.IntN(40) == 0 {
				exp = 0
			}
			return uid, did, fmt.Sprint("s", r.IntN(3)), fmt.Sprint("ev", r.IntN(20)), exp
		}
		// Login attempts of few logins from few addresses, with a small
		// policy, so that waits, trust and pruning all happen.
		policy := &statev1.ThrottlePolicy{AddrFree: 2, LoginFree: 1, BaseDelayMs: 10, MaxDelayMs: 40, WindowMs: 100, TrustMs: 300}
		pickAttempt := func() *statev1.LoginAttempt {
			return &statev1.LoginAttempt{Login: "login-" + pickUser(), AddrHash: bytes.Repeat([]byte{0xf0 | byte(r.IntN(4))}, AddrHashLen), Policy: policy}
		}
		switch r.IntN(19) {
		case 17:
			cmd.Op = &statev1.Command_LoginAttempt{LoginAttempt: pickAttempt()}
		case 18:
			if len(refresh) > 0 && r.IntN(2) == 0 {
				// Rotations of tokens issued above (some twice: reuse),
				// some kept until later, so that a kept token is presented
				// again past its own expiry, and pruned at the keep.
				cur := refresh[len(refresh)-1-r.IntN(min(len(refresh), 3))]
				if r.IntN(5) == 0 {
					// A logout, some ending their session.
					end := r.IntN(2) == 0
					cmd.Op = &statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: cur.FamilyId, UserId: cur.UserId,
						Reason: "logout", End: end, EndedKeptUntilMs: int64(r.IntN(2)) * (cmd.ProposedAtMs + int64(r.IntN(3000)))}}
					break
				}
				next := tok(fmt.Sprint("rt", i), cur.FamilyId, cur.UserId, byte(i), cmd.ProposedAtMs+int64(r.IntN(3000)))
				refresh = append(refresh, next)
				cmd.Op = &statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: cur.Id,
					PresentedSecretHash: cur.SecretHash, Next: next, KeepRotatedUntilMs: int64(r.IntN(2)) * (cmd.ProposedAtMs + int64(r.IntN(6000))),
					BoundRotations: r.IntN(2) == 0}}
				break
			}
			uid := pickUser()
			if len(users) > 0 && r.IntN(2) == 0 {
				uid = users[r.IntN(min(len(users), 3))] // a few accounts with many logins: caps end some
			}
			issued := tok(fmt.Sprint("rt", i), fmt.Sprint("rf", i), uid, byte(i), cmd.ProposedAtMs+int64(r.IntN(3000)))
			refresh = append(refresh, issued)
			// Some under a session cap of 1 to 3 (ending earlier ones).
			cmd.Op = &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: issued, Succeeded: pickAttempt(),
				MaxSessions: uint32(r.IntN(4)), EndedKeptUntilMs: int64(r.IntN(2)) * (cmd.ProposedAtMs + int64(r.IntN(3000)))}}
		case 0, 1, 2:
			id := fmt.Sprintf("u%d", r.IntN(400))
			users = append(users, id)
			cmd.Op = &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: id, Login: "login-" + id, DisplayName: "User " + id}}}
		case 3:
			switch r.IntN(3) {
			case 0:
				cmd.Op = &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: pickUser(), Fields: []string{"display_name", "status"},
					User: &statev1.User{DisplayName: fmt.Sprint("name ", i), Status: statev1.UserStatus(1 + r.IntN(2))}}}
			case 1:
				cmd.Op = &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: pickUser(), Fields: []string{"password_hash"},
					User: &statev1.User{PasswordHash: hashes[r.IntN(2)]}}}
			default:
				// Over the right hash or the other, some while gated shut.
				cmd.Op = &statev1.Command_RehashPassword{RehashPassword: &statev1.RehashPassword{UserId: pickUser(),
					ExpectPasswordHash: hashes[r.IntN(2)], PasswordHash: hashes[r.IntN(2)]}}
			}
		case 4:
			cmd.Op = &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: pickUser(), PurgeLimit: uint32(r.IntN(3))}}
		case 5, 6, 7:
			uid, did := pickUser(), fmt.Sprintf("d%d", r.IntN(800))
			devices[did] = uid
			devList = append(devList, did)
			cmd.Op = &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: did, UserId: uid, Name: "dev", PublicKey: key32(byte(i))}}}
		case 8:
			did := fmt.Sprintf("d%d", r.IntN(800))
			cmd.Op = &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: devices[did], DeviceId: did, PurgeLimit: uint32(r.IntN(3))}}
		case 9:
			did := fmt.Sprintf("d%d", r.IntN(800))
			cmd.Op = &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: devices[did], DeviceId: did, PurgeLimit: uint32(r.IntN(3))}}
		case 10:
			// Node records listing some features, withdrawals and the
			// gated apply switch: the gated fields below are ignored at
			// some entries and not at others, also inside one batch.
			id := fmt.Sprintf("n%d", r.IntN(5))
			switch r.IntN(6) {
			case 0:
				cmd.Op = &statev1.Command_EnableGatedApply{EnableGatedApply: &statev1.EnableGatedApply{}}
			case 1:
				cmd.Op = &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: id}, WithdrawFeatures: true}}
			case 2:
				cmd.Op = &statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: id}}
			default:
				features := Features()
				if r.IntN(2) == 0 {
					features = slices.DeleteFunc(features, func(string) bool { return r.IntN(6) == 0 })
				}
				cmd.Op = &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: id, RaftAddr: "a:1", ApiAddr: fmt.Sprintf("b:%d", r.IntN(3)), Features: features}}}
			}
		case 12:
			// Few senders and event ids, so retries (dedup) happen; small
			// quotas, so mailboxes fill; some entries already expired.
			var entries []*statev1.MailboxEntry
			for n := 1 + r.IntN(6); n > 0; n-- {
				uid, did, sender, id, exp := pickEvent(cmd.ProposedAtMs, 200)
				entries = append(entries, &statev1.MailboxEntry{UserId: uid, DeviceId: did, SenderDeviceId: sender,
					EventId: id, Event: make([]byte, 1+r.IntN(100)), ExpiresAtMs: exp, AnyOne: r.IntN(2) == 0})
			}
			cmd.Op = &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: entries, MaxEntriesPerDevice: 4, MaxBytesPerDevice: 200, ReplaceExpired: r.IntN(2) == 0}}
		case 13:
			_, did := pickDevice()
			cmd.Op = &statev1.Command_AckMailbox{AckMailbox: &statev1.AckMailbox{DeviceId: did, Seqs: []uint64{uint64(1 + r.IntN(8)), uint64(1 + r.IntN(8))}}}
		case 14:
			cmd.Op = &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: uint32(r.IntN(4)), PurgeLimit: uint32(r.IntN(3)), MaxBytes: uint64(r.IntN(3) * 40)}}
		case 15, 16:
			// Claims of the events the puts above store (same senders and
			// ids), by live, dead and foreign devices; some already over.
			var claims []*statev1.EventClaim
			for n := 1 + r.IntN(4); n > 0; n-- {
				uid, did, sender, id, exp := pickEvent(cmd.ProposedAtMs, 100)
				claims = append(claims, &statev1.EventClaim{UserId: uid, DeviceId: did, SenderDeviceId: sender, EventId: id, ExpiresAtMs: exp})
			}
			cmd.Op = &statev1.Command_ClaimEvents{ClaimEvents: &statev1.ClaimEvents{Claims: claims, RecordGraceMs: int64(r.IntN(2) * 300)}}
		case 11:
			if r.IntN(2) == 0 {
				cmd.Op = &statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: []*statev1.Activity{{UserId: pickUser(), SeenAtMs: int64(i)}}}}
			} else {
				cmd.Op = &statev1.Command_Noop{Noop: &statev1.Noop{}}
			}
		}
		logs = append(logs, entry(t, idx, cmd))
	}
	return logs
}

// Replaying the same log on two fresh FSMs, one entry at a time and in
// random batches, gives byte-identical state and identical results.
func TestDeterminism(t *testing.T) {
	cfg := Config{PruneEvery: 64, ChangeRetention: 200, RequestRetention: 150}
	logs := randomLog(t, 2000, 42)
	a, b := newFSM(t, cfg), newFSM(t, cfg)
	var resA, resB []any
	for _, l := range logs {
		resA = append(resA, a.Apply(l))
	}
	r := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < len(logs); {
		n := 1 + r.IntN(100)
		if i+n > len(logs) {
			n = len(logs) - i
		}
		resB = append(resB, b.ApplyBatch(logs[i:i+n])...)
		i += n
	}
	if !bytes.Equal(exportBytes(t, a), exportBytes(t, b)) {
		t.Fatal("the same log gave different state")
	}
	for i := range resA {
		ra, _ := resA[i].(*statev1.Result)
		rb, _ := resB[i].(*statev1.Result)
		if !proto.Equal(ra, rb) {
			t.Fatalf("entry %d: results differ: %v vs %v", i+1, ra, rb)
		}
	}
	if a.AppliedIndex() != uint64(len(logs)) {
		t.Fatalf("applied %d", a.AppliedIndex())
	}
	ok, rejected := 0, 0
	mailbox := map[statev1.MailboxStatus]int{}
	claims := map[bool]int{}
	for _, r := range resA {
		if res, _ := r.(*statev1.Result); res != nil {
			if res.Code == statev1.ResultCode_RESULT_CODE_OK {
				ok++
			} else {
				rejected++
			}
			for _, m := range res.GetMailboxResults() {
				mailbox[m.GetStatus()]++
			}
			for _, w := range res.GetClaimsWon() {
				claims[w]++
			}
		}
	}
	// Gated apply went on, and the gated fields were ignored at some
	// entries (and applied at others: the export comparison above).
	if on, _ := a.GatedApply(); !on {
		t.Fatal("the log never switched gated apply on")
	}
	ignored := map[string]int{}
	for _, r := range resA {
		if res, _ := r.(*statev1.Result); res != nil {
			for _, f := range res.GetFeaturesIgnored() {
				ignored[f]++
			}
		}
	}
	for _, f := range []string{FeatureMailboxExpireBytes, FeatureRefreshKeepRotated, FeatureSessionCap} {
		if ignored[f] < 5 {
			t.Fatalf("feature %s ignored at too few entries: %v", f, ignored)
		}
	}
	if claims[true] < 10 || claims[false] < 10 {
		t.Fatalf("log exercised claims too little: %v", claims)
	}
	// The export comparison above covered the event index and the claim
	// records; make sure the log left some of each.
	if len(keysWith(t, a, prefixEventIndex)) == 0 || len(keysWith(t, a, prefixClaim)) == 0 {
		t.Fatal("the log left no event index records or claims")
	}
	if ok < 200 || rejected < 200 {
		t.Fatalf("log exercised too little: %d ok, %d rejected", ok, rejected)
	}
	for _, st := range []statev1.MailboxStatus{statev1.MailboxStatus_MAILBOX_STATUS_STORED, statev1.MailboxStatus_MAILBOX_STATUS_FULL,
		statev1.MailboxStatus_MAILBOX_STATUS_TARGET_GONE, statev1.MailboxStatus_MAILBOX_STATUS_EXPIRED} {
		if mailbox[st] < 10 {
			t.Fatalf("log exercised mailboxes too little: %v", mailbox)
		}
	}
	if h, _ := a.Horizon(); h == 0 {
		t.Fatal("change feed never pruned")
	}
}

// Every rejection leaves the state exactly as it was and names the field.
func TestRejectionsChangeNothing(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "alice", Login: "alice"}}})
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "bob", Login: "bob"}}})
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "off", Login: "off", Status: statev1.UserStatus_USER_STATUS_DISABLED}}})
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d1", UserId: "alice", Name: "phone", PublicKey: key32(1)}}})
	// An account promoted (here, created) an operator after an operator's
	// check of it, and its device.
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "staff", Login: "staff", Role: "operator"}}})
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "sd1", UserId: "staff", Name: "laptop", PublicKey: key32(5)}}})
	long := string(bytes.Repeat([]byte("x"), 300))
	dev := func(d *statev1.Device) isCommandOp {
		return &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: d}}
	}
	user := func(u *statev1.User) isCommandOp {
		return &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: u}}
	}
	cases := []struct {
		name  string
		op    isCommandOp
		code  statev1.ResultCode
		field string
	}{
		{"nil op", nil, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "operation"},
		{"missing user", user(nil), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user"},
		{"empty id", user(&statev1.User{Login: "x"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.id"},
		{"long id", user(&statev1.User{Id: long, Login: "x"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.id"},
		{"bad id char", user(&statev1.User{Id: "a/b", Login: "x"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.id"},
		{"empty login", user(&statev1.User{Id: "x"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.login"},
		{"control char", user(&statev1.User{Id: "x", Login: "a\x01"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.login"},
		{"long display name", user(&statev1.User{Id: "x", Login: "x", DisplayName: long}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.display_name"},
		{"unknown status", user(&statev1.User{Id: "x", Login: "x", Status: 9}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.status"},
		{"duplicate id", user(&statev1.User{Id: "alice", Login: "other"}), statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS, "alice"},
		{"duplicate login", user(&statev1.User{Id: "carol", Login: "alice"}), statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS, "login"},
		{"update unknown field", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "alice", Fields: []string{"id"}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "field"},
		{"update no fields", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "alice"}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "fields"},
		{"update to taken login", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "alice", Fields: []string{"display_name", "login"}, User: &statev1.User{DisplayName: "changed", Login: "bob"}}}, statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS, "login"},
		{"update missing user", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "nobody", Fields: []string{"display_name"}}}, statev1.ResultCode_RESULT_CODE_NOT_FOUND, "nobody"},
		{"delete missing user", &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "nobody"}}, statev1.ResultCode_RESULT_CODE_NOT_FOUND, "nobody"},
		{"missing device", dev(nil), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "device"},
		{"short key", dev(&statev1.Device{Id: "d2", UserId: "alice", Name: "x", PublicKey: []byte{1}}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "public_key"},
		{"no device name", dev(&statev1.Device{Id: "d2", UserId: "alice", PublicKey: key32(2)}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "device.name"},
		{"long device name", dev(&statev1.Device{Id: "d2", UserId: "alice", Name: long, PublicKey: key32(2)}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "device.name"},
		{"device for missing user", dev(&statev1.Device{Id: "d2", UserId: "nobody", Name: "x", PublicKey: key32(2)}), statev1.ResultCode_RESULT_CODE_NOT_FOUND, "nobody"},
		{"device for disabled user", dev(&statev1.Device{Id: "d2", UserId: "off", Name: "x", PublicKey: key32(2)}), statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "not active"},
		{"duplicate device", dev(&statev1.Device{Id: "d1", UserId: "bob", Name: "x", PublicKey: key32(2)}), statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS, "d1"},
		{"revoke another user's device", &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "bob", DeviceId: "d1"}}, statev1.ResultCode_RESULT_CODE_NOT_FOUND, "d1"},
		{"delete another user's device", &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "bob", DeviceId: "d1"}}, statev1.ResultCode_RESULT_CODE_NOT_FOUND, "d1"},
		{"rename another user's device", &statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{UserId: "bob", DeviceId: "d1", Name: "x"}}, statev1.ResultCode_RESULT_CODE_NOT_FOUND, "d1"},
		{"an operator's change of a staff account", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "staff", Fields: []string{"display_name"}, User: &statev1.User{DisplayName: "x"}, OnlyUserAccount: true}}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "staff or edge"},
		{"an operator's deletion of a staff account", &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "staff", OnlyUserAccount: true}}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "staff or edge"},
		{"an operator's device for a staff account", &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "sd2", UserId: "staff", Name: "x", PublicKey: key32(6)}, OnlyUserAccount: true}}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "staff or edge"},
		{"an operator's rename of a staff device", &statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{UserId: "staff", DeviceId: "sd1", Name: "x", OnlyUserAccount: true}}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "staff or edge"},
		{"an operator's revocation of a staff device", &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "staff", DeviceId: "sd1", OnlyUserAccount: true}}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "staff or edge"},
		{"an operator's deletion of a staff device", &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "staff", DeviceId: "sd1", OnlyUserAccount: true}}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "staff or edge"},
		{"revocation's purge limit above the cap", &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "d1", PurgeLimit: MaxExpireLimit + 1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "purge_limit"},
		{"deletion's purge limit above the cap", &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "alice", DeviceId: "d1", PurgeLimit: MaxExpireLimit + 1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "purge_limit"},
		{"user deletion's purge limit above the cap", &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "alice", PurgeLimit: MaxExpireLimit + 1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "purge_limit"},
		{"expiry's purge limit above the cap", &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{PurgeLimit: MaxExpireLimit + 1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "purge_limit"},
		{"rename to empty", &statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{UserId: "alice", DeviceId: "d1"}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "name"},
		{"node without api addr", &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n1", RaftAddr: "a"}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "node.api_addr"},
		{"node with too many features", &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n1", RaftAddr: "a", ApiAddr: "b",
			Features: slices.Repeat([]string{FeatureChangePassword}, MaxFeatures+1)}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "node.features"},
		{"node with an empty feature", &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n1", RaftAddr: "a", ApiAddr: "b",
			Features: []string{FeatureChangePassword, ""}}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "node.features"},
		{"missing node", &statev1.Command_PutNode{PutNode: &statev1.PutNode{}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "node"},
		{"session key too short", &statev1.Command_RotateSessionKey{RotateSessionKey: &statev1.RotateSessionKey{Key: &statev1.SessionKey{Id: "k", Secret: []byte{1}}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "secret"},
		{"signing key missing", &statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "signing key"},
		{"edge without addrs", &statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{Id: "e1", LeaseExpiresAtMs: 1 << 50}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "edge.addrs"},
		{"edge lease in the past", &statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{Id: "e1", Addrs: []string{"a"}, LeaseExpiresAtMs: 1}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "lease"},
		{"gated apply while no record lists it", &statev1.Command_EnableGatedApply{EnableGatedApply: &statev1.EnableGatedApply{}}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "gated_apply"},
		{"deregister missing edge", &statev1.Command_DeregisterEdge{DeregisterEdge: &statev1.DeregisterEdge{Id: "nope"}}, statev1.ResultCode_RESULT_CODE_NOT_FOUND, "nope"},
		{"token for missing user", &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: &statev1.RefreshToken{Id: "t1", FamilyId: "f1", UserId: "nobody", SecretHash: key32(3), ExpiresAtMs: 1 << 50}}}, statev1.ResultCode_RESULT_CODE_NOT_FOUND, "nobody"},
		{"token with too high a session cap", &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: &statev1.RefreshToken{Id: "t1", FamilyId: "f1", UserId: "alice", SecretHash: key32(3), ExpiresAtMs: 1 << 50}, MaxSessions: MaxSessionCap + 1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "max_sessions"},
		{"token with a negative keep for ended sessions", &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: &statev1.RefreshToken{Id: "t1", FamilyId: "f1", UserId: "alice", SecretHash: key32(3), ExpiresAtMs: 1 << 50}, MaxSessions: 1, EndedKeptUntilMs: -1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "ended_kept_until_ms"},
		{"logout with a negative keep", &statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: "f1", UserId: "alice", End: true, EndedKeptUntilMs: -1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "ended_kept_until_ms"},
		{"token with short hash", &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: &statev1.RefreshToken{Id: "t1", FamilyId: "f1", UserId: "alice", SecretHash: []byte{1}, ExpiresAtMs: 1 << 50}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "secret_hash"},
		{"unknown role", user(&statev1.User{Id: "x", Login: "x", Role: "root"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.role"},
		{"node role for an account", user(&statev1.User{Id: "x", Login: "x", Role: "node"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.role"},
		{"garbage password hash", user(&statev1.User{Id: "x", Login: "x", PasswordHash: "hunter2"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.password_hash"},
		{"hash of another scheme", user(&statev1.User{Id: "x", Login: "x", PasswordHash: "$2y$10$abcdefghijklmnopqrstuv"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.password_hash"},
		{"hash with absurd memory", user(&statev1.User{Id: "x", Login: "x", PasswordHash: "$argon2id$v=19$m=99999999,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA"}), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.password_hash"},
		{"update to unknown role", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "alice", Fields: []string{"role"}, User: &statev1.User{Role: "superuser"}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.role"},
		{"update to node role", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "alice", Fields: []string{"display_name", "role"}, User: &statev1.User{DisplayName: "changed", Role: "node"}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.role"},
		{"update to garbage hash", &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "alice", Fields: []string{"password_hash"}, User: &statev1.User{PasswordHash: "plaintext-password"}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "user.password_hash"},
		{"activity without a time", &statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: []*statev1.Activity{{UserId: "alice", SeenAtMs: 5}, {UserId: "alice"}}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[1].seen_at_ms"},
		{"activity with a bad id", &statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: []*statev1.Activity{{UserId: "alice", SeenAtMs: 5}, {UserId: "alice", DeviceId: "a b", SeenAtMs: 5}}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[1].device_id"},
		{"mailbox without entries", putOp(), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries"},
		{"mailbox entry with a bad device id", putOp(mail("alice", "d 1", "d1", "e", 1, far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].device_id"},
		{"mailbox entry without a user", putOp(mail("", "d1", "d1", "e", 1, far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].user_id"},
		{"mailbox entry without an event", putOp(mail("alice", "d1", "d1", "e", 0, far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].event"},
		{"mailbox entry too large", putOp(mail("alice", "d1", "d1", "e", MaxMailboxEventBytes+1, far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].event"},
		{"mailbox entry with a long traceparent", putOp(withTraceparent(mail("alice", "d1", "d1", "e", 1, far), strings.Repeat("0", MaxTraceparentBytes+1))), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].traceparent"},
		{"mailbox entry with a binary traceparent", putOp(withTraceparent(mail("alice", "d1", "d1", "e", 1, far), "00-\x00")), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].traceparent"},
		{"mailbox entry without expiry", putOp(mail("alice", "d1", "d1", "e", 1, 0)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].expires_at_ms"},
		{"mailbox entry for a century", putOp(mail("alice", "d1", "d1", "e", 1, 1<<42)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].expires_at_ms"},
		{"mailbox entry without an event id", putOp(mail("alice", "d1", "d1", "", 1, far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[0].event_id"},
		{"mailbox entry with a bad sender", putOp(mail("alice", "d1", "d1", "ok", 1, far), mail("alice", "d1", "", "e", 1, far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "entries[1].sender_device_id"},
		{"mailbox quota above the cap", &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: []*statev1.MailboxEntry{mail("alice", "d1", "d1", "e", 1, far)}, MaxEntriesPerDevice: MaxMailboxQuotaEntries + 1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "max_entries_per_device"},
		{"mailbox ack with a bad device id", ackOp("a b", 1), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "device_id"},
		{"mailbox ack of too many seqs", ackOp("d1", make([]uint64, MaxMailboxAck+1)...), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "seqs"},
		{"mailbox expiry limit above the cap", &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: MaxExpireLimit + 1}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "limit"},
		{"claim nothing", claimOp(), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims"},
		{"too many claims", claimOp(make([]*statev1.EventClaim, MaxClaimBatch+1)...), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims"},
		{"claim missing", claimOp(claim("alice", "d1", "d1", "e", far), nil), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[1]"},
		{"claim with a bad sender", claimOp(claim("alice", "d1", "", "e", far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[0].sender_device_id"},
		{"claim without an event id", claimOp(claim("alice", "d1", "d1", "e", far), claim("alice", "d1", "d1", "", far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[1].event_id"},
		{"claim with a long event id", claimOp(claim("alice", "d1", "d1", long, far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[0].event_id"},
		{"claim with a bad device id", claimOp(claim("alice", "d/1", "d1", "e", far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[0].device_id"},
		{"claim without a user", claimOp(claim("", "d1", "d1", "e", far)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[0].user_id"},
		{"claim without expiry", claimOp(claim("alice", "d1", "d1", "e", 0)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[0].expires_at_ms"},
		{"claim for a century", claimOp(claim("alice", "d1", "d1", "e", 1<<42)), statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "claims[0].expires_at_ms"},
		{"cluster CA without a key", &statev1.Command_SetClusterCa{SetClusterCa: &statev1.SetClusterCA{Ca: &statev1.ClusterCA{}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "ca.private_seed"},
		{"init with a non-admin", &statev1.Command_InitCluster{InitCluster: &statev1.InitCluster{Admin: &statev1.User{Id: "root", Login: "root"}}}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "admin.role"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before, err := f.Digest()
			if err != nil {
				t.Fatal(err)
			}
			res := a.apply(tc.op)
			if res.GetCode() != tc.code {
				t.Fatalf("code %v (%s), want %v", res.GetCode(), res.GetMessage(), tc.code)
			}
			if !bytes.Contains([]byte(res.GetMessage()), []byte(tc.field)) {
				t.Fatalf("message %q does not name %q", res.GetMessage(), tc.field)
			}
			after, _ := f.Digest()
			if before != after {
				t.Fatal("a rejected command changed the state")
			}
			if res.GetRevision() != a.idx || f.AppliedIndex() != a.idx {
				t.Fatalf("revision %d / applied %d, want %d", res.GetRevision(), f.AppliedIndex(), a.idx)
			}
		})
	}
}

func TestResultError(t *testing.T) {
	for code, want := range map[statev1.ResultCode]error{
		statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT:    ErrInvalidArgument,
		statev1.ResultCode_RESULT_CODE_NOT_FOUND:           ErrNotFound,
		statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS:      ErrAlreadyExists,
		statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION: ErrFailedPrecondition,
	} {
		if err := ResultError(&statev1.Result{Code: code, Message: `device "d" not found`}); !errors.Is(err, want) || err.Error() != `device "d" not found` {
			t.Errorf("%v -> %v", code, err)
		}
		// Without a message the sentinel speaks.
		if err := ResultError(&statev1.Result{Code: code}); !errors.Is(err, want) || err.Error() != want.Error() {
			t.Errorf("%v without a message -> %v", code, err)
		}
	}
	if ResultError(&statev1.Result{Code: statev1.ResultCode_RESULT_CODE_OK}) != nil {
		t.Error("OK is an error")
	}
	if ResultError(nil) == nil || ResultError(&statev1.Result{Code: 99}) == nil {
		t.Error("nil / unknown codes")
	}
}

// A command re-applied with the same request id returns the first result
// and changes nothing, until the id falls out of its window.
func TestRequestIDIdempotency(t *testing.T) {
	f := newFSM(t, Config{PruneEvery: 16, RequestRetention: 32})
	create := &statev1.Command{RequestId: "r1", ProposedAtMs: 5, Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u1", Login: "u1"}}}}
	first := f.Apply(entry(t, 1, create)).(*statev1.Result)
	if first.Code != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(first)
	}
	before, _ := f.Digest()
	again := f.Apply(entry(t, 2, create)).(*statev1.Result)
	if !proto.Equal(first, again) {
		t.Fatalf("retry answered %v, first was %v", again, first)
	}
	if after, _ := f.Digest(); after != before {
		t.Fatal("retry changed the state")
	}
	// A client's id carries the digest of its request: the same id with
	// another digest is refused, and changes neither the state nor what
	// the id answers.
	keyed := &statev1.Command{RequestId: "k1", RequestDigest: []byte("one"), ProposedAtMs: 6, Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u2", Login: "u2"}}}}
	kfirst := f.Apply(entry(t, 3, keyed)).(*statev1.Result)
	other := proto.Clone(keyed).(*statev1.Command)
	other.RequestDigest = []byte("two")
	before, _ = f.Digest()
	if r := f.Apply(entry(t, 4, other)).(*statev1.Result); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT || !strings.Contains(r.Message, "different request") {
		t.Fatalf("id reused with another digest: %v", r)
	}
	if after, _ := f.Digest(); after != before {
		t.Fatal("a refused reuse changed the state")
	}
	if r := f.Apply(entry(t, 5, keyed)).(*statev1.Result); !proto.Equal(r, kfirst) {
		t.Fatalf("retry with the same digest answered %v, first was %v", r, kfirst)
	}
	// Far later, the id is forgotten: the same command now conflicts.
	for i := uint64(6); i <= 80; i++ {
		f.Apply(entry(t, i, &statev1.Command{Op: &statev1.Command_Noop{Noop: &statev1.Noop{}}}))
	}
	late := f.Apply(entry(t, 81, create)).(*statev1.Result)
	if late.Code != statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS {
		t.Fatalf("after the window: %v, want ALREADY_EXISTS", late)
	}
}

// After a restart the applied index comes back from the store and
// entries Raft replays are skipped (hashicorp/raft#142).
func TestRestartSkipsAppliedEntries(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	f := newFSM(t, Config{Store: s})
	a := &applier{t: t, f: f}
	for i := 0; i < 10; i++ {
		a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: fmt.Sprint("u", i), Login: fmt.Sprint("l", i)}}})
	}
	want, _ := f.Digest()
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, dir)
	defer s2.Close()
	f2 := newFSM(t, Config{Store: s2})
	if f2.AppliedIndex() != 10 {
		t.Fatalf("applied index after restart %d, want 10", f2.AppliedIndex())
	}
	// Replay entry 5 (a create of u4): it must be skipped, not rejected.
	if r := f2.Apply(entry(t, 5, &statev1.Command{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u4"}}})); r != nil {
		t.Fatalf("replayed entry produced %v", r)
	}
	if got, _ := f2.Digest(); got != want {
		t.Fatal("replay changed the state")
	}
	r := f2.Apply(entry(t, 11, &statev1.Command{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u4"}}})).(*statev1.Result)
	if r.Code != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
}

func TestDeleteUserCascades(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	for i := 0; i < 3; i++ {
		a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: fmt.Sprint("d", i), UserId: "u", Name: "x", PublicKey: key32(byte(i))}}})
	}
	a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: &statev1.RefreshToken{Id: "t1", FamilyId: "f1", UserId: "u", SecretHash: key32(9), ExpiresAtMs: 1 << 50}}})
	before := a.idx
	res := a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u"}})
	if res.Code != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(res)
	}
	cs, err := f.Changes(before, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 4 {
		t.Fatalf("%d changes, want 3 device deletions and the user's", len(cs))
	}
	for i, c := range cs {
		if c.Revision != a.idx || c.Seq != uint32(i) {
			t.Fatalf("change %d: revision %d seq %d", i, c.Revision, c.Seq)
		}
		want := statev1.ChangeKind_CHANGE_KIND_DEVICE_DELETED
		if i == 3 {
			want = statev1.ChangeKind_CHANGE_KIND_USER_DELETED
		}
		if c.Kind != want {
			t.Fatalf("change %d is %v, want %v", i, c.Kind, want)
		}
	}
	// Paging through the feed one change at a time with ChangesFrom
	// yields the same four changes: a page may end inside a revision.
	var paged []*statev1.Change
	for pos := (ChangePos{Revision: before + 1}); ; {
		page, err := f.ChangesFrom(pos, 1)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		paged = append(paged, page...)
		pos = After(page[0])
	}
	if len(paged) != len(cs) {
		t.Fatalf("paging by one change found %d changes, want %d", len(paged), len(cs))
	}
	for i := range cs {
		if !proto.Equal(paged[i], cs[i]) {
			t.Fatalf("paged change %d is %v, want %v", i, paged[i], cs[i])
		}
	}
	if d, _ := f.ListDevices("u"); len(d) != 0 {
		t.Fatal("devices remain")
	}
	if _, err := f.DeviceOwner("d0"); !errors.Is(err, ErrNotFound) {
		t.Fatal("device owner index remains")
	}
	if _, err := f.GetUserByLogin("u"); !errors.Is(err, ErrNotFound) {
		t.Fatal("login index remains")
	}
	if n, _ := f.UserTokenCount("u"); n != 0 {
		t.Fatal("tokens remain")
	}
	if _, err := f.GetRefreshToken("t1"); !errors.Is(err, ErrNotFound) {
		t.Fatal("token remains")
	}
}

type bufSink struct {
	bytes.Buffer
	cancelled bool
}

func (s *bufSink) ID() string    { return "test" }
func (s *bufSink) Cancel() error { s.cancelled = true; return nil }
func (s *bufSink) Close() error  { return nil }

func TestSnapshotRestoreAndWaits(t *testing.T) {
	var snaps int
	f := newFSM(t, Config{OnSnapshot: func(time.Duration, uint64, error) { snaps++ }})
	a := &applier{t: t, f: f}
	for i := 0; i < 20; i++ {
		a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: fmt.Sprint("u", i), Login: fmt.Sprint("l", i)}}})
	}
	want, _ := f.Digest()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	// Applies after Snapshot() do not leak into it.
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "later", Login: "later"}}})
	var sink bufSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	if snaps != 1 {
		t.Fatalf("OnSnapshot called %d times", snaps)
	}
	g := newFSM(t, Config{})
	ga := &applier{t: t, f: g}
	ga.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "stale", Login: "stale"}}})
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if got, _ := g.Digest(); got != want {
		t.Fatal("restored state differs from the snapshot")
	}
	if _, err := g.GetUser("stale"); !errors.Is(err, ErrNotFound) {
		t.Fatal("restore kept earlier state")
	}
	if g.AppliedIndex() != 20 {
		t.Fatalf("applied %d after restore", g.AppliedIndex())
	}
	// A truncated snapshot is refused and changes nothing.
	before, _ := g.Digest()
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()[:sink.Len()/2]))); !errors.Is(err, state.ErrCorrupt) {
		t.Fatalf("truncated snapshot: %v", err)
	}
	if after, _ := g.Digest(); after != before {
		t.Fatal("a refused restore changed the state")
	}
	// WaitApplied: immediate, then woken by an apply, then deadline.
	if err := f.WaitApplied(context.Background(), 5); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	target := a.idx + 1
	go func() { done <- f.WaitApplied(context.Background(), target) }()
	changed := f.Changed()
	a.apply(&statev1.Command_Noop{Noop: &statev1.Noop{}})
	<-changed
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := f.WaitApplied(ctx, a.idx+100); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitApplied past the deadline: %v", err)
	}
	// A backup decodes and imports to the same state.
	var b bytes.Buffer
	idx, err := f.WriteBackup(&b)
	if err != nil || idx != a.idx {
		t.Fatalf("backup at %d: %v", idx, err)
	}
	h := newFSM(t, Config{})
	if err := h.Restore(io.NopCloser(&b)); err != nil {
		t.Fatal(err)
	}
	fd, _ := f.Digest()
	if hd, _ := h.Digest(); hd != fd {
		t.Fatal("backup does not restore to the same state")
	}
}

func withTraceparent(e *statev1.MailboxEntry, tp string) *statev1.MailboxEntry {
	e.Traceparent = tp
	return e
}

// backupWith returns f's backup with the record key set to value.
func backupWith(t *testing.T, f *FSM, key, value []byte) *bytes.Buffer {
	t.Helper()
	var good bytes.Buffer
	if _, err := f.WriteBackup(&good); err != nil {
		t.Fatal(err)
	}
	scratch := openStore(t, t.TempDir())
	defer scratch.Close()
	if _, err := scratch.Import(&good); err != nil {
		t.Fatal(err)
	}
	b := scratch.NewBatch()
	if err := b.Set(key, value); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	snap := scratch.Snapshot()
	defer snap.Close()
	if _, err := state.Export(&out, snap); err != nil {
		t.Fatal(err)
	}
	return &out
}

// A snapshot (or backup) whose applied index record is malformed is
// refused before anything is ingested: the state and its applied index
// stay as they were, and the error is a corrupt export's.
func TestRestoreChecksRecordsBeforeIngesting(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	for i := range 5 {
		a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: fmt.Sprint("u", i), Login: fmt.Sprint("l", i)}}})
	}
	bad := backupWith(t, f, keyApplied, make([]byte, 8))
	g := newFSM(t, Config{})
	ga := &applier{t: t, f: g}
	ga.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "kept", Login: "kept"}}})
	before, _ := g.Digest()
	if err := g.Restore(io.NopCloser(bad)); !errors.Is(err, state.ErrCorrupt) {
		t.Fatalf("restore of a malformed applied index: %v", err)
	}
	if after, _ := g.Digest(); after != before || g.AppliedIndex() != 1 {
		t.Fatalf("a refused restore changed the state (applied %d)", g.AppliedIndex())
	}
	if _, err := g.GetUser("u1"); !errors.Is(err, ErrNotFound) {
		t.Fatal("a refused restore ingested its records")
	}
	if err := CheckRecord(keyHistory, make([]byte, MaxHistoryLen+1)); !errors.Is(err, state.ErrCorrupt) {
		t.Fatalf("an oversized history id: %v", err)
	}
	// The records apply and the change feed read by their layout: each
	// as written is taken, a malformed one refused as corrupt. (A short
	// horizon made every watch panic; a malformed expiry key, every
	// replica fail the same expiry command, again at every replay.)
	seq := binary.BigEndian.AppendUint64(nil, 3)
	for _, tc := range []struct {
		what       string
		key, value []byte
		ok         bool
	}{
		{"horizon", keyHorizon, seq, true},
		{"short horizon", keyHorizon, []byte{1, 2, 3}, false},
		{"dedup record", mailDedupKey("d", "s", "e"), seq, true},
		{"short dedup record", mailDedupKey("d", "s", "e"), []byte{1}, false},
		{"mailbox expiry key", mailExpiryKey(5, "d", 3), nil, true},
		{"short mailbox expiry key", append(slices.Clone(prefixMailExpiry), 1, 2, 3), nil, false},
		{"claim expiry key", claimExpiryKey(5, "s", "e"), nil, true},
		{"short claim expiry key", append(slices.Clone(prefixClaimExpiry), 1), nil, false},
		{"event index key", eventIndexKey("s", "e", "d", 3), nil, true},
		{"event index key without its seq", eventIndexPrefix("s", "e"), nil, false},
		{"event index key whose id runs past it", append(slices.Clone(prefixEventIndex), 's', 0, 200, 'e'), nil, false},
		{"event index key without its event", append(slices.Clone(prefixEventIndex), 's'), nil, false},
	} {
		err := CheckRecord(tc.key, tc.value)
		if tc.ok && err != nil || !tc.ok && !errors.Is(err, state.ErrCorrupt) {
			t.Errorf("%s: %v", tc.what, err)
		}
	}
	// The state's format: this release's is taken, a newer one refused
	// as such, a malformed record as corrupt.
	format := func(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
	if err := CheckRecord(keyFormat, format(StateFormat)); err != nil {
		t.Fatalf("this release's format: %v", err)
	}
	if err := CheckRecord(keyFormat, format(StateFormat+1)); !errors.Is(err, ErrNewerFormat) {
		t.Fatalf("a newer format: %v", err)
	}
	if err := CheckRecord(keyFormat, []byte{1}); !errors.Is(err, state.ErrCorrupt) {
		t.Fatalf("a malformed format record: %v", err)
	}
}

// A snapshot or backup of a newer release's state format is refused,
// before anything is ingested, with ErrNewerFormat.
func TestRestoreRefusesANewerStateFormat(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "l"}}})
	newer := backupWith(t, f, keyFormat, binary.BigEndian.AppendUint64(nil, StateFormat+1))
	g := newFSM(t, Config{})
	if err := g.Restore(io.NopCloser(newer)); !errors.Is(err, ErrNewerFormat) {
		t.Fatalf("restore of a newer format: %v", err)
	}
	if _, err := g.GetUser("u"); !errors.Is(err, ErrNotFound) {
		t.Fatal("a refused restore ingested its records")
	}
}

// The index records pruning reads a suffix from (request ids by
// revision, refresh tokens and login throttles by expiry) are never
// written shorter than their prefix and time; one that came in with a
// snapshot or backup is skipped, on every node alike, rather than
// panicking every replica at each prune.
func TestPruningSkipsMalformedIndexRecords(t *testing.T) {
	store := openStore(t, t.TempDir())
	t.Cleanup(func() { _ = store.Close() })
	b := store.NewBatch()
	for _, p := range [][]byte{prefixRequestRev, prefixTokenExpiry, prefixThrottleExp} {
		if err := b.Set(append(bytes.Clone(p), 0), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	f := newFSM(t, Config{Store: store, PruneEvery: 2, RequestRetention: 1})
	a := &applier{t: t, f: f}
	for range 4 {
		a.apply(&statev1.Command_Noop{Noop: &statev1.Noop{}})
	}
	if f.AppliedIndex() != 4 {
		t.Fatalf("applied %d", f.AppliedIndex())
	}
}

// A change an operator checked against a user account (only_user_account)
// applies while the account is one: the guard refuses only what became a
// staff or edge account since (TestRejectionsChangeNothing).
func TestOnlyUserAccountChangesApplyToUserAccounts(t *testing.T) {
	a := &applier{t: t, f: newFSM(t, Config{})}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "alice", Login: "alice"}}})
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "bob", Login: "bob", Role: "user"}}})
	for _, op := range []isCommandOp{
		&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "alice", Fields: []string{"display_name"}, User: &statev1.User{DisplayName: "Alice"}, OnlyUserAccount: true}},
		&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d1", UserId: "alice", Name: "phone", PublicKey: key32(1)}, OnlyUserAccount: true}},
		&statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{UserId: "alice", DeviceId: "d1", Name: "old phone", OnlyUserAccount: true}},
		&statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "d1", OnlyUserAccount: true}},
		&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "alice", DeviceId: "d1", OnlyUserAccount: true}},
		&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "bob", OnlyUserAccount: true}},
	} {
		if res := a.apply(op); res.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatalf("%T on a user account: %v %s", op, res.GetCode(), res.GetMessage())
		}
	}
	if u, err := a.f.GetUser("alice"); err != nil || u.GetDisplayName() != "Alice" {
		t.Fatalf("alice after the changes: %v %v", u, err)
	}
	if _, err := a.f.GetUser("bob"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("bob after his deletion: %v", err)
	}
}
