package server

import "testing"

// An address the edge tells others is host:port, [ipv6]:port, or a host
// alone that takes the bound port; anything else is refused.
func TestAdvertisedAddresses(t *testing.T) {
	const bound = "0.0.0.0:7445"
	for in, want := range map[string]string{
		"10.0.0.7:9000":       "10.0.0.7:9000",
		"10.0.0.7":            "10.0.0.7:7445",
		"edge-0.relay":        "edge-0.relay:7445",
		"edge-0.relay:9000":   "edge-0.relay:9000",
		"fd00::7":             "[fd00::7]:7445", // $(POD_IP) on IPv6
		"[fd00::7]:9000":      "[fd00::7]:9000",
		"fe80::1%eth0":        "[fe80::1%eth0]:7445",
		"2001:db8::1:7445":    "[2001:db8::1:7445]:7445", // an address alone: no way to tell
		"[2001:db8::1]":       "[2001:db8::1]:7445",
		"[10.0.0.7]":          "",
		"edge-0.relay:abc":    "",
		"edge-0.relay:0":      "",
		"edge-0.relay:70000":  "",
		"http://edge-0.relay": "",
		"[fd00::7]x:9000":     "",
		":9000":               "",
		"edge-0.relay:":       "",
		"a:b:c]":              "",
		"":                    "",
		"[fd00::7]:9000:9001": "",
	} {
		got, err := advertised(in, bound)
		if want == "" {
			if err == nil {
				t.Errorf("advertised(%q) = %q, want an error", in, got)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("advertised(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
