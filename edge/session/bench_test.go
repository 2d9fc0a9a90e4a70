package session

import (
	"fmt"
	"sync"
	"testing"
	"time"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// BenchmarkEventPath is the session core's per-event path without a
// transport: a durable 64-byte event from one device to another of its
// user, the delivery, the receipt and the sender's ack, with up to 64
// events in flight. Both devices' clients run in this process over
// in-memory pipes, so ns/op and allocs/op include their frame encoding
// and decoding; compare runs of this benchmark, and take the edge's own
// CPU per event from relayload (make bench-compare).
func BenchmarkEventPath(b *testing.B) {
	for _, ephemeral := range []bool{false, true} {
		name := "durable"
		if ephemeral {
			name = "ephemeral"
		}
		b.Run(name, func(b *testing.B) { eventPath(b, ephemeral) })
	}
}

func eventPath(b *testing.B, ephemeral bool) {
	const window = 64
	e := newEnv(b, func(c *Config) {
		c.Limits.EventsPerSecond, c.Limits.BytesPerSecond, c.Limits.FramesPerSecond = 1e9, 1e12, 1e9
		c.QueueLen = 4 * window
	})
	e.device("u1", "tx")
	e.device("u1", "rx")
	// Stream only: ephemeral deliveries would otherwise go as datagrams,
	// which this benchmark's receiver does not read.
	tx, rx := e.connectFrom("tx", "127.0.0.1:5000", false), e.connectFrom("rx", "127.0.0.1:5001", false)
	tx.handshake()
	rx.handshake()

	payload := make([]byte, 64)
	credits := make(chan struct{}, window)
	for range window {
		credits <- struct{}{}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	// The receiver: every delivery answered with a receipt, batched as a
	// client batches what one read brought in.
	wg.Go(func() {
		for got := 0; got < b.N; {
			f := &relayv1.Frame{}
			if err := rx.r.Read(f); err != nil {
				errs <- fmt.Errorf("receiver: %w", err)
				return
			}
			d := f.GetDeliver()
			if d == nil {
				continue
			}
			got++
			if ephemeral {
				credits <- struct{}{}
				continue
			}
			if err := rx.w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: []uint64{d.GetDeliveryId()}}}}); err != nil {
				errs <- fmt.Errorf("receipt: %w", err)
				return
			}
		}
	})
	if !ephemeral {
		// The sender's acks return the credits.
		wg.Go(func() {
			for got := 0; got < b.N; {
				f := &relayv1.Frame{}
				if err := tx.r.Read(f); err != nil {
					errs <- fmt.Errorf("sender: %w", err)
					return
				}
				if r := f.GetReject(); r != nil {
					errs <- fmt.Errorf("rejected: %v", r)
					return
				}
				if f.GetAck() != nil {
					got++
					credits <- struct{}{}
				}
			}
		})
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu := cpuTime()
	now := time.Now().UnixMilli()
	for i := range b.N {
		select {
		case <-credits:
		case err := <-errs:
			b.Fatal(err)
		}
		ev := &relayv1.Event{Id: fmt.Sprintf("e%d", i), Seq: uint64(i + 1), CreatedAtMs: now, TtlMs: 60_000,
			Type: "bench", Payload: payload, Targets: []string{"rx"}, Ephemeral: ephemeral}
		if err := tx.w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}}); err != nil {
			b.Fatal(err)
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case err := <-errs:
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64((cpuTime()-cpu).Nanoseconds())/1e3/float64(b.N), "cpu-µs/event")
}
