package client_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/relaytest"
)

// A phone sends an event to the laptop of the same user; the laptop
// receives it once, and the phone's Send returns when the laptop has it.
// (The relay here is a real one, started in this process: one control
// node and one edge on 127.0.0.1.)
func Example() {
	env := &relaytest.Standalone{}
	defer env.Close()
	relay := relaytest.Start(env, relaytest.Options{})
	user := relay.User("alice")
	phoneDev, laptopDev := relay.Device(user, "phone"), relay.Device(user, "laptop")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A device needs the edge's address, its ids and its Ed25519 key;
	// this edge has a self-signed certificate, pinned by hash.
	phone, err := client.Dial(ctx, relay.ClientConfig(0, phoneDev, client.QUIC))
	if err != nil {
		panic(err)
	}
	defer phone.Close()
	laptop, err := client.Dial(ctx, relay.ClientConfig(0, laptopDev, client.WebTransport))
	if err != nil {
		panic(err)
	}
	defer laptop.Close()
	for !slices.Contains(phone.Online(), laptopDev.ID) {
		<-phone.Presence()
	}

	err = phone.Send(ctx, client.Message{Targets: []string{laptopDev.ID}, Type: "clipboard", Payload: []byte("hello from the phone")})
	fmt.Println("delivered:", err == nil)
	ev, err := laptop.Receive(ctx)
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s from the phone: %s\n", ev.Type, ev.Payload)
	// Output:
	// delivered: true
	// clipboard from the phone: hello from the phone
}

// A refused event comes back as an *Error whose code says whether sending
// it again later may help.
func ExampleError_Retryable() {
	err := error(&client.Error{Code: 14, Message: "a target's queue is full; retry later"})
	var ce *client.Error
	if errors.As(err, &ce) && ce.Retryable() {
		fmt.Println("retry later:", ce.Code)
	}
	// Output:
	// retry later: ERROR_CODE_QUEUE_FULL
}
