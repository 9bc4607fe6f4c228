// keyhaven web UI: a plain client of the JSON-RPC 2.0 API at /api/current.
// No framework, no inline script/style (strict CSP); the session lives only in
// this page's memory (the authenticated WebSocket) and ends on logout, on page
// unload, when the server closes the socket, and when the session token expires
// (the account's session timeout without activity).
import { viewAudit } from './audit.js';
import { viewCluster } from './cluster.js';
import { viewConfig } from './config.js';
import { updateAttribute, viewBackup } from './backup.js';
import { $, busy, formModal, h, toast, toastError } from './dom.js';
import { errText, rpc } from './rpc.js';
import { viewRsync } from './rsync.js';
import { fmtSeconds, shell } from './shell.js';
import { viewSsh } from './ssh.js';
import { viewUsers } from './users.js';

// ---------------------------------------------------------------- routing and login
export const ROUTES = {
  '#/credentials/backup': ['backup', viewBackup],
  '#/credentials/users': ['users', viewUsers],
  '#/data-protection/rsync': ['rsync', viewRsync],
  '#/system/services/ssh': ['ssh', viewSsh],
  '#/system/general/config': ['config', viewConfig],
  '#/system/cluster': ['cluster', viewCluster],
  '#/audit': ['audit', viewAudit],
};

export let routeSeq = 0;
export async function route() {
  if (!rpc.user) return;
  const [nav, fn] = ROUTES[location.hash] || ROUTES['#/credentials/backup'];
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === nav);
    if (a.dataset.nav === nav) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const seq = ++routeSeq;
  const view = h('div', { id: `view-${nav}` }, h('p', { class: 'empty' }, 'Loading…'));
  $('view').replaceChildren(view);
  try {
    await fn(view);
  } catch (e) {
    if (seq === routeSeq) view.replaceChildren(h('p', { class: 'error', role: 'alert' }, `Could not load this page: ${errText(e)}`));
  }
}

export function showLogin(message) {
  $('topbar').hidden = true;
  $('view').replaceChildren();
  $('login').hidden = false;
  $('login-creds').hidden = false;
  $('login-otp-box').hidden = true;
  $('login-otp').value = '';
  $('login-password').value = '';
  $('login-error').textContent = message || '';
  $('login-submit').textContent = 'Log in';
  $('login-username').focus();
}

// Nothing of the session stays in the page: dialogs may hold a token or a
// half-typed password.
export function clearSessionUi() {
  const dlg = $('modal');
  if (dlg.open) dlg.close();
  dlg.replaceChildren();
  $('view').replaceChildren();
}

export function sessionEnded(message) {
  rpc.user = null;
  idle.stop();
  clearSessionUi();
  rpc.close();
  showLogin(message);
}

export async function loggedIn() {
  const me = await rpc.call('auth.me');
  await startTokenSession(sessionLifetime(me));
  rpc.user = me;
  rpc.methods = await rpc.call('core.get_methods');
  $('login').hidden = true;
  $('topbar').hidden = false;
  $('whoami').textContent = `Logged in as ${rpc.user.pw_name || rpc.user.username || ''}`;
  idle.start();
  if (!ROUTES[location.hash]) location.hash = '#/credentials/backup';
  await route();
  $('main').focus();
}

// ---------------------------------------------------------------- session lifetime
// After the password (and OTP) login the page swaps its connection to a
// single-use token session: the server ends a token session once it has been
// idle for the token's lifetime, like TrueNAS's UI token. The lifetime is the
// account's `preferences.lifetime` attribute (TrueNAS's "Session Timeout").
export const DEFAULT_LIFETIME = 300;
export const MIN_LIFETIME = 10;
export const MAX_LIFETIME = 86400;

export function sessionLifetime(me) {
  const v = me && me.attributes && me.attributes.preferences && me.attributes.preferences.lifetime;
  return Number.isInteger(v) && v >= MIN_LIFETIME && v <= MAX_LIFETIME ? v : DEFAULT_LIFETIME;
}

export const expiredMessage = () => `Your session expired after ${fmtSeconds(rpc.lifetime)} without activity. Log in again.`;

export async function startTokenSession(lifetime) {
  const token = await rpc.call('auth.generate_token', lifetime, {}, true, true);
  if (!(await rpc.call('auth.login_with_token', token))) throw new Error('The server refused the session token. Log in again.');
  rpc.lifetime = lifetime;
}

