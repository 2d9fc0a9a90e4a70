// The relay's browser client: a device of a user talks to an edge over
// WebTransport (HTTP/3), or over a WebSocket where UDP is blocked, proves
// its Ed25519 key (WebCrypto), sends events with acknowledgement and
// receives the events of its user's other devices once each, in
// per-sender order. It reconnects by itself (resume tickets, backoff with
// jitter) and resends what was not acknowledged: the same behaviour as
// the Go client (edge/client).

import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import {
  ErrorCode,
  EventSchema,
  FrameSchema,
  HelloSchema,
  type Event as WireEvent,
  type Frame,
} from "./gen/relay/v1/frames_pb.js";

/** The protocol's error codes (proto/relay/v1), RelayError.code. */
export { ErrorCode };

/** The device protocol version this client speaks (Hello). Version 2
 * binds the proofs to the TLS connection's exporter (RFC 9266), which no
 * browser API gives a page; a browser signs version 1's transcripts
 * (docs/protocol.md, "Channel binding"). */
export const PROTOCOL_VERSION = 1;
/** Where an edge takes WebTransport sessions (HTTP/3, its UDP port). */
export const WEBTRANSPORT_PATH = "/relay/v1/wt";
/** Where an edge takes the WebSocket fallback (its HTTPS port). */
export const WEBSOCKET_PATH = "/relay/v1/ws";
/** Where an edge publishes its self-signed certificate's SHA-256 hashes,
 * for serverCertificateHashes ({"hashes": [{"value": base64}]}). */
export const CERT_HASHES_PATH = "/.well-known/relay/certificate-hashes";

/** A protocol error: an event refused (by the edge, or by the client as
 * the edge would), or the session closed. */
export class RelayError extends Error {
  constructor(
    /** Why, as a protocol code (describe gives it in words). */
    readonly code: ErrorCode,
    message: string,
    /** GOING_AWAY: when the edge asked to come back, in ms. */
    readonly reconnectAfterMs = 0,
    /** REPLACED: the client instance that took the device's session over. */
    readonly replacedBy = "",
  ) {
    super(message || describe(code));
    this.name = "RelayError";
  }
  /** Sending the same event again later may succeed. */
  get retryable(): boolean {
    return [
      ErrorCode.QUEUE_FULL,
      ErrorCode.RATE_LIMITED,
      ErrorCode.TARGET_OFFLINE,
      ErrorCode.INTERNAL,
      ErrorCode.GOING_AWAY,
      ErrorCode.MAILBOX_FULL,
    ].includes(this.code);
  }
}

/** Every protocol code in words, for people. */
export function describe(code: ErrorCode): string {
  switch (code) {
    case ErrorCode.FRAME_TOO_LARGE: return "The message was too large for the relay.";
    case ErrorCode.PAYLOAD_TOO_LARGE: return "The event's content is too large.";
    case ErrorCode.TTL_TOO_LONG: return "The event asked to wait longer than the relay allows.";
    case ErrorCode.CREATED_IN_FUTURE: return "This device's clock is too far ahead.";
    case ErrorCode.EXPIRED: return "The event expired before it could be delivered.";
    case ErrorCode.UNKNOWN_TARGET: return "That is not one of your devices.";
    case ErrorCode.TARGET_DELETED: return "That device was removed or revoked.";
    case ErrorCode.SENDER_REVOKED: return "This device was revoked.";
    case ErrorCode.RATE_LIMITED: return "Too much at once: slow down and try again.";
    case ErrorCode.MALFORMED_FRAME: return "The relay did not understand this device (a bug or an old version).";
    case ErrorCode.AUTH_FAILED: return "This device could not prove who it is (unknown, revoked, or wrong key).";
    case ErrorCode.REPLACED: return "This device connected somewhere else, which took over.";
    case ErrorCode.UNSUPPORTED_VERSION: return "This version is too old for the relay: update it.";
    case ErrorCode.QUEUE_FULL: return "The other device is not keeping up: try again in a moment.";
    case ErrorCode.GOING_AWAY: return "The relay is restarting: reconnecting.";
    case ErrorCode.SESSION_EXPIRED: return "The session was too old and had to sign in again.";
    case ErrorCode.REVOKED: return "This device was revoked or its account deleted.";
    case ErrorCode.DUPLICATE_ID: return "An event with the same id but other content was sent before.";
    case ErrorCode.TARGET_OFFLINE: return "The other device is offline and the event could not wait for it.";
    case ErrorCode.SLOW_CONSUMER: return "This device stopped reading; reconnecting.";
    case ErrorCode.SEQ_OUT_OF_ORDER: return "Events were sent out of order (a bug).";
    case ErrorCode.INTERNAL: return "The relay had a problem: try again.";
    case ErrorCode.MAILBOX_FULL: return "The other device has too much waiting while offline: try later.";
    case ErrorCode.TIMEOUT: return "The connection stalled; reconnecting.";
    default: return "Something went wrong.";
  }
}

/** An event to send. */
export interface Message {
  /** Identifies the event for dedup and acks; one is made when empty.
   * Sending the same id again never delivers twice, so a page that may
   * retry a send (after close(), a reload) sets it itself. */
  id?: string;
  /** Device ids of the same user; empty: all the user's other devices. */
  targets?: string[];
  /** What the event is, for the application (opaque to the relay). */
  type?: string;
  /** The content, opaque to the relay; a string is sent as UTF-8. */
  payload?: Uint8Array | string;
  /** How long the event may wait for a target, in ms [60 000]: 0 (or
   * none) takes the default; a fraction of a ms is dropped; a negative
   * TTL, one under a millisecond or not a number is refused
   * (MALFORMED_FRAME), as by the Go client (see ttlMillis). */
  ttlMs?: number;
  /** Deliver to any one of the targets (see the protocol). */
  anyOne?: boolean;
}

/** An event received from another device of the user. */
export interface RelayEvent {
  /** The sender's id for the event (unique per sender). */
  id: string;
  /** The sending device's id. */
  sender: string;
  /** The sender's sequence number: events of one sender arrive in its
   * order (0 for a cancellation). */
  seq: bigint;
  /** Message.type as sent. */
  type: string;
  /** Message.payload as sent (empty for a cancellation). */
  payload: Uint8Array;
  /** When the sender made it, by the edge's clock as the sender knew it. */
  createdAt: Date;
  /** Sent with sendEphemeral: never stored, never acknowledged. */
  ephemeral: boolean;
  /** Sent to any one of its targets (Message.anyOne). */
  anyOne: boolean;
  /** Another device took this "any one" event. */
  cancelled: boolean;
}

/** The transports a session runs on. */
export type TransportName = "webtransport" | "websocket";

/** What RelayClient.connect needs; the rest has defaults. */
export interface RelayOptions {
  /** The edge, host:port (UDP for WebTransport, TCP for the WebSocket). */
  edge: string;
  /** The user the device belongs to. */
  userId: string;
  /** The device, as registered (RegisterDevice) with key's public half. */
  deviceId: string;
  /** The device's Ed25519 private key (it may be non-extractable). */
  key: CryptoKey;
  /** "auto" (default): WebTransport first, raced against the WebSocket. */
  transport?: "auto" | TransportName;
  /** Head start WebTransport gets in the race [300 ms]. */
  headStartMs?: number;
  /** SHA-256 hashes of the edge's self-signed certificate; fetched from
   * certHashesUrl when not given (and the edge's certificate is not
   * trusted by the browser). */
  certHashes?: Uint8Array[];
  /** Where to fetch the hashes [https://<edge>/.well-known/...]. */
  certHashesUrl?: string;
  /** WebSocket URL [wss://<edge>/relay/v1/ws]. */
  webSocketUrl?: string;
  /** Reconnect backoff: each wait is drawn between half the current
   * bound and the bound, which doubles from reconnectMinMs [100] up to
   * reconnectMaxMs [10 000] (see reconnectWait). */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** How long an edge may stay silent before the connection counts as
   * broken and the client reconnects [30 000 ms]; on a WebSocket the
   * client pings at a third of it, at least every 10 s (WebTransport has
   * QUIC's keep-alive, the browser's own). */
  idleTimeoutMs?: number;
  /** How many durable sends may wait for their acks at once [1024], a
   * positive integer: a further send waits, in the order of the send
   * calls, for one of them to finish, and only then is its event built
   * (its seq and creation time) and sent. What is on the wire, and what
   * is resent after a reconnect, stays bounded however fast a page sends;
   * a page that awaits its sends is also held back, one that does not
   * keeps its waiting sends in memory. */
  maxPending?: number;
  /** A control-plane revision this device knows of, such as the
   * revision RegisterDevice returned: every Hello names it, and an edge
   * that has not caught up with it yet waits (a few seconds at most)
   * before it looks the device up, so a device that connects right after
   * its registration is not refused as unknown. */
  minRevision?: bigint;
}

