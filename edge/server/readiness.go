package server

import (
	"fmt"
	"net/http"
	"strings"
)

// Why an edge is not ready, as its public /readyz says it: a few fixed
// words. The detail (a registration error, which names the control
// plane's URLs; the peer edges it steps aside for) is the admin port's
// /readyz's and the logs', kept from the internet as the console API's
// proxy keeps control-plane addresses out of its answers.
const (
	notReadyStarting = "starting"
	notReadyDraining = "draining"
	notReadyControl  = "control plane"
	notReadyPort     = "device port down"
)

// readiness is what decides whether an edge is ready (see Ready).
type readiness struct {
	listening, stopping bool // listeners up (Start done); Shutdown or Kill began
	synced, registered  bool // the watch feed's first full copy in; a membership lease held once
	regErr              string
	portDown            string   // a device port that stopped accepting, and why ("": none)
	stepAsideFor        []string // peers that hear the control plane while this edge does not
}

// why says why the edge is not ready, as a fixed reason for the public
// /readyz and with the detail for the admin port's; both "" when it is.
func (r readiness) why() (reason, detail string) {
	switch {
	case r.stopping:
		return notReadyDraining, "shutting down"
	case !r.listening:
		return notReadyStarting, "listeners not up"
	case r.portDown != "":
		return notReadyPort, "device port down: " + r.portDown + " (restart the edge)"
	case !r.synced:
		return notReadyStarting, "watch feed not synced"
	case !r.registered:
		detail = "not registered as a member yet"
		if r.regErr != "" {
			detail += " (last registration error: " + r.regErr + ")"
		}
		return notReadyStarting, detail
	case r.stepAsideFor != nil:
		return notReadyControl, fmt.Sprintf("control plane silent for longer than the control grace, while peer edges hear it (%s)",
			strings.Join(r.stepAsideFor, ", "))
	}
	return "", ""
}

// readyz serves /readyz: 503 with why the edge is not ready, or 200;
// with detail (the admin port) the reason in full, and that a ready edge
// is cut off from the control plane.
func (s *Server) readyz(detail bool) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		reason, full := s.notReady()
		if detail {
			reason = full
		}
		if reason != "" {
			http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
			return
		}
		if detail && s.controlSilent() {
			_, _ = fmt.Fprintf(w, "ready, but cut off from the control plane: relaying for the sessions it holds, refusing new ones (it steps aside once a peer edge has said for %s that it hears the control plane)\n", StepAsideAfter)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	}
}

// healthz answers 200 while the edge can serve, and 503 once a device
// port stopped accepting (portFailed), which only a restart mends: a
// liveness probe then restarts the edge. With detail (the admin port)
// it names the port and the error.
func (s *Server) healthz(detail bool) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		if down := s.portDown.Load(); down != nil {
			reason := "device port down"
			if detail {
				reason += ": " + *down
			}
			http.Error(w, "unhealthy: "+reason+" (restart the edge)", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	}
}
