package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"time"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// apiconns: connections to the control API that each carried one call
// that passed authentication (GetMe, as the admin) and then stay open,
// as idle relayctl and console clients' do. It reports what each costs
// the control node that answers --control (heap, goroutine stacks and
// goroutines, from its own /metrics at --control-admin after a
// collection). The node keeps at most --max-api-conns-per-account (256)
// of one account's: open fewer, or it closes the oldest.
func (d *driverConfig) apiconns(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("apiconns", flag.ContinueOnError)
	count := fs.Int("conns", 200, "connections to open and hold (one account's: at most the node's --max-api-conns-per-account)")
	admin := fs.String("control-admin", "", "base URL of the control node's admin port (http://127.0.0.1:7402); required")
	hold := fs.Duration("hold", 0, "how long to hold them before measuring")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *admin == "" {
		return errors.New("apiconns needs --control-admin")
	}
	token, err := d.setup()
	if err != nil {
		return err
	}
	r := newResult("apiconns", "control")
	r.Params["conns"] = float64(*count)
	mem := []string{"go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes", "go_goroutines", "relay_control_api_authenticated_connections"}
	before, err := settledMetricsAt(ctx, *admin, mem)
	if err != nil {
		return err
	}
	// A client each: its own transport, so its own connection.
	var clients []*http.Client
	defer func() {
		for _, c := range clients {
			c.CloseIdleConnections()
		}
	}()
	start := time.Now()
	for range *count {
		hc, err := controlClient(d.control, d.controlCA)
		if err != nil {
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = controlv1connect.NewUserServiceClient(hc, d.control).GetMe(cctx, authed(&controlv1.GetMeRequest{}, token))
		cancel()
		if err != nil {
			r.fail(cause(err))
			continue
		}
		clients = append(clients, hc)
		r.count("opened", 1)
	}
	r.Seconds = time.Since(start).Seconds()
	if err := sleepCtx(ctx, *hold); err != nil {
		return err
	}
	after, err := settledMetricsAt(ctx, *admin, mem)
	if err != nil {
		return err
	}
	held := after["relay_control_api_authenticated_connections"] - before["relay_control_api_authenticated_connections"]
	r.peak("control_authenticated_connections", after["relay_control_api_authenticated_connections"])
	if held <= 0 {
		return fmt.Errorf("the control node counts %.0f more authenticated connections after opening %d", held, len(clients))
	}
	per := func(k string) float64 { return (after[k] - before[k]) / held }
	r.peak("control_heap_per_conn_bytes", per("go_memstats_heap_inuse_bytes"))
	r.peak("control_stack_per_conn_bytes", per("go_memstats_stack_inuse_bytes"))
	r.peak("control_goroutines_per_conn", per("go_goroutines"))
	return d.finish(r)
}
