package main_test

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// freePort returns 127.0.0.1:PORT with nothing listening on TCP PORT.
func freePort(t *testing.T) string {
	t.Helper()
	return freeAddr(t, false)
}

// freeUDPPort returns 127.0.0.1:PORT with PORT free for both UDP and TCP
// (an edge listens on both).
func freeUDPPort(t *testing.T) string {
	t.Helper()
	return freeAddr(t, true)
}

// freeAddr picks a port below the kernel's range of ephemeral ports, and
// checks that it is free. A port of that range, which binding port 0
// gives, is also handed to the outgoing connections of every process on
// the machine (other packages' tests): one could take it between this
// check and relayd's bind, or between a relayd's stop and its restart on
// the same ports; below the range only an explicit bind takes a port.
func freeAddr(t *testing.T, udp bool) string {
	t.Helper()
	hi := ephemeralLow() - 1
	lo := max(hi-20000, 1024)
	for range 200 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(lo+rand.IntN(hi-lo)))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		if udp {
			pc, err := net.ListenPacket("udp", addr)
			if err != nil {
				ln.Close()
				continue
			}
			pc.Close()
		}
		ln.Close()
		return addr
	}
	t.Fatalf("no free port found between %d and %d", lo, hi)
	return ""
}

// ephemeralLow is the first port of the kernel's ephemeral range (Linux;
// 32768 elsewhere, the lowest range the usual systems use).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err == nil {
		var low, high int
		if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &low, &high); err == nil && low > 2048 {
			return low
		}
	}
	return 32768
}