// Activity (keys, pointer, wheel) keeps the session alive: a cheap call when
// the last one is a third of the lifetime old. Idle past the lifetime, the
// page asks the server, which ends the session and answers ENOTAUTHENTICATED.
export const idle = {
  timer: null, probing: false,
  start() {
    this.stop();
    this.timer = setInterval(() => this.tick(), 500);
    for (const ev of ['keydown', 'pointerdown', 'mousemove', 'wheel', 'touchstart']) document.addEventListener(ev, idle.onActivity, { capture: true, passive: true });
  },
  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    for (const ev of ['keydown', 'pointerdown', 'mousemove', 'wheel', 'touchstart']) document.removeEventListener(ev, idle.onActivity, { capture: true });
    this.warn(null);
  },
  remaining() { return rpc.lastCall + rpc.lifetime * 1000 - Date.now(); },
  onActivity() {
    if (!rpc.user || idle.probing) return;
    if (Date.now() - rpc.lastCall > (rpc.lifetime * 1000) / 3) idle.probe();
  },
  async probe() {
    this.probing = true;
    try { await rpc.call('auth.me'); this.warn(null); } catch (e) { /* ENOTAUTHENTICATED already ended the session */ } finally { this.probing = false; }
  },
  tick() {
    if (!rpc.user) { this.stop(); return; }
    if (rpc.pending.size) { this.warn(null); return; }
    const left = this.remaining();
    // A second of grace: the server's clock for this session starts when our call arrives.
    if (left < -1000) { if (!this.probing) this.probe(); return; }
    // A quarter of the lifetime (at most a minute), but never less than half of a short one.
    const warnAt = Math.min(60, Math.max(rpc.lifetime / 4, Math.min(10, rpc.lifetime / 2))) * 1000;
    this.warn(left <= warnAt ? Math.max(0, Math.ceil(left / 1000)) : null);
  },
  warn(secondsLeft) {
    const box = $('session-warning');
    if (!box) return;
    if (secondsLeft === null) {
      if (!box.hidden) { box.hidden = true; if (box.hidePopover && box.matches(':popover-open')) box.hidePopover(); }
      return;
    }
    // The countdown is hidden from screen readers: the alert is announced once, not every second.
    const left = `(${fmtSeconds(secondsLeft)} left)`;
    if (box.hidden) {
      box.replaceChildren('Your session is about to end for lack of activity ', h('span', { id: 'session-left', 'aria-hidden': 'true' }, left),
        '. Press a key or move the mouse to stay logged in.');
      box.hidden = false;
      if (box.showPopover) box.showPopover();
    } else {
      $('session-left').textContent = left;
    }
  },
};

export function preferencesForm() {
  formModal({
    title: 'Preferences',
    fields: [
      { name: 'lifetime', label: 'Session timeout (seconds)', type: 'number', attrs: { min: MIN_LIFETIME, max: MAX_LIFETIME, step: 1, required: true },
        help: `Log out after this long without activity (TrueNAS: Session Timeout). ${MIN_LIFETIME} to ${MAX_LIFETIME} seconds; applies now.` },
    ],
    values: { lifetime: rpc.lifetime },
    onSubmit: async (v, f, m) => {
      if (!Number.isInteger(v.lifetime) || v.lifetime < MIN_LIFETIME || v.lifetime > MAX_LIFETIME) {
        f.fieldError('lifetime', `Enter a whole number of seconds from ${MIN_LIFETIME} to ${MAX_LIFETIME}.`);
        f.ctl.lifetime.focus();
        return;
      }
      await updateAttribute('preferences', (p) => { p.lifetime = v.lifetime; });
      await startTokenSession(v.lifetime);
      m.close();
      toast(`Session timeout set to ${fmtSeconds(v.lifetime)}`);
    },
  });
}

export let otpStage = false;
export async function onLogin(ev) {
  ev.preventDefault();
  const err = $('login-error');
  err.textContent = '';
  const submit = $('login-submit');
  submit.disabled = true;
  try {
    let r;
    if (!otpStage) {
      if (!rpc.ws) await rpc.connect();
      r = await rpc.call('auth.login_ex', { mechanism: 'PASSWORD_PLAIN', username: $('login-username').value, password: $('login-password').value });
    } else {
      r = await rpc.call('auth.login_ex', { mechanism: 'OTP_TOKEN', otp_token: $('login-otp').value.trim() });
    }
    if (r.response_type === 'SUCCESS') {
      otpStage = false;
      await loggedIn();
    } else if (r.response_type === 'OTP_REQUIRED') {
      if (otpStage) err.textContent = 'That one-time password was not accepted. Try again.';
      otpStage = true;
      $('login-creds').hidden = true;
      $('login-otp-box').hidden = false;
      $('login-otp').focus();
      submit.textContent = 'Verify';
    } else {
      const msg = { AUTH_ERR: 'Invalid username, password or one-time password.', DENIED: 'Login refused (too many failures or no access). Try again later.', EXPIRED: 'The credentials have expired.' }[r.response_type] || `Login failed: ${r.response_type}`;
      if (otpStage) { otpStage = false; rpc.close(); showLogin(msg); } else err.textContent = msg;
    }
  } catch (e) {
    // Start over on a fresh connection: never leave a half-logged-in socket behind.
    otpStage = false;
    rpc.close();
    showLogin(errText(e));
  } finally {
    submit.disabled = false;
  }
}

export async function logout() {
  idle.stop();
  try { if (rpc.ws) await rpc.call('auth.logout'); } catch (e) { toastError(e); }
  rpc.user = null;
  clearSessionUi();
  rpc.close();
  showLogin('You have logged out.');
}

Object.assign(shell, { route, sessionEnded, expiredMessage, toastError });

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', onLogin);
  $('logout').addEventListener('click', logout);
  $('preferences').addEventListener('click', () => preferencesForm());
  window.addEventListener('hashchange', () => route());
  $('busy').addEventListener('cancel', (ev) => ev.preventDefault());
  showLogin('');
});
