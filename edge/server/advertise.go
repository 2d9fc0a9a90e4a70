package server

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// splitAdvertised takes apart an address the edge tells others (its
// public or mesh address): host:port, [ipv6]:port, or a host alone (a
// name, an IPv4 address, or an IPv6 address without brackets, as
// Kubernetes substitutes $(POD_IP)), whose port is then the one the edge
// bound (port ""). An IPv6 address with a port and no brackets is taken
// as an address alone: it cannot be told apart from one.
func splitAdvertised(v string) (host, port string, err error) {
	if _, err := netip.ParseAddr(v); err == nil {
		return v, "", nil
	}
	if !strings.Contains(v, ":") {
		if v == "" {
			return "", "", fmt.Errorf("empty address")
		}
		return v, "", nil
	}
	host, port, err = net.SplitHostPort(v)
	if err != nil {
		return "", "", fmt.Errorf("want host:port, [ipv6]:port or a host alone: %w", err)
	}
	if host == "" || port == "" {
		return "", "", fmt.Errorf("%q: want host:port, [ipv6]:port or a host alone", v)
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
