// The browser test's page logic: check the JS Noise against the known-answer
// vector, then connect to wss://127.0.0.1:PORT, run Noise XX in binary
// messages, register, log in, send a message to the native client named in
// the URL, and show its reply. The test reads #result over WebDriver.
//
// URL parameters: wss (the WSS port), peer (the native client's user id),
// key (the server's Noise static key, hex, which the page pins).

import { XXInitiator, Transport, concat, equal, randomSecretKey } from './noise.js';
import { Type, PROTOCOL_VERSION, encode, field, frame, Deframer } from './frames.js';

const resultElement = document.getElementById('result');
const logElement = document.getElementById('log');

function log(line) {
  logElement.textContent += `${line}\n`;
}

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function unhex(text) {
  if (text.length % 2 !== 0 || /[^0-9a-f]/i.test(text)) throw new Error(`not hex: ${text}`);
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

// Replays the XX half of src/noise/testdata/vector.txt with its fixed keys.
async function checkVector() {
  const text = await (await fetch('/vector.txt')).text();
  const v = {};
  for (const line of text.split('\n')) {
    const m = line.match(/^([a-z0-9_]+) = ([0-9a-f]+)$/);
    if (m) v[m[1]] = unhex(m[2]);
  }
  const expect = (what, got, want) => {
    if (!equal(got, want)) throw new Error(`vector: ${what} is ${hex(got)}, expected ${hex(want)}`);
  };
  const initiator = new XXInitiator(v.client_static_private, v.client_ephemeral_private);
  expect('intro and message 1', initiator.start(), concat(v.xx_intro, v.xx_message_1));
  const third = initiator.readMessage2(v.xx_message_2.subarray(2));
  expect('server static key', initiator.serverStatic, v.server_static_public);
  expect('message 3', third, v.xx_message_3);
  expect('handshake hash', initiator.handshakeHash, v.xx_handshake_hash);
  const transport = initiator.transport();
  expect('first client transport message', transport.seal(v.transport_client_plaintext), v.xx_transport_client_1);
  expect('first server transport message', transport.open(v.xx_transport_server_1), v.transport_server_plaintext);
  log('known-answer vector: ok');
}

// A Noise session over one WebSocket: frames in and out.
class Session {
  static open(url, serverKey) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.binaryType = 'arraybuffer';
      const initiator = new XXInitiator(randomSecretKey());
      let pending = new Uint8Array(0);
      let session = null;
      ws.onopen = () => {
        const opening = initiator.start();
        // Message boundaries carry no meaning: the intro goes alone.
        ws.send(opening.subarray(0, 5));
        ws.send(opening.subarray(5));
      };
      ws.onmessage = (event) => {
        const bytes = new Uint8Array(event.data);
        if (session !== null) {
          session.receive(bytes);
          return;
        }
        pending = concat(pending, bytes);
        if (pending.length < 2) return;
        const length = (pending[0] << 8) | pending[1];
        if (pending.length < 2 + length) return;
        try {
          const third = initiator.readMessage2(pending.subarray(2, 2 + length));
          if (!equal(initiator.serverStatic, serverKey)) {
            throw new Error(`the server's key ${hex(initiator.serverStatic)} is not the pinned one`);
          }
          ws.send(third);
          session = new Session(ws, initiator.transport());
          log(`noise XX done, handshake hash ${hex(initiator.handshakeHash).slice(0, 16)}…`);
          resolve(session);
          const rest = pending.subarray(2 + length);
          if (rest.length > 0) session.receive(rest);
        } catch (error) {
          ws.close();
          reject(error);
        }
      };
      ws.onerror = () => reject(new Error('WebSocket error'));
      ws.onclose = (event) => {
        const why = `WebSocket closed: ${event.code} ${event.reason}`;
        log(why);
        reject(new Error(why));
        if (session !== null) session.closed(why);
      };
    });
  }

  constructor(ws, transport) {
    this.ws = ws;
    this.transport = transport;
    this.deframer = new Deframer();
    this.frames = [];
    this.waiting = null;
    this.ended = null;
  }

  receive(bytes) {
    try {
      this.deframer.push(this.transport.open(bytes));
      for (let next = this.deframer.next(); next !== null; next = this.deframer.next()) {
        this.frames.push(next);
      }
    } catch (error) {
      this.ws.close();
      this.closed(`bad bytes from the server: ${error.message}`);
    }
    this.wake();
  }

  closed(why) {
    this.ended = why;
    this.wake();
  }

  wake() {
    if (this.waiting !== null) {
      const waiting = this.waiting;
      this.waiting = null;
      waiting();
    }
  }

  send(type, body) {
    this.ws.send(this.transport.seal(frame(type, body)));
  }

  /** The next frame (an Error frame becomes an exception). */
  async next() {
    for (;;) {
      if (this.frames.length > 0) {
        const next = this.frames.shift();
        if (next.type === Type.Error) {
          const message = new TextDecoder().decode(field(next.fields, 2, new Uint8Array(0)));
          throw new Error(`Error frame, code ${field(next.fields, 1)}: ${message}`);
        }
        return next;
      }
      if (this.ended !== null) throw new Error(this.ended);
      await new Promise((resolve) => {
        this.waiting = resolve;
      });
    }
  }

  async expect(type) {
    const next = await this.next();
    if (next.type !== type) throw new Error(`expected frame type ${type}, got ${next.type}`);
    return next.fields;
  }
}

async function main() {
  const params = new URLSearchParams(location.search);
  const port = params.get('wss');
  const peer = BigInt(params.get('peer'));
  const serverKey = unhex(params.get('key'));

  await checkVector();

  const session = await Session.open(`wss://127.0.0.1:${port}/`, serverKey);
  session.send(Type.Register, encode([[1, PROTOCOL_VERSION]]));
  const registered = await session.expect(Type.Registered);
  const user = field(registered, 2);
  const device = field(registered, 3);
  log(`registered as user ${user}, device ${device}`);
  session.send(Type.Hello, encode([[1, PROTOCOL_VERSION], [2, user], [3, device]]));
  await session.expect(Type.Welcome);
  log('logged in');

  const clientMessageId = 1n;
  const text = new TextEncoder().encode('hello from the browser');
  session.send(Type.Send, encode([[1, clientMessageId], [2, peer], [3, text]]));
  let acknowledged = false;
  let reply = null;
  while (!acknowledged || reply === null) {
    const next = await session.next();
    if (next.type === Type.ServerAck && field(next.fields, 1) === clientMessageId) {
      acknowledged = true;
      log('sent ✓');
    } else if (next.type === Type.Deliver && field(next.fields, 2) === peer) {
      reply = new TextDecoder().decode(field(next.fields, 6, new Uint8Array(0)));
      session.send(Type.Ack, encode([[1, field(next.fields, 1)]]));
      log(`received: ${reply}`);
    }
  }
  resultElement.textContent = `done: ${reply}`;
}

main().catch((error) => {
  log(`failed: ${error.stack || error}`);
  resultElement.textContent = `error: ${error.message || error}`;
});
