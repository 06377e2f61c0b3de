// Switchboard frames (docs/protocol.md §1, §2) for the handful of types the
// browser test uses: `u32 big-endian length | type | protobuf body`, the
// bodies encoded and decoded by hand (varints and length-delimited fields
// are all these messages have). Integers are BigInt: user ids are 64-bit.

export const Type = Object.freeze({
  Register: 0x01,
  Registered: 0x02,
  Hello: 0x03,
  Welcome: 0x04,
  Send: 0x10,
  ServerAck: 0x11,
  Deliver: 0x12,
  Ack: 0x13,
  Receipt: 0x14,
  Ping: 0x20,
  Pong: 0x21,
  Error: 0x30,
  GoAway: 0x31,
});

export const PROTOCOL_VERSION = 1n;

function varint(value) {
  let v = BigInt(value);
  if (v < 0n) throw new Error('negative varint');
  const out = [];
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v !== 0n) byte |= 0x80;
    out.push(byte);
  } while (v !== 0n);
  return out;
}

/**
 * A protobuf body from `[fieldNumber, value]` pairs: a BigInt (or number)
 * is a varint field, a Uint8Array a length-delimited one. Default values
 * (0, empty) are left out, as protobuf 3 does.
 */
export function encode(fields) {
  const out = [];
  for (const [number, value] of fields) {
    if (value instanceof Uint8Array) {
      if (value.length === 0) continue;
      out.push(...varint((number << 3) | 2), ...varint(value.length), ...value);
    } else {
      if (BigInt(value) === 0n) continue;
      out.push(...varint(number << 3), ...varint(value));
    }
  }
  return new Uint8Array(out);
}

/**
 * Decodes a protobuf body into a Map from field number to the list of its
 * values (BigInt for varints, Uint8Array for length-delimited fields).
 */
export function decode(body) {
  const fields = new Map();
  let at = 0;
  const readVarint = () => {
    let value = 0n;
    for (let shift = 0n; ; shift += 7n) {
      if (at >= body.length || shift > 63n) throw new Error('bad varint');
      const byte = body[at++];
      value |= BigInt(byte & 0x7f) << shift;
      if ((byte & 0x80) === 0) return value;
    }
  };
  while (at < body.length) {
    const key = readVarint();
    const number = Number(key >> 3n);
    const wire = Number(key & 7n);
    let value;
    if (wire === 0) {
      value = readVarint();
    } else if (wire === 2) {
      const length = Number(readVarint());
      if (at + length > body.length) throw new Error('truncated field');
      value = body.slice(at, at + length);
      at += length;
    } else if (wire === 1) {
      at += 8;
      continue;
    } else if (wire === 5) {
      at += 4;
      continue;
    } else {
      throw new Error(`wire type ${wire}`);
    }
    if (!fields.has(number)) fields.set(number, []);
    fields.get(number).push(value);
  }
  return fields;
}

/** The first value of field `number`, or the protobuf default. */
export function field(fields, number, fallback = 0n) {
  const values = fields.get(number);
  return values === undefined ? fallback : values[0];
}

/** A whole frame: length, type, body. */
export function frame(type, body) {
  const out = new Uint8Array(5 + body.length);
  new DataView(out.buffer).setUint32(0, 1 + body.length, false);
  out[4] = type;
  out.set(body, 5);
  return out;
}

/** Splits a byte stream into frames; checks each length before waiting. */
export class Deframer {
  constructor(frameBytesMax = 1 << 20) {
    this.frameBytesMax = frameBytesMax;
    this.buffer = new Uint8Array(0);
  }

  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer, 0);
    joined.set(bytes, this.buffer.length);
    this.buffer = joined;
  }

  /** The next `{ type, fields }`, or null until more bytes arrive. */
  next() {
    if (this.buffer.length < 4) return null;
    const length = new DataView(this.buffer.buffer, this.buffer.byteOffset).getUint32(0, false);
    if (length === 0 || length > this.frameBytesMax) throw new Error(`frame length ${length}`);
    if (this.buffer.length < 4 + length) return null;
    const type = this.buffer[4];
    const fields = decode(this.buffer.slice(5, 4 + length));
    this.buffer = this.buffer.slice(4 + length);
    return { type, fields };
  }
}
