// Byte helpers on k6/encoding and k6/crypto (no Node or browser APIs).
import { b64decode, b64encode } from "k6/encoding";
import { randomBytes } from "k6/crypto";

export function toBase64(b: Uint8Array): string {
  return b64encode(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer, "std");
}

export function fromBase64(s: string): Uint8Array {
  return new Uint8Array(b64decode(s, "std"));
}

export function randomHex(n: number): string {
  return Array.from(new Uint8Array(randomBytes(n)), (x) => x.toString(16).padStart(2, "0")).join("");
}
