// A device's session with an edge over its WebSocket fallback
// (docs/protocol.md): one binary message per frame body, the signed
// handshake (or a resume ticket), events with acks, receipts for what
// arrives, pings to keep the connection alive.
import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { WebSocket } from "k6/websockets";
import { clearInterval, clearTimeout, setInterval, setTimeout } from "k6/timers";
import { Counter, Rate, Trend } from "k6/metrics";
import "./utf8.js";
import { ErrorCode, EventSchema, FrameSchema, type Frame, type Event as WireEvent } from "../gen/relay/v1/frames_pb.js";
import { encodeUtf8 } from "./utf8.js";
import { sign } from "./ed25519.js";
import { randomHex } from "./bytes.js";
import { randomBytes } from "k6/crypto";

export { ErrorCode };

export const PROTOCOL_VERSION = 1;

/** From dial to Welcome. */
export const handshakeTime = new Trend("relay_handshake_duration", true);
/** Handshakes that did not end in a Welcome (refused, timed out, cut). */
export const handshakeFailed = new Rate("relay_handshake_failed");
/** Sessions that came up on their resume ticket (no signature round trip). */
export const sessionResumed = new Rate("relay_session_resumed");
/** From sending an event to its Ack: every target has it. */
export const ackLatency = new Trend("relay_ack_latency", true);
/** Events not acknowledged: refused, unanswered in time, or lost with their session. */
export const eventFailed = new Rate("relay_event_failed");
export const eventsSent = new Counter("relay_events_sent");
export const eventsReceived = new Counter("relay_events_received");

/** A protocol error: an event refused or a session closed, by code. */
export class RelayError extends Error {
  constructor(readonly code: ErrorCode, message: string) {
    super(`${ErrorCode[code] ?? code}${message ? ": " + message : ""}`);
    this.name = "RelayError";
  }
}

export interface DeviceIdentity {
  userId: string;
  deviceId: string;
  /** Ed25519 seed. */
  secret: Uint8Array;
  /** Named in every Hello: an edge behind it waits for it before it
   * looks the device up (a device registered moments ago). */
  minRevision?: bigint;
}

export interface Delivered {
  id: string;
  sender: string;
  payload: Uint8Array;
}

const PING_EVERY_MS = 10_000;

