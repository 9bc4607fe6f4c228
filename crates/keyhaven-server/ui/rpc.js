// The JSON-RPC 2.0 client of /api/current and error texts.

import { shell } from './shell.js';

// ---------------------------------------------------------------- RPC client
export class RpcError extends Error {
  constructor(err) {
    const d = err.data || {};
    super(d.reason || err.message || 'Error');
    this.code = err.code;
    this.data = d;
    this.errname = d.errname || '';
    this.extra = Array.isArray(d.extra) ? d.extra : [];
  }
}

export const rpc = {
  ws: null, seq: 0, pending: new Map(), methods: null, user: null,
  // Session lifetime in seconds (the token's ttl) and when the server last saw a call from us.
  lifetime: 0, lastCall: 0,
  connect() {
    return new Promise((resolve, reject) => {
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const ws = new WebSocket(`${proto}//${location.host}/api/current`);
      ws.onopen = () => { this.ws = ws; resolve(); };
      ws.onerror = () => reject(new Error('Cannot connect to the keyhaven API'));
      ws.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (e) { shell.toastError(`Bad message from server: ${e}`); return; }
        const p = this.pending.get(msg.id);
        if (!p) return;
        this.pending.delete(msg.id);
        // The server counts a finished call as activity too.
        this.lastCall = Date.now();
        if (msg.error) p.reject(new RpcError(msg.error)); else p.resolve(msg.result);
      };
      ws.onclose = () => {
        const wasOpen = this.ws === ws;
        if (wasOpen) this.ws = null;
        for (const p of this.pending.values()) p.reject(new Error('Connection to the server closed'));
        this.pending.clear();
        if (wasOpen && this.user) shell.sessionEnded('The connection to keyhaven closed (server restarted or network lost). Please log in again.');
      };
    });
  },
  call(method, ...params) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return Promise.reject(new Error('Not connected'));
    const id = ++this.seq;
    this.lastCall = Date.now();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
    }).catch((e) => {
      if (e instanceof RpcError && e.errname === 'ENOTAUTHENTICATED' && this.user) {
        shell.sessionEnded(/Session expired/.test(e.message) ? shell.expiredMessage() : 'Your session has ended. Please log in again.');
      }
      throw e;
    });
  },
  has(method) { return !!(this.methods && Object.prototype.hasOwnProperty.call(this.methods, method)); },
  close() { const ws = this.ws; this.ws = null; this.user = null; if (ws) ws.close(); },
};

export function errText(e) {
  if (e instanceof RpcError) {
    const lines = e.extra.length ? e.extra.map(([a, m]) => (a ? `${a}: ${m}` : m)) : [e.message];
    return lines.join('\n');
  }
  return e && e.message ? e.message : String(e);
}
