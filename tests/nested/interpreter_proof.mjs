// Issue 10's proof, the JS half: the seed's persistence flow written with
// runCode through the real JS SDK (novita-sandbox/code-interpreter) against a
// Linux code-interpreter sandbox that tests/nested/interpreter_proof.py made
// and already paused and resumed once (x = 41 lives in its kernel):
//   Sandbox.connect -> runCode('y = x * 2') -> betaPause -> Sandbox.connect
//   -> runCode('x + y') is 123 -> a bash context answers.
// Reached as a user's SDK reaches it: https://49999-{id}.{domain}, the CA
// trusted through NODE_EXTRA_CA_CERTS; the one stand-in is DNS
// (tests/interpreter/sdk/dns-standin.js, preloaded with --require).
//   node --require dns-standin.js interpreter_proof.mjs SANDBOX_ID
// Prints "PROOF: js ..." lines and, last, "JS-PROOF-OK {json}".
import { Sandbox } from "novita-sandbox/code-interpreter";

const id = process.argv[2];
if (!id) throw new Error("usage: interpreter_proof.mjs SANDBOX_ID");
const rt = 1000 * Number(process.env.STASIS_PROOF_REQUEST_TIMEOUT || "900");
const opts = { requestTimeoutMs: rt, timeoutMs: 3_600_000 };
const domain = process.env.STASIS_PROOF_DOMAIN || "sandbox.test";
const secs = (t) => ((performance.now() - t) / 1000).toFixed(2);

async function run(sbx, code, language) {
  const ex = await sbx.runCode(code, { language, timeoutMs: rt, requestTimeoutMs: rt });
  if (ex.error) throw new Error(`${code} raised ${ex.error.name}: ${ex.error.value}\n${ex.error.traceback}`);
  return ex;
}

let t = performance.now();
const sbx = await Sandbox.connect(id, opts);
if (sbx.getHost(49999) !== `49999-${id}.${domain}`) throw new Error(`getHost: ${sbx.getHost(49999)}`);
const x = (await run(sbx, "x")).text;
if (x !== "41") throw new Error(`x in the resumed kernel is ${x}, not 41`);
await run(sbx, "y = x * 2");
console.log(`PROOF: js connect -> runCode('x') -> ${x}, then y = x * 2 (${secs(t)} s)`);

t = performance.now();
await sbx.betaPause(opts);
const pauseS = secs(t);
const info = await Sandbox.getInfo(id, opts);
if (info.state !== "paused") throw new Error(`after betaPause the state is ${info.state}`);

t = performance.now();
const again = await Sandbox.connect(id, opts);
const connectS = secs(t);
const sum = (await run(again, "x + y")).text;
const nextS = secs(t);
if (sum !== "123") throw new Error(`x + y after the JS pause/resume is ${sum}, not 123`);
const bash = await run(again, "echo $((40+2))", "bash");
if (bash.logs.stdout.join("") !== "42\n") throw new Error(`bash: ${JSON.stringify(bash.logs)}`);
console.log(`PROOF: js betaPause ${pauseS} s (listed paused), connect ${connectS} s, ` +
  `runCode('x + y') -> ${sum} ${nextS} s after connect began; a bash context answers`);
console.log("JS-PROOF-OK " + JSON.stringify({ pause_s: Number(pauseS), connect_s: Number(connectS), next_s: Number(nextS) }));