/** Options of one send. */
export interface SendOptions {
  /** Gives the send up: one still waiting for a slot (maxPending) is
   * never sent; one already sent gives its slot back at once, is not sent
   * again after a reconnect, and may still be delivered. The send rejects
   * with the signal's reason. */
  signal?: AbortSignal;
}

interface Conn {
  name: TransportName;
  send(frameBody: Uint8Array): Promise<void>;
  sendDatagram?(body: Uint8Array): boolean;
  /** Calls fn with each datagram received (WebTransport only). */
  onDatagram?(fn: (body: Uint8Array) => void): void;
  next(): Promise<Uint8Array | null>; // a frame body, or null at the end
  /** Whether a whole frame is already here, so next() will not wait. */
  buffered(): boolean;
  /** The bytes given to send and not yet taken by the transport. */
  backlog(): number;
  /** Frames from the edge may be as long as its Welcome's limit allows
   * (a WebSocket's messages are whole when they come: no limit of its
   * own). */
  limitFrames?(limit: number): void;
  /** A frame from the edge must be whole within ms of its first byte
   * (WebTransport; a WebSocket's messages come whole). */
  timeFrames?(ms: number): void;
  close(code?: number, reason?: string): void;
  /** Ends the connection here and now, whatever the edge does: next()
   * returns null at once (a pending one too), closeReason() is why, and
   * the transport's own close goes on in the background. For an edge
   * that went silent, whose close handshake would never come (a
   * WebSocket's onclose may wait a minute for it). */
  abandon?(why: RelayError | null): void;
  /** Sends the goodbye frame and ends the connection without losing what
   * was sent before it: a WebTransport session waits (at most
   * GOODBYE_MS) for the edge, which hangs up once it read the goodbye,
   * since closing it at once discards stream data not yet sent; a
   * WebSocket's close already sends what is buffered first. */
  goodbye(frameBody: Uint8Array): void;
  closeReason(): RelayError | null;
  /** The Hello of this connection's handshake, for re-authentication. */
  hello?: Hello;
  /** An ephemeral event went on the stream: the edge reads this
   * connection's datagrams from then on (the Hello defers them). */
  datagramsOpen?: boolean;
}

type Hello = { userId: string; deviceId: string; protocolVersion: number; clientTimeMs: bigint };

/** A frame body with the given kind. */
function frame(kind: MessageInitShape<typeof FrameSchema>["kind"]): Uint8Array {
  return toBinary(FrameSchema, create(FrameSchema, { kind }));
}

const enc = new TextEncoder();

