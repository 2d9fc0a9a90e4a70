// Globals every k6 script has that @types/k6 leaves to the DOM typings
// (which would also declare globals k6 does not have).
declare const console: {
  log(...args: unknown[]): void;
  info(...args: unknown[]): void;
  warn(...args: unknown[]): void;
  error(...args: unknown[]): void;
  debug(...args: unknown[]): void;
};
