// Package h2probe speaks HTTP/2 frame by frame as a client that stalls:
// it gives the server no flow-control window, so no answer gets out and
// each request holds its handler, and sends request bodies no handler
// reads. Tests use it to measure what such a client can make a server
// hold.
package h2probe

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
)

// Frame types and flags of RFC 9113 used here.
const (
	frameData, frameHeaders, frameRSTStream, frameSettings = 0, 1, 3, 4
	framePing, frameGoAway, frameWindowUpdate              = 6, 7, 8

	flagAck, flagEndHeaders = 1, 4

	settingInitialWindowSize = 4
	// initialWindow is a window before SETTINGS or WINDOW_UPDATE say
	// otherwise; maxFrame the largest DATA payload a peer takes unless
	// its SETTINGS allow more.
	initialWindow = 65535
	maxFrame      = 16384
)

// Buffered opens streams requests (method and path; authority "x") on c,
// a connection to an HTTP/2 server on which nothing was sent yet (past
// TLS, if any; scheme "https" or "http"), after SETTINGS that give the
// server no window (SETTINGS_INITIAL_WINDOW_SIZE 0). Each request has a
// body, of which Buffered sends every byte the server's windows allow,
// then a PING: the server handles frames in order, so once the PING's
// ack is read every WINDOW_UPDATE the data earned has been too. It stops
// when a round was granted nothing more, and returns what it sent: what
// request bodies the server held for a client that stalls, as no handler
// read them. Past limit bytes sent it stops with an error that says so.
// c's deadlines are the caller's to set.
func Buffered(c net.Conn, scheme, method, path string, streams int, limit int64) (int64, error) {
	p := &probe{c: c, connWin: initialWindow, streamInit: initialWindow, streamWin: map[uint32]int64{}}
	if _, err := io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"); err != nil {
		return 0, err
	}
	if err := p.write(frameSettings, 0, 0, []byte{0, settingInitialWindowSize, 0, 0, 0, 0}); err != nil {
		return 0, err
	}
	if err := p.readUntil("the server's SETTINGS", func(typ, flags byte, _ []byte) bool {
		return typ == frameSettings && flags&flagAck == 0
	}); err != nil {
		return 0, err
	}
	block := requestHeaders(scheme, method, path)
	for i := range uint32(streams) {
		id := 2*i + 1
		if err := p.write(frameHeaders, flagEndHeaders, id, block); err != nil { // no END_STREAM: a body follows
			return 0, err
		}
		p.streamWin[id] = p.streamInit
	}
	var sent int64
	body := make([]byte, maxFrame)
	for round := uint64(1); ; round++ {
		before := sent
		for id := range p.streamWin {
			for p.streamWin[id] > 0 && p.connWin > 0 {
				n := min(maxFrame, p.streamWin[id], p.connWin)
				if err := p.write(frameData, 0, id, body[:n]); err != nil {
					return sent, err
				}
				p.streamWin[id] -= n
				p.connWin -= n
				sent += n
			}
		}
		if sent > limit {
			return sent, fmt.Errorf("the server took %d KiB of request bodies no handler reads, more than %d KiB", sent>>10, limit>>10)
		}
		if sent == before && round > 1 {
			return sent, nil
		}
		var ping [8]byte
		binary.BigEndian.PutUint64(ping[:], round)
		if err := p.write(framePing, 0, 0, ping[:]); err != nil {
			return sent, err
		}
		if err := p.readUntil("a PING's ack", func(typ, flags byte, payload []byte) bool {
			return typ == framePing && flags&flagAck != 0 && binary.BigEndian.Uint64(payload) == round
		}); err != nil {
			return sent, err
		}
	}
}

// requestHeaders is the HPACK block of a request for path: :method GET
// or POST and :scheme https or http from the static table, :path and
// :authority as literals without indexing on static names 4 and 1.
func requestHeaders(scheme, method, path string) []byte {
	m, s := byte(0x82), byte(0x87)
	if method == "POST" {
		m = 0x83
	}
	if scheme == "http" {
		s = 0x86
	}
	block := append([]byte{m, s, 0x04, byte(len(path))}, path...)
	return append(block, 0x01, 1, 'x')
}

type probe struct {
	c          net.Conn
	connWin    int64
	streamInit int64
	streamWin  map[uint32]int64 // of the streams not reset
}

func (p *probe) write(typ, flags byte, stream uint32, payload []byte) error {
	var h [9]byte
	h[0], h[1], h[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	h[3], h[4] = typ, flags
	binary.BigEndian.PutUint32(h[5:], stream)
	_, err := p.c.Write(append(h[:], payload...))
	return err
}

// readUntil reads the server's frames, keeping the windows it grants and
// acking its SETTINGS, until done says so.
func (p *probe) readUntil(what string, done func(typ, flags byte, payload []byte) bool) error {
	var h [9]byte
	for {
		if _, err := io.ReadFull(p.c, h[:]); err != nil {
			return fmt.Errorf("reading the server's frames, waiting for %s: %w", what, err)
		}
		payload := make([]byte, int(h[0])<<16|int(h[1])<<8|int(h[2]))
		if _, err := io.ReadFull(p.c, payload); err != nil {
			return fmt.Errorf("reading the server's frames, waiting for %s: %w", what, err)
		}
		typ, flags, id := h[3], h[4], binary.BigEndian.Uint32(h[5:])&0x7fffffff
		switch typ {
		case frameSettings:
			if flags&flagAck != 0 {
				break
			}
			for s := payload; len(s) >= 6; s = s[6:] {
				if binary.BigEndian.Uint16(s) == settingInitialWindowSize {
					v := int64(binary.BigEndian.Uint32(s[2:]))
					for id := range p.streamWin {
						p.streamWin[id] += v - p.streamInit
					}
					p.streamInit = v
				}
			}
			if err := p.write(frameSettings, flagAck, 0, nil); err != nil {
				return err
			}
		case frameWindowUpdate:
			if len(payload) < 4 {
				return fmt.Errorf("a WINDOW_UPDATE of %d bytes", len(payload))
			}
			inc := int64(binary.BigEndian.Uint32(payload) & 0x7fffffff)
			if id == 0 {
				p.connWin += inc
			} else if _, ok := p.streamWin[id]; ok {
				p.streamWin[id] += inc
			}
		case frameRSTStream:
			delete(p.streamWin, id)
		case frameGoAway:
			code := uint32(0)
			if len(payload) >= 8 {
				code = binary.BigEndian.Uint32(payload[4:])
			}
			return fmt.Errorf("the server ended the connection (GOAWAY, code %d), waiting for %s", code, what)
		}
		if done(typ, flags, payload) {
			return nil
		}
	}
}