/** The transcript a device signs (docs/protocol.md, "Handshake"). */
export function transcript(f: { userId: string; deviceId: string; version: number; clientTimeMs: bigint; edgeId: string; nonce: Uint8Array; serverTimeMs: bigint }): Uint8Array {
  const out: number[] = [];
  const u32 = (n: number) => out.push((n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
  const i64 = (n: bigint) => {
    const v = BigInt.asUintN(64, n);
    for (let i = 7; i >= 0; i--) out.push(Number((v >> BigInt(i * 8)) & 255n));
  };
  const str = (b: Uint8Array) => {
    u32(b.length);
    for (const x of b) out.push(x);
  };
  str(encodeUtf8("relay/1 device handshake"));
  str(encodeUtf8(f.userId));
  str(encodeUtf8(f.deviceId));
  u32(f.version);
  i64(f.clientTimeMs);
  str(encodeUtf8(f.edgeId));
  str(f.nonce);
  i64(f.serverTimeMs);
  return new Uint8Array(out);
}

/** The resume transcript a device signs to resume with a ticket
 * (docs/protocol.md): the ticket is worth nothing without the key. */
export function resumeTranscript(f: { userId: string; deviceId: string; version: number; clientTimeMs: bigint; instance: string; nonce: Uint8Array; ticket: Uint8Array }): Uint8Array {
  const out: number[] = [];
  const u32 = (n: number) => out.push((n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
  const str = (b: Uint8Array) => {
    u32(b.length);
    for (const x of b) out.push(x);
  };
  str(encodeUtf8("relay/1 device resume"));
  str(encodeUtf8(f.userId));
  str(encodeUtf8(f.deviceId));
  u32(f.version);
  const v = BigInt.asUintN(64, f.clientTimeMs);
  for (let i = 7; i >= 0; i--) out.push(Number((v >> BigInt(i * 8)) & 255n));
  str(encodeUtf8(f.instance));
  str(f.nonce);
  str(f.ticket);
  return new Uint8Array(out);
}

/** What a device keeps from a session to resume the next one. */
export interface Resume {
  ticket: Uint8Array;
  /** The edge's clock offset learnt then: a resume proof is stamped in the edge's time. */
  clockOffsetMs: number;
}

function frame(kind: MessageInitShape<typeof FrameSchema>["kind"]): Uint8Array {
  return toBinary(FrameSchema, create(FrameSchema, { kind }));
}

interface Pending {
  sentAt: number;
  resolve: (ms: number) => void;
  reject: (e: Error) => void;
}

export class Session {
  /** Resume ticket of this session, for the next one. */
  ticket: Uint8Array = new Uint8Array(0);
  resumed = false;
  sessionId = "";
  /** How far the edge's clock is ahead, in ms. */
  clockOffsetMs = 0;
  /** Why the session ended (null: it has not, or ended without a Close frame). */
  closeReason: RelayError | null = null;
  /** Called with every event delivered to this device. */
  onEvent: (ev: Delivered) => void = () => {};
  /** Resolves when the connection is gone. */
  readonly ended: Promise<void>;

  private ws!: WebSocket;
  private pending = new Map<string, Pending>();
  private seq = BigInt(Date.now()) * 1000n;
  private idPrefix = randomHex(6);
  private nextId = 0;
  private open = false;
  private ping = 0 as unknown as ReturnType<typeof setInterval>;
  private endedResolve!: () => void;

  private constructor(private readonly dev: DeviceIdentity) {
    this.ended = new Promise((r) => (this.endedResolve = r));
  }

  /** Connects and shakes hands; resolves on the Welcome. The metrics
   * count every attempt. */
  static connect(url: string, dev: DeviceIdentity, resume?: Resume, timeoutMs = 10_000): Promise<Session> {
    const s = new Session(dev);
    const started = Date.now();
    return s.handshake(url, resume, timeoutMs).then(
      () => {
        handshakeTime.add(Date.now() - started);
        handshakeFailed.add(false);
        sessionResumed.add(s.resumed);
        return s;
      },
      (e: unknown) => {
        handshakeFailed.add(true);
        throw e;
      },
    );
  }

  /** This session's resume state, for the next one. */
  resume(): Resume {
    return { ticket: this.ticket, clockOffsetMs: this.clockOffsetMs };
  }

  private handshake(url: string, resume: Resume | undefined, timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      let done = false;
      const finish = (e?: Error) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (e) {
          this.ws.close();
          reject(e);
        } else {
          resolve();
        }
      };
      const timer = setTimeout(() => finish(new Error(`no Welcome within ${timeoutMs} ms`)), timeoutMs);
      // A resume proves the key too (a ticket alone resumes nothing),
      // stamped in the edge's time as far as the last session learnt it.
      const ticket = resume?.ticket ?? new Uint8Array(0);
      const hello = {
        userId: this.dev.userId,
        deviceId: this.dev.deviceId,
        protocolVersion: PROTOCOL_VERSION,
        clientTimeMs: BigInt(Math.round(Date.now() + (resume?.clockOffsetMs ?? 0))),
        resumeTicket: ticket,
        instance: randomHex(8),
        resumeNonce: new Uint8Array(0) as Uint8Array,
        resumeProof: new Uint8Array(0) as Uint8Array,
        minRevision: this.dev.minRevision ?? 0n,
      };
      if (ticket.length > 0) {
        hello.resumeNonce = new Uint8Array(randomBytes(16));
        hello.resumeProof = sign(resumeTranscript({ ...hello, version: hello.protocolVersion, nonce: hello.resumeNonce, ticket }), this.dev.secret);
      }
      const sentAt = Date.now();
      this.ws = new WebSocket(url);
      this.ws.binaryType = "arraybuffer";
      this.ws.onopen = () => {
        this.open = true;
        this.ws.send(frame({ case: "hello", value: hello }));
      };
      this.ws.onerror = (e) => finish(new Error(`websocket: ${e?.error ?? "error"}`));
      this.ws.onclose = () => {
        this.open = false;
        clearInterval(this.ping);
        const why = this.closeReason ?? new Error("the connection closed");
        finish(why);
        for (const p of this.pending.values()) p.reject(why);
        this.pending.clear();
        this.endedResolve();
      };
      this.ws.onmessage = (m) => {
        let f: Frame;
        try {
          f = fromBinary(FrameSchema, new Uint8Array(m!.data as ArrayBuffer));
        } catch (e) {
          finish(new Error(`undecodable frame: ${e}`));
          return;
        }
        if (done) {
          this.serve(f, hello);
          return;
        }
        switch (f.kind.case) {
          case "challenge":
            this.answer(hello, f.kind.value);
            break;
          case "welcome": {
            const w = f.kind.value;
            this.clockOffsetMs = Number(w.serverTimeMs) + (Date.now() - sentAt) / 2 - Date.now();
            this.ticket = w.resumeTicket;
            this.resumed = w.resumed;
            this.sessionId = w.sessionId;
            this.ping = setInterval(() => this.send1(frame({ case: "ping", value: { nonce: 1n } })), PING_EVERY_MS);
            finish();
            break;
          }
          case "close":
            this.closeReason = new RelayError(f.kind.value.code, f.kind.value.message);
            finish(this.closeReason);
            break;
          default:
            finish(new Error(`unexpected ${f.kind.case} in the handshake`));
        }
      };
    });
  }

  private answer(hello: { userId: string; deviceId: string; protocolVersion: number; clientTimeMs: bigint }, ch: { nonce: Uint8Array; serverTimeMs: bigint; edgeId: string }): void {
    const sig = sign(transcript({ ...hello, version: hello.protocolVersion, edgeId: ch.edgeId, nonce: ch.nonce, serverTimeMs: ch.serverTimeMs }), this.dev.secret);
    this.send1(frame({ case: "authenticate", value: { signature: sig } }));
  }

  private send1(body: Uint8Array): void {
    if (this.open) this.ws.send(body);
  }

  private serve(f: Frame, hello: { userId: string; deviceId: string; protocolVersion: number; clientTimeMs: bigint }): void {
    switch (f.kind.case) {
      case "deliver": {
        const d = f.kind.value;
        if (d.event) {
          eventsReceived.add(1);
          this.onEvent({ id: d.event.id, sender: d.event.senderDeviceId, payload: d.event.payload });
        }
        if (d.deliveryId) this.send1(frame({ case: "received", value: { deliveryIds: [d.deliveryId] } }));
        break;
      }
      case "ack": {
        const p = this.pending.get(f.kind.value.eventId);
        if (p) {
          this.pending.delete(f.kind.value.eventId);
          p.resolve(Date.now() - p.sentAt);
        }
        break;
      }
      case "reject": {
        const r = f.kind.value;
        const p = this.pending.get(r.eventId);
        if (p) {
          this.pending.delete(r.eventId);
          p.reject(new RelayError(r.code, r.message));
        }
        break;
      }
      case "ticket":
        this.ticket = f.kind.value.resumeTicket;
        break;
      case "challenge": // re-authentication at the maximum session age
        this.answer(hello, f.kind.value);
        break;
      case "ping":
        this.send1(frame({ case: "pong", value: { nonce: f.kind.value.nonce } }));
        break;
      case "close":
        this.closeReason = new RelayError(f.kind.value.code, f.kind.value.message);
        break;
      default:
        break; // presence, pong, cancel
    }
  }

  /** Sends a durable event; resolves with its ack latency (ms) and
   * records it, rejects when it is refused, unanswered within
   * ackTimeoutMs, or its session ends first. */
  send(targets: string[], payload: Uint8Array, ackTimeoutMs = 10_000, type = "k6"): Promise<number> {
    eventsSent.add(1);
    if (!this.open) {
      eventFailed.add(true);
      return Promise.reject(this.closeReason ?? new Error("the session is closed"));
    }
    this.seq++;
    const ev: WireEvent = create(EventSchema, {
      id: `${this.idPrefix}-${this.nextId++}`,
      targets,
      seq: this.seq,
      createdAtMs: BigInt(Math.round(Date.now() + this.clockOffsetMs)),
      ttlMs: 60_000n,
      type,
      payload,
    });
    return new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.pending.delete(ev.id)) reject(new Error(`no ack within ${ackTimeoutMs} ms`));
      }, ackTimeoutMs);
      this.pending.set(ev.id, {
        sentAt: Date.now(),
        resolve: (ms) => { clearTimeout(timer); resolve(ms); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      this.ws.send(frame({ case: "event", value: ev }));
    }).then(
      (ms) => {
        ackLatency.add(ms);
        eventFailed.add(false);
        return ms;
      },
      (e: unknown) => {
        eventFailed.add(true);
        throw e;
      },
    );
  }

  /** Says goodbye (so the edge announces the device offline at once) and closes. */
  close(): Promise<void> {
    if (this.open) {
      this.ws.send(frame({ case: "close", value: {} }));
      this.ws.close();
    }
    return this.ended;
  }

  /** Closes without a goodbye, as a device that loses its network would
   * look to the edge. */
  drop(): Promise<void> {
    if (this.open) this.ws.close();
    return this.ended;
  }
}

/** Resolves after ms (k6/timers). */
export function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Math.max(0, ms)));
}
