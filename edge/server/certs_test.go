package server

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// A self-signed certificate is renewed before it expires, and the
// previous one's hash stays published while it is valid, so clients that
// pinned it keep connecting during the renewal.
func TestSelfSignedCertificateRenewal(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	// Valid until 2s from now (the validity counts an hour of slack
	// before now), renewed when less than 1s remains.
	s, err := selfSigned(log, time.Hour+2*time.Second, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	first := s.Hashes(time.Now())
	if len(first) != 1 {
		t.Fatalf("hashes: %v", first)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { s.run(ctx) })
	deadline := time.Now().Add(10 * time.Second)
	for {
		hs := s.Hashes(time.Now())
		if len(hs) == 2 && hs[1].SHA256 == first[0].SHA256 && hs[0].SHA256 != first[0].SHA256 {
			c, _ := s.GetCertificate(nil)
			if c.Leaf.Raw == nil || hs[0].NotAfter != c.Leaf.NotAfter {
				t.Fatal("the newest hash is not the served certificate's")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not renewed: %v", hs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	// Expired hashes are not published.
	if hs := s.Hashes(time.Now().Add(time.Minute)); len(hs) != 0 {
		t.Fatalf("published expired hashes: %v", hs)
	}
}
