// Noise_XX_25519_ChaChaPoly_SHA256, the initiator's side, and the sealed
// transport after it: what a browser needs to speak Switchboard's Noise
// stream (docs/protocol.md §1.1). The primitives are @noble's (audited,
// dependency-free): X25519 from @noble/curves, ChaCha20-Poly1305 from
// @noble/ciphers, SHA-256 and HMAC from @noble/hashes. The state machine
// follows the Noise specification (revision 34) §5; the test vector in
// src/noise/testdata/vector.txt checks it byte for byte (app.js).

import { x25519 } from '@noble/curves/ed25519.js';
import { chacha20poly1305 } from '@noble/ciphers/chacha.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { hmac } from '@noble/hashes/hmac.js';

const PROTOCOL_NAME = 'Noise_XX_25519_ChaChaPoly_SHA256';
/** The intro a client opens with ("SBN1X"), also the handshake's prologue. */
export const XX_INTRO = new Uint8Array([0x53, 0x42, 0x4e, 0x31, 0x58]);
const KEY_BYTES = 32;
const TAG_BYTES = 16;
/** Largest Noise message (the u16 length prefix's limit). */
export const MESSAGE_BYTES_MAX = 65535;
/** Largest plaintext in one transport message. */
export const CHUNK_BYTES_MAX = MESSAGE_BYTES_MAX - TAG_BYTES;
const EMPTY = new Uint8Array(0);

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function equal(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

/** A Noise message as it travels: its u16 big-endian length, then it. */
export function withLength(message) {
  if (message.length < 1 || message.length > MESSAGE_BYTES_MAX) {
    throw new Error(`Noise message of ${message.length} bytes`);
  }
  return concat(new Uint8Array([message.length >> 8, message.length & 0xff]), message);
}

// HKDF as Noise defines it (two outputs), over HMAC-SHA-256.
function hkdf2(chainingKey, inputKeyMaterial) {
  const tempKey = hmac(sha256, chainingKey, inputKeyMaterial);
  const out1 = hmac(sha256, tempKey, new Uint8Array([1]));
  const out2 = hmac(sha256, tempKey, concat(out1, new Uint8Array([2])));
  return [out1, out2];
}

// 96-bit nonce: 4 zero bytes, then the counter as a little-endian u64.
function nonceBytes(n) {
  const bytes = new Uint8Array(12);
  new DataView(bytes.buffer).setBigUint64(4, n, true);
  return bytes;
}

class CipherState {
  constructor(key = null) {
    this.key = key;
    this.n = 0n;
  }

  encrypt(ad, plaintext) {
    if (this.key === null) return plaintext;
    // 2^64 - 1 is reserved; a session never comes near it.
    if (this.n >= 0xffffffffffffffffn) throw new Error('nonce exhausted');
    const out = chacha20poly1305(this.key, nonceBytes(this.n), ad).encrypt(plaintext);
    this.n += 1n;
    return out;
  }

  decrypt(ad, ciphertext) {
    if (this.key === null) return ciphertext;
    if (this.n >= 0xffffffffffffffffn) throw new Error('nonce exhausted');
    // Throws when the tag does not verify: the connection must end.
    const out = chacha20poly1305(this.key, nonceBytes(this.n), ad).decrypt(ciphertext);
    this.n += 1n;
    return out;
  }
}

class SymmetricState {
  constructor() {
    const name = new TextEncoder().encode(PROTOCOL_NAME);
    // A name of at most 32 bytes is used as the hash, zero-padded.
    this.h = name.length <= 32 ? concat(name, new Uint8Array(32 - name.length)) : sha256(name);
    this.ck = this.h;
    this.cipher = new CipherState();
  }

  mixHash(data) {
    this.h = sha256(concat(this.h, data));
  }

  mixKey(inputKeyMaterial) {
    const [ck, key] = hkdf2(this.ck, inputKeyMaterial);
    this.ck = ck;
    this.cipher = new CipherState(key);
  }

  encryptAndHash(plaintext) {
    const ciphertext = this.cipher.encrypt(this.h, plaintext);
    this.mixHash(ciphertext);
    return ciphertext;
  }

  decryptAndHash(ciphertext) {
    const plaintext = this.cipher.decrypt(this.h, ciphertext);
    this.mixHash(ciphertext);
    return plaintext;
  }

  split() {
    const [k1, k2] = hkdf2(this.ck, EMPTY);
    return [new CipherState(k1), new CipherState(k2)];
  }
}

function keypair(secret) {
  return { secret, public: x25519.getPublicKey(secret) };
}

/** A fresh X25519 secret key. */
export function randomSecretKey() {
  return x25519.utils.randomSecretKey();
}

/**
 * The client's side of XX:
 *   → e            (start: the intro and message 1)
 *   ← e, ee, s, es (readMessage2, which returns message 3)
 *   → s, se
 * Client payloads are empty (the login is the first sealed frame).
 */
export class XXInitiator {
  /**
   * @param staticSecret the device's X25519 secret key (its login)
   * @param ephemeralSecret fixed only to replay the test vector; omit it
   */
  constructor(staticSecret, ephemeralSecret = randomSecretKey()) {
    this.s = keypair(staticSecret);
    this.e = keypair(ephemeralSecret);
    this.state = new SymmetricState();
    this.state.mixHash(XX_INTRO);
    this.step = 0;
  }

  /** The bytes the client opens with: the intro, then message 1. */
  start() {
    if (this.step !== 0) throw new Error('start called twice');
    this.step = 1;
    this.state.mixHash(this.e.public);
    this.state.encryptAndHash(EMPTY);
    return concat(XX_INTRO, withLength(this.e.public));
  }

  /**
   * Reads the server's message 2 (without its length) and returns message 3
   * with its length. Afterwards `serverStatic`, `serverPayload`,
   * `handshakeHash` and `transport()` are available.
   */
  readMessage2(message) {
    if (this.step !== 1) throw new Error('message 2 out of order');
    const fixed = KEY_BYTES + KEY_BYTES + TAG_BYTES + TAG_BYTES;
    if (message.length < fixed) throw new Error(`message 2 of ${message.length} bytes`);
    this.step = 2;
    const re = message.subarray(0, KEY_BYTES);
    this.state.mixHash(re);
    this.state.mixKey(x25519.getSharedSecret(this.e.secret, re));
    const rs = this.state.decryptAndHash(message.subarray(KEY_BYTES, 2 * KEY_BYTES + TAG_BYTES));
    this.state.mixKey(x25519.getSharedSecret(this.e.secret, rs));
    this.serverPayload = this.state.decryptAndHash(message.subarray(2 * KEY_BYTES + TAG_BYTES));
    this.serverStatic = rs;

    const encryptedStatic = this.state.encryptAndHash(this.s.public);
    this.state.mixKey(x25519.getSharedSecret(this.s.secret, re));
    const encryptedPayload = this.state.encryptAndHash(EMPTY);
    this.handshakeHash = this.state.h;
    [this.sending, this.receiving] = this.state.split();
    return withLength(concat(encryptedStatic, encryptedPayload));
  }

  /** The sealed stream, once message 3 is made. */
  transport() {
    if (this.step !== 2) throw new Error('the handshake is not finished');
    return new Transport(this.sending, this.receiving);
  }
}

/**
 * The sealed stream: each transport message carries one chunk of the
 * ordinary frame byte stream (frames may span chunks).
 */
export class Transport {
  constructor(sending, receiving) {
    this.sending = sending;
    this.receiving = receiving;
    this.input = EMPTY;
  }

  /** Seals `plaintext` into transport messages, each with its length. */
  seal(plaintext) {
    const out = [];
    for (let at = 0; at < plaintext.length; at += CHUNK_BYTES_MAX) {
      const chunk = plaintext.subarray(at, at + CHUNK_BYTES_MAX);
      out.push(withLength(this.sending.encrypt(EMPTY, chunk)));
    }
    return concat(...out);
  }

  /**
   * Takes bytes from the server (in any pieces) and returns the plaintext
   * of every whole transport message among them. Throws on a message that
   * does not open: the connection must end.
   */
  open(bytes) {
    this.input = concat(this.input, bytes);
    const out = [];
    for (;;) {
      if (this.input.length < 2) break;
      const length = (this.input[0] << 8) | this.input[1];
      if (length <= TAG_BYTES) throw new Error(`transport message of ${length} bytes`);
      if (this.input.length < 2 + length) break;
      out.push(this.receiving.decrypt(EMPTY, this.input.subarray(2, 2 + length)));
      this.input = this.input.slice(2 + length);
    }
    return concat(...out);
  }
}
