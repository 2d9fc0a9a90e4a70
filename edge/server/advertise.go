package server

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// errAdvertised says which forms an advertised address may take.
var errAdvertised = errors.New("want host:port, [ipv6]:port, or a host alone (a name, or an IP address with or without brackets)")

// splitAdvertised takes apart an address the edge tells others (its
// public or mesh address): host:port, [ipv6]:port, or a host alone (a
// name, an IPv4 address, or an IPv6 address with or without brackets,
// as Kubernetes substitutes $(POD_IP) without them), whose port is then
// the one the edge bound (port ""). An IPv6 address followed by a port
// without brackets is taken as an address alone: it cannot be told apart
// from one.
func splitAdvertised(v string) (host, port string, err error) {
	if _, err := netip.ParseAddr(v); err == nil {
		return v, "", nil
	}
	if inner, ok := strings.CutPrefix(v, "["); ok {
		if inner, ok = strings.CutSuffix(inner, "]"); ok {
			if a, err := netip.ParseAddr(inner); err == nil && a.Is6() {
				return inner, "", nil
			}
		}
	}
	if v != "" && !strings.ContainsAny(v, ":[]/") {
		return v, "", nil
	}
	host, port, err = net.SplitHostPort(v)
	if err != nil || host == "" || strings.ContainsAny(host, "/[]") {
		return "", "", errAdvertised
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return "", "", fmt.Errorf("port %q is not a number from 1 to 65535", port)
	}
	return host, port, nil
}

// advertised is v as host:port, with the port of bound when v names a
// host alone.
func advertised(v, bound string) (string, error) {
	host, port, err := splitAdvertised(v)
	if err != nil {
		return "", err
	}
	if port == "" {
		if _, port, err = net.SplitHostPort(bound); err != nil {
			return "", fmt.Errorf("bound address %q: %w", bound, err)
		}
	}
	return net.JoinHostPort(host, port), nil
}
