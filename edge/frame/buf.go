package frame

import (
	"io"
	"sync"
	"sync/atomic"
)

// BufferPool lends read buffers of one size to Readers that hold one
// only while bytes are buffered (ReaderConfig.Pool): an edge's idle
// sessions, each blocked waiting for its next frame, then hold a small
// array each instead of a whole buffer. Safe for concurrent use.
type BufferPool struct {
	size  int
	p     sync.Pool // of *[]byte, len size
	count bool      // lent is kept (CountLoans)
	lent  atomic.Int64
}

// NewBufferPool returns a pool of buffers of size bytes (at least
// waitBytes).
func NewBufferPool(size int) *BufferPool {
	size = max(size, waitBytes)
	bp := &BufferPool{size: size}
	bp.p.New = func() any {
		b := make([]byte, size)
		return &b
	}
	return bp
}

// CountLoans makes the pool count the buffers it lends (Lent), at the
// cost of a counter every reader shares; call it before the pool is used.
// For tests.
func (bp *BufferPool) CountLoans() { bp.count = true }

// Lent is how many of the pool's buffers readers hold now, if the pool
// counts them (CountLoans), else 0.
func (bp *BufferPool) Lent() int { return int(bp.lent.Load()) }

func (bp *BufferPool) get() *[]byte {
	if bp.count {
		bp.lent.Add(1)
	}
	return bp.p.Get().(*[]byte)
}

func (bp *BufferPool) put(b *[]byte) {
	if bp.count {
		bp.lent.Add(-1)
	}
	bp.p.Put(b)
}

// waitBytes is how much a lending reader reads into its own array while
// it holds no buffer: what a wait for the next frame costs it. Enough for
// a typical event frame (about 150 bytes), which then arrives in one
// read rather than a first read here and a second into the buffer.
const waitBytes = 256

// bufReader is a buffered reader, as bufio.Reader, whose buffer may be
// lent by a pool: then it gives the buffer back whenever nothing is
// buffered at a frame boundary (idle), reads the first bytes of what comes
// next into a small array, and borrows a buffer again for the rest.
type bufReader struct {
	src   io.Reader
	pool  *BufferPool // nil: buf is the reader's own
	buf   []byte      // nil while given back
	held  *[]byte     // the pool's handle on buf
	r, w  int         // buf[r:w] is buffered
	err   error       // of the last read, returned once buf[r:w] is used up
	small [waitBytes]byte
}

func newBufReader(src io.Reader, size int, pool *BufferPool) *bufReader {
	b := &bufReader{src: src, pool: pool}
	if pool == nil {
		b.buf = make([]byte, size)
	}
	return b
}

// Buffered is how many bytes are buffered.
func (b *bufReader) Buffered() int { return b.w - b.r }

// Size is the buffer's size: the most fillTo can hold.
func (b *bufReader) Size() int {
	if b.pool != nil {
		return b.pool.size
	}
	return len(b.buf)
}

// fillTo reads until n bytes (at most Size) are buffered, moving what is
// buffered to the front of the buffer first when the rest would not fit
// (or nothing is buffered).
// An error that comes with the last bytes needed is kept for the next
// read; one before them is returned.
func (b *bufReader) fillTo(n int) error {
	if b.w-b.r >= n {
		return nil
	}
	if b.err != nil {
		return b.take()
	}
	b.borrow()
	if b.r == b.w || len(b.buf)-b.r < n {
		b.w = copy(b.buf, b.buf[b.r:b.w])
		b.r = 0
	}
	for b.w-b.r < n {
		k, err := b.readSome(b.buf[b.w:])
		b.w += k
		if err != nil {
			if b.w-b.r >= n {
				b.err = err
				return nil
			}
			return err
		}
	}
	return nil
}

// readSome reads into p until it gets a byte or an error;
// io.ErrNoProgress after 100 empty reads, as bufio.
func (b *bufReader) readSome(p []byte) (int, error) {
	for range 100 {
		if n, err := b.src.Read(p); n > 0 || err != nil {
			return n, err
		}
	}
	return 0, io.ErrNoProgress
}

// take returns the error of the last read, once.
func (b *bufReader) take() error {
	err := b.err
	b.err = nil
	return err
}

// borrow makes sure the reader holds a buffer.
func (b *bufReader) borrow() {
	if b.buf == nil {
		b.held = b.pool.get()
		b.buf = *b.held
	}
}

// release gives a lent buffer back, or drops the reader's own, with
// whatever was buffered in it.
func (b *bufReader) release() {
	if b.held != nil {
		b.pool.put(b.held)
	}
	b.buf, b.held = nil, nil
	b.r, b.w = 0, 0
}

// idle is called at a frame boundary: with nothing buffered it gives a
// lent buffer back and waits for the next bytes in the small array, then
// borrows a buffer and moves them into it. An error of that read is
// returned by the next read once the bytes are used up.
func (b *bufReader) idle() {
	if b.pool == nil || b.r != b.w || b.err != nil {
		return
	}
	if b.buf != nil {
		b.pool.put(b.held)
		b.buf, b.held = nil, nil
	}
	b.r, b.w = 0, 0
	n, err := b.readSome(b.small[:])
	if n > 0 {
		b.borrow()
		b.w = copy(b.buf, b.small[:n])
	}
	b.err = err
}

// ReadByte reads one byte.
func (b *bufReader) ReadByte() (byte, error) {
	if b.r == b.w {
		if err := b.fillTo(1); err != nil {
			return 0, err
		}
	}
	c := b.buf[b.r]
	b.r++
	return c, nil
}

// Peek returns the next n bytes, which must be buffered, without using
// them up; valid until the next read.
func (b *bufReader) Peek(n int) []byte { return b.buf[b.r : b.r+n] }

// Discard uses up n buffered bytes.
func (b *bufReader) Discard(n int) { b.r += n }

// Read reads into p what is buffered, or else what one read of the
// source gives.
func (b *bufReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if b.r == b.w {
		if b.err != nil {
			return 0, b.take()
		}
		if len(p) >= len(b.buf) {
			// Straight into p: nothing to gain from a copy.
			return b.src.Read(p)
		}
		if err := b.fillTo(1); err != nil {
			return 0, err
		}
	}
	n := copy(p, b.buf[b.r:b.w])
	b.r += n
	return n, nil
}
