// Node.js cluster peer for the bench, plain `http`: a primary forks WORKERS workers, restarts
// any that exits, rolls them one at a time on SIGHUP (new one listening before the old one
// disconnects), and stops on SIGTERM/SIGINT. Apps: APP=hello (short body naming the pid) or
// APP=cpu (a fixed amount of arithmetic per request, the same loop as bench/apps/work.py).
// How many iterations: JS_CPU_ITERATIONS if set; else, when JS_CPU_TARGET_MS is set (the harness
// passes the time the Python loop takes on this machine), each worker warms the loop up at start
// (the JIT changes its speed by 3x over the first seconds) and picks the count that takes that
// long; else 330000.
// Usage: PORT=8000 WORKERS=2 APP=hello node bench/node/server.js
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const PORT = Number(process.env.PORT || 8000);
const HOST = process.env.HOST || '127.0.0.1';
const WORKERS = Number(process.env.WORKERS || 2);
const APP = process.env.APP || 'hello';
let JS_CPU_ITERATIONS = Number(process.env.JS_CPU_ITERATIONS || 330000);
const JS_CPU_TARGET_MS = Number(process.env.JS_CPU_TARGET_MS || 0);

function cpuWork(n) {
  let x = 0;
  for (let i = 0; i < n; i++) x = (x * 31 + i) >>> 0;
  return x;
}

if (cluster.isPrimary) {
  let stopping = false;
  let rolling = false;
  const forkOne = () => cluster.fork();
  cluster.on('exit', (worker) => {
    if (!stopping && !worker.exitedAfterDisconnect) forkOne();
    if (stopping && Object.keys(cluster.workers).length === 0) process.exit(0);
  });
  const waitListening = (w) => new Promise((resolve) => w.once('listening', resolve));
  const waitExit = (w) => new Promise((resolve) => w.once('exit', resolve));
  async function roll() {
    if (rolling) return;
    rolling = true;
    for (const old of Object.values(cluster.workers)) {
      if (stopping) break;
      const fresh = forkOne();
      await waitListening(fresh);
      const gone = waitExit(old);
      old.disconnect();  // stop accepting, finish open connections, exit
      const timer = setTimeout(() => old.kill('SIGKILL'), 30000);
      await gone;
      clearTimeout(timer);
    }
    rolling = false;
    console.log('reloaded');
  }
  process.on('SIGHUP', () => { roll(); });
  const stop = () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.kill('SIGTERM');
    setTimeout(() => process.exit(0), 10000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  let listening = 0;
  cluster.on('listening', () => {
    listening += 1;
    if (listening === WORKERS) console.log(`ready ${HOST}:${PORT} workers=${WORKERS} app=${APP}`);
  });
  for (let i = 0; i < WORKERS; i++) forkOne();
} else {
  if (APP === 'cpu' && !process.env.JS_CPU_ITERATIONS && JS_CPU_TARGET_MS > 0) {
    // Warm up (bounded: at most ~1 s), then time the loop and scale the count to the target.
    const warmUntil = Date.now() + 1000;
    for (let k = 0; k < 400 && Date.now() < warmUntil; k++) cpuWork(330000);
    const t0 = process.hrtime.bigint();
    for (let k = 0; k < 50; k++) cpuWork(330000);
    const msPer = Number(process.hrtime.bigint() - t0) / 1e6 / 50;
    JS_CPU_ITERATIONS = Math.max(1000, Math.round(330000 * JS_CPU_TARGET_MS / msPer));
    console.log(`cpu loop: ${JS_CPU_ITERATIONS} iterations for ${JS_CPU_TARGET_MS} ms`);
  }
  const server = http.createServer((req, res) => {
    let body;
    if (APP === 'cpu') body = `cpu ${cpuWork(JS_CPU_ITERATIONS)} from pid=${process.pid}\n`;
    else body = `hello from pid=${process.pid}\n`;
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
  });
  server.keepAliveTimeout = 5000;
  server.listen(PORT, HOST);
  process.on('SIGTERM', () => server.close(() => process.exit(0)));
}
