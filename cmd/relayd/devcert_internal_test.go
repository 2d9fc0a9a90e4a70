package main

import (
	"os"
	"testing"
	"time"
)

// The dev edge's certificate is kept while it has days left, replaced
// when it has fewer than three, and when its files are damaged.
func TestDevEdgeCertKeptWhileValid(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Now()
	certFile, keyFile, until, reused, err := devEdgeCert(dir, t0)
	if err != nil || reused || until.Sub(t0) < 9*24*time.Hour {
		t.Fatalf("first: until %v, reused %v, %v", until, reused, err)
	}
	first, _ := os.ReadFile(certFile)
	for _, tc := range []struct {
		at     time.Duration
		reused bool
	}{{24 * time.Hour, true}, {6 * 24 * time.Hour, true}, {8 * 24 * time.Hour, false}} {
		_, _, _, reused, err := devEdgeCert(dir, t0.Add(tc.at))
		if err != nil || reused != tc.reused {
			t.Errorf("%v later: reused %v (%v), want %v", tc.at, reused, err, tc.reused)
		}
	}
	if now, _ := os.ReadFile(certFile); string(now) == string(first) {
		t.Error("the certificate was not replaced once nearly expired")
	}
	if err := os.WriteFile(keyFile, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, _, reused, err := devEdgeCert(dir, t0); err != nil || reused {
		t.Errorf("damaged key file: reused %v, %v", reused, err)
	}
}
