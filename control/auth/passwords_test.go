package auth

import (
	"errors"
	"strings"
	"testing"
)

func TestPasswords(t *testing.T) {
	h, err := HashPassword("correct horse battery", TestParams)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(h, "$argon2id$v=19$m=64,t=1,p=1$") {
		t.Fatalf("hash %q", h)
	}
	ok, err := VerifyPassword(h, "correct horse battery")
	if err != nil || !ok {
		t.Fatalf("right password: %v %v", ok, err)
	}
	ok, err = VerifyPassword(h, "wrong horse battery")
	if err != nil || ok {
		t.Fatalf("wrong password: %v %v", ok, err)
	}
	h2, _ := HashPassword("correct horse battery", TestParams)
	if h == h2 {
		t.Fatal("same salt twice")
	}
	if NeedsRehash(h, TestParams) || !NeedsRehash(h, DefaultParams) || !NeedsRehash("garbage", TestParams) {
		t.Fatal("NeedsRehash")
	}
	for _, bad := range []string{
		"", "garbage", "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=18$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=99999999,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=0,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=1,p=1$!!!$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$c2hvcnQ",
		"$argon2id$v=19$m=64,t=1,p=1,x=2$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA$",
	} {
		if _, err := VerifyPassword(bad, "x"); !errors.Is(err, ErrMalformedHash) {
			t.Errorf("VerifyPassword(%q) = %v, want ErrMalformedHash", bad, err)
		}
	}
	for pw, ok := range map[string]bool{"short": false, "twelve chars": true, strings.Repeat("x", 257): false, "\xff\xfe invalid utf8": false} {
		if err := ValidatePassword(pw); (err == nil) != ok {
			t.Errorf("ValidatePassword(%q) = %v", pw, err)
		}
	}
}

func FuzzParsePHC(f *testing.F) {
	h, _ := HashPassword("seed password", TestParams)
	f.Add(h)
	f.Add("$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")
	f.Add("$argon2id$v=19$m=4294967295,t=4294967295,p=255$c2FsdA$aGFzaA")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parsePHC(s)
		if err != nil {
			return
		}
		if p.p.Memory > maxMemory || p.p.Time > maxTime || p.p.Threads > maxThreads {
			t.Fatalf("accepted out-of-range parameters %+v", p.p)
		}
	})
}

// BenchmarkLoginCheck is what a login's password check costs with the
// default parameters (Verify), and what a login that rehashes adds to it
// (Hash: once per account after the parameters change).
func BenchmarkLoginCheck(b *testing.B) {
	h, err := HashPassword("a password of twelve", DefaultParams)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("Verify", func(b *testing.B) {
		for b.Loop() {
			if ok, err := VerifyPassword(h, "a password of twelve"); !ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
	b.Run("Hash", func(b *testing.B) {
		for b.Loop() {
			if _, err := HashPassword("a password of twelve", DefaultParams); err != nil {
				b.Fatal(err)
			}
		}
	})
}
