// The device's Ed25519 proof. k6's WebCrypto (k6 v2.3) signs with ECDSA,
// HMAC and RSA only, so the suite bundles @noble/ed25519 (audited,
// pure JavaScript, pinned in package-lock.json) with SHA-512 from
// k6/crypto and keys from k6/crypto's randomBytes.
import * as ed from "@noble/ed25519";
import { randomBytes, sha512 } from "k6/crypto";

ed.hashes.sha512 = (m: Uint8Array) => new Uint8Array(sha512(copy(m), "binary"));

// The first signature builds noble's table of base-point multiples
// (about 0.7 s of JavaScript in k6's engine, then about 8 ms a
// signature): build it when the VU starts, not inside the first
// handshake it would inflate.
ed.getPublicKey(new Uint8Array(32).fill(7));

function copy(b: Uint8Array): ArrayBuffer {
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
}

export interface DeviceKey {
  /** The 32-byte seed (RFC 8032's private key). */
  secret: Uint8Array;
  /** The 32-byte public key the control plane registers. */
  publicKey: Uint8Array;
}

export function newDeviceKey(): DeviceKey {
  const secret = new Uint8Array(randomBytes(32));
  return { secret, publicKey: ed.getPublicKey(secret) };
}

export function sign(message: Uint8Array, secret: Uint8Array): Uint8Array {
  return ed.sign(message, secret);
}

export function verify(signature: Uint8Array, message: Uint8Array, publicKey: Uint8Array): boolean {
  return ed.verify(signature, message, publicKey);
}
