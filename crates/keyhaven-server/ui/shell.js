// What the shell (app.js) does for the modules below it: refresh the current
// screen, end the session, report an error. app.js fills these in at start, so
// no module imports app.js and the modules form no import cycle.

export const shell = {
  route: async () => {},
  sessionEnded: (_message) => {},
  expiredMessage: () => 'Your session expired. Log in again.',
  toastError: (_e) => {},
};

// Re-render the current screen.
export const route = () => shell.route();

export function fmtSeconds(s) {
  if (s >= 120 && s % 60 === 0) return `${s / 60} minutes`;
  return s === 1 ? '1 second' : `${s} seconds`;
}