function b64(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function unb64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function randomId(): string {
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** The transcript a device signs (docs/protocol.md). */
export function transcript(f: {
  userId: string; deviceId: string; version: number; clientTimeMs: bigint;
  edgeId: string; nonce: Uint8Array; serverTimeMs: bigint;
}): Uint8Array {
  const parts: number[] = [];
  const u32 = (n: number) => parts.push((n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
  const i64 = (n: bigint) => {
    const v = BigInt.asUintN(64, n);
    for (let i = 7; i >= 0; i--) parts.push(Number((v >> BigInt(i * 8)) & 255n));
  };
  const str = (b: Uint8Array) => { u32(b.length); parts.push(...b); };
  str(enc.encode("relay/1 device handshake"));
  str(enc.encode(f.userId));
  str(enc.encode(f.deviceId));
  u32(f.version);
  i64(f.clientTimeMs);
  str(enc.encode(f.edgeId));
  str(f.nonce);
  i64(f.serverTimeMs);
  return new Uint8Array(parts);
}

/** The resume transcript a device signs to resume with a ticket
 * (docs/protocol.md): the ticket is worth nothing without the key. */
export function resumeTranscript(f: {
  userId: string; deviceId: string; version: number; clientTimeMs: bigint;
  instance: string; nonce: Uint8Array; ticket: Uint8Array;
}): Uint8Array {
  const parts: number[] = [];
  const u32 = (n: number) => parts.push((n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
  const i64 = (n: bigint) => {
    const v = BigInt.asUintN(64, n);
    for (let i = 7; i >= 0; i--) parts.push(Number((v >> BigInt(i * 8)) & 255n));
  };
  const str = (b: Uint8Array) => { u32(b.length); for (const x of b) parts.push(x); };
  str(enc.encode("relay/1 device resume"));
  str(enc.encode(f.userId));
  str(enc.encode(f.deviceId));
  u32(f.version);
  i64(f.clientTimeMs);
  str(enc.encode(f.instance));
  str(f.nonce);
  str(f.ticket);
  return new Uint8Array(parts);
}

/** Reads uvarint-length-prefixed frames out of a byte stream. */
/** The edge's frame limit until its Welcome gives one (the Go edge's
 * default), and how much longer than that limit a frame from the edge may
 * be: a Deliver wraps a relayed event, which the edge has given its
 * sender's ids. */
const DEFAULT_MAX_FRAME_BYTES = 64 * 1024;
const DELIVER_SLACK = 1024;
/** The largest frame limit an edge may announce (the Go client's
 * frame.MaxFrameLimit): a larger one in a Welcome is taken as this, so an
 * edge cannot make the page hold frames of any size. */
const MAX_FRAME_LIMIT = 16 << 20;
/** The bytes a connection may hold unsent before sendEphemeral refuses an
 * event (QUEUE_FULL) rather than queue it behind the others: an
 * ephemeral event is worth sending now or not at all. */
export const MAX_EPHEMERAL_BACKLOG = 256 * 1024;
/** How much later than the edge's clock, as the page knows it, an event
 * must have expired before the page refuses it itself rather than resend
 * it (ms; the Go client's expirySlack): the edge must certainly refuse it. */
const EXPIRY_SLACK_MS = 1000;
/** The longest wait an edge's GOING_AWAY may ask for that the page takes
 * (ms; the Go client's MaxReconnectHint). */
export const MAX_RECONNECT_HINT_MS = 5 * 60_000;

/** The longest frame from an edge whose Welcome gave limit. */
function readLimit(limit: number): number {
  return Math.max(DEFAULT_MAX_FRAME_BYTES, Math.min(limit, MAX_FRAME_LIMIT)) + DELIVER_SLACK;
}

/** The bound on a frame from an edge whose Welcome gave ms (the Go
 * client's frameTimeout): ms, 10 s when it gave none, never under 100 ms
 * (a Welcome of a few milliseconds would fail every frame that comes in
 * two packets) or above an hour. */
export function frameTimeoutMs(ms: number): number {
  if (!(ms > 0)) return 10_000;
  return Math.min(Math.max(ms, 100), 3_600_000);
}

/** Reads frames (a varint length, then that many bytes of body) from a
 * stream. A frame longer than max is refused from its length, before its
 * body is buffered (RelayError FRAME_TOO_LARGE), and a length that does
 * not end within 10 bytes is malformed (MALFORMED_FRAME). A frame that is
 * not whole within timeoutMs of its first byte (when set) is refused
 * (TIMEOUT): an edge, or a middlebox, that stalls inside a frame while the
 * connection stays up does not hold the reader for good. The chunks of a
 * frame are joined once it is whole: one copy per frame, however many
 * packets brought it. Exported for tests. */
export class FrameReader {
  private buf = new Uint8Array(0);
  private chunks: Uint8Array[] = [];
  private chunked = 0; // bytes in chunks, after buf
  /** When the first byte of the frame under way came (0: none under way). */
  private started = 0;
  constructor(
    private reader: ReadableStreamDefaultReader<Uint8Array>,
    /** The longest frame body accepted. */
    public max = readLimit(DEFAULT_MAX_FRAME_BYTES),
    /** How long a frame may take from its first byte to its last (ms; 0:
     * no bound): the Welcome's frame_timeout_ms, the bound the edge holds
     * the page's frames to. */
    public timeoutMs = 0,
  ) {}

  /** The header of the first frame in buf: [body start, body length], or
   * null while it is incomplete. */
  private head(): [number, number] | null {
    let n = 0, shift = 0;
    for (let i = 0; i < this.buf.length && i < 10; i++) {
      n += (this.buf[i] & 127) * 2 ** shift;
      shift += 7;
      if (this.buf[i] < 128) {
        if (n > this.max) throw new RelayError(ErrorCode.FRAME_TOO_LARGE, `frame of ${n} bytes from the edge, at most ${this.max} allowed`);
        return [i + 1, n];
      }
    }
    if (this.buf.length >= 10) throw new RelayError(ErrorCode.MALFORMED_FRAME, "frame length longer than 10 bytes");
    return null;
  }

  /** Moves the chunks read since into buf. */
  private gather(): void {
    if (this.chunks.length === 0) return;
    const merged = new Uint8Array(this.buf.length + this.chunked);
    merged.set(this.buf);
    let off = this.buf.length;
    for (const c of this.chunks) { merged.set(c, off); off += c.length; }
    this.buf = merged;
    this.chunks = [];
    this.chunked = 0;
  }

  buffered(): boolean {
    try {
      const h = this.head();
      return h !== null && this.buf.length + this.chunked - h[0] >= h[1];
    } catch {
      return true; // next() says what is wrong, without waiting
    }
  }

  async next(): Promise<Uint8Array | null> {
    for (;;) {
      const h = this.head();
      if (h === null && this.chunked > 0) {
        this.gather(); // the header is incomplete: buf holds less than 10 bytes
        continue;
      }
      if (h && this.buf.length + this.chunked - h[0] >= h[1]) {
        this.gather();
        const body = this.buf.slice(h[0], h[0] + h[1]);
        this.buf = this.buf.subarray(h[0] + h[1]);
        // The next frame's first bytes, if any, came with this one's.
        this.started = this.buf.length > 0 ? Date.now() : 0;
        return body;
      }
      const { value, done } = await this.read();
      if (done) return null;
      if (value.length > 0) {
        if (this.started === 0) this.started = Date.now();
        this.chunks.push(value);
        this.chunked += value.length;
      }
    }
  }

  /** The stream's next chunk, within what is left of the frame timeout
   * when a frame is under way. */
  private read(): Promise<ReadableStreamReadResult<Uint8Array>> {
    const read = this.reader.read();
    if (this.started === 0 || !(this.timeoutMs > 0)) return read;
    const left = this.started + this.timeoutMs - Date.now();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new RelayError(ErrorCode.TIMEOUT,
        `a frame from the edge was not whole within ${this.timeoutMs} ms of its first byte`)), Math.max(left, 0));
    });
    read.catch(() => {}); // outrun by the timeout, it ends with the session
    return Promise.race([read, late]).finally(() => clearTimeout(timer));
  }
}

function prefixed(body: Uint8Array): Uint8Array {
  const head: number[] = [];
  let n = body.length;
  while (n >= 128) { head.push((n & 127) | 128); n = Math.floor(n / 128); }
  head.push(n);
  const out = new Uint8Array(head.length + body.length);
  out.set(head);
  out.set(body, head.length);
  return out;
}

async function dialWebTransport(opts: RelayOptions, hashes: Uint8Array[] | undefined, signal: AbortSignal): Promise<Conn> {
  if (typeof WebTransport === "undefined") throw new Error("WebTransport is not available here");
  signal.throwIfAborted();
  const init: WebTransportOptions = {};
  if (hashes && hashes.length > 0) {
    init.serverCertificateHashes = hashes.map((value) => ({ algorithm: "sha-256", value: value as BufferSource }));
  }
  const wt = new WebTransport(`https://${opts.edge}${WEBTRANSPORT_PATH}`, init);
  wt.closed.catch(() => {}); // a failed or abandoned attempt is reported through ready
  const abort = () => wt.close();
  signal.addEventListener("abort", abort);
  try {
    await wt.ready;
  } finally {
    signal.removeEventListener("abort", abort);
  }
  if (signal.aborted) { wt.close(); throw signal.reason; }
  const stream = await wt.createBidirectionalStream().catch((e) => { wt.close(); throw e; });
  if (signal.aborted) { wt.close(); throw signal.reason; }
  const writer = stream.writable.getWriter();
  const reader = new FrameReader(stream.readable.getReader() as ReadableStreamDefaultReader<Uint8Array>);
  const dgWriter = wt.datagrams.writable.getWriter();
  let reason: RelayError | null = null;
  wt.closed.then(
    (info) => { if (info.closeCode) reason = new RelayError(info.closeCode as ErrorCode, info.reason ?? ""); },
    () => {},
  );
  let unsent = 0;
  return {
    name: "webtransport",
    send: (body) => {
      const b = prefixed(body);
      unsent += b.length;
      return writer.write(b).finally(() => { unsent -= b.length; });
    },
    backlog: () => unsent,
    sendDatagram: (body) => {
      if (body.length > 1100) return false;
      dgWriter.write(body).catch(() => {});
      return true;
    },
    onDatagram: (fn) => {
      const dg = wt.datagrams.readable.getReader() as ReadableStreamDefaultReader<Uint8Array>;
      void (async () => {
        for (;;) {
          const { value, done } = await dg.read();
          if (done) return;
          fn(value);
        }
      })().catch(() => { /* the session ended */ });
    },
    next: () => reader.next().catch((e) => {
      if (e instanceof RelayError) { // the edge broke the framing: end the session, say why
        reason = e;
        try { wt.close({ closeCode: e.code, reason: e.message }); } catch { /* closed */ }
      }
      return null;
    }),
    buffered: () => reader.buffered(),
    limitFrames: (limit) => { reader.max = readLimit(limit); },
    timeFrames: (ms) => { reader.timeoutMs = ms; },
    close: (code, msg) => { try { wt.close({ closeCode: code ?? 0, reason: msg ?? "" }); } catch { /* closed */ } },
    goodbye: (body) => {
      const end = () => { try { wt.close({ closeCode: 0, reason: "" }); } catch { /* closed */ } };
      const timer = setTimeout(end, GOODBYE_MS);
      wt.closed.finally(() => clearTimeout(timer)).catch(() => {});
      writer.write(prefixed(body)).then(() => writer.close()).catch(end);
    },
    closeReason: () => reason,
  };
}

function dialWebSocket(opts: RelayOptions, signal: AbortSignal): Promise<Conn> {
  const url = opts.webSocketUrl ?? `wss://${opts.edge}${WEBSOCKET_PATH}`;
  return new Promise((resolve, reject) => {
    if (signal.aborted) { reject(signal.reason); return; }
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    const queue: Uint8Array[] = [];
    const waiting: ((b: Uint8Array | null) => void)[] = [];
    let ended = false;
    let reason: RelayError | null = null;
    let closeInfo = "";
    const abort = () => ws.close();
    signal.addEventListener("abort", abort);
    // The longest message taken from the edge, as over WebTransport
    // (limitFrames): the browser has it whole by now, but a session that
    // goes on holds no more of them.
    let maxMessage = readLimit(DEFAULT_MAX_FRAME_BYTES);
    ws.onmessage = (m) => {
      if (ended) return; // abandoned
      const b = new Uint8Array(m.data as ArrayBuffer);
      if (b.byteLength > maxMessage) {
        abandon(new RelayError(ErrorCode.FRAME_TOO_LARGE, `the edge sent a message of ${b.byteLength} bytes, more than ${maxMessage}`));
        return;
      }
      const w = waiting.shift();
      if (w) w(b); else queue.push(b);
    };
    ws.onclose = (c) => {
      if (!ended) { // not abandoned: the close says why
        if (c.code > 4000 && c.code < 5000) reason = new RelayError((c.code - 4000) as ErrorCode, c.reason);
        else if (c.code === 1009) reason = new RelayError(ErrorCode.FRAME_TOO_LARGE, c.reason); // over the edge's read limit
        else closeInfo = `websocket closed (${c.code}${c.reason ? ": " + c.reason : ""})`;
      }
      ended = true;
      for (const w of waiting.splice(0)) w(null);
      reject(reason ?? new Error(closeInfo));
    };
    // onclose comes once the edge answered the close, which an edge
    // gone silent never does (Chromium waits a minute for it): the
    // connection ends here at once, and the close goes on behind.
    const abandon = (why: RelayError | null) => {
      if (ended) return;
      ended = true;
      reason = why;
      queue.length = 0;
      for (const w of waiting.splice(0)) w(null);
      try { ws.close(1000); } catch { /* closed */ }
    };
    ws.onopen = () => {
      signal.removeEventListener("abort", abort);
      resolve({
        name: "websocket",
        send: async (body) => { ws.send(body); },
        backlog: () => ws.bufferedAmount,
        next: () => new Promise((res) => {
          const b = queue.shift();
          if (b) res(b); else if (ended) res(null); else waiting.push(res);
        }),
        buffered: () => queue.length > 0,
        limitFrames: (n: number) => { maxMessage = readLimit(n); },
        close: () => abandon(null),
        abandon,
        // Not abandoned: the close handshake sends what is buffered, the
        // goodbye included, before the socket closes.
        goodbye: (body) => { ws.send(body); ws.close(1000); },
        closeReason: () => reason,
      });
    };
  });
}

/** How long the transport that won the race for an edge (the WebSocket,
 * where UDP is blocked) is used without racing again (ms). */
export const TRANSPORT_MEMORY_MS = 60 * 60_000;

/** How long close() lets a WebTransport session's edge take to read the
 * goodbye and hang up (the Go client's goodbyeTimeout). */
const GOODBYE_MS = 1_000;
/** How long dialing and the handshake may take together. */
const HANDSHAKE_TIMEOUT_MS = 10_000;
/** On a WebSocket (no transport keep-alive): how often to ping at most,
 * and the default of RelayOptions.idleTimeoutMs, how long a silent edge
 * counts as alive (the Go client's wsPingEvery and Config.IdleTimeout). */
const PING_EVERY_MS = 10_000;
const DEFAULT_IDLE_TIMEOUT_MS = 30_000;
/** Receipts sent in one Received frame at most. */
const MAX_RECEIPTS = 256;

/** Ephemeral events held at most while the page does not listen for
 * "event"; later ones are dropped, as where a receiver is slow. (Durable
 * deliveries are bounded by the edge, which sends no more to a session
 * that holds its unacknowledged limit, and by dropHeld when a session
 * ends.) */
const MAX_HELD_EPHEMERAL = 1024;

/** A delivery (or cancellation) that came while the page had no
 * "event" listener: run passes it on; a durable one's receipt goes, once
 * it ran, on the connection it came on, which is still the current one
 * (a durable delivery held from a session that ended is dropped: the edge
 * sends it again). */
interface Held {
  run: () => void;
  deliveryId: bigint;
  /** The connection a durable delivery came on (null for the others). */
  conn: Conn | null;
}

/** An "event" listener attached to a RelayClient: what was registered
 * with EventTarget for it (a wrapper that forgets it, for a once
 * listener). One object per attachment, so a signal that aborts after
 * the listener was removed and attached again forgets nothing. */
interface Registration {
  registered: EventListenerOrEventListenerObject;
}

/** The default of RelayOptions.maxPending (the Go client's too). */
const DEFAULT_MAX_PENDING = 1024;

/** A durable send: waiting for a slot (body null: its event is not built
 * yet), then sent and waiting for its ack. */
interface Outgoing {
  id: string;
  m: Message;
  body: Uint8Array | null; // the Event frame, once built
  /** The built event's created_at_ms and ttl_ms (for the resend). */
  createdAtMs: number;
  ttlMs: number;
  resolve: () => void;
  reject: (e: unknown) => void;
}

/** Why an aborted send failed: the signal's reason, else an AbortError. */
function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException("The send was aborted.", "AbortError");
}

/** The TTL of a Message that sets none (ms; the Go client's DefaultTTL). */
export const DEFAULT_TTL_MS = 60_000;

/** The ttl_ms a Message's ttlMs is sent as (the Go client's ttlMillis):
 * the edge counts in whole milliseconds (a fraction is dropped) and
 * refuses a TTL that is not positive, so a negative one, one under a
 * millisecond, or one that is not a number is refused here as the edge
 * would (RelayError MALFORMED_FRAME) rather than replaced by the default:
 * its sender asked for something else. Undefined, null or 0 take
 * DEFAULT_TTL_MS. Exported for tests. */
export function ttlMillis(ttlMs: number | null | undefined): bigint {
  if (ttlMs === undefined || ttlMs === null || ttlMs === 0) return BigInt(DEFAULT_TTL_MS);
  if (typeof ttlMs !== "number" || Number.isNaN(ttlMs) || ttlMs < 0) {
    throw new RelayError(ErrorCode.MALFORMED_FRAME, `ttlMs ${String(ttlMs)} is not a positive number of milliseconds (0 takes the default, ${DEFAULT_TTL_MS})`);
  }
  if (ttlMs < 1) {
    throw new RelayError(ErrorCode.MALFORMED_FRAME, `ttlMs ${ttlMs} is under a millisecond, the edge's unit (0 takes the default, ${DEFAULT_TTL_MS})`);
  }
  // Beyond any edge's maximum (TTL_TOO_LONG), but still an int64.
  return BigInt(Math.floor(Math.min(ttlMs, Number.MAX_SAFE_INTEGER)));
}

/** Keeps a device connected to the relay. Listen for "event",
 * "presence", "state" and "closed" (CustomEvent) on it. */
export class RelayClient extends EventTarget {
  /** The transport of the current (or last) session. */
  transport: TransportName | null = null;
  /** How far the edge's clock is ahead of this one, in ms. */
  clockOffsetMs = 0;
  /** How far clockOffsetMs may be off: half the round trip it was
   * learnt over (ms). */
  private clockErrorMs = 0;
  /** The edge's clock-skew tolerance, from the last Welcome (ms; 0: none
   * given). */
  private skewToleranceMs = 0;
  /** The current (or last) session's id, from the edge's Welcome. */
  sessionId = "";
  /** Why the client stopped for good, once it did. */
  error: RelayError | null = null;

  private conn: Conn | null = null;
  /** Aborts the connection being established, if one is. */
  private connecting: AbortController | null = null;
  private ticket: Uint8Array = new Uint8Array(0);
  private seq = BigInt(Date.now()) * 1000n;
  /** The edge's frame limit, from the last Welcome: a longer frame would
   * end the session for good, so such an event is refused here. */
  private maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
  /** Events sent and not acknowledged yet, in the order they were sent
   * (a Map iterates in insertion order); at most maxPending. */
  private pending = new Map<string, Outgoing>();
  /** Sends waiting for a slot in pending, first come first served. */
  private waiting = new Map<string, Outgoing>();
  private readonly maxPending: number;
  private readonly idleTimeoutMs: number;
  private seen = new Map<string, Set<string>>();
  /** Deliveries held, in order, until the page listens for "event". */
  private held: Held[] = [];
  /** The delivery ids of the current session's events passed on and not
   * acknowledged yet: each joins before its listeners run, so a close()
   * from one of them acknowledges it with the rest in its goodbye. */
  private receipts: bigint[] = [];
  /** The wait before the next reconnect, which close() cuts short. */
  private reconnectWait: { timer: ReturnType<typeof setTimeout>; wake: () => void } | null = null;
  /** The "event" listeners attached, by capture flag: each maps to what
   * was registered with EventTarget for it. */
  private readonly eventListeners = { bubble: new Map<EventListenerOrEventListenerObject, Registration>(), capture: new Map<EventListenerOrEventListenerObject, Registration>() };
  /** Whether an "event" listener is attached. */
  private listening = false;
  private onlineSet = new Set<string>();
  private stopped = false;
  private readonly instance = randomId();

  private constructor(private readonly opts: RelayOptions) {
    super();
    const max = opts.maxPending ?? DEFAULT_MAX_PENDING;
    if (!Number.isSafeInteger(max) || max < 1) throw new RangeError(`maxPending must be a positive integer, not ${String(opts.maxPending)}`);
    this.maxPending = max;
    const idle = opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
    if (typeof idle !== "number" || !(idle > 0) || !Number.isFinite(idle)) throw new RangeError(`idleTimeoutMs must be a positive number, not ${String(opts.idleTimeoutMs)}`);
    this.idleTimeoutMs = idle;
  }

  /** Connects (the first session) and keeps the connection up. */
  static async connect(opts: RelayOptions): Promise<RelayClient> {
    const c = new RelayClient(opts);
    await c.establish();
    // The loop handles what a session throws; anything else that escapes
    // it stops the client, telling listeners, rather than leave its sends
    // waiting on a loop that is gone.
    void c.loop().catch((e) => {
      if (c.stopped) return;
      c.conn?.close();
      c.conn = null;
      c.stop(e instanceof RelayError ? e : new RelayError(ErrorCode.INTERNAL, `the client failed: ${(e as Error)?.message ?? String(e)}`));
    });
    return c;
  }

  /** Events that arrive while no "event" listener is attached (the
   * edge sends what waited in the mailbox as soon as the session is up,
   * maybe before connect() resolved; or the page removed its last
   * listener) are held, unacknowledged, and passed on once one is
   * attached: none is acknowledged without having been passed on. */
  override addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void {
    if (type !== "event" || !listener) {
      super.addEventListener(type, listener, options);
      return;
    }
    const capture = typeof options === "boolean" ? options : !!options?.capture;
    const signal = typeof options === "object" ? options.signal : undefined;
    if (signal?.aborted) return; // added and removed at once, as EventTarget does
    const forCapture = capture ? this.eventListeners.capture : this.eventListeners.bubble;
    if (forCapture.has(listener)) return; // EventTarget adds it once
    // The browser removes a once listener, and one whose signal aborts,
    // without calling removeEventListener: a once listener is registered
    // through a wrapper that forgets it as it runs, and a signal is
    // followed, so the count stays true.
    const reg: Registration = { registered: listener };
    if (typeof options === "object" && options.once) {
      reg.registered = (ev: Event) => {
        this.forget(listener, capture, reg);
        if (typeof listener === "function") listener.call(this, ev); else listener.handleEvent(ev);
      };
    }
    forCapture.set(listener, reg);
    signal?.addEventListener("abort", () => this.forget(listener, capture, reg), { once: true });
    super.addEventListener(type, reg.registered, options);
    if (!this.listening) {
      this.listening = true;
      // Once the code that attached it has run (it may attach others).
      queueMicrotask(() => this.release());
    }
  }

  /** Removing the last "event" listener makes the client hold what
   * arrives again, unacknowledged, until one is attached. */
  override removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void {
    if (type !== "event" || !listener) {
      super.removeEventListener(type, listener, options);
      return;
    }
    const capture = typeof options === "boolean" ? options : !!options?.capture;
    const reg = (capture ? this.eventListeners.capture : this.eventListeners.bubble).get(listener);
    if (!reg) return;
    super.removeEventListener(type, reg.registered, options);
    this.forget(listener, capture, reg);
  }

  /** Forgets an "event" listener the browser no longer calls. */
  private forget(listener: EventListenerOrEventListenerObject, capture: boolean, reg: Registration): void {
    const forCapture = capture ? this.eventListeners.capture : this.eventListeners.bubble;
    // Only this registration: the same listener may have been removed
    // and attached again since (a signal that aborts later).
    if (forCapture.get(listener) === reg) forCapture.delete(listener);
    this.listening = this.eventListeners.capture.size + this.eventListeners.bubble.size > 0;
  }

  /** Passes a delivery on now, its receipt joining this.receipts, or holds
   * it while the page does not listen for "event" yet (or earlier ones are
   * still held); true when it was passed on. */
  private take(run: () => void, deliveryId: bigint, c: Conn, ephemeral = false): boolean {
    // Closed: what comes while the edge reads the goodbye is neither
    // passed on nor acknowledged (the edge keeps a durable one in the
    // mailbox).
    if (this.stopped) return false;
    if (this.listening && this.held.length === 0) {
      if (deliveryId) this.receipts.push(deliveryId);
      run();
      return true;
    }
    if (!(ephemeral && this.held.length >= MAX_HELD_EPHEMERAL)) this.held.push({ run, deliveryId, conn: deliveryId ? c : null });
    return false;
  }

  /** Drops the durable deliveries held from c, whose session ended: they
   * were never acknowledged, so the edge gives them to the next session
   * again; kept, a page that does not listen would pile up a copy of
   * each per reconnect, each holding its ended connection. */
  private dropHeld(c: Conn): void {
    this.held = this.held.filter((h) => h.conn !== c);
  }

  /** Passes the held deliveries on, in order, and acknowledges them,
   * until the page stops listening (a listener may remove itself): what
   * is left stays held. */
  private release(): void {
    // Closed (or stopped): what was held was never acknowledged, so the
    // edge keeps it for the device's next session; none is passed on.
    if (this.stopped) {
      this.held = [];
      return;
    }
    const c = this.conn;
    let i = 0;
    // A listener may close() the client: nothing is passed on after.
    for (; i < this.held.length && this.listening && !this.stopped; i++) {
      const h = this.held[i];
      if (h.deliveryId && c && h.conn === c) this.receipts.push(h.deliveryId);
      h.run();
    }
    this.held = this.stopped ? [] : this.held.slice(i);
    if (c && !this.stopped) this.flushReceipts(c);
  }

  /** Sends this.receipts on c, in Received frames of at most MAX_RECEIPTS
   * ids. */
  private flushReceipts(c: Conn): void {
    const ids = this.receipts;
    this.receipts = [];
    for (let j = 0; j < ids.length; j += MAX_RECEIPTS) {
      void c.send(frame({ case: "received", value: { deliveryIds: ids.slice(j, j + MAX_RECEIPTS) } })).catch(() => {});
    }
  }

  /** The user's other devices that are online. */
  online(): string[] { return [...this.onlineSet].sort(); }

  /** Sends a durable event; resolves when every target has it, rejects
   * with a RelayError when refused (see retryable). While maxPending
   * sends wait for their acks it first waits for one of them to finish;
   * opts.signal gives it up. */
  send(m: Message, opts: SendOptions = {}): Promise<void> {
    if (this.stopped) return Promise.reject(this.closedError());
    const { signal } = opts;
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    const id = m.id || randomId();
    if (this.pending.has(id) || this.waiting.has(id)) {
      // The edge would drop the second as a duplicate, and its caller
      // would wait for the first one's ack (the Go client's
      // ErrAlreadySending).
      return Promise.reject(new RelayError(ErrorCode.DUPLICATE_ID, `event ${id} is already being sent`));
    }
    return new Promise((resolve, reject) => {
      let unlisten = () => {};
      const s: Outgoing = {
        id, m, body: null, createdAtMs: 0, ttlMs: 0,
        resolve: () => { unlisten(); resolve(); },
        reject: (e) => { unlisten(); reject(e); },
      };
      if (signal) {
        const abort = () => this.abandon(s, abortReason(signal));
        signal.addEventListener("abort", abort, { once: true });
        unlisten = () => signal.removeEventListener("abort", abort);
      }
      // Behind any earlier send still waiting, so per-sender order (seq
      // order) is the order of the calls.
      if (this.waiting.size === 0 && this.pending.size < this.maxPending) {
        this.start(s);
      } else {
        // Built later: a copy, so the event is what was asked for now.
        s.m = { ...m, targets: m.targets?.slice(), payload: m.payload instanceof Uint8Array ? m.payload.slice() : m.payload };
        this.waiting.set(id, s);
      }
    });
  }

  /** Builds a send's event, now that it has a slot, and sends it. */
  private start(s: Outgoing): void {
    try {
      const ev = this.build(s.m, false, s.id);
      s.body = this.fits(frame({ case: "event", value: ev }));
      s.createdAtMs = Number(ev.createdAtMs);
      s.ttlMs = Number(ev.ttlMs);
    } catch (e) {
      s.reject(e); // it cannot be encoded (a bad ttlMs, say): never sent
      return;
    }
    this.pending.set(s.id, s);
    this.conn?.send(s.body).catch(() => {});
  }

  /** Gives free slots to the sends waiting for them, in order. */
  private pump(): void {
    for (const s of this.waiting.values()) {
      if (this.stopped || this.pending.size >= this.maxPending) return;
      this.waiting.delete(s.id);
      this.start(s);
    }
  }

  /** Gives a send up (its signal aborted): a waiting one was never sent;
   * a sent one is forgotten, its slot free for the next. */
  private abandon(s: Outgoing, reason: unknown): void {
    if (this.waiting.get(s.id) === s) {
      this.waiting.delete(s.id);
      s.reject(reason);
    } else if (this.pending.get(s.id) === s) {
      this.pending.delete(s.id);
      s.reject(reason);
      this.pump();
    }
  }

  /** Sends an ephemeral event: never stored, never acknowledged; a
   * datagram when it fits, but for the first of each connection, which
   * goes on the stream (the edge reads a session's datagrams from then on,
   * so a page that sends none costs it no datagram reader). Throws a
   * RelayError: TARGET_OFFLINE while disconnected, FRAME_TOO_LARGE for an
   * event longer than the edge's frame limit, QUEUE_FULL while the
   * connection holds more than MAX_EPHEMERAL_BACKLOG bytes it could not
   * send yet (the edge reads the page more slowly above its rates, or the
   * network is slow): the event is dropped, not queued behind the others. */
  sendEphemeral(m: Message): void {
    const c = this.conn;
    if (this.stopped) throw this.closedError();
    if (!c) throw new RelayError(ErrorCode.TARGET_OFFLINE, "not connected");
    const body = this.fits(frame({ case: "event", value: this.build(m, true) }));
    if (c.datagramsOpen && c.sendDatagram?.(body)) return;
    if (c.backlog() > MAX_EPHEMERAL_BACKLOG) {
      throw new RelayError(ErrorCode.QUEUE_FULL, `${c.backlog()} bytes wait to be sent: ephemeral event dropped`);
    }
    // Datagrams from when this frame has gone out (until then they would
    // wait in the edge's small queue, or be dropped beyond it).
    void c.send(body).then(() => { c.datagramsOpen = true; }, () => {});
  }

  /** Ends the session and stops reconnecting. Sends under way (sent or
   * waiting for a slot) reject, and later calls fail, with a RelayError
   * UNSPECIFIED "closed". That does not say an event was not delivered:
   * one already sent (or written before the goodbye, which the edge
   * still reads) may be, its ack never seen. To make sure an event
   * arrives, send it again from a new client of the same device with the
   * same Message.id: receivers drop the second copy. */
  close(): void {
    this.stopped = true;
    this.error ??= new RelayError(ErrorCode.UNSPECIFIED, "closed");
    this.connecting?.abort(this.error);
    const c = this.conn;
    this.conn = null;
    if (c) {
      // The events passed on are acknowledged before the goodbye, which
      // the edge reads last: they must not come again.
      this.flushReceipts(c);
      c.goodbye(frame({ case: "close", value: {} }));
    }
    this.receipts = [];
    if (this.reconnectWait) {
      clearTimeout(this.reconnectWait.timer);
      this.reconnectWait.wake();
    }
    this.fail(this.error);
  }

  /** body, when the edge takes a frame that long; else a RelayError
   * (FRAME_TOO_LARGE) is thrown and nothing is sent. */
  private fits(body: Uint8Array): Uint8Array {
    if (body.length > this.maxFrameBytes) {
      throw new RelayError(ErrorCode.FRAME_TOO_LARGE, `frame of ${body.length} bytes, at most ${this.maxFrameBytes} allowed`);
    }
    return body;
  }

  private build(m: Message, ephemeral: boolean, id = m.id || randomId()): WireEvent {
    const payload = typeof m.payload === "string" ? enc.encode(m.payload) : (m.payload ?? new Uint8Array(0));
    const ttlMs = ttlMillis(m.ttlMs);
    this.seq++;
    return create(EventSchema, {
      id,
      targets: m.targets ?? [],
      seq: this.seq,
      createdAtMs: BigInt(Math.round(Date.now() + this.clockOffsetMs)),
      ttlMs,
      type: m.type ?? "",
      payload,
      ephemeral,
      anyOne: !!m.anyOne && !ephemeral,
    });
  }

  /** Why a call on a client that stopped fails: what stopped it
   * (RelayError UNSPECIFIED "closed" after close()). */
  private closedError(): RelayError {
    return this.error ?? new RelayError(ErrorCode.UNSPECIFIED, "closed");
  }

  private emit(type: string, detail: unknown): void {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** The hashes to pin: the ones given, else fetched again for every
   * dial (a restarted or renewed edge has a new certificate). */
  private async certHashes(signal: AbortSignal): Promise<Uint8Array[] | undefined> {
    if (this.opts.certHashes) return this.opts.certHashes;
    const url = this.opts.certHashesUrl ?? `https://${this.opts.edge}${CERT_HASHES_PATH}`;
    try {
      const r = await fetch(url, { cache: "no-store", signal });
      const doc = (await r.json()) as { hashes?: { value: string }[] };
      return (doc.hashes ?? []).map((h) => unb64(h.value));
    } catch {
      return undefined; // a trusted certificate needs none
    }
  }

  /** Where the transport the race chose for this edge is kept
   * (localStorage), and beside it (".at") when it was chosen, in ms since
   * the epoch. */
  private rememberKey(): string { return `relay.transport.${this.opts.edge}`; }

  /** The WebSocket, when the race chose it for this edge less than
   * TRANSPORT_MEMORY_MS ago; else null (race again). */
  private rememberedWebSocket(): boolean {
    try {
      const key = this.rememberKey();
      const at = Number(localStorage.getItem(`${key}.at`));
      const age = Date.now() - at;
      return localStorage.getItem(key) === "websocket" && at > 0 && age >= 0 && age < TRANSPORT_MEMORY_MS;
    } catch {
      return false; // no storage
    }
  }

  /** Keeps the race's winner for this edge, or forgets it (null). */
  private remember(name: TransportName | null): void {
    try {
      const key = this.rememberKey();
      if (name) {
        localStorage.setItem(key, name);
        localStorage.setItem(`${key}.at`, String(Date.now()));
      } else {
        localStorage.removeItem(key);
        localStorage.removeItem(`${key}.at`);
      }
    } catch { /* no storage */ }
  }

  /** Dials: WebTransport first, raced against the WebSocket after a head
   * start, unless one is forced, or the WebSocket won the race for this
   * edge less than TRANSPORT_MEMORY_MS ago (UDP blocked where the page
   * is) and dials: a network that changed since (or a WebSocket that no
   * longer works) gets WebTransport back. */
  private async dial(signal: AbortSignal): Promise<Conn> {
    const want = this.opts.transport ?? "auto";
    // The race's loser is stopped too. (By hand, not AbortSignal.any:
    // Safari before 17.4 has none.)
    const ctl = new AbortController();
    const follow = () => ctl.abort(signal.reason);
    if (signal.aborted) follow();
    else signal.addEventListener("abort", follow, { once: true });
    const both = ctl.signal;
    let hashes: Promise<Uint8Array[] | undefined> | undefined;
    const wt = async () => dialWebTransport(this.opts, await (hashes ??= this.certHashes(both)), both);
    const ws = () => dialWebSocket(this.opts, both);
    if (want === "webtransport") return wt();
    if (want === "websocket") return ws();
    if (typeof WebTransport === "undefined") return ws();
    if (this.rememberedWebSocket()) {
      try {
        return await ws();
      } catch (e) {
        if (signal.aborted) throw e;
        this.remember(null); // the full race, now
      }
    }
    const head = this.opts.headStartMs ?? 300;
    const first = wt();
    let timer = 0;
    const second = new Promise<Conn>((resolve, reject) => {
      let started = false;
      const start = () => {
        if (started) return;
        started = true;
        if (both.aborted) reject(new Error("not needed"));
        else ws().then(resolve, reject);
      };
      timer = setTimeout(start, head) as unknown as number;
      first.catch(() => { clearTimeout(timer); start(); });
    });
    const attempts = [first, second];
    let winner: Conn;
    try {
      winner = await Promise.any(attempts);
    } catch (e) {
      // Both failed: say why, the WebTransport attempt's reason first.
      const why = (e as AggregateError).errors ?? [e];
      throw why.find((x) => x instanceof RelayError) ?? new Error(`cannot reach the edge: ${why.map((x) => String((x as Error)?.message ?? x)).join("; ")}`);
    }
    // Stop the other attempt (or close it, should it have connected).
    clearTimeout(timer);
    ctl.abort();
    for (const a of attempts) void a.then((c) => { if (c !== winner) c.close(); }, () => {});
    this.remember(winner.name);
    return winner;
  }

  /** Dials and shakes hands within HANDSHAKE_TIMEOUT_MS, then resends
   * what was not acknowledged before telling listeners. */
  private async establish(): Promise<void> {
    // What is given up on (the time is up, or close() was called) is
    // stopped, not left to run: the certificate hashes' fetch, both dials,
    // the handshake.
    const ctl = new AbortController();
    this.connecting = ctl;
    let dialed: Conn | null = null;
    const timer = setTimeout(() => {
      ctl.abort(new RelayError(ErrorCode.TIMEOUT, "the edge did not answer the handshake in time"));
    }, HANDSHAKE_TIMEOUT_MS);
    const given = new Promise<never>((_, reject) => {
      ctl.signal.addEventListener("abort", () => {
        dialed?.close(); // ends a handshake the edge does not answer
        reject(ctl.signal.reason);
      }, { once: true });
    });
    const attempt = (async () => {
      const c = await this.dial(ctl.signal);
      if (ctl.signal.aborted) { c.close(); throw ctl.signal.reason; }
      dialed = c;
      try {
        await this.handshake(c);
      } catch (e) {
        c.close();
        throw e;
      }
      return c;
    })();
    let c: Conn;
    try {
      c = await Promise.race([attempt, given]);
    } finally {
      clearTimeout(timer);
      if (this.connecting === ctl) this.connecting = null;
    }
    attempt.catch(() => {}); // settled, or given up on above
    if (this.stopped) { // closed while connecting
      c.close();
      throw this.closedError();
    }
    this.conn = c;
    this.transport = c.name;
    this.onlineSet.clear();
    // Resend what was not acknowledged, in order, before anything new,
    // but for what this edge would certainly refuse: each of those fails
    // alone (see refusedOnResend). Sends still waiting for a slot follow
    // as acks (and those failures) free slots.
    const edgeNow = Date.now() + this.clockOffsetMs - this.clockErrorMs - EXPIRY_SLACK_MS;
    const refused: [Outgoing, RelayError][] = [];
    for (const p of this.pending.values()) {
      const why = this.refusedOnResend(p, edgeNow);
      if (why) refused.push([p, why]);
      else void c.send(p.body!).catch(() => {});
    }
    for (const [p, why] of refused) {
      this.pending.delete(p.id);
      p.reject(why);
    }
    this.pump();
    this.emit("state", { connected: true, transport: c.name, sessionId: this.sessionId });
  }

  /** The error the edge would certainly refuse a resent send with, which
   * the page gives it instead of sending it (the Go client's serve does
   * the same); null when the edge may take it. An event longer than this
   * edge's frame limit (encoded under another's) would end the session
   * for good (FRAME_TOO_LARGE); one expired by the edge's clock at
   * edgeNowMs, the earliest it can be, by validate's rule (its age at
   * least its TTL plus the skew tolerance) would cost a refusal, and a
   * page back after a long sleep with more of them than the edge's
   * refusal budget would be closed as RATE_LIMITED, session after
   * session (EXPIRED). Nothing expires while the tolerance is unknown. */
  private refusedOnResend(p: Outgoing, edgeNowMs: number): RelayError | null {
    if (p.body!.length > this.maxFrameBytes) {
      return new RelayError(ErrorCode.FRAME_TOO_LARGE, `event ${p.id}: frame of ${p.body!.length} bytes, longer than this edge's limit of ${this.maxFrameBytes}`);
    }
    const skew = this.skewToleranceMs, age = Math.floor(edgeNowMs) - p.createdAtMs;
    if (skew > 0 && age >= 0 && age >= p.ttlMs + skew) {
      return new RelayError(ErrorCode.EXPIRED, `event ${p.id}: created ${age} ms ago with a ttl of ${p.ttlMs} ms, tolerance ${skew} ms: not sent again`);
    }
    return null;
  }

  /** Signs a challenge with the device key (docs/protocol.md). */
  private async answer(c: Conn, hello: Hello, ch: { edgeId: string; nonce: Uint8Array; serverTimeMs: bigint }): Promise<void> {
    const tr = transcript({
      userId: hello.userId, deviceId: hello.deviceId, version: hello.protocolVersion, clientTimeMs: hello.clientTimeMs,
      edgeId: ch.edgeId, nonce: ch.nonce, serverTimeMs: ch.serverTimeMs,
    });
    const sig = new Uint8Array(await crypto.subtle.sign("Ed25519", this.opts.key, tr as BufferSource));
    await c.send(frame({ case: "authenticate", value: { signature: sig } }));
  }

  private async handshake(c: Conn): Promise<void> {
    const sent = Date.now();
    // In the edge's time as far as this client knows it: a resume proof
    // must be within the edge's resume window of its clock.
    const hello = create(HelloSchema, {
      userId: this.opts.userId, deviceId: this.opts.deviceId, protocolVersion: PROTOCOL_VERSION,
      clientTimeMs: BigInt(Math.round(sent + this.clockOffsetMs)), resumeTicket: this.ticket, instance: this.instance,
      deferDatagrams: true, minRevision: this.opts.minRevision ?? 0n,
    });
    if (hello.resumeTicket.length > 0) {
      hello.resumeNonce = crypto.getRandomValues(new Uint8Array(16));
      const rt = resumeTranscript({
        userId: hello.userId, deviceId: hello.deviceId, version: hello.protocolVersion, clientTimeMs: hello.clientTimeMs,
        instance: hello.instance, nonce: hello.resumeNonce, ticket: hello.resumeTicket,
      });
      hello.resumeProof = new Uint8Array(await crypto.subtle.sign("Ed25519", this.opts.key, rt as BufferSource));
    }
    await c.send(frame({ case: "hello", value: hello }));
    // The edge's clock is learnt from its first frame: a full handshake's
    // Challenge answers the Hello at once, while the Welcome comes after
    // the signature's round trip and the edge's work (the Go client's
    // handshake does the same).
    let offset: number | null = null;
    for (;;) {
      const body = await c.next();
      if (!body) throw c.closeReason() ?? new Error("the edge closed the connection during the handshake");
      const f = fromBinary(FrameSchema, body);
      switch (f.kind.case) {
        case "challenge":
          if (offset === null && f.kind.value.serverTimeMs) {
            this.clockErrorMs = (Date.now() - sent) / 2;
            offset = Number(f.kind.value.serverTimeMs) + this.clockErrorMs - Date.now();
          }
          if (f.kind.value.ticketError) this.ticket = new Uint8Array(0);
          await this.answer(c, hello, f.kind.value);
          break;
        case "welcome": {
          const w = f.kind.value;
          if (offset === null) {
            // A resumed session: the Welcome answers the Hello.
            this.clockErrorMs = (Date.now() - sent) / 2;
            offset = Number(w.serverTimeMs) + this.clockErrorMs - Date.now();
          }
          this.clockOffsetMs = offset;
          this.skewToleranceMs = Number(w.limits?.skewToleranceMs ?? 0n);
          if (w.resumeTicket.length > 0) this.ticket = w.resumeTicket;
          // An edge that announces no limit holds the default one, not
          // the one an earlier edge announced.
          this.maxFrameBytes = w.limits?.maxFrameBytes ? Math.min(w.limits.maxFrameBytes, MAX_FRAME_LIMIT) : DEFAULT_MAX_FRAME_BYTES;
          c.limitFrames?.(this.maxFrameBytes);
          c.timeFrames?.(frameTimeoutMs(Number(w.limits?.frameTimeoutMs ?? 0n)));
          this.sessionId = w.sessionId;
          c.hello = hello;
          return;
        }
        case "close":
          throw closeError(f.kind.value);
        case undefined: // a kind of a newer edge's: skipped, as in the session
        case "ping":
        case "pong":
        case "presence":
        case "ticket":
          // Frames that may come at any time and ask nothing of a client
          // not yet welcomed (the Go client skips them too).
          break;
        default:
          throw new RelayError(ErrorCode.MALFORMED_FRAME, `unexpected ${f.kind.case} in the handshake`);
      }
    }
  }

  private firstTime(sender: string, id: string): boolean {
    let s = this.seen.get(sender);
    if (!s) { s = new Set(); this.seen.set(sender, s); }
    if (s.has(id)) return false;
    s.add(id);
    if (s.size > 4096) s.delete(s.values().next().value as string);
    return true;
  }

  /** Passes a delivered event on, once per sender and id. */
  private deliver(ev: WireEvent | undefined): void {
    if (!ev || !this.firstTime(ev.senderDeviceId, ev.id)) return;
    this.emit("event", {
      id: ev.id, sender: ev.senderDeviceId, seq: ev.seq, type: ev.type, payload: ev.payload,
      createdAt: new Date(Number(ev.createdAtMs)), ephemeral: ev.ephemeral, anyOne: ev.anyOne, cancelled: false,
    } satisfies RelayEvent);
  }

  private resolve(id: string, err?: RelayError): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    if (err) p.reject(err); else p.resolve();
    this.pump();
  }

  /** Fails every send, sent or still waiting for a slot. */
  private fail(err: RelayError): void {
    const all = [...this.pending.values(), ...this.waiting.values()];
    this.pending.clear();
    this.waiting.clear();
    for (const p of all) p.reject(err);
  }

  /** Reads one session until it ends; returns why. */
  private async serve(c: Conn): Promise<RelayError | null> {
    let lastHeard = Date.now();
    // A WebSocket has no keep-alive of its own: ping, and give up on an
    // edge that stays silent (a half-open TCP connection) at once, not
    // after a close handshake it will not answer.
    const idle = this.idleTimeoutMs;
    const keepalive = c.name === "websocket" ? setInterval(() => {
      if (Date.now() - lastHeard > idle) {
        const why = new RelayError(ErrorCode.TIMEOUT, `the edge was silent for ${Math.round((Date.now() - lastHeard) / 1000)} s`);
        if (c.abandon) c.abandon(why); else c.close();
        return;
      }
      void c.send(frame({ case: "ping", value: { nonce: 1n } })).catch(() => {});
    }, Math.min(idle / 3, PING_EVERY_MS)) : 0;
    // Ephemeral deliveries come as datagrams when they fit.
    c.onDatagram?.((body) => {
      try {
        const f = fromBinary(FrameSchema, body);
        if (f.kind.case === "deliver" && !f.kind.value.deliveryId) {
          const ev = f.kind.value.event;
          this.take(() => this.deliver(ev), 0n, c, true);
        }
      } catch { /* a malformed datagram is dropped */ }
    });
    // Receipts go out in one Received frame per burst: when no further
    // frame is already here to read.
    this.receipts = [];
    try {
      for (;;) {
        const body = await c.next();
        if (!body) return c.closeReason();
        lastHeard = Date.now();
        const f: Frame = fromBinary(FrameSchema, body);
        // Closed, waiting for the edge to read the goodbye and hang up:
        // only its Close still matters (a presence change, a challenge
        // or a ping is for a session that is over, and an answer would
        // be written after the goodbye).
        if (this.stopped && f.kind.case !== "close") continue;
        switch (f.kind.case) {
          case "deliver": {
            const d = f.kind.value;
            this.take(() => this.deliver(d.event), d.deliveryId, c, !d.deliveryId);
            break;
          }
          case "ack": this.resolve(f.kind.value.eventId); break;
          case "reject": {
            const r = f.kind.value;
            this.resolve(r.eventId, new RelayError(r.code, r.message));
            break;
          }
          case "cancel": {
            const cl = f.kind.value;
            // Only an event passed on needs undoing; one that was not is
            // just never passed on (a late copy is a duplicate).
            this.take(() => {
              if (this.firstTime(cl.senderDeviceId, cl.eventId)) return;
              this.emit("event", {
                id: cl.eventId, sender: cl.senderDeviceId, seq: 0n, type: "", payload: new Uint8Array(0),
                createdAt: new Date(), ephemeral: false, anyOne: true, cancelled: true,
              } satisfies RelayEvent);
            }, 0n, c);
            break;
          }
          case "presence": {
            const p = f.kind.value;
            if (p.online) this.onlineSet.add(p.deviceId); else this.onlineSet.delete(p.deviceId);
            this.emit("presence", { deviceId: p.deviceId, online: p.online });
            break;
          }
          case "ticket": this.ticket = f.kind.value.resumeTicket; break;
          // Answered without waiting for the write: the reader never waits
          // behind the page's own sends.
          case "challenge": void this.answer(c, c.hello!, f.kind.value).catch(() => {}); break;
          case "ping": void c.send(frame({ case: "pong", value: { nonce: f.kind.value.nonce } })).catch(() => {}); break;
          case "close": return closeError(f.kind.value);
          default: break;
        }
        if (this.receipts.length > 0 && (this.receipts.length >= MAX_RECEIPTS || !c.buffered())) this.flushReceipts(c);
      }
    } catch (e) {
      // Whatever failed here (a write on a stream that closed under it, a
      // frame that does not decode) ends this session, not the client:
      // the loop reconnects, and a reason worth stopping for shows then.
      return c.closeReason() ?? new RelayError(ErrorCode.UNSPECIFIED, `session ended: ${(e as Error)?.message ?? String(e)}`);
    } finally {
      if (keepalive) clearInterval(keepalive);
      this.receipts = []; // delivery ids are the session's
      c.close();
    }
  }

  private fatal(e: RelayError | null): boolean {
    if (!e) return false;
    if (e.code === ErrorCode.REPLACED && e.replacedBy === this.instance) return false;
    return [ErrorCode.AUTH_FAILED, ErrorCode.REVOKED, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.REPLACED,
      ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE].includes(e.code);
  }

  /** Stops for good, telling listeners why. */
  private stop(why: RelayError): void {
    this.stopped = true;
    this.error = why;
    this.fail(why);
    this.emit("closed", why);
  }

  private async loop(): Promise<void> {
    const min = this.opts.reconnectMinMs ?? 100, max = this.opts.reconnectMaxMs ?? 10_000;
    let backoff = min;
    for (;;) {
      const c = this.conn;
      let wait = 0;
      if (c) {
        const began = performance.now();
        const why = await this.serve(c);
        this.conn = null;
        this.dropHeld(c);
        if (this.stopped) return;
        // What the ended session said is online is not known any more:
        // reported offline (the next session reports who is online).
        for (const id of this.onlineSet) this.emit("presence", { deviceId: id, online: false });
        this.onlineSet.clear();
        this.emit("state", { connected: false, reason: why });
        if (this.fatal(why)) { this.stop(why!); return; }
        [wait, backoff] = reconnectWait(why, performance.now() - began, backoff, min, max);
      } else {
        // close() from a "state" listener of the session that just came
        // up leaves no connection and nothing to wait for.
        if (this.stopped) return;
        wait = backoff / 2 + Math.random() * (backoff / 2);
        backoff = Math.min(backoff * 2, max);
      }
      if (wait > 0) {
        await new Promise<void>((wake) => { this.reconnectWait = { timer: setTimeout(wake, wait), wake }; });
        this.reconnectWait = null;
      }
      if (this.stopped) return;
      try {
        await this.establish();
      } catch (e) {
        if (this.stopped) return;
        if (e instanceof RelayError && this.fatal(e)) { this.stop(e); return; }
      }
    }
  }
}

/** How long a session must have lasted for its end to reset the
 * reconnect backoff (ms). */
export const STABLE_SESSION_MS = 30_000;

/** The wait before reconnecting after a session that lasted `lastedMs`
 * ended with `why`, and the backoff after it (both ms). An edge going away
 * says when to come back; the first reconnect after a session that lasted
 * is soon, after a wait drawn from [0, max(min, 1 s)], so the pages of an
 * edge that died do not all come back in the same instant; a session that
 * ended soon after it began, or as RATE_LIMITED, is followed by a wait
 * between half the backoff and the backoff, which doubles up to `max`, so
 * a page cannot spin against an edge that accepts and then drops it. (The
 * Go client's reconnectWait.) */
export function reconnectWait(why: RelayError | null | undefined, lastedMs: number, backoff: number, min: number, max: number): [number, number] {
  if (why?.code === ErrorCode.GOING_AWAY) {
    // The edge's word, bounded: an edge can neither park the page for
    // ever (nor past setTimeout's range, which fires at once) nor, after
    // a session that ended soon after it began, make it spin.
    const hint = Math.min(Math.max(why.reconnectAfterMs || 0, 0), MAX_RECONNECT_HINT_MS);
    if (lastedMs >= STABLE_SESSION_MS) return [hint, min];
    return [Math.max(hint, backoff / 2 + Math.random() * (backoff / 2)), Math.min(backoff * 2, max)];
  }
  if (lastedMs >= STABLE_SESSION_MS) {
    backoff = min;
    if (why?.code !== ErrorCode.RATE_LIMITED) return [Math.random() * Math.max(min, 1000), min];
  }
  return [backoff / 2 + Math.random() * (backoff / 2), Math.min(backoff * 2, max)];
}

/** The error a Close frame carries. */
function closeError(cl: { code: ErrorCode; message: string; reconnectAfterMs: bigint; replacingInstance: string }): RelayError {
  return new RelayError(cl.code, cl.message, Number(cl.reconnectAfterMs), cl.replacingInstance);
}

/** A new device key pair: the private key non-extractable (it can sign,
 * never leave the browser), the public key raw (32 bytes) to register. */
export async function generateDeviceKey(): Promise<{ privateKey: CryptoKey; publicKey: Uint8Array }> {
  const kp = (await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"])) as CryptoKeyPair;
  const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", kp.publicKey));
  return { privateKey: kp.privateKey, publicKey };
}

/** A device as this browser remembers it. */
export interface StoredDevice {
  /** RelayOptions.userId, deviceId and key. */
  userId: string; deviceId: string; key: CryptoKey;
  /** What the user called it, for people. */
  name?: string;
  /** The revision that registered the device (RelayOptions.minRevision). */
  revision?: bigint;
}

function db(): Promise<IDBDatabase> {
  return new Promise((resolve, reject) => {
    const r = indexedDB.open("relay", 1);
    r.onupgradeneeded = () => r.result.createObjectStore("devices");
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

/** Keeps a device (with its non-extractable key) in IndexedDB. */
export async function saveDevice(d: StoredDevice): Promise<void> {
  const conn = await db();
  await new Promise<void>((resolve, reject) => {
    const tx = conn.transaction("devices", "readwrite");
    tx.objectStore("devices").put(d, "current");
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
  });
  conn.close();
}

/** The device saved in this browser, if any. */
export async function loadDevice(): Promise<StoredDevice | undefined> {
  const conn = await db();
  const d = await new Promise<StoredDevice | undefined>((resolve, reject) => {
    const r = conn.transaction("devices").objectStore("devices").get("current");
    r.onsuccess = () => resolve(r.result as StoredDevice | undefined);
    r.onerror = () => reject(r.error);
  });
  conn.close();
  return d;
}

/** Forgets the device saved in this browser. */
export async function forgetDevice(): Promise<void> {
  const conn = await db();
  await new Promise<void>((resolve) => {
    const tx = conn.transaction("devices", "readwrite");
    tx.objectStore("devices").delete("current");
    tx.oncomplete = () => resolve();
  });
  conn.close();
}

/** Base64 (standard, padded) of bytes, and back: the encoding of the
 * certificate hashes' document, handy for keys and payloads too. */
export { b64, unb64 };
