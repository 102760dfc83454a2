// Node.js cluster peer for the bench, plain `http`: a primary forks WORKERS workers, restarts
// any that exits, rolls them one at a time on SIGHUP (new one listening before the old one
// disconnects), and stops on SIGTERM/SIGINT. Apps: APP=hello (short body naming the pid) or
// APP=cpu (a fixed ~2 ms of arithmetic; JS_CPU_ITERATIONS=330000 is ~2 ms of warmed-up JIT here, as
// the Python loop of bench/apps/work.py is).
// Usage: PORT=8000 WORKERS=2 APP=hello node bench/node/server.js
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const PORT = Number(process.env.PORT || 8000);
const HOST = process.env.HOST || '127.0.0.1';
const WORKERS = Number(process.env.WORKERS || 2);
const APP = process.env.APP || 'hello';
const JS_CPU_ITERATIONS = Number(process.env.JS_CPU_ITERATIONS || 330000);

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
